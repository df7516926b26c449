"""One process per run folder: an exclusive ``flock`` on ``RUN/run.lock``, held for the run's life.

Two runners on one ``--out`` (or a ``--resume`` while the run is alive) would interleave
checkpoints and remove each other's files. The kernel drops a ``flock`` when its holder
exits, even after ``kill -9``, so a lock is never left stale and needs no cleaning. The
holder writes its pid into the file so that the refused process can name it. Shared by the
device runner and the host trainer (rank 0); torch-free.
"""
from __future__ import annotations

import fcntl
import gc
import os
from pathlib import Path

from .errors import RunError

LOCK_NAME = "run.lock"


class RunLock:
    """The held lock of one run folder; :meth:`release` (or process exit) frees it."""

    def __init__(self, folder: Path, fd: int):
        self.folder = folder
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __del__(self) -> None:  # an owner dropped without release() (a Trainer left to the GC)
        self.release()

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder_pid(folder: Path) -> str:
    """The pid written by the lock's holder, or ``unknown`` (it may not have written it yet)."""
    try:
        text = (Path(folder) / LOCK_NAME).read_text().strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def acquire(folder: Path) -> RunLock:
    """Lock ``folder`` (which must exist) for this process, or raise RunError naming the holder."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if holder_pid(folder) != str(os.getpid()):
                raise
            # Held by this process: by a runner that was dropped without release() and only
            # waits for the garbage collector (tests, notebooks). Collect it and try once more.
            gc.collect()
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = holder_pid(folder)
        raise RunError(f"{folder} is in use by another run (pid {pid} holds {path}); wait for it to "
                       f"finish or stop it (kill -INT {pid}), then --resume {folder}") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RunLock(folder, fd)
