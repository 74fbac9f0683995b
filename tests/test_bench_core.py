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
  rows = {r["dtype"]: r for r in report["rows"]}
  assert set(rows) == {"float32", "bfloat16", "int8", "int4"}
  for dtype, r in rows.items():
    keys = ["floor_ms", "project_flat_x_floor", "project_tree_x_floor",
            "bw_reduce_GBs"]
    if dtype != "float32":
      keys.append("xla_flat_x_float32")
    for key in keys:
      assert _finite(r[key]) and r[key] > 0, (key, r)
  f32 = rows["float32"]["P_MB"]
  assert rows["bfloat16"]["P_MB"] * 2 == f32  # half the bytes
  # int8 / int4: 1/4 and 1/8 of float32 plus 8 bytes per 256-entry group
  # (1/128 and 1/32 more) and the padding of D to a whole group.
  assert 0.25 < rows["int8"]["P_MB"] / f32 < 0.26
  assert 0.125 < rows["int4"]["P_MB"] / f32 < 0.135


def test_step_profile_smoke(tmp_path):
  report = _run("step_profile.py", tmp_path / "p.json")
  (row,) = report["results"]
  assert row["model"] == "small_cnn" and _finite(row["step_s"])
  # Every conv of the step is found in the trace in its role, and the
  # shares are of the profiled op time.
  roles = row["by_role"]
  assert {"forward", "input_gradient", "kernel_gradient"} <= set(roles)
  assert all(0 < share <= 1 for share in roles.values())
  assert abs(sum(roles.values()) - 1) < 1e-6
  assert 0 < sum(row["by_kind"].values()) <= 1 + 1e-6
