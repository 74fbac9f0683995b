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
       "--smoke", "--out", str(out)],
      check=True, capture_output=True, timeout=600, env=env)
  report = json.loads(out.read_text())
  assert report["environment"]["date"]
  rows = {(r["layout"], r["k"]): r for r in report["rows"]}
  assert set(rows) == {(l, k) for l in ("basis", "params") for k in (1, 2, 4, 8)}
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
