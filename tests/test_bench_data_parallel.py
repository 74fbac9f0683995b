"""Smoke test of benchmarks/data_parallel.py: 8 simulated devices, the MLP."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_data_parallel_step_reduces_the_gradient_once(tmp_path):
  out = tmp_path / "data_parallel.json"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "data_parallel.py"),
       "--smoke", "--out", str(out)],
      check=True, capture_output=True, timeout=600, env=env)
  rows = {r["step"]: r for r in json.loads(out.read_text())["rows"]}
  assert set(rows) == {"sgd", "twa_params", "twa_basis"}
  for r in rows.values():
    assert r["devices"] == 8
    # One all-reduce carries the whole gradient; the other one the metrics.
    assert r["gradient_all_reduces"] == 1, r
    assert r["all_reduced_elements"] >= r["D"], r
  assert rows["sgd"]["all_reduces"] == 2
  # TWA adds its layout's collectives: the params layout gathers the
  # projected slices, the basis layout all-reduces a second D-vector.
  assert rows["twa_params"]["other_collectives"] == ["all-gather"]
  assert rows["twa_basis"]["all_reduced_elements"] >= 2 * rows["sgd"]["D"]
