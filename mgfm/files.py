"""Files users hand us and files we write for them.

Reading: the text files users write (annotation CSVs, recipes) as UTF-8 with or without a byte-order
mark, a decode error naming the file, the line and the byte instead of a bare codec traceback.
Writing: a full disk, a quota or a read-only / forbidden folder becomes one line naming the path and the
cause (:class:`StorageError`), since what was written before stays intact (every writer is atomic); a run
folder is claimed by one writer at a time (:class:`FolderLock`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
from pathlib import Path

from mgfm.errors import MgfmError

log = logging.getLogger(__name__)


class TextFileError(MgfmError, ValueError):
    """A file that cannot be read as UTF-8 text: ``path``, ``line`` (1-based, or None) and ``problem``."""

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        super().__init__(f"{path}{f':{line}' if line else ''}: {problem}")
        self.path, self.line, self.problem = str(path), line, problem


def read_text(path: str | Path) -> str:
    """The text of ``path`` decoded as UTF-8; a leading byte-order mark (Excel's "CSV UTF-8") is dropped.

    Raises :class:`TextFileError` for an unreadable file or bytes that are not UTF-8 (naming the line and
    the offending byte; e.g. a Latin-1 export or a binary file given by mistake)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TextFileError(path, None, f"cannot read ({err.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise TextFileError(path, line, f"not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); "
                                        f"save it as UTF-8") from None


class StorageError(MgfmError):
    """Writing failed for a reason the user must fix on the machine (full disk, quota, read-only or not
    permitted folder); the message is one line naming the path and the cause."""


_CAUSES = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "not permitted"}


def storage_cause(err: BaseException, path: str | Path | None = None) -> str | None:
    """Why a write failed, in words, when it is the machine's doing (see :class:`StorageError`); else None.

    ``OSError`` carries an errno; torch's checkpoint writer and safetensors report a full disk as a plain
    ``RuntimeError`` / ``SafetensorError`` (``basic_ios::clear: iostream error``), so for other errors the
    free space where ``path`` lives is checked instead."""
    if isinstance(err, OSError) and err.errno in _CAUSES:
        return _CAUSES[err.errno]
    if path is not None and not isinstance(err, OSError):
        folder = Path(path)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            if shutil.disk_usage(folder).free < LOW_SPACE:
                return "no space left on the device"
        except OSError:
            return None
    return None


LOW_SPACE = 16 * 2**20  # bytes: below this a failed write is taken for a full disk


@contextlib.contextmanager
def writing(path: str | Path):
    """Turn a failure to write ``path`` caused by the machine (:func:`storage_cause`) into a one-line
    :class:`StorageError`; any other error propagates unchanged."""
    try:
        yield
    except Exception as err:
        cause = storage_cause(err, path)
        if cause is None:
            raise
        where = getattr(err, "filename", None) or path
        raise StorageError(f"cannot write {where}: {cause}") from None


class FolderInUse(MgfmError):
    """Another live process holds a folder's lock; the message names it (pid, host, since when)."""


class FolderLock:
    """An exclusive claim on a run folder while a process writes to it: ``<folder>/.lock`` holds the pid,
    the host and the process's start time. A second writer gets :class:`FolderInUse` naming the holder; the
    lock of a process that is gone (same host, pid dead or reused) is taken over, with a warning. Use it as a
    context manager; the lock file goes when the holder exits normally."""

    NAME = ".lock"

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / self.NAME
        self.held = False

    def __enter__(self) -> "FolderLock":
        with writing(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
            me = _process_identity(os.getpid())
            while True:
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    holder = self._holder()
                    if holder is not None and _alive(holder):
                        raise FolderInUse(f"{self.folder} is in use by pid {holder.get('pid')} on "
                                          f"{holder.get('host')} (since {holder.get('since')}); wait for it to "
                                          f"finish, or delete {self.path} if that process is gone") from None
                    log.warning("%s: taking over the lock of pid %s on %s, which is gone", self.folder,
                                (holder or {}).get("pid"), (holder or {}).get("host"))
                    self.path.unlink(missing_ok=True)
                    continue
                with os.fdopen(fd, "w") as handle:
                    json.dump(me, handle)
                break
        self.held = True
        return self

    def __exit__(self, *exc) -> None:
        if self.held:
            holder = self._holder()
            if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self.held = False

    def _holder(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # unreadable or half-written by a process killed while writing it: stale
        return data if isinstance(data, dict) else None


def _process_identity(pid: int) -> dict:
    import datetime

    return {"pid": pid, "host": socket.gethostname(), "started": _start_time(pid),
            "since": datetime.datetime.now().isoformat(timespec="seconds")}


def _start_time(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - no psutil, or no such process
        return None


def _alive(holder: dict) -> bool:
    """Whether the lock's process still runs. On another host that cannot be known: taken as alive."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's live process
    started = _start_time(pid)
    return holder.get("started") is None or started is None or abs(started - holder["started"]) < 1.0
