"""TWA dropped into the training loops people write, one test per style.

Each loop trains a few steps with one line of twa_jax in it and is checked
against the explicit computation in float64 numpy: v <- m v + P P^T g +
lambda w, w <- w - lr v on the spanned leaves, frozen leaves unchanged; the
iterates stay in the span.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import helpers
import strategies
import twa_jax as twa

LR, MOMENTUM, WD, STEPS = 0.2, 0.9, 1e-3, 4
TESTS = pathlib.Path(__file__).parent
MODEL = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])


def _data():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(32, 4)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray((x[:, 0] + x[:, 1] > 0).astype(np.int32))


X, Y = _data()


def _xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def loss(params, x=X, y=Y):
  return _xent(MODEL.apply({"params": params}, x), y)


def _build(snaps, trainable=None):
  return twa.basis_from_snapshots(snaps, trainable=trainable)


@functools.cache
def _linen_problem():
  """Five SGD snapshots of the linen MLP (SGD has not converged: TWA moves)."""
  params = MODEL.init(jax.random.key(0), X)["params"]
  grad = jax.jit(jax.grad(loss))
  snaps = []
  for _ in range(5):
    params = jax.tree.map(lambda w, g: w - 0.5 * g, params, grad(params))
    snaps.append(params)
  return snaps, twa.swa(snaps)


HEAD = {"layers_0": False, "layers_2": True}  # fine-tune the head only


def _paths(tree):
  """{leaf path: leaf} of a tree of arrays."""
  return {jax.tree_util.keystr(p): leaf
          for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _reference(basis, start, grad_fn, lrs, steps_skipped=()):
  """Float64 iterates of projected momentum SGD with coupled weight decay."""
  p = strategies.basis_rows(basis)
  paths = basis.spec.paths
  base = _paths(start)
  frozen = {k: np.asarray(base[k], np.float64) for k in base if k not in paths}
  def flat(tree):
    named = _paths(tree)
    return np.concatenate([np.asarray(named[k], np.float64).ravel()
                           for k in paths])
  def tree_of(w):
    return basis.spec.unravel(jnp.asarray(w, jnp.float32))
  w, v, out = flat(start), 0.0, []
  for i, lr in enumerate(lrs):
    if i not in steps_skipped:
      g = flat(grad_fn(tree_of(w), i))
      v = MOMENTUM * v + p.T @ (p @ g) + WD * w
      w = w - lr * v
    out.append(w)
  return out, frozen


def _check(basis, history, reference, frozen=None, atol=2e-5):
  assert len(history) == len(reference)
  for got, want in zip(history, reference):
    named = _paths(got)
    flat = np.concatenate([np.asarray(named[k], np.float64).ravel()
                           for k in basis.spec.paths])
    np.testing.assert_allclose(flat, want, atol=atol)
    p = strategies.basis_rows(basis)
    assert np.linalg.norm(flat - p.T @ (p @ flat)) <= 1e-5 * np.linalg.norm(flat)
    for k, value in (frozen or {}).items():
      np.testing.assert_array_equal(np.asarray(named[k], np.float64), value)
  assert np.linalg.norm(reference[-1] - reference[0]) > 1e-3  # it trained


def _linen_reference(basis, start, lrs=(LR,) * STEPS, **kw):
  # Gradients of the full tree (frozen leaves at their start values).
  base = start
  def grad_fn(spanned, _):
    full = _merge(base, spanned)
    return jax.grad(loss)(full)
  return _reference(basis, start, grad_fn, lrs, **kw)


def _merge(full, spanned):
  """`full` with the leaves of `spanned` (None where frozen) put in."""
  named = _paths(spanned)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(full)
  return jax.tree_util.tree_unflatten(treedef, [
      named.get(jax.tree_util.keystr(p), leaf) for p, leaf in leaves])


def _tx(basis):
  return twa.twa(basis, LR, momentum=MOMENTUM, weight_decay=WD)


@pytest.mark.parametrize("donate", [False, True])
def test_plain_jit_step(donate):
  snaps, start = _linen_problem()
  basis = _build(snaps)
  tx = _tx(basis)  # the one line of twa_jax

  @functools.partial(jax.jit, donate_argnums=(0, 1) if donate else ())
  def step(params, opt_state):
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = jax.tree.map(jnp.array, start)
  opt_state, history = tx.init(params), []
  for _ in range(STEPS):
    params, opt_state = step(params, opt_state)
    history.append(jax.device_get(params))
  _check(basis, history, _linen_reference(basis, start)[0])


def test_flax_train_state():
  snaps, start = _linen_problem()
  basis = _build(snaps)
  state = train_state.TrainState.create(apply_fn=MODEL.apply, params=start,
                                        tx=_tx(basis))

  @jax.jit
  def step(state):
    return state.apply_gradients(grads=jax.grad(loss)(state.params))

  history = []
  for _ in range(STEPS):
    state = step(state)
    history.append(state.params)
  _check(basis, history, _linen_reference(basis, start)[0])


def _set_params(model, pure):
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)


def _nnx_loss(model):
  return _xent(model(X), Y)


def test_nnx_optimizer_with_nnx_jit_and_pure_dict_snapshots():
  model = helpers.NNXMLP(nnx.Rngs(0))
  sgd = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
  snaps = []
  for _ in range(5):
    sgd.update(model, nnx.grad(_nnx_loss)(model))
    snaps.append(jax.tree.map(np.array, nnx.to_pure_dict(
        nnx.state(model, nnx.Param))))  # as a store would keep them
  basis = _build(snaps)
  start = twa.swa(snaps)
  _set_params(model, start)
  opt = nnx.Optimizer(model, _tx(basis), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    opt.update(model, nnx.grad(_nnx_loss)(model))

  history = []
  for _ in range(STEPS):
    step(model, opt)
    history.append(nnx.to_pure_dict(nnx.state(model, nnx.Param)))

  def grad_fn(pure, _):
    probe = helpers.NNXMLP(nnx.Rngs(0))
    _set_params(probe, pure)
    return nnx.to_pure_dict(nnx.grad(_nnx_loss)(probe))

  _check(basis, history,
         _reference(basis, start, grad_fn, (LR,) * STEPS)[0])
  # The optimizer state (what an NNX checkpoint saves) holds no P.
  sizes = [np.size(x) for x in jax.tree.leaves(nnx.state(opt))]
  assert max(sizes) < basis.dim * basis.num_params
  assert sum(sizes) <= 2 * basis.num_params + 8  # momentum (+ model copy)


# The programs jit lowers (a trace and an XLA compile each), by name.
LOWERING = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@contextlib.contextmanager
def _lowerings():
  count = collections.Counter()
  def listen(event, duration, *, fun_name="", **_):
    del duration
    if event == LOWERING:
      count[fun_name] += 1
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield count
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


def _steps_lowered(run, state, commit: bool) -> int:
  """Lowerings of `step` over three calls from `state`, put on the device
  first if `commit`."""
  if commit:
    state = jax.device_put(state, jax.devices()[0])
  with _lowerings() as count:
    for _ in range(3):
      state = run(state)
  return count["jit(step)"]


def _jit_lowered(tx, commit: bool) -> int:
  @jax.jit
  def step(params, opt_state):
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  params = jax.tree.map(jnp.array, _linen_problem()[1])
  return _steps_lowered(lambda s: step(*s), (params, tx.init(params)), commit)


def _train_state_lowered(tx, commit: bool) -> int:
  @jax.jit
  def step(state):
    return state.apply_gradients(grads=jax.grad(loss)(state.params))
  state = train_state.TrainState.create(
      apply_fn=MODEL.apply, params=jax.tree.map(jnp.array, _linen_problem()[1]),
      tx=tx)
  return _steps_lowered(step, state, commit)


def _nnx_lowered(tx, commit: bool) -> int:
  @nnx.jit
  def step(model, opt):
    opt.update(model, nnx.grad(_nnx_loss)(model))
  model = helpers.NNXMLP(nnx.Rngs(0))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  def run(state):
    nnx.update((model, opt), state)
    step(model, opt)
    return nnx.state((model, opt))
  return _steps_lowered(run, nnx.state((model, opt)), commit)


@pytest.mark.parametrize("style", ["jit", "train_state", "nnx"])
def test_a_state_on_the_device_compiles_the_step_once(style):
  """jit keys its programs on whether the inputs are committed to a device.
  The basis' Refs always are, so TWA's first step returns committed arrays:
  from an uncommitted state the step compiles twice where optax's SGD
  compiles once; put on the device first (the README's loops), once."""
  lowered = {"jit": _jit_lowered, "train_state": _train_state_lowered,
             "nnx": _nnx_lowered}[style]
  if style == "nnx":
    params = nnx.to_pure_dict(nnx.state(helpers.NNXMLP(nnx.Rngs(0)), nnx.Param))
    snaps = [jax.tree.map(lambda w, i=i: w + 0.1 * i * jnp.cos(w + i), params)
             for i in range(4)]
  else:
    snaps = _linen_problem()[0]
  basis = _build(snaps)
  assert [lowered(optax.sgd(LR, MOMENTUM), c) for c in (False, True)] == [1, 1]
  assert [lowered(_tx(basis), c) for c in (False, True)] == [2, 1]


def _frozen_reference(basis, start):
  ref, frozen = _linen_reference(basis, start)
  assert frozen and all("layers_0" in k for k in frozen)
  return ref, frozen


@pytest.mark.parametrize("wrapper", ["masked", "multi_transform", "full_tree"])
def test_frozen_leaves(wrapper):
  snaps, start = _linen_problem()
  basis = _build(snaps, trainable=HEAD)
  assert basis.spec.frozen and basis.num_params == 8 * 2 + 2
  labels = {k: jax.tree.map(lambda _: "twa" if v else "frozen", start[k])
            for k, v in HEAD.items()}
  if wrapper == "masked":
    frozen_mask = {k: not v for k, v in HEAD.items()}
    tx = optax.chain(optax.masked(_tx(basis), HEAD),
                     optax.masked(optax.set_to_zero(), frozen_mask))
  elif wrapper == "multi_transform":
    tx = optax.multi_transform({"twa": _tx(basis),
                                "frozen": optax.set_to_zero()}, labels)
  else:
    tx = _tx(basis)  # frozen leaves get a zero update

  @jax.jit
  def step(params, opt_state):
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, history = start, []
  opt_state = tx.init(params)
  for _ in range(STEPS):
    params, opt_state = step(params, opt_state)
    history.append(params)
  ref, frozen = _frozen_reference(basis, start)
  _check(basis, history, ref, frozen)


def test_masked_with_a_basis_over_every_leaf_names_the_leaf():
  snaps, start = _linen_problem()
  tx = optax.masked(_tx(_build(snaps)), HEAD)
  with pytest.raises(ValueError, match=r"missing leaf \['layers_0'\].*masked"):
    tx.init(start)


def test_inject_hyperparams_under_jit():
  snaps, start = _linen_problem()
  basis = _build(snaps)
  tx = optax.inject_hyperparams(twa.twa)(
      basis=basis, learning_rate=LR, momentum=MOMENTUM, weight_decay=WD)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
  params, state, history = start, tx.init(start), []
  lrs = (LR, LR, LR / 4, LR / 4)
  for lr in lrs:
    state.hyperparams["learning_rate"] = jnp.asarray(lr)
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    history.append(params)
  _check(basis, history, _linen_reference(basis, start, lrs)[0])


def test_weight_decay_zero_needs_no_params():
  snaps, start = _linen_problem()
  basis = _build(snaps)
  tx = twa.twa(basis, LR, weight_decay=0)
  grads = jax.grad(loss)(start)
  updates, _ = jax.jit(tx.update)(grads, tx.init(start))
  expected = basis.project(grads)
  np.testing.assert_allclose(strategies.flat(updates),
                             -LR * strategies.flat(expected), rtol=1e-5)


def test_multisteps_accumulates_microbatches():
  snaps, start = _linen_problem()
  basis = _build(snaps)
  tx = optax.MultiSteps(_tx(basis), every_k_schedule=2)
  halves = [(X[:16], Y[:16]), (X[16:], Y[16:])]

  @jax.jit
  def step(params, opt_state, x, y):
    grads = jax.grad(loss)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state, history = start, tx.init(start), []
  for _ in range(STEPS):
    for x, y in halves:
      params, opt_state = step(params, opt_state, x, y)
    history.append(params)

  def mean_grad(tree, _):
    grads = [jax.grad(loss)(tree, x, y) for x, y in halves]
    return jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  _check(basis, history,
         _reference(basis, start, mean_grad, (LR,) * STEPS)[0])


def test_apply_if_finite_skips_a_nan_step():
  snaps, start = _linen_problem()
  basis = _build(snaps)
  tx = optax.apply_if_finite(_tx(basis), max_consecutive_errors=3)

  @jax.jit
  def step(params, opt_state, poison):
    grads = jax.tree.map(lambda g: g * poison, jax.grad(loss)(params))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state, history = start, tx.init(start), []
  for i in range(STEPS):
    params, opt_state = step(params, opt_state, jnp.nan if i == 1 else 1.0)
    history.append(params)
  assert int(opt_state.total_notfinite) == 1
  _check(basis, history,
         _linen_reference(basis, start, steps_skipped=(1,))[0])


def test_library_import_is_light():
  """`import twa_jax` loads none of train.py's extras, nor flax (absl comes
  with orbax)."""
  code = ("import sys, twa_jax; print(' '.join(m for m in ('tensorflow_datasets',"
          " 'ml_collections', 'sklearn', 'matplotlib', 'tqdm',"
          " 'flax') if m in sys.modules))")
  env = dict(os.environ, PYTHONPATH=str(TESTS.parent), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                       capture_output=True, text=True).stdout.strip()
  assert out == ""


def test_mesh_sharded_basis_on_eight_simulated_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))
  result = subprocess.run(
      [sys.executable, str(TESTS / "multidevice_dropin.py")], env=env,
      cwd=TESTS.parent, capture_output=True, text=True, timeout=600,
      check=False)
  assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]


def test_scale_by_subspace_forwards_optax_extra_args():
  snaps, start = _linen_problem()
  basis = _build(snaps)

  def update_fn(updates, state, params=None, *, value):
    del params
    return jax.tree.map(lambda u: value * u, updates), state

  scale_by_value = optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update_fn)
  tx = optax.chain(twa.scale_by_subspace(basis, scale_by_value),
                   optax.scale(-LR))
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  grads = jax.grad(loss)(start)
  updates, _ = jax.jit(tx.update)(grads, tx.init(start), start, value=3.0)
  np.testing.assert_allclose(strategies.flat(updates),
                             -3.0 * LR * strategies.flat(basis.project(grads)),
                             rtol=1e-5, atol=1e-7)
