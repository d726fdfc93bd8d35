"""Stopping a run cleanly when the machine is taken away.

SLURM ends a job (time limit, preemption, ``scancel``) with SIGTERM and kills it after its ``KillWait``
grace; ``sbatch --signal=B:USR1@120`` sends SIGUSR1 two minutes before a time limit; Kubernetes sends
SIGTERM and kills after ``terminationGracePeriodSeconds``. While a run trains, SIGTERM, SIGUSR1 and a first
Ctrl-C (SIGINT) ask it to stop at the next step boundary: every rank agrees (one all-reduce per step), the
run saves a checkpoint and ends with one line and the exit code :data:`EXIT_REQUEUE` (SIGINT: 130). A second
Ctrl-C stops at once. A requeued job runs the same command again and ``resume=auto`` continues exactly.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from mgfm.errors import Interrupted

log = logging.getLogger(__name__)

#: Exit code of a run stopped by SIGTERM / SIGUSR1 after its checkpoint: sysexits.h's EX_TEMPFAIL ("a
#: temporary failure; retry later"), what a job script tests before it requeues.
EXIT_REQUEUE = 75
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's code for Ctrl-C
SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1", signal.SIGINT: "SIGINT"}


class Stopped(Interrupted):
    """A run that stopped on a signal after saving a checkpoint; ``exit_code`` is what the process returns."""

    def __init__(self, signame: str, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by {signame} at step {step}; checkpoint {checkpoint} saved: rerun the same "
                         f"command to resume")
        self.exit_code = EXIT_INTERRUPTED if signame == "SIGINT" else EXIT_REQUEUE


class StopRequests:
    """While entered (in the main thread), SIGTERM, SIGUSR1 and SIGINT are requests to stop at the next step
    boundary (:meth:`agreed`); a second SIGINT raises ``KeyboardInterrupt`` at once. The previous handlers
    come back on exit. DataLoader workers started inside inherit the handlers and ignore the requests: the
    main process stops them."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = SIGNALS[signum]
        if name == "SIGINT" and self.requested == "SIGINT":
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = name
            log.warning("%s received: stopping after this step with a checkpoint%s", name,
                        " (Ctrl-C again to stop at once)" if name == "SIGINT" else "")

    def agreed(self, device: torch.device | str = "cpu") -> str | None:
        """The signal that asks every rank to stop now, or None (collective in a process group of several:
        a signal that reached one rank stops them all)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        names = list(SIGNALS.values())
        code = torch.tensor([0 if self.requested is None else 1 + names.index(self.requested)], device=device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        return None if int(code) == 0 else names[int(code) - 1]
