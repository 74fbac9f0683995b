"""Smoke test of benchmarks/input_pipeline.py: tiny sizes, JSON written."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _finite(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_input_pipeline_smoke(tmp_path):
  out = tmp_path / "i.json"
  subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "input_pipeline.py"),
       "--smoke", "--out", str(out)], check=True, capture_output=True,
      timeout=600)
  report = json.loads(out.read_text())
  assert set(report["npz"]) == {"grain", "previous"}
  assert set(report["jpeg"]) == {"grain_w0", "grain_w2", "previous"}
  for part in ("npz", "jpeg"):
    for side, row in report[part].items():
      assert _finite(row["images_per_s"]), (part, side)
      assert len(row["seconds"]) == report["config"]["repeats"]
  # The JPEG dataset is read lazily, with the CIFAR augmentation.
  assert report["jpeg_dataset"]["augmentation"] == "cifar"
  assert report["jpeg_dataset"]["train_examples"] == 256
  step = report["step"]
  assert set(step["step_s"]) == {"cached", "grain"}
  assert _finite(step["grain_over_cached"])
  assert report["npz"]["grain"]["headroom"] == (
      report["npz"]["grain"]["images_per_s"] / step["consumed_images_per_s"])
  assert len(step["grain_over_cached_per_repeat"]) == (
      report["config"]["step_repeats"])
