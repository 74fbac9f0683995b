"""Two processes joined by `jax.distributed` write one store with sharded
leaves (each process holding half of the shards): the checksums of a sharded
leaf are those of its whole value, and a reader verifies them."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import helpers

from twa_jax.store import LOCK_FILE, TrajectoryStore

TESTS = pathlib.Path(__file__).parent
SNAPSHOT_SRC = textwrap.dedent("""
    import numpy as np

    def snapshot(step):
      rng = np.random.default_rng(step)
      return {"w": rng.standard_normal((64, 48)).astype(np.float32),
              "b": rng.standard_normal(48).astype(np.float32)}
    """)
_ns = {}
exec(SNAPSHOT_SRC, _ns)  # pylint: disable=exec-used
snapshot = _ns["snapshot"]
WORKER = SNAPSHOT_SRC + textwrap.dedent("""
    import sys
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from twa_jax.store import TrajectoryStore

    process, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=2, process_id=process)
    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    def sharded(value, spec):
      return jax.make_array_from_callback(
          value.shape, NamedSharding(mesh, spec), lambda index: value[index])
    with TrajectoryStore(directory, chunk_bytes=1024) as store:
      for step in range(3):
        tree = snapshot(step)
        store.save(step, {"w": sharded(tree["w"], P("x")),
                          "b": sharded(tree["b"], P())})
      store.wait_until_finished()
    print("ok", flush=True)
    jax.distributed.shutdown()
    """)


@pytest.mark.slow
def test_two_processes_save_sharded_leaves(tmp_path):
  helpers.require_cpu_collectives()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                 [str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
  port, directory = helpers.free_port(), tmp_path / "s"
  procs = [subprocess.Popen(
      [sys.executable, "-c", WORKER, str(i), str(port), str(directory)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    logs = [proc.communicate(timeout=300)[0] for proc in procs]
  finally:
    for proc in procs:
      proc.kill()
      proc.wait()
  for i, (proc, log) in enumerate(zip(procs, logs)):
    assert proc.returncode == 0 and log.strip().endswith("ok"), (
        f"process {i}:\n{log[-6000:]}")
  assert int((directory / LOCK_FILE).read_text()) == procs[0].pid
  with TrajectoryStore(directory, read_only=True) as store:
    assert store.steps() == [0, 1, 2]
    for step in range(3):
      got, want = store.load(step), snapshot(step)
      for name in ("w", "b"):
        np.testing.assert_array_equal(got[name], want[name])
    _, view = store.columns()
    np.testing.assert_array_equal(view[:, 100:3000],
                                  store.read_matrix()[1][:, 100:3000])
