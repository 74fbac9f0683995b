"""The optax transformations: project, twa, scale_by_subspace."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import helpers
import strategies
import twa_jax as twa


def _loss_weights(tree, seed: int) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.normal(size=np.shape(leaf)).astype(np.float32)
          for leaf in jax.tree_util.tree_leaves(tree)]


def _weighted_loss(tree, weights):
  """A smooth non-quadratic loss over any float tree (fixed random weights)."""
  return sum((jnp.sum(jnp.sin(3.0 * leaf) * c + 0.5 * leaf ** 2)
              for leaf, c in zip(jax.tree_util.tree_leaves(tree), weights)),
             jnp.float32(0))


_weighted_grad = helpers.jit_fast_compile(jax.grad(_weighted_loss))


def _grad_fn(seed: int):
  """The gradient of `_weighted_loss` with the weights drawn from `seed`,
  compiled once per tree structure."""
  return lambda tree: _weighted_grad(tree, _loss_weights(tree, seed))


# Fixed layouts: the gradients compile once per layout.
SNAPSHOTS = strategies.snapshot_sets(layout_strategy=strategies.fixed_layouts())


def _out_of_span(basis, tree) -> float:
  """|w - P P^T w| / |w| in float64 from the explicit basis rows."""
  p = strategies.basis_rows(basis)
  w = strategies.flat(tree)
  return float(np.linalg.norm(w - p.T @ (p @ w)) / max(np.linalg.norm(w), 1e-30))


def _run(tx, params, grad_fn, steps):
  state = tx.init(params)
  update = helpers.jit_fast_compile(tx.update)
  history = []
  for _ in range(steps):
    updates, state = update(grad_fn(params), state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  return history


def _combination(snaps, rng):
  alpha = rng.dirichlet(np.ones(snaps.n))
  return strategies.fill(snaps.layout, alpha @ snaps.matrix)


@settings(max_examples=10)
@given(SNAPSHOTS, st.sampled_from([0.0, 0.9]), st.booleans(),
       st.booleans(), st.integers(0, 2**32 - 1))
def test_twa_matches_explicit_update_and_stays_in_span(
    snaps, momentum, nesterov, schedule, seed):
  basis = twa.basis_from_snapshots(snaps.snapshots)
  rng = np.random.default_rng(seed)
  params = _combination(snaps, rng)
  lr = optax.exponential_decay(0.05, 1, 0.7) if schedule else 0.05
  wd = 1e-3
  tx = twa.twa(basis, lr, momentum=momentum, weight_decay=wd,
               nesterov=nesterov and momentum > 0)
  grad_fn = _grad_fn(seed)
  history = _run(tx, params, grad_fn, steps=4)

  # The recursion written out with the explicit float64 basis matrix.
  p = strategies.basis_rows(basis)
  w = strategies.flat(params)
  v = np.zeros_like(w)
  for t, got in enumerate(history):
    g = strategies.flat(grad_fn(strategies.fill(snaps.layout, w)))
    g = p.T @ (p @ g) + wd * w
    v = g + momentum * v
    step = g + momentum * v if nesterov and momentum > 0 else v
    w = w - (lr(t) if schedule else lr) * step
    np.testing.assert_allclose(strategies.flat(got), w,
                               atol=1e-5 * (1 + np.abs(w).max()))
    assert _out_of_span(basis, got) < 1e-5


@settings(max_examples=10)
@given(SNAPSHOTS, st.integers(0, 2**32 - 1))
def test_scale_by_subspace_adam_stays_in_span_where_chained_adam_leaves(snaps, seed):
  basis = twa.basis_from_snapshots(snaps.snapshots)
  rng = np.random.default_rng(seed)
  params = _combination(snaps, rng)
  grad_fn = _grad_fn(seed)
  tx = twa.scale_by_subspace(basis, optax.adam(0.05))
  state = tx.init(params)
  inner = jax.tree_util.tree_leaves(state)
  assert all(np.size(x) <= basis.dim for x in inner)  # O(n) state, not O(D)
  for got in _run(tx, params, grad_fn, steps=4):
    assert _out_of_span(basis, got) < 1e-5
  if basis.dim < basis.num_params // 2:
    # Element-wise Adam after the projection leaves the span (documented).
    chained = optax.chain(twa.project(basis), optax.adam(0.05))
    assert _out_of_span(basis, _run(chained, params, grad_fn, 2)[-1]) > 1e-3


@settings(max_examples=10)
@given(SNAPSHOTS, st.integers(0, 2**32 - 1))
def test_scale_by_subspace_sgd_equals_projected_sgd(snaps, seed):
  basis = twa.basis_from_snapshots(snaps.snapshots)
  params = strategies.fill(snaps.layout, np.random.default_rng(seed).normal(
      size=snaps.matrix.shape[1]))  # anywhere, not only in the span
  grad_fn = _grad_fn(seed)
  sgd = optax.sgd(0.03, momentum=0.9)
  a = _run(twa.scale_by_subspace(basis, sgd), params, grad_fn, 4)
  b = _run(optax.chain(twa.project(basis), sgd), params, grad_fn, 4)
  for x, y in zip(a, b):
    np.testing.assert_allclose(strategies.flat(x), strategies.flat(y),
                               atol=1e-5 * (1 + np.abs(strategies.flat(y)).max()))


# --- fixed small problem for the integration tests -----------------------------

def _problem(seed=0, n=4):
  rng = np.random.default_rng(seed)
  layout = {"conv": {"kernel": (3, 3, 2, 4), "bias": (4,)},
            "head": [(4, 3), (3,)], "scale": ()}
  def tree(scale):
    return jax.tree.map(
        lambda s: jnp.asarray((scale * rng.normal(size=s)).astype(np.float32)),
        layout, is_leaf=lambda x: isinstance(x, tuple))
  w0 = tree(1.0)
  snaps = [jax.tree.map(lambda a, b: a + b, w0, tree(0.05)) for _ in range(n)]
  return snaps, twa.basis_from_snapshots(snaps)


def _assert_trees_close(a, b, atol=1e-5):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  np.testing.assert_allclose(strategies.flat(a), strategies.flat(b), atol=atol)


def test_jitted_step_matches_eager_with_basis_as_argument():
  snaps, basis = _problem()
  params = twa.swa(snaps)
  weights = _loss_weights(params, 1)

  def step(basis, params, opt_state):
    grad_fn = functools.partial(jax.grad(_weighted_loss), weights=weights)
    tx = twa.twa(basis, 0.1)
    updates, opt_state = tx.update(grad_fn(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  jitted = jax.jit(step)
  tx = twa.twa(basis, 0.1)
  p_jit, s_jit = params, tx.init(params)
  p_eager, s_eager = params, tx.init(params)
  for _ in range(3):
    p_jit, s_jit = jitted(basis, p_jit, s_jit)
    p_eager, s_eager = step(basis, p_eager, s_eager)
  _assert_trees_close(p_jit, p_eager)
  assert _out_of_span(basis, p_jit) < 1e-5
  # Also with the basis closed over, and a jitted projection of a pytree.
  closed = jax.jit(lambda p, s: step(basis, p, s))
  _assert_trees_close(closed(params, tx.init(params))[0],
                      step(basis, params, tx.init(params))[0])


def test_inside_multisteps_equals_one_step_on_the_mean_gradient():
  snaps, basis = _problem()
  params = twa.swa(snaps)
  grads = [_grad_fn(s)(params) for s in range(3)]
  multi = optax.MultiSteps(twa.twa(basis, 0.1), every_k_schedule=3)
  state = multi.init(params)
  current = params
  for i, g in enumerate(grads):
    updates, state = multi.update(g, state, current)
    current = optax.apply_updates(current, updates)
    if i < 2:
      _assert_trees_close(current, params, atol=0)  # accumulating only
  mean = jax.tree.map(lambda *g: sum(g) / 3, *grads)
  tx = twa.twa(basis, 0.1)
  updates, _ = tx.update(mean, tx.init(params), params)
  _assert_trees_close(current, optax.apply_updates(params, updates))
  assert _out_of_span(basis, current) < 1e-5


def test_chained_with_inject_hyperparams_sgd():
  snaps, basis = _problem()
  params = twa.swa(snaps)
  grad_fn = _grad_fn(2)
  tx = optax.chain(twa.project(basis), optax.add_decayed_weights(1e-4),
                   optax.inject_hyperparams(optax.sgd)(learning_rate=0.1,
                                                       momentum=0.9))
  state = tx.init(params)
  p = strategies.basis_rows(basis)
  w, v = strategies.flat(params), 0.0
  current = params
  for lr in (0.1, 0.1, 0.02, 0.02):
    state[2].hyperparams["learning_rate"] = jnp.asarray(lr)
    updates, state = jax.jit(tx.update)(grad_fn(current), state, current)
    current = optax.apply_updates(current, updates)
    g = strategies.flat(grad_fn(strategies.fill(_layout_of(params), w)))
    v = p.T @ (p @ g) + 1e-4 * w + 0.9 * v
    w = w - lr * v
    np.testing.assert_allclose(strategies.flat(current), w, atol=1e-5)
  assert _out_of_span(basis, current) < 1e-5


def _layout_of(tree):
  return jax.tree.map(lambda l: strategies.Leaf(l.shape, l.dtype), tree)


def _data():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(32, 4)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray((x[:, 0] > 0).astype(np.int32))


def _xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.mark.parametrize("make_tx", [
    lambda b: twa.twa(b, 0.5),
    lambda b: twa.scale_by_subspace(b, optax.adam(0.05)),
])
def test_flax_nnx_state_parameter_trees(make_tx):
  x, y = _data()
  model = helpers.NNXMLP(nnx.Rngs(0))
  sgd = nnx.Optimizer(model, optax.sgd(0.3), wrt=nnx.Param)
  loss = lambda m: _xent(m(x), y)
  snaps = []
  for _ in range(5):
    sgd.update(model, nnx.grad(loss)(model))
    # nnx.state shares the model's Variables: detach each snapshot.
    snaps.append(jax.tree.map(jnp.copy, nnx.state(model, nnx.Param)))
  assert isinstance(snaps[0], nnx.State)
  basis = twa.basis_from_snapshots(snaps)
  assert basis.dim == 5
  start = twa.swa(snaps)
  assert isinstance(start, nnx.State)
  nnx.update(model, start)
  start_loss = float(loss(model))
  opt = nnx.Optimizer(model, make_tx(basis), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, opt):
    value, grads = nnx.value_and_grad(loss)(model)
    opt.update(model, grads)
    return value

  for _ in range(10):
    train_step(model, opt)
  state = nnx.state(model, nnx.Param)
  assert isinstance(state, nnx.State)
  assert _out_of_span(basis, state) < 1e-5
  assert float(loss(model)) < start_loss
  projected = basis.project(nnx.state(model, nnx.Param))
  assert isinstance(projected, nnx.State)


def test_flax_linen_param_dicts():
  x, y = _data()
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
  params = model.init(jax.random.key(0), x)
  assert isinstance(params, dict) and "params" in params
  loss = jax.jit(lambda p: _xent(model.apply(p, x), y))
  sgd = optax.sgd(0.3)
  state, snaps = sgd.init(params), []
  for _ in range(5):
    updates, state = sgd.update(jax.grad(loss)(params), state)
    params = optax.apply_updates(params, updates)
    snaps.append(params)
  basis = twa.basis_from_snapshots(snaps)
  start = twa.swa(snaps)
  tx = twa.twa(basis, 0.5)
  history = _run(tx, start, jax.grad(loss), 10)
  assert _out_of_span(basis, history[-1]) < 1e-5
  assert float(loss(history[-1])) < float(loss(start))


def test_transformations_reject_mismatched_trees_naming_the_leaf():
  snaps, basis = _problem()
  params = snaps[0]
  bad = {**params, "conv": {**params["conv"], "bias": jnp.ones((5,))}}
  missing = {k: v for k, v in params.items() if k != "scale"}
  for tx in (twa.project(basis), twa.twa(basis, 0.1),
             twa.scale_by_subspace(basis, optax.adam(0.1))):
    with pytest.raises(ValueError, match=r"\['conv'\]\['bias'\].*\(5,\)"):
      tx.init(bad)
    with pytest.raises(ValueError, match=r"missing leaf \['scale'\]"):
      tx.init(missing)
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"\['conv'\]\['bias'\].*\(5,\)"):
      tx.update(bad, state, params)
  sub = twa.scale_by_subspace(basis, optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"\['conv'\]\['bias'\]"):
    sub.update(params, sub.init(params), bad)


def test_optimizer_states_hold_no_basis():
  """Checkpoints are P-free by construction: no state leaf is P-sized."""
  snaps, basis = _problem()
  params = twa.swa(snaps)
  grads = _grad_fn(4)(params)
  d, k = basis.num_params, basis.dim
  assert k >= 2
  for tx, budget in ((twa.project(basis), 0), (twa.twa(basis, 0.1), d + 1),
                     (twa.twa(basis, 0.1, momentum=0.0), 1),
                     (twa.scale_by_subspace(basis, optax.adam(0.05)), 2 * k + 1)):
    state = tx.init(params)
    _, state = jax.jit(tx.update)(grads, state, params)
    assert sum(np.size(x) for x in jax.tree_util.tree_leaves(state)) <= budget
