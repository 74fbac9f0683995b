"""End to end: SGD on scikit-learn digits, snapshots per epoch, SWA then TWA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from sklearn.datasets import load_digits

import twa_jax as twa


class MLP(nn.Module):
  """A BN-free MLP (no batch statistics to recompute after averaging)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


def test_twa_from_swa_start_lowers_training_loss():
  digits = load_digits()
  x = jnp.asarray(digits.data / 16.0, jnp.float32)
  y = jnp.asarray(digits.target, jnp.int32)
  model = MLP()
  params = model.init(jax.random.key(0), x[:1])

  def loss_fn(p, xb, yb):
    logits = model.apply(p, xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  def make_step(tx):
    @jax.jit
    def step(p, s, xb, yb):
      grads = jax.grad(loss_fn)(p, xb, yb)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s
    return step

  train_loss = jax.jit(lambda p: loss_fn(p, x, y))
  batch, epochs = 128, 12
  num_batches = x.shape[0] // batch
  rng = np.random.default_rng(0)

  def run_epochs(step, p, s, count):
    for _ in range(count):
      perm = rng.permutation(x.shape[0])
      for b in range(num_batches):
        idx = perm[b * batch:(b + 1) * batch]
        p, s = step(p, s, x[idx], y[idx])
    return p, s

  sgd = optax.sgd(0.05, momentum=0.9)
  sgd_step, state = make_step(sgd), sgd.init(params)
  snapshots = []
  for _ in range(epochs):
    params, state = run_epochs(sgd_step, params, state, 1)
    snapshots.append(params)

  swa_start = 3  # SWA (and TWA's subspace) over epochs 4..12
  tail = snapshots[swa_start:]
  start = twa.swa(tail)
  basis = twa.basis_from_snapshots(tail)
  assert basis.dim == len(tail)
  swa_loss = float(train_loss(start))

  tx = twa.twa(basis, learning_rate=0.3, weight_decay=1e-5)
  twa_params, _ = run_epochs(make_step(tx), start, tx.init(start), 3)
  twa_loss = float(train_loss(twa_params))
  assert np.isfinite(twa_loss)
  assert twa_loss < 0.8 * swa_loss  # measured: about 0.5-0.6x, (swa_loss, twa_loss)

  # The solution is an average of the snapshots: sum(alpha) near 1.
  alpha = np.asarray(twa.averaging_coefficients(twa_params, tail, basis))
  residual = jax.tree.map(lambda a, *w: a - sum(c * wi for c, wi in zip(alpha, w)),
                          twa_params, *tail)
  assert max(float(jnp.abs(r).max()) for r in jax.tree_util.tree_leaves(residual)) < 1e-3
  assert 0.8 < alpha.sum() < 1.2, alpha.sum()
