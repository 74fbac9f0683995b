"""Sharded TWA on simulated CPU devices and across two real processes.

JAX fixes its device count when it starts, so the checks run in
subprocesses: `multidevice_sharding.py` (pytest, 8 simulated devices, all
layout / mesh-size / equivalence / HLO checks in one process) and two
`multiprocess_worker.py` processes joined by `jax.distributed`.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import helpers

TESTS = pathlib.Path(__file__).parent
BENCHMARKS = TESTS.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import hlo  # pylint: disable=g-import-not-at-top,wrong-import-position


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(TESTS), str(TESTS.parent), str(BENCHMARKS),
       env.get("PYTHONPATH", "")])
  return env


def _fail(what: str, output: str) -> None:
  pytest.fail(f"{what} failed:\n{output[-6000:]}", pytrace=False)


def test_sharded_basis_on_eight_simulated_devices():
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       "-W", "ignore:Some donated buffers:UserWarning",
       str(TESTS / "multidevice_sharding.py")],
      env=_env(8), cwd=TESTS.parent, capture_output=True, text=True,
      timeout=600, check=False)
  if result.returncode != 0:
    _fail("multidevice_sharding.py", result.stdout + result.stderr)


@pytest.mark.slow
def test_two_processes_agree_with_single_process(tmp_path):
  helpers.require_cpu_collectives()
  port = helpers.free_port()
  outs = [tmp_path / f"process{i}.json" for i in range(2)]
  procs = [subprocess.Popen(
      [sys.executable, str(TESTS / "multiprocess_worker.py"), str(i), "2",
       str(port), str(out), str(tmp_path / "store")],
      env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i, out in enumerate(outs)]
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=300)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for i, (proc, log) in enumerate(zip(procs, logs)):
    if proc.returncode != 0:
      _fail(f"process {i}", log)
  results = [json.loads(out.read_text()) for out in outs]
  for layout in ("basis", "params"):
    # Each process holds 4 of the 8 shards: n = 7 -> 1 row, D = 50 -> 7 columns.
    assert results[0][layout]["shard_shape"] == (
        [1, 50] if layout == "basis" else [7, 7])
    # Both processes see the same replicated result, which is the unsharded one.
    np.testing.assert_array_equal(results[0][layout]["params"],
                                  results[1][layout]["params"])
    np.testing.assert_allclose(results[0][layout]["params"],
                               results[0]["unsharded"], rtol=1e-5, atol=1e-6)
    # From the store, each process read about its half of the columns
    # (D = 130 000: 65 000 each), not the whole matrix: measured 0.61 of a
    # whole read, the rest being the chunks at the 4 devices' slice edges
    # and the snapshots' metadata.
    stored = [r["store"] for r in results]
    assert [s["columns"] for s in stored] == [65_000, 65_000]
    whole = stored[0]["read_matrix"]["bytes"]
    for s in stored:
      assert 0.45 * whole < s[layout]["bytes"] < 0.7 * whole, stored
  # A basis per leaf reads each leaf's columns per process, too.
  for s in stored:
    assert 0.45 * whole < s["leaf"]["bytes"] < 0.7 * whole, stored
  # A NaN in columns only process 1 reads: process 1 names it, process 0
  # names process 1, and both raised (neither was left in a collective).
  assert stored[1]["nan_error"] == (
      "columns(step=7): leaf ['w'] contains NaN or Inf."), stored
  assert stored[0]["nan_error"] == (
      "put_columns: reading the column slices of W failed on process(es) "
      "[1]; see the error raised there."), stored


def test_collectives_are_read_from_hlo_text():
  text = """
  %a = f32[1000]{0} all-reduce(%x), channel_id=1, to_apply=%add
  ROOT %b = (f32[993]{0}, f32[10]{0}, /*index=2*/f32[2]{0}) all-reduce(%y, %z, %w), channel_id=3
  %c = (bf16[8]{0}, bf16[64]{0}) all-gather-start(%q), dimensions={0}
  %d = f32[7,3]{1,0} collective-permute(%r), source_target_pairs={{0,1}}
  %e = f32[1000]{0} add(%a, %a)
  """
  assert hlo.collectives(text) == [
      ("all-reduce", 1000, 4000), ("all-reduce", 1005, 4020),
      ("all-gather", 64, 128), ("collective-permute", 21, 84)]
