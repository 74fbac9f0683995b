"""Averaging while training: running SWA/EMA averages and the SWA schedule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import twa_jax as twa


def _trees(n, seed):
  rng = np.random.default_rng(seed)
  return [{"w": rng.normal(size=(3, 2)).astype(np.float32),
           "b": rng.normal(size=(2,)).astype(np.float32),
           "step": np.int32(i)} for i in range(n)]


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 6), st.sampled_from([None, 0.5, 0.9]),
       st.integers(0, 2**32 - 1))
def test_running_average_matches_direct_mean_and_ema(n, decay, seed):
  trees = _trees(n, seed)
  avg = twa.init_running_average(trees[0])
  update = jax.jit(lambda a, p: twa.update_running_average(a, p, decay=decay))
  for tree in trees:
    avg = update(avg, tree)
  assert int(avg.count) == n
  for key in ("w", "b"):
    values = np.stack([t[key].astype(np.float64) for t in trees])
    if decay is None:
      expected = values.mean(axis=0)
    else:
      expected = values[0]
      for v in values[1:]:
        expected = decay * expected + (1 - decay) * v
    np.testing.assert_allclose(avg.params[key], expected, rtol=1e-5, atol=1e-6)
  assert int(avg.params["step"]) == n - 1  # non-float leaves follow the last


def test_with_running_average_averages_the_chosen_iterates():
  target = np.array([1.0, -2.0, 3.0], np.float32)
  grad = jax.grad(lambda p: jnp.sum((p["x"] - target) ** 2))
  inner = optax.sgd(0.1, momentum=0.5)
  tx = twa.with_running_average(inner, start=2, every=3)
  params = {"x": jnp.zeros(3)}
  state = tx.init(params)
  step = jax.jit(tx.update)
  ref_params, ref_state, iterates = params, inner.init(params), []
  for s in range(1, 12):
    updates, state = step(grad(params), state, params)
    params = optax.apply_updates(params, updates)
    ref_updates, ref_state = inner.update(grad(ref_params), ref_state)
    ref_params = optax.apply_updates(ref_params, ref_updates)
    np.testing.assert_allclose(params["x"], ref_params["x"], rtol=1e-6)
    if s >= 2 and (s - 2) % 3 == 0:
      iterates.append(np.asarray(ref_params["x"], np.float64))
  assert int(state.average.count) == len(iterates) == 4  # steps 2, 5, 8, 11
  np.testing.assert_allclose(state.average.params["x"],
                             np.mean(iterates, axis=0), rtol=1e-5)
  with pytest.raises(ValueError, match="params"):
    tx.update(grad(params), state)
  with pytest.raises(ValueError, match="every >= 1"):
    twa.with_running_average(inner, every=0)


def _torch_swalr(base_lr, swa_lr, anneal_epochs, anneal, steps):
  """torch.optim.swa_utils.SWALR.get_lr, transcribed (recursive form)."""
  func = ((lambda t: (1 - math.cos(math.pi * t)) / 2) if anneal == "cos"
          else (lambda t: t))
  lr, out = base_lr, []
  for step in range(steps):
    if anneal_epochs == 0:
      step = max(1, step)
    prev_t = max(0, min(1, (step - 1) / max(1, anneal_epochs)))
    prev_alpha = func(prev_t)
    initial = swa_lr if prev_alpha == 1 else (
        (lr - prev_alpha * swa_lr) / (1 - prev_alpha))
    t = max(0, min(1, step / max(1, anneal_epochs)))
    alpha = func(t)
    lr = swa_lr * alpha + initial * (1 - alpha)
    out.append(lr)
  return np.array(out)


@pytest.mark.parametrize("anneal", ["cos", "linear"])
@pytest.mark.parametrize("anneal_steps", [0, 1, 5])
def test_swa_lr_schedule_matches_torch_swalr(anneal, anneal_steps):
  schedule = twa.swa_lr_schedule(0.4, 0.05, anneal_steps, anneal=anneal)
  got = np.array([float(schedule(t)) for t in range(12)])
  np.testing.assert_allclose(
      got, _torch_swalr(0.4, 0.05, anneal_steps, anneal, 12), rtol=1e-6)
  with pytest.raises(ValueError, match="anneal"):
    twa.swa_lr_schedule(0.4, 0.05, 5, anneal="step")
