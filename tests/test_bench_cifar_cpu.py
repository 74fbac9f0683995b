"""Smoke test of benchmarks/cifar_cpu.py on digits with tiny epochs."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cifar_cpu(tmp_path, *args: str) -> dict:
  """benchmarks/cifar_cpu.py --smoke with `args`; its JSON report."""
  out = tmp_path / "report.json"
  subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "cifar_cpu.py"),
       "--smoke", *args, "--workdirs", str(tmp_path / "runs"), "--out",
       str(out)], check=True, capture_output=True, timeout=600)
  return json.loads(out.read_text())


@pytest.mark.slow
def test_cifar_cpu_tail_smoke(tmp_path):
  report = _cifar_cpu(tmp_path, "--stage", "tail", "--swa-lrs", "0.05")
  assert report["stage"] == "tail" and len(report["runs"]) == 1
  run = report["runs"][0]
  assert (run["label"], run["setting"]) == ("seed 0, swa_lr 0.05",
                                            "swa_lr 0.05")
  assert list(report["aggregates"]) == ["swa_lr 0.05"]
  assert {"sgd", "swa", "ema", "twa"} <= set(run["results"])
  twa = run["results"]["twa"]["test_accuracy"]
  swa = run["results"]["swa"]["test_accuracy"]
  assert run["claims"]["claim_beats_swa"] == (twa > swa)
  assert abs(run["claims"]["twa_minus_swa"] - 100 * (twa - swa)) < 1e-9


@pytest.mark.slow
def test_cifar_cpu_head_seeds_selection_sweep_and_variants_smoke(tmp_path):
  """The head stage: two seeds, TWA's lr chosen on held-out data, the sweep
  over 2 heads, and TWA again on each seed's trajectory, layer-wise with int8
  storage (a variant)."""
  report = _cifar_cpu(tmp_path, "--stage", "head", "--seeds", "0,1",
                      "--select-twa", "0.05,0.2:1", "--select-sgd-epochs", "2",
                      "--sweep-heads", "1,2", "--variants", "layer:int8")
  selection = report["selection"]
  grid = {r["lr"]: r["held_out_acc"] for r in selection["grid"]}
  assert set(grid) == {0.05, 0.2} and grid[selection["lr"]] == max(grid.values())
  runs = report["runs"]
  assert [r["label"] for r in runs] == [
      "seed 0", "seed 0, layer int8", "seed 1", "seed 1, layer int8"]
  heads, layers = runs[0::2], runs[1::2]
  for r in runs:  # the chosen lr
    assert r["twa"]["lr"] == selection["lr"]
  for r in heads:  # the sweep's heads with budget-matched SGD
    assert r["setting"] == "config"
    assert [h["head_epochs"] for h in r["sweep"]["heads"]] == [1, 2]
    assert all(h["budget_matched_sgd"]["epochs"] == h["head_epochs"] + 1
               for h in r["sweep"]["heads"])
  for head, layer in zip(heads, layers):
    assert layer["setting"] == "layer int8" and layer["sweep"] is None
    assert (layer["twa"]["granularity"], layer["twa"]["storage"]) == (
        "layer", "int8")
    # The MLP's 3 layers each get the 3 snapshots of epochs 0-2.
    assert (head["twa"]["basis_dim"], layer["twa"]["basis_dim"]) == (3, 9)
    # The same SGD trajectory: only TWA differs.
    for method in ("sgd", "swa", "ema"):
      assert layer["results"][method] == head["results"][method]
    assert layer["results"]["twa"] != head["results"]["twa"]
  for r in runs:  # the head stage's claims, from each run's results
    assert {"sgd", "swa", "ema", "twa"} <= set(r["results"])
    twa, swa = (r["results"][m]["test_accuracy"] for m in ("twa", "swa"))
    assert r["claims"]["claim_beats_swa"] == (twa > swa)
    assert abs(r["claims"]["twa_minus_swa"] - 100 * (twa - swa)) < 1e-9
    assert r["claims"]["twa_epoch_fraction"] == r["results"]["twa"][
        "epochs"] / 4
  # Aggregates over the seeds: the config's runs and the variant's apart.
  aggregates = report["aggregates"]
  assert list(aggregates) == ["config", "layer int8"]
  for agg, group in ((aggregates["config"], heads),
                     (aggregates["layer int8"], layers)):
    twa = [100 * r["results"]["twa"]["test_accuracy"] for r in group]
    assert abs(agg["methods"]["twa"]["mean"] - sum(twa) / 2) < 1e-9
    assert agg["methods"]["twa"]["n"] == 2
  assert set(aggregates["config"]["sweep"]) == {"1", "2"}
  assert "sweep" not in aggregates["layer int8"]
