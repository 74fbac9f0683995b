"""twa_jax.batch_norm: exact batch statistics against a direct numpy pass."""

import jax
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from twa_jax import batch_norm

EPS = 1e-5


def _reference(x_batches, dense1, bn1, dense2):
  """Batch-size-weighted mean/var of the two BN inputs, in float64 numpy,
  with the first BN normalizing by each batch's own statistics."""
  sums = {k: 0.0 for k in ("m1", "v1", "m2", "v2")}
  total = 0
  for x in x_batches:
    x = np.asarray(x, np.float64)
    h1 = x @ dense1[0] + dense1[1]
    m1, v1 = h1.mean(0), h1.var(0)
    a = np.maximum((h1 - m1) / np.sqrt(v1 + EPS) * bn1[0] + bn1[1], 0.0)
    h2 = a @ dense2[0] + dense2[1]
    n = len(x)
    for key, value in (("m1", m1), ("v1", v1), ("m2", h2.mean(0)),
                       ("v2", h2.var(0))):
      sums[key] = sums[key] + n * value
    total += n
  return {k: v / total for k, v in sums.items()}


def _batches(sizes=(8, 5, 11), dim=3, seed=0):
  rng = np.random.default_rng(seed)
  return [(2.0 + rng.normal(size=(n, dim))).astype(np.float32) for n in sizes]


class _Linen(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(6)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                     epsilon=EPS)(x)
    x = nn.Dense(4)(nn.relu(x))
    return nn.BatchNorm(epsilon=EPS)(x, use_running_average=not train)


def test_linen_update_bn_matches_a_direct_computation():
  model = _Linen()
  batches = _batches()
  variables = model.init(jax.random.key(0), batches[0], train=False)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  # Non-trivial scale/bias, so the second layer sees the first's output.
  p["BatchNorm_0"]["scale"] = np.linspace(0.5, 2.0, 6)
  p["BatchNorm_0"]["bias"] = np.linspace(-0.3, 0.4, 6)
  variables = {"params": jax.tree.map(lambda a: a.astype(np.float32), p),
               "batch_stats": variables["batch_stats"]}
  apply = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
  out = batch_norm.update_bn(apply, variables, iter(batches))
  ref = _reference(batches, (p["Dense_0"]["kernel"], p["Dense_0"]["bias"]),
                   (p["BatchNorm_0"]["scale"], p["BatchNorm_0"]["bias"]),
                   (p["Dense_1"]["kernel"], p["Dense_1"]["bias"]))
  stats = out["batch_stats"]
  np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], ref["m1"], rtol=1e-5)
  np.testing.assert_allclose(stats["BatchNorm_0"]["var"], ref["v1"], rtol=1e-4)
  np.testing.assert_allclose(stats["BatchNorm_1"]["mean"], ref["m2"],
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["BatchNorm_1"]["var"], ref["v2"], rtol=1e-4)
  assert out["params"] is variables["params"]


def test_linen_update_bn_errors():
  model = _Linen()
  batches = _batches()
  variables = model.init(jax.random.key(0), batches[0], train=False)
  train = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
  with pytest.raises(ValueError, match="empty"):
    batch_norm.update_bn(train, variables, [])
  with pytest.raises(ValueError, match="BatchNorm_0 in inference mode"):
    batch_norm.update_bn(lambda v, x: model.apply(v, x, train=False),
                         variables, batches)
  with pytest.raises(ValueError, match="no 'batch_stats'"):
    batch_norm.update_bn(train, {"params": variables["params"]}, batches)


class _NNX(nnx.Module):

  def __init__(self, rngs):
    self.dense1 = nnx.Linear(3, 6, rngs=rngs)
    self.bn1 = nnx.BatchNorm(6, momentum=0.9, epsilon=EPS, rngs=rngs)
    self.dense2 = nnx.Linear(6, 4, rngs=rngs)
    self.bn2 = nnx.BatchNorm(4, epsilon=EPS, rngs=rngs)

  def __call__(self, x):
    return self.bn2(self.dense2(nnx.relu(self.bn1(self.dense1(x)))))


def test_nnx_update_bn_matches_a_direct_computation_and_restores_modes():
  model = _NNX(nnx.Rngs(0))
  model.bn1.scale[...] = np.linspace(0.5, 2.0, 6).astype(np.float32)
  model.bn1.bias[...] = np.linspace(-0.3, 0.4, 6).astype(np.float32)
  model.eval()
  batches = _batches(seed=1)
  batch_norm.update_bn_nnx(model, batches)
  f64 = lambda v: np.asarray(v[...], np.float64)
  ref = _reference(batches, (f64(model.dense1.kernel), f64(model.dense1.bias)),
                   (f64(model.bn1.scale), f64(model.bn1.bias)),
                   (f64(model.dense2.kernel), f64(model.dense2.bias)))
  np.testing.assert_allclose(model.bn1.mean[...], ref["m1"], rtol=1e-5)
  np.testing.assert_allclose(model.bn1.var[...], ref["v1"], rtol=1e-4)
  np.testing.assert_allclose(model.bn2.mean[...], ref["m2"], rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(model.bn2.var[...], ref["v2"], rtol=1e-4)
  assert model.bn1.momentum == 0.9 and model.bn2.momentum == 0.99
  assert model.bn1.use_running_average and model.bn2.use_running_average
  with pytest.raises(ValueError, match="empty"):
    batch_norm.update_bn_nnx(model, [])
  with pytest.raises(ValueError, match="no nnx.BatchNorm"):
    batch_norm.update_bn_nnx(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), batches)
