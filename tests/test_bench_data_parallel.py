"""Smoke test of benchmarks/data_parallel.py: 8 simulated devices, the MLP,
the state replicated and FSDP-split; and its classification of collectives."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from jax.sharding import AbstractMesh

from twa_jax.training import parallel

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import data_parallel  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_data_parallel_step_reduces_the_gradient_once(tmp_path):
  out = tmp_path / "data_parallel.json"
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "data_parallel.py"),
       "--smoke", "--out", str(out)],
      check=True, capture_output=True, timeout=600, env=env)
  rows = {(r["step"], r["param_sharding"]): r
          for r in json.loads(out.read_text())["rows"]}
  assert set(rows) == {(step, sharding)
                       for step in ("sgd", "twa_params", "twa_basis")
                       for sharding in ("replicated", "fsdp")}
  for r in rows.values():
    assert r["devices"] == 8
    # One collective reduces the gradient (with FSDP XLA may reduce some
    # kernels' gradients in no collective: their layers then run on the
    # gathered batch).
    assert r["gradient_all_reduces"] + r["gradient_reduce_scatters"] == 1, r
    assert 1 <= r["kernel_gradients_reduced"] <= r["kernels"], r
    # TWA's basis (N snapshots of D) never travels.
    assert r["all_gathered_elements"] < data_parallel.N * r["D"], r
  replicated = {step: r for (step, sharding), r in rows.items()
                if sharding == "replicated"}
  for r in replicated.values():
    # One all-reduce carries every kernel's whole gradient.
    assert r["kernel_gradients_reduced"] == r["kernels"] == 3, r
    assert r["all_reduced_elements"] >= r["D"], r
    assert r["reduce_scatters"] == 0, r
  # The gradient and the metrics; nothing else travels.
  assert replicated["sgd"]["all_reduces"] == 2
  assert replicated["sgd"]["all_gathers"] == 0
  assert replicated["sgd"]["other_collectives"] == {}
  # TWA adds its layout's collectives: the params layout gathers the
  # projected slices, the basis layout all-reduces a second D-vector.
  assert replicated["twa_params"]["all_gathers"] == 1
  assert replicated["twa_params"]["all_gathered_elements"] >= \
      replicated["twa_params"]["D"]
  assert replicated["twa_basis"]["all_reduced_elements"] >= \
      2 * replicated["sgd"]["D"]
  # Split parameters are gathered (or the activations are) before use.
  for step in ("sgd", "twa_params", "twa_basis"):
    assert rows[step, "fsdp"]["all_gathers"] > 0, rows[step, "fsdp"]


def test_classify_counts_reduce_scattered_gradient_shards():
  # An MLP's kernels split FSDP-style over 8 devices; lines in the form of
  # compiled HLO: a kernel shard's gradient reduce-scattered (transposed),
  # a whole kernel's gradient all-reduced with a bias's, an all-reduce of
  # activations in the forward pass and the gather of a kernel.
  params = {"Dense_0": {"kernel": np.zeros((64, 256)),
                        "bias": np.zeros(256)},
            "Dense_1": {"kernel": np.zeros((256, 10)), "bias": np.zeros(10)}}
  shardings = parallel.state_sharding(
      params, AbstractMesh((8,), (parallel.DATA_AXIS,)), "fsdp")
  backward = 'metadata={op_name="jit(step)/transpose(jvp(MLP))/Dense_%d/dot"}'
  text = "\n".join([
      "  %ag = f32[64,256]{1,0} all-gather(%p0), dimensions={1}, "
      + backward.replace("transpose(jvp(MLP))", "jvp(MLP)") % 0,
      "  %ar = f32[128,256]{1,0} all-reduce(%a), to_apply=%add, "
      + backward.replace("transpose(jvp(MLP))", "jvp(MLP)") % 0,
      "  %rs = f32[32,64]{1,0} reduce-scatter(%g0), dimensions={0}, "
      "to_apply=%add, " + backward % 0,
      "  ROOT %ar.1 = (f32[10,256]{1,0}, f32[10]{0}) all-reduce(%g1, %b1), "
      "to_apply=%add, " + backward % 1,
      "  %cp = f32[32]{0} collective-permute(%x), source_target_pairs={{0,1}}",
  ])
  row = data_parallel.classify(text, params, shardings)
  assert row["kernels"] == row["kernel_gradients_reduced"] == 2
  assert (row["reduce_scatters"], row["gradient_reduce_scatters"],
          row["reduce_scattered_elements"]) == (1, 1, 32 * 64)
  assert (row["all_reduces"], row["gradient_all_reduces"],
          row["other_all_reduces"]) == (2, 1, 1)
  assert row["all_reduced_elements"] == 128 * 256 + 10 * 256 + 10
  assert (row["all_gathers"], row["all_gathered_elements"]) == (1, 64 * 256)
  assert row["other_collectives"] == {"collective-permute": 1}
  assert row["other_collective_elements"] == 32
