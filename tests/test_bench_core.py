"""Smoke tests of the core benchmarks: they run at tiny sizes and write JSON."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, out, *args):
  subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", script), "--smoke",
       "--out", str(out), *args], check=True, capture_output=True, timeout=600)
  with open(out) as f:
    return json.load(f)


def _finite(x):
  return isinstance(x, (int, float)) and math.isfinite(x)


def test_orthonormalize_smoke(tmp_path):
  report = _run("orthonormalize.py", tmp_path / "o.json",
                "--sides", "twa,cgs", "--kinds", "trajectory")
  assert report["environment"]["date"] and report["environment"]["jax"]
  rows = {(r["kind"], r["side"]): r for r in report["rows"]}
  assert set(rows) == {("trajectory", "twa"), ("trajectory", "cgs")}
  for r in rows.values():
    for key in ("time_s", "ratio_to_cgs", "orth_err", "recon_err",
                "peak_mem_x_W"):
      assert _finite(r[key]), (key, r)
    assert r["dim"] == r["n"]
  # Accuracy (not timing): the orthonormalizer keeps orthogonality on
  # nearly collinear snapshots where classical Gram-Schmidt loses it.
  assert rows["trajectory", "twa"]["orth_err"] < 1e-5
  assert rows["trajectory", "cgs"]["orth_err"] > 1e-3


def test_projection_smoke(tmp_path):
  report = _run("projection.py", tmp_path / "p.json")
  assert {r["dtype"] for r in report["rows"]} == {"float32", "bfloat16"}
  for r in report["rows"]:
    for key in ("floor_ms", "project_flat_x_floor", "project_tree_x_floor",
                "mulsum_flat_x_floor", "bw_reduce_GBs"):
      assert _finite(r[key]) and r[key] > 0, (key, r)
  bf16, f32 = sorted(report["rows"], key=lambda r: r["dtype"])
  assert bf16["P_MB"] * 2 == f32["P_MB"]  # bfloat16 storage is half the bytes
