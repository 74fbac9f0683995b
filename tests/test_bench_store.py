"""Smoke tests of the store benchmarks: tiny sizes, JSON written."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, out):
  subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", script), "--smoke",
       "--out", str(out)], check=True, capture_output=True, timeout=600)
  with open(out) as f:
    return json.load(f)


def _finite(x):
  return isinstance(x, (int, float)) and math.isfinite(x)


def test_store_overhead_smoke(tmp_path):
  report = _run("store_overhead.py", tmp_path / "o.json")
  cfg = report["config"]
  # A warm-up block plus one store block per repeat, one snapshot per epoch.
  assert report["snapshots_saved"] == (1 + cfg["repeats"]) * cfg["epochs"]
  assert len(report["overhead_per_repeat"]) == cfg["repeats"]
  for key in ("overhead", "cpu_overhead", "save_call_s_per_epoch",
              "final_wait_s"):
    assert _finite(report[key]), key
  assert all(_finite(report["epoch_s"][s]) for s in ("plain", "store"))
  cost = report["checksums"]
  assert cost["read_snapshots"] == report["snapshots_saved"] + cfg["repeats"]
  for key in ("save_overhead", "read_overhead", "checksum_s", "save_s"):
    assert _finite(cost[key]), key
  assert 0 < cost["checksum_s"] < cost["save_s"]


def test_from_store_memory_smoke(tmp_path):
  report = _run("from_store_memory.py", tmp_path / "m.json")
  n = report["config"]["n"]
  assert set(report["modes"]) == {"read_matrix", "from_store", "via_device"}
  for row in report["modes"].values():
    assert row["dim"] == n  # the snapshots are linearly independent
    assert _finite(row["multiple_of_p"]) and row["peak_bytes"] > 0
