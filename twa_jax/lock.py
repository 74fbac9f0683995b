"""One holder at a time: an exclusive OS file lock held by a process.

The lock is `fcntl.flock` on a file, so the kernel releases it when the
holder's file is closed or the holder dies (a kill -9 never leaves a stale
lock). The file holds the holder's pid, for the error of the next one.
"""

from __future__ import annotations

import fcntl
import os


class LockedError(RuntimeError):
  """The lock is held by another holder (its pid named)."""


class FileLock:
  """An exclusive lock on `path`, taken at construction (never waits).

  Usage::

    with FileLock(workdir / "lock", what="train.py --workdir=..."):
      ...

  Args:
    path: the lock file (created if absent; never deleted).
    what: names the guarded thing in the error.

  Raises:
    LockedError: another process (or another `FileLock` in this one) holds
      the lock; the message names its pid.
  """

  def __init__(self, path: str | os.PathLike[str], *, what: str):
    self.path = os.fspath(path)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      raise LockedError(
          f"{what}: in use by process {holder} (it holds the lock "
          f"{self.path}); one writer at a time. Wait for it to finish or "
          "stop it; the lock is released when it exits.") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    self._fd: int | None = fd

  def release(self) -> None:
    """Releases the lock (again: a no-op)."""
    if self._fd is not None:
      os.close(self._fd)  # closing the file releases the flock
      self._fd = None

  def __enter__(self) -> FileLock:
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()
