"""Smoke tests of the step-overhead, memory and GPU benchmark scripts.

Each script runs at tiny sizes (`--smoke`) and must write well-formed JSON;
no timing is asserted. The PyTorch side is a benchmark-only extra: its tests
skip when torch is not installed.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import twa_jax
from twa_jax import quantization

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
JAX_SIDES = {"jax_sgd", "jax_twa", "jax_project", "jax_project_flat", "copy"}
TORCH_SIDES = {"torch_sgd", "torch_twa", "torch_project"}
NO_TORCH = "torch is a benchmark-only extra (pip install -e '.[bench]')"


def _has_torch() -> bool:
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600, check=False, **kwargs)


def _positive(x) -> bool:
  return isinstance(x, float) and math.isfinite(x) and x > 0


def _check_step_report(path: pathlib.Path, *, torch: bool, dtype: str):
  report = json.loads(path.read_text())
  assert report["benchmark"] == "step_overhead"
  assert report["args"]["basis_dtype"] == dtype
  assert report["environment"]["backend"] == "cpu"
  (row,) = report["results"]
  assert (row["model"], row["n"]) == ("small_cnn", 3)
  assert row["num_params"] == twa_jax.ParamSpec.of(_small_cnn_params()).num_params
  sides = JAX_SIDES | (TORCH_SIDES if torch else set())
  assert set(row["median_s"]) == set(row["times_s"]) == sides
  for times in row["times_s"].values():
    assert len(times) == report["args"]["repeats"]
    assert all(_positive(t) for t in times)
  keys = ["copy_gbps"]
  for fw in ("jax", "torch") if torch else ("jax",):
    keys += [f"{fw}_ratio", f"{fw}_ratio_of_minima", f"{fw}_ratio_from_parts",
             f"{fw}_project_gbps"]
  if torch:
    keys.append("sgd_jax_over_torch")
  assert all(_positive(row[k]) for k in keys)
  assert ("torch_ratio" in row) == ("sgd_jax_over_torch" in row) == torch
  assert (report["torch"]["device"] == "cpu") == torch
  if not torch:
    assert report["torch"]["note"]  # says why the PyTorch side is missing
  return report


def _small_cnn_params():
  from twa_jax.training import models  # pylint: disable=g-import-not-at-top
  model = models.create_model("small_cnn", 10)
  return jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                         train=False))["params"]


def test_gpu_script_smoke_runs_step_overhead_float32_and_bfloat16(tmp_path):
  proc = _run(["bash", str(BENCH / "gpu.sh"), "--smoke", str(tmp_path)])
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  _check_step_report(tmp_path / "gpu_step_overhead_1.json",
                     torch=_has_torch(), dtype="float32")
  _check_step_report(tmp_path / "gpu_step_overhead_2.json", torch=False,
                     dtype="bfloat16")


def test_gpu_script_refuses_to_run_without_a_gpu(tmp_path):
  proc = _run(["bash", str(BENCH / "gpu.sh"), str(tmp_path)])
  assert proc.returncode != 0
  assert "not a GPU" in proc.stderr
  assert not list(tmp_path.iterdir())


def test_step_overhead_rejects_an_unknown_model(tmp_path):
  proc = _run([sys.executable, str(BENCH / "step_overhead.py"),
               "--models", "small_cnn,resnet_9000", "--out",
               str(tmp_path / "x.json")])
  assert proc.returncode == 2 and "resnet_9000" in proc.stderr
  assert not (tmp_path / "x.json").exists()


def test_memory_smoke(tmp_path):
  out = tmp_path / "memory.json"
  proc = _run([sys.executable, str(BENCH / "memory.py"), "--smoke",
               "--out", str(out)])
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["benchmark"] == "memory" and not report["skipped"]
  sgd, twa, plain = report["results"]
  assert (sgd["phase"], twa["phase"], plain["phase"]) == ("sgd", "twa", "twa")
  assert (twa["step"], plain["step"], twa["n"], plain["n"]) == (
      "donated", "plain", 2, 2)
  for r in (twa, plain):
    assert r["basis_dim"] == 2
    assert r["basis_mb"] == pytest.approx(2 * r["num_params"] * 4 / 2**20)
    assert _positive(r["peak_setup_mb"])
  for r in (sgd, twa, plain):
    assert all(_positive(r[k]) for k in ("rss_init_mb", "peak_compile_mb",
                                         "peak_steps_mb"))
  assert sgd["steps_peak_vs_sgd"] == 1.0


@pytest.mark.parametrize("name", ["small_cnn", "resnet20", "vgg16",
                                  "preresnet164"])
def test_torch_twins_have_the_flax_parameter_counts(name, monkeypatch):
  pytest.importorskip("torch", reason=NO_TORCH)
  monkeypatch.syspath_prepend(str(BENCH))
  import step_overhead  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top
  model = torch_reference.create_model(name, 10)
  assert torch_reference.num_params(model) == step_overhead.num_params(name)


def test_torch_reference_projection_matches_basis_project(monkeypatch):
  torch = pytest.importorskip("torch", reason=NO_TORCH)
  monkeypatch.syspath_prepend(str(BENCH))
  import torch_reference  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = torch_reference.create_model("small_cnn", 10)
  x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
  torch.nn.functional.cross_entropy(model(x), y).backward()
  grads = torch_reference.grad_vector(model).numpy().copy()
  rng = np.random.default_rng(0)
  snapshots = [rng.standard_normal(grads.size).astype(np.float32)
               for _ in range(5)]
  basis = twa_jax.basis_from_snapshots(snapshots)
  torch_reference.project_grads(model, torch.from_dlpack(basis.read_vectors()))
  projected = torch_reference.grad_vector(model).numpy()
  expected = np.asarray(basis.project(jnp.asarray(grads)))
  np.testing.assert_allclose(projected, expected, rtol=1e-4,
                             atol=1e-5 * np.abs(expected).max())
  # ...and P P^T is a projection: applying it again changes nothing.
  torch_reference.project_grads(model, torch.from_dlpack(basis.read_vectors()))
  np.testing.assert_allclose(torch_reference.grad_vector(model).numpy(),
                             projected, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int4"])
def test_random_basis_quantizes_row_by_row_as_quantize_does(dtype, monkeypatch):
  monkeypatch.syspath_prepend(str(BENCH))
  import common  # pylint: disable=g-import-not-at-top
  spec = twa_jax.ParamSpec.of({"a": jnp.zeros((300, 2)), "b": jnp.zeros((37,))})
  rows = common.random_basis(spec, 4, "float32", seed=3).read_vectors()
  basis = common.random_basis(spec, 4, dtype, seed=3)
  assert basis.nbytes == common.basis_bytes(4, spec.num_params, dtype)
  expected = (quantization.quantize(rows, dtype)
              if dtype in quantization.BITS else rows.astype(dtype))
  got = basis.read_vectors()
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_step_overhead_loops_smoke(tmp_path):
  out = tmp_path / "loops.json"
  cmd = [sys.executable, str(BENCH / "step_overhead.py"), "--loops", "--smoke",
         "--out", str(out)]
  proc = _run(cmd + ([] if _has_torch() else ["--torch", "off"]))
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  (row,) = report["loops"]
  styles = {"jit", "donated", "train_state", "nnx"} | (
      {"torch"} if _has_torch() else set())
  assert set(row["ratio"]) == styles
  assert set(row["times_s"]) == {f"{s}_{k}" for s in styles
                                 for k in ("sgd", "twa")}
  assert row["num_params"] == 32 * 64 + 64 + 64 * 10 + 10 and row["n"] == 3
  assert all(_positive(r) for r in row["ratio"].values())
  assert all(len(t) == 2 and all(_positive(x) for x in t)
             for t in row["times_s"].values())


def test_conv_layers_smoke_lists_each_conv_and_matches_pytorch(tmp_path):
  out = tmp_path / "conv.json"
  cmd = [sys.executable, str(BENCH / "conv_layers.py"), "--smoke", "--out",
         str(out)]
  proc = _run(cmd + ([] if _has_torch() else ["--torch", "off"]))
  assert proc.returncode == 0, proc.stderr[-3000:]
  (result,) = json.loads(out.read_text())["results"]
  layers = result["layers"]
  # small_cnn's four convs, in forward order (its kernels sort as Conv_0..3),
  # each used once; the first reads the batch of 2 images.
  kernels = [list(p.shape) for p in jax.tree.leaves(_small_cnn_params())
             if p.ndim == 4]
  assert [l["kernel"] for l in layers] == kernels
  assert [l["count"] for l in layers] == [1, 1, 1, 1]
  assert layers[0]["lhs"] == [2, 32, 32, 3]
  roles = ("forward", "input_gradient", "kernel_gradient")
  sides = ("jax", "torch") if _has_torch() else ("jax",)
  for l in layers:
    assert set(l["median_ms"]) == {f"{s}_{r}" for s in sides for r in roles}
    assert all(_positive(v) for v in l["median_ms"].values())
    if _has_torch():  # both compute the same convolution in every role
      assert all(d < 1e-5 for d in l["max_rel_diff"].values()), l
  # The step never computes the gradient of the images.
  assert result["total_ms"]["jax_input_gradient"] == pytest.approx(
      sum(l["median_ms"]["jax_input_gradient"] for l in layers[1:]))
