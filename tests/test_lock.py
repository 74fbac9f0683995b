"""Tests for twa_jax.lock.FileLock."""

import os
import signal
import subprocess
import sys

import pytest

from twa_jax.lock import FileLock, LockedError


def test_second_holder_is_refused_until_release(tmp_path):
  path = tmp_path / "lock"
  with FileLock(path, what="workdir 'a'") as lock:
    with pytest.raises(LockedError, match=rf"^workdir 'a': in use by process "
                       rf"{os.getpid()} \(it holds the lock {path}\)"):
      FileLock(path, what="workdir 'a'")
    lock.release()
    lock.release()  # again: nothing
    FileLock(path, what="workdir 'a'").release()
  assert path.exists()  # never deleted


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  path = tmp_path / "lock"
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\n"
       "from twa_jax.lock import FileLock\n"
       "lock = FileLock(sys.argv[1], what='x')\n"
       "print('locked', flush=True)\n"
       "time.sleep(600)\n", str(path)],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(LockedError, match=rf"in use by process {holder.pid} "):
      FileLock(path, what="x")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
  finally:
    holder.kill()
    holder.communicate()
  with FileLock(path, what="x"):  # the kernel released it
    assert path.read_text().strip() == str(os.getpid())
