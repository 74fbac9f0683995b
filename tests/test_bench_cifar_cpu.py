"""Smoke test of benchmarks/cifar_cpu.py on digits with tiny epochs."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["head", "tail"])
def test_cifar_cpu_smoke(tmp_path, stage):
  out = tmp_path / "c.json"
  subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "cifar_cpu.py"),
       "--smoke", "--stage", stage, "--swa-lrs", "0.05", "--workdirs",
       str(tmp_path / "runs"), "--out", str(out)],
      check=True, capture_output=True, timeout=600)
  report = json.loads(out.read_text())
  assert report["stage"] == stage and len(report["runs"]) == 1
  run = report["runs"][0]
  assert {"sgd", "swa", "ema", "twa"} <= set(run["results"])
  claims = run["claims"]
  twa = run["results"]["twa"]["test_accuracy"]
  swa = run["results"]["swa"]["test_accuracy"]
  assert claims["claim_beats_swa"] == (twa > swa)
  assert abs(claims["twa_minus_swa"] - 100 * (twa - swa)) < 1e-9
  if stage == "head":
    assert claims["twa_epoch_fraction"] == run["results"]["twa"]["epochs"] / 4


@pytest.mark.slow
def test_cifar_cpu_variants_smoke(tmp_path):
  """TWA again on the head run's trajectory, layer-wise with int8 storage."""
  out = tmp_path / "v.json"
  subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "cifar_cpu.py"),
       "--smoke", "--stage", "head", "--variants", "layer:int8",
       "--workdirs", str(tmp_path / "runs"), "--out", str(out)],
      check=True, capture_output=True, timeout=600)
  head, layer = json.loads(out.read_text())["runs"]
  assert layer["label"] == "seed 0, layer int8"
  assert (layer["twa"]["granularity"], layer["twa"]["storage"]) == (
      "layer", "int8")
  # The MLP's 3 layers each get the 3 snapshots of epochs 0-2.
  assert (head["twa"]["basis_dim"], layer["twa"]["basis_dim"]) == (3, 9)
  # The same SGD trajectory: only TWA differs.
  for method in ("sgd", "swa", "ema"):
    assert layer["results"][method] == head["results"][method]
  assert layer["results"]["twa"] != head["results"]["twa"]
