"""Smoke test of benchmarks/sharding.py: tiny sizes, 8 simulated devices."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sharding_benchmark_smoke(tmp_path):
  out = tmp_path / "sharding.json"
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "sharding.py"),
       "--smoke", "--storage", "float32,int8,int4", "--out", str(out)],
      check=True, capture_output=True, timeout=600, env=env)
  report = json.loads(out.read_text())
  assert report["environment"]["date"]
  everything = {(r["storage"], r["layout"], r["k"]): r for r in report["rows"]}
  rows = {key[1:]: r for key, r in everything.items() if key[0] == "float32"}
  assert set(rows) == {(l, k) for l in ("basis", "params") for k in (1, 2, 4, 8)}
  # Low-bit shards: a quarter or an eighth of float32's bytes plus a scale
  # and an offset per group; the same collectives (the params layout gathers
  # its slices padded to whole groups: 1008 entries for D = 1003).
  for (storage, layout, k), r in everything.items():
    f32 = rows[layout, k]
    ratio = r["P_MB_per_device"] / f32["P_MB_per_device"]
    assert {"float32": 0.999 < ratio < 1.001, "int8": 0.25 < ratio < 0.28,
            "int4": 0.125 < ratio < 0.15}[storage], (storage, layout, k, ratio)
    assert [c[0] for c in r["step_collectives"]] == [
        c[0] for c in f32["step_collectives"]]
    for c, c32 in zip(r["step_collectives"], f32["step_collectives"]):
      assert c32[1] <= c[1] <= 1.01 * c32[1]
  d, n = report["D"], report["n"]
  for (layout, k), r in rows.items():
    # Memory per device is what the layout promises.
    assert r["shard_shape"] == r["promised_shape"] == (
        [-(-n // k), d] if layout == "basis" else [n, -(-d // k)])
    assert math.isfinite(r["project_ms"]) and r["project_ms"] > 0
    # Communication read from the compiled step: none on one device; the
    # paper's scheme (basis) is the gradient all-reduce plus one of D; the
    # params layout sends less.
    if k == 1:
      assert r["step_wire_MB"] == 0
    elif layout == "basis":
      assert sorted(c[:2] for c in r["step_collectives"]) == [
          ["all-reduce", d], ["all-reduce", d]]
      assert math.isclose(r["step_wire_MB"], r["paper_wire_MB"])
    else:
      assert ["all-reduce", n] in [c[:2] for c in r["step_collectives"]]
      assert r["step_wire_MB"] < r["paper_wire_MB"]
