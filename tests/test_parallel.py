"""train.py data-parallel: 8 simulated devices, and 2 processes on localhost.

Each run is `train.py` in a subprocess (the device count is fixed when JAX
starts); the single-device reference runs in this process.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # CONFIG's `from configs import ...`
# pylint: disable=g-import-not-at-top,wrong-import-position

from twa_jax.store import TrajectoryStore
from twa_jax.training import experiment as experiment_lib
from twa_jax.training import train_lib

# The default config, shortened, with batch norm (synchronized over devices).
CONFIG = """
from configs import default


def get_config():
  c = default.get_config()
  c.model.kwargs.batch_norm = True
  c.sgd.epochs = 3
  c.sgd.batch_size = 64
  c.averaging.end = 2
  c.twa.epochs = 1
  return c
"""


def _config():
  namespace = {}
  exec(CONFIG, namespace)  # pylint: disable=exec-used
  return namespace["get_config"]()


# train.py with the store's whole-matrix reader refused: the run must read
# snapshots one at a time, and the basis through the column slices.
WITHOUT_READ_MATRIX = f"""
import runpy
from twa_jax.store import TrajectoryStore

def refuse(*args, **kwargs):
  raise AssertionError("TrajectoryStore.read_matrix was called")

TrajectoryStore.read_matrix = refuse
runpy.run_path({str(ROOT / "train.py")!r}, run_name="__main__")
"""


def _train_py(workdir: pathlib.Path, devices: int, name: str, *flags: str,
              read_matrix: bool = True
              ) -> tuple[subprocess.Popen, pathlib.Path]:
  """train.py started on CONFIG (without `read_matrix`: with
  `WITHOUT_READ_MATRIX`); its output goes to a file (a pipe that nobody
  reads while the other process waits would stall it)."""
  config_file = workdir.parent / "config.py"
  config_file.write_text(CONFIG)
  log = workdir.parent / f"{name}.log"
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=(
      f"--xla_force_host_platform_device_count={devices}"))
  main = ([str(ROOT / "train.py")] if read_matrix
          else ["-c", WITHOUT_READ_MATRIX])
  with open(log, "w") as out:
    proc = subprocess.Popen(
        [sys.executable, *main, f"--config={config_file}",
         f"--workdir={workdir}", *flags], cwd=ROOT, env=env, stdout=out,
        stderr=subprocess.STDOUT)
  return proc, log


def _finish(runs: list[tuple[subprocess.Popen, pathlib.Path]],
            timeout: int = 400) -> list[str]:
  """The processes' output, once all exited 0."""
  try:
    for proc, _ in runs:
      proc.wait(timeout=timeout)
  finally:
    for proc, _ in runs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  outs = [log.read_text() for _, log in runs]
  for i, ((proc, _), out) in enumerate(zip(runs, outs)):
    assert proc.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
  return outs


def _assert_results_close(summary: dict, reference: dict) -> None:
  """Same methods, accuracies and losses up to float32 reduction order."""
  assert summary["results"].keys() == reference["results"].keys()
  for method, ref in reference["results"].items():
    row = summary["results"][method]
    assert row["epochs"] == ref["epochs"], method
    for key in ("test_accuracy", "train_accuracy"):  # ~ one example of 300+
      assert abs(row[key] - ref[key]) <= 0.004, (method, key, row, ref)
    for key in ("test_loss", "train_loss"):
      np.testing.assert_allclose(row[key], ref[key], rtol=2e-3,
                                 err_msg=f"{method} {key}")


def _checkpoint_specs(directory: pathlib.Path
                      ) -> dict[str, tuple[tuple[int, ...], tuple]]:
  """Shape and partition spec of each state leaf in the latest checkpoint."""
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True)) as manager:
    latest = manager.latest_step()
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.metadata(directory / str(latest) /
                                  "state").item_metadata
  return {jax.tree_util.keystr(path): (tuple(leaf.shape),
                                       tuple(leaf.sharding.partition_spec))
          for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The single-device run (this process) and its workdir."""
  workdir = tmp_path_factory.mktemp("one")
  return workdir, train_lib.run(_config(), workdir)


@pytest.mark.slow
def test_eight_devices_compute_what_one_device_computes(tmp_path, reference):
  one, reference = reference
  # The training state is sharded (FSDP); the TWA basis is sharded over the
  # 8 devices and read from the store's column slices; SWA's mean, TWA's
  # start and coefficients stream the snapshots: the whole snapshot matrix
  # is never read.
  eight = tmp_path / "eight"
  out = _finish([_train_py(eight, 8, "eight",
                           "--config.parallel.param_sharding=fsdp",
                           read_matrix=False)])[0]
  assert "data parallel over 8 device(s) of 1 process(es)" in out
  summary = json.loads((eight / "summary.json").read_text())
  _assert_results_close(summary, reference)
  np.testing.assert_allclose(summary["twa"]["coefficients"],
                             reference["twa"]["coefficients"], atol=5e-3)
  # Each phase's state was saved sharded: every leaf with a dimension that
  # 8 divides split along "data" on its largest one, the others whole.
  for phase in ("sgd", "twa"):
    specs = _checkpoint_specs(eight / phase / "checkpoints")
    assert specs["['params']['Dense_0']['kernel']"] == ((64, 256),
                                                        (None, "data"))
    assert specs["['params']['Dense_2']['bias']"] == ((10,), ())
    momentum = [k for k in specs if k.startswith("['opt_state']")
                and k.endswith("['Dense_1']['kernel']")]
    assert [specs[k] for k in momentum] == [((256, 256), ("data",))]
    for path, (shape, spec) in specs.items():
      assert ("data" in spec) == any(d % 8 == 0 for d in shape), path
  # The same batches: SGD's per-epoch training loss agrees epoch by epoch.
  records = [[json.loads(line) for line in (d / "metrics.jsonl")
              .read_text().splitlines()] for d in (one, tmp_path / "eight")]
  np.testing.assert_allclose([r["train_loss"] for r in records[1]],
                             [r["train_loss"] for r in records[0]],
                             rtol=1e-3)


@pytest.mark.slow
def test_two_processes_run_one_workdir_and_agree(tmp_path, reference):
  helpers.require_cpu_collectives()
  port = helpers.free_port()
  workdir = tmp_path / "run"
  runs = [_train_py(
      workdir, 2, f"process{i}", "--config.parallel.distributed=True",
      f"--config.parallel.coordinator_address=127.0.0.1:{port}",
      "--config.parallel.num_processes=2",
      f"--config.parallel.process_id={i}") for i in range(2)]
  outs = _finish(runs)
  for i, out in enumerate(outs):  # each loads its half of every batch
    assert (f"data parallel over 4 device(s) of 2 process(es) (this is "
            f"process {i}); 16 examples per device and step") in out
  # Both processes printed the same comparison table (process 0 wrote it),
  # wall times aside.
  tables = [re.sub(r"\s+", " ", re.sub(r"[\d.]+ s\b", "", out[
      out.rindex("default: mlp on digits"):out.rindex("train acc: clean")]))
            for out in outs]
  assert "TWA" in tables[0] and tables[0] == tables[1]
  summary = json.loads((workdir / "summary.json").read_text())
  _assert_results_close(summary, reference[1])
  # One trajectory, written once: every planned snapshot, checksums intact.
  with TrajectoryStore(workdir / "trajectory", read_only=True) as store:
    assert store.steps() == experiment_lib.create(_config()).planned_steps
    store.load(store.steps()[-1])
  # Process 0 alone wrote the workdir's log.
  log = (workdir / "log.txt").read_text()
  assert "(this is process 0)" in log and "(this is process 1)" not in log
