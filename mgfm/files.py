"""Files users hand us and files we write for them.

Reading: the text files users write (annotation CSVs, recipes) as UTF-8 with or without a byte-order
mark, a decode error naming the file, the line and the byte instead of a bare codec traceback.
Writing: a full disk, a quota or a read-only / forbidden folder becomes one line naming the path and the
cause (:class:`StorageError`), since what was written before stays intact (every writer is atomic); a run
folder is claimed by one writer at a time (:class:`FolderLock`); a temporary file names its writer (pid and
host), so what a killed writer left is told apart from a live writer's work (:func:`stale_temp_files`).
Paths: a file where a folder belongs, or a symlink loop, is one :class:`~mgfm.errors.InputError` line
(:func:`make_folder`, :func:`require_folder`, :func:`check_path`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator
import datetime

import psutil

from mgfm.errors import InputError, MgfmError

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
# How libraries that do not raise OSError quote the errno: safetensors (Rust: "Os { code: 13, kind:
# PermissionDenied, ... }" / "(os error 28)"), faiss and torch ("errno 30", "error code: 13").
_ERRNO_TEXT = re.compile(r"(?:os error|errno|code:?)\s*(\d+)", re.IGNORECASE)


def storage_cause(err: BaseException, path: str | Path | None = None) -> str | None:
    """Why a write failed, in words, when it is the machine's doing (see :class:`StorageError`); else None.

    The errno decides: an ``OSError``'s own, or the one a library quoted in its message (safetensors, torch,
    faiss raise their own types). Without any errno (torch's checkpoint writer says only ``basic_ios::clear:
    iostream error``) the folder that was written is asked what it is, most specific first: a read-only
    mount, a folder this process may not write, then a full disk."""
    code = err.errno if isinstance(err, OSError) else None
    if code is None:
        match = _ERRNO_TEXT.search(str(err))
        code = int(match.group(1)) if match else None
    if code is not None:
        return _CAUSES.get(code)
    if path is None:
        return None
    folder = Path(path)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return _CAUSES[errno.EROFS]
        if not os.access(folder, os.W_OK):
            return _CAUSES[errno.EACCES]
        if shutil.disk_usage(folder).free < LOW_SPACE:
            return _CAUSES[errno.ENOSPC]
    except OSError:
        return None
    return None


LOW_SPACE = 16 * 2**20  # bytes: below this a failed write without an errno is taken for a full disk


@contextlib.contextmanager
def writing(path: str | Path):
    """Turn a failure to write ``path`` caused by the machine (:func:`storage_cause`) into a one-line
    :class:`StorageError`; any other error propagates unchanged."""
    try:
        yield
    except MgfmError:
        raise
    except Exception as err:
        cause = storage_cause(err, path)
        if cause is None:
            raise
        where = getattr(err, "filename", None) or path
        raise StorageError(f"cannot write {where}: {cause}") from None


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """The one way mgfm writes a file: yields a temporary path beside ``path`` (same folder, so the rename is
    atomic; ``suffix`` for writers that insist on an extension) for the block to write, then renames it onto
    ``path``. A reader sees the old file or the new one, never half of one; when the block fails the temporary
    file goes and ``path`` is untouched. A failure caused by the machine is a :class:`StorageError` naming
    ``path`` and the cause."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}@{_host()}.tmp{suffix}")
    with writing(path):
        make_folder(path.parent)
        try:
            yield tmp
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """:func:`atomic_path` for a folder: yields an empty temporary folder beside ``folder`` to fill, then swaps
    it in (an existing ``folder`` is replaced whole), so a reader never sees half a folder; when the block
    fails the temporary folder goes and ``folder`` is untouched; what a killed writer left beside it (its
    temporary or old folder, named with its pid and host) goes when the next writer of ``folder`` starts."""
    folder = Path(folder)
    with writing(folder):
        make_folder(folder.parent)
        for stale in stale_temp_files(folder.parent, {folder.name}, folders=True):
            shutil.rmtree(stale, ignore_errors=True)
        writer = f".{folder.name}.{os.getpid()}@{_host()}"
        tmp = Path(tempfile.mkdtemp(prefix=f"{writer}.tmp-", dir=folder.parent))
        try:
            yield tmp
            old = None
            if folder.exists():
                old = folder.with_name(f"{writer}.old")
                os.replace(folder, old)
            os.replace(tmp, folder)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9._-]*))?\.(?:tmp|old)")


def _host() -> str:
    """This machine's name as it goes into a temporary file's name (letters, digits, ``.-_`` only)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())


def stale_temp_files(folder: str | Path, targets: set[str], folders: bool = False) -> list[Path]:
    """The temporary files :func:`atomic_path` left in ``folder`` for the file names ``targets`` (with
    ``folders``: the temporary and old folders of :func:`atomic_folder`) whose writer is gone: written on this host by a process that no longer runs (or whose pid now belongs to a process started
    after the file was last written; a name without a host, from before names carried one, counts as this
    host's). A live writer's file, another host's, and every file of another naming scheme or for another
    target are never listed."""
    out = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return out
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        kind_ok = entry.is_dir(follow_symlinks=False) if folders else entry.is_file(follow_symlinks=False)
        if not match or match["target"] not in targets or not kind_ok:
            continue
        if match["host"] is not None and match["host"] != _host():
            continue
        try:
            written = entry.stat(follow_symlinks=False).st_mtime
            started = psutil.Process(int(match["pid"])).create_time()
        except psutil.NoSuchProcess:
            out.append(Path(entry.path))
            continue
        except (OSError, psutil.Error):
            continue  # gone meanwhile, or a process we may not inspect: leave it
        if started > written:
            out.append(Path(entry.path))
    return sorted(out)


def check_path(path: str | Path) -> Path:
    """``path``, after checking it is not (and does not pass through) a symlink loop: that is one
    :class:`InputError` line naming it, not a ``RuntimeError`` from :meth:`Path.resolve` later. A path that
    does not exist is fine here."""
    path = Path(path)
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise InputError(f"{path}: a symlink loop (a link on this path points back to itself); fix or remove "
                             f"the link") from None
    return path


def require_folder(folder: str | Path) -> Path:
    """``folder`` if it is a folder or could be made one; one :class:`InputError` line when a file stands where
    it (or a folder above it) belongs, or the path is a symlink loop. Creates nothing."""
    folder = check_path(folder)
    for part in (folder, *folder.parents):
        if part.is_dir():
            break
        if os.path.lexists(part):
            what = "a file" if part.is_file() else "a broken symlink" if part.is_symlink() else "not a folder"
            where = f"{part} is {what}" if part == folder else f"{part} (on the path to {folder}) is {what}"
            raise InputError(f"{where}, where a folder belongs; pick another path or move it away")
    return folder


def make_folder(folder: str | Path) -> Path:
    """Create ``folder`` and its parents (nothing to do when it exists); a file or a symlink loop in the way is
    one :class:`InputError` line (:func:`require_folder`) instead of a ``FileExistsError`` traceback."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        require_folder(folder)
        raise
    except OSError as err:
        if err.errno == errno.ELOOP:
            check_path(folder)
        raise
    return folder


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through :func:`atomic_path`; returns ``path``."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


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
            make_folder(self.folder)
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
    return {"pid": pid, "host": socket.gethostname(), "started": _start_time(pid),
            "since": datetime.datetime.now().isoformat(timespec="seconds")}


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:  # no such process, or not ours to inspect
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
