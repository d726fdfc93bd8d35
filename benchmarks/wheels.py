"""Installing handed wheel files on an offline box (a lent GPU machine has no network): every ``*.whl`` of a
folder with pip from that folder only, and a one-line error naming the wheel a stage still lacks. Used by
``gpu_check.py --wheels``."""

from __future__ import annotations

import importlib
import logging
import os
import site
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("gpu_check")
# import name -> the wheel that provides it
OPTIONAL = {"deepspeed": "deepspeed", "webdataset": "webdataset", "braceexpand": "braceexpand", "decord": "decord",
            "av": "av", "torchdata": "torchdata", "faiss": "faiss-cpu", "tensorboard": "tensorboard",
            "matplotlib": "matplotlib"}


def install_wheels(folder: Path) -> dict:
    """pip-install every ``*.whl`` in ``folder`` from that folder only; when the set misses a dependency, each
    wheel alone without its dependencies (an import then names what is missing). Never raises."""
    wheels = sorted(str(p) for p in folder.glob("*.whl"))
    if not wheels:
        return {"ok": False, "error": f"no *.whl in {folder}", "installed": []}
    base = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(folder),
            "--disable-pip-version-check", "--no-input"]
    result = _pip(base + wheels)
    if result.returncode and "externally-managed" in result.stdout + result.stderr:
        base.append("--break-system-packages")  # a distribution's system Python (PEP 668)
        result = _pip(base + wheels)
    report = {"wheels": [Path(w).name for w in wheels], "installed": _installed(result.stdout),
              "ok": result.returncode == 0}
    if result.returncode:
        log.warning("installing the wheels together failed; installing each without its dependencies")
        report["together_error"] = (result.stdout + result.stderr)[-1500:]
        report["one_by_one"] = {}
        for wheel in wheels:
            single = _pip(base + ["--no-deps", wheel])
            report["one_by_one"][Path(wheel).name] = "ok" if single.returncode == 0 else single.stderr[-300:]
            report["installed"] += _installed(single.stdout)
        report["ok"] = all(v == "ok" for v in report["one_by_one"].values())
        report["pip_check"] = _pip([sys.executable, "-m", "pip", "check"]).stdout[-1500:]  # what is still missing
    user_site = site.getusersitepackages()  # pip falls back to --user when site-packages is read-only
    if os.path.isdir(user_site) and user_site not in sys.path:
        site.addsitedir(user_site)
    importlib.invalidate_caches()
    return report


def _pip(cmd: list[str]) -> subprocess.CompletedProcess:
    log.info("%s", " ".join(cmd[:8]) + (" ..." if len(cmd) > 8 else ""))
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        return subprocess.CompletedProcess(cmd, 1, "", str(err))


def _installed(pip_stdout: str) -> list[str]:
    lines = [line for line in pip_stdout.splitlines() if line.startswith("Successfully installed")]
    return [name for line in lines for name in line.split()[2:]]


def require(*modules: str) -> None:
    """Import ``modules`` or raise one line naming the wheel to pass with ``--wheels``."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            wheel = OPTIONAL.get(module, module)
            raise RuntimeError(f"{module} is not installed or does not import ({err}): pass --wheels with a {wheel} "
                               f"wheel (and wheels of its missing dependencies)") from None
