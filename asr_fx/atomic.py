"""Atomic output files and private temporary folders that never outlive the run.

Every output asr-fx writes goes through :func:`atomic_output`: the content is written into a
private temporary folder beside the output (``.asr-fx-tmp-<pid>-XXXX``, on the same file system so
the final rename is atomic), flushed with ``fsync``, then renamed to its final name. A failure leaves
the output as it was: absent, or the old file.

Temporary folders are removed when their block ends, at interpreter exit, and on SIGTERM/SIGINT (the
handler removes them and re-raises the signal). A SIGKILL cannot be caught: the folder it leaves is
removed by :func:`remove_stale_temp_folders` at the next run, because the process id in its name is
no longer alive (or it is older than :data:`STALE_SECONDS`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from asr_fx.errors import OutputPathError

#: every asr-fx temporary folder's name starts with this (beside an output it is hidden: a leading dot)
PREFIX = "asr-fx-"
#: a temporary folder older than this many seconds is stale even if its process id is in use again
STALE_SECONDS = 3600

_live: set[str] = set()
_lock = threading.RLock()  # re-entrant: the signal handler may run while the main thread holds it
_previous_handlers: dict[int, object] = {}


def _remove_live() -> None:
    with _lock:
        folders = list(_live)
        _live.clear()
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _on_signal(signum: int, frame: object) -> None:
    """Remove the live temporary folders, then let the signal do what it did before."""
    _remove_live()
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signum, previous if isinstance(previous, (int, signal.Handlers)) else signal.SIG_DFL)
    signal.raise_signal(signum)


def _install_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit and finally still clean up
    for signum in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(signum)
        if current is not _on_signal:
            _previous_handlers[signum] = current
            signal.signal(signum, _on_signal)


atexit.register(_remove_live)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _is_stale(folder: Path, now: float) -> bool:
    try:
        age = now - folder.stat().st_mtime
    except OSError:
        return False
    if age > STALE_SECONDS:
        return True
    parts = folder.name.lstrip(".").split("-")  # asr-fx-<pid>-<name>-XXXX (older asr-fx: asr-fx-<name>-XXXX)
    pid = int(parts[2]) if len(parts) > 3 and parts[2].isdigit() else None
    return pid is not None and pid != os.getpid() and not _pid_alive(pid)


def remove_stale_temp_folders(*folders: str | os.PathLike) -> list[str]:
    """Remove stale asr-fx temporary folders in ``folders`` and in the system temp folder.

    Stale: its process (the id in its name) is gone, or it is older than :data:`STALE_SECONDS`.
    Returns the removed paths."""
    now = time.time()
    removed = []
    for parent in {Path(tempfile.gettempdir()), *(Path(f) for f in folders)}:
        try:
            entries = list(parent.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.name.lstrip(".").startswith(PREFIX) and entry.is_dir() and _is_stale(entry, now):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(str(entry))
    return removed


@contextlib.contextmanager
def temp_folder(parent: str | os.PathLike | None = None, name: str = "tmp") -> Iterator[Path]:
    """A private temporary folder, removed when the block ends, at exit and on SIGTERM/SIGINT.

    ``parent`` None: in the system temp folder, named ``asr-fx-<pid>-<name>-XXXX``; otherwise hidden
    inside ``parent`` (``.asr-fx-<pid>-<name>-XXXX``), on the same file system as the outputs there."""
    _install_handlers()  # before the folder exists: a signal from here on finds it registered or not created
    with _signals_deferred():
        if parent is None:
            folder = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-{name}-")
        else:
            folder = tempfile.mkdtemp(prefix=f".{PREFIX}{os.getpid()}-{name}-", dir=parent)
        with _lock:
            _live.add(folder)
    try:
        yield Path(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # then forget it: a signal in between removes it again
        with _lock:
            _live.discard(folder)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGTERM/SIGINT held back (delivered when the block ends) in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(files: Sequence[tuple[str | os.PathLike, str | os.PathLike]]) -> None:
    """Move finished files to their final names, in order (data files first, the file naming them last).

    Each is fsynced, given the permissions a new file gets (``mkstemp`` makes files owner-only), and
    renamed with ``os.replace`` (atomic on one file system); the folder is fsynced afterwards."""
    umask = os.umask(0)
    os.umask(umask)
    for tmp, _ in files:
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~umask)
    for tmp, final in files:
        os.replace(tmp, final)
    with contextlib.suppress(OSError):  # not every platform can fsync a folder
        _fsync(Path(files[-1][1]).parent)


def check_writable(path: str | os.PathLike, *, suffix: str | None = None) -> Path:
    """Refuse, before any expensive work, an output ``path`` that cannot be written.

    Raises :class:`OutputPathError` (``.path``) when ``path`` is a folder, its folder does not exist or
    is not writable, or it does not end in ``suffix``. Also removes stale asr-fx temporary folders
    beside it. Returns ``path`` as a :class:`Path`."""
    path = Path(path)
    if suffix is not None and path.suffix.lower() != suffix:
        raise OutputPathError(f"the output {str(path)!r} should end in {suffix}", path=str(path))
    if path.is_dir():
        raise OutputPathError(f"the output {str(path)!r} is a folder: name the file to write", path=str(path))
    parent = path.parent
    if not parent.is_dir():
        problem = "is a file, not a folder" if parent.exists() else "does not exist"
        raise OutputPathError(f"cannot write {str(path)!r}: the folder {str(parent)!r} {problem}", path=str(path))
    remove_stale_temp_folders(parent)
    try:
        folder = tempfile.mkdtemp(prefix=f".{PREFIX}{os.getpid()}-check-", dir=parent)
        os.rmdir(folder)
    except OSError as exc:
        raise OutputPathError(f"cannot write {str(path)!r}: the folder {str(parent)!r} is not writable "
                              f"({exc.strerror or exc})",
                              path=str(path)) from None
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path (same file name, in a private folder beside ``path``) to write to;
    when the block succeeds, rename it (and any ``<name>.data``-like companions written beside it,
    which are renamed first) to ``path``. On failure ``path`` is left as it was."""
    path = check_writable(path)
    with temp_folder(path.parent, "out") as folder:
        tmp = folder / path.name
        yield tmp
        companions = sorted(p for p in folder.iterdir() if p != tmp and p.is_file())
        publish([*((p, path.parent / p.name) for p in companions), (tmp, path)])

