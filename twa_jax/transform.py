"""Optax gradient transformations that train inside the snapshot subspace.

The transformations close over the basis: their states hold no P, so a
checkpoint of the optimizer state is P-free and a jitted step that returns
the state writes no copy of P. The basis keeps P in `jax.Ref`s, which a
closure captures by reference (neither embedded as a constant nor copied).
Refs are committed to their device, so a step's outputs are too: put the
training state on the device before the first step (`jax.device_put`), or
jit compiles the step a second time at step 2.

References:
  Li et al., "Trainable Weight Averaging: Efficient Training by Optimizing
  Historical Solutions", ICLR 2023 (Algorithm 1).
  Li et al., "Trainable Weight Averaging: Accelerating Training and Improving
  Generalization", arXiv 2205.13104 (coefficient-space optimizers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from twa_jax.basis import Basis
from twa_jax.blocks import BlockBasis

PyTree = Any
AnyBasis = Basis | BlockBasis


def _in_span(basis: AnyBasis, tree: PyTree, what: str
             ) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
  """The spanned part of `tree` in the basis' structure, and the inverse.

  The inverse maps a tree in the basis' structure back to the structure of
  `tree` (its container types, `optax.MaskedNode`s, leaf dtypes), with zeros
  at leaves the basis leaves out.
  """
  spec = basis.spec
  leaves, place = spec.select(tree, what=what)
  def back(out: PyTree) -> PyTree:
    return place([o.astype(leaf.dtype) for o, leaf in
                  zip(jax.tree_util.tree_leaves(out), leaves)])
  return jax.tree_util.tree_unflatten(spec.treedef, leaves), back


def project(basis: AnyBasis) -> optax.GradientTransformation:
  """Projects updates onto the span of the snapshots: g -> P P^T g.

  Stateless (`optax.EmptyState`); chain it in front of any optimizer whose
  update is linear in its input per step (SGD, momentum, weight decay),
  e.g. ``optax.chain(twa.project(basis), optax.add_decayed_weights(1e-5),
  optax.sgd(lr, momentum=0.9))``. For adaptive optimizers use
  :func:`scale_by_subspace`: Adam after `project` rescales coordinates
  element-wise and leaves the subspace. Leaves the basis does not span
  (built with `trainable=`) get a zero update, or may be absent (e.g.
  masked out by `optax.masked` / `optax.multi_transform`).

  Args:
    basis: the orthonormal basis P (closed over; not part of the state).

  Returns:
    An `optax.GradientTransformation`.
  """

  def init_fn(params):
    basis.spec.check(params, what="project: params")
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    spanned, back = _in_span(basis, updates, "project: updates")
    return back(basis.project(spanned)), state

  return optax.GradientTransformation(init_fn, update_fn)


def _is_zero(value) -> bool:
  """Whether a hyperparameter is a concrete Python/NumPy zero (not traced)."""
  return isinstance(value, (int, float, np.number)) and value == 0


def twa(basis: AnyBasis, learning_rate: optax.ScalarOrSchedule, *,
        momentum: float = 0.9, weight_decay: float = 1e-5,
        nesterov: bool = False) -> optax.GradientTransformation:
  """The paper's TWA optimizer: projected momentum SGD with weight decay.

  w <- w - lr * v,  v <- momentum * v + P P^T g + weight_decay * w,
  i.e. PyTorch-style coupled weight decay added after the projection. Started
  inside the span (the snapshots' mean or last one), the iterates stay there.
  Works under `optax.inject_hyperparams` (learning rate, momentum and weight
  decay may then be traced).

  Args:
    basis: the orthonormal basis P (closed over; not part of the state).
    learning_rate: a float or an optax schedule.
    momentum: heavy-ball momentum (a concrete 0 keeps no momentum buffer).
    weight_decay: lambda, the L2 penalty on the spanned weights (a concrete
      0 drops it, and `update` then needs no `params`).
    nesterov: Nesterov momentum.

  Returns:
    `optax.chain(project(basis), optax.add_decayed_weights(weight_decay),
    optax.sgd(learning_rate, momentum, nesterov))`.
  """
  # Leaves the basis leaves out (frozen) get no decay either.
  decay = [] if _is_zero(weight_decay) else [optax.add_decayed_weights(
      weight_decay, mask=basis.spec.mask if basis.spec.frozen else None)]
  return optax.chain(
      project(basis), *decay,
      optax.sgd(learning_rate, momentum=None if _is_zero(momentum) else momentum,
                nesterov=nesterov),
  )


def scale_by_subspace(basis: AnyBasis,
                      base_optimizer: optax.GradientTransformation
                      ) -> optax.GradientTransformationExtraArgs:
  """Runs `base_optimizer` on the coefficients beta of w = P beta.

  The gradient with respect to beta is P^T g; the base optimizer turns it
  into a coefficient update delta, applied as P delta. Its state, which is
  this transformation's whole state, has the shape of beta (n floats), not
  of the parameters. This is the right way to use adaptive optimizers
  (Adam, ...): their element-wise scaling acts on coefficients and the
  update stays in the span, whereas chaining them after :func:`project`
  rescales parameter coordinates and leaves it. With plain SGD the two
  agree.

  Args:
    basis: the orthonormal basis P (closed over; not part of the state).
    base_optimizer: any optax transformation, applied in coefficient space
      (its `params` argument, if used, receives P^T w; optax extra
      arguments such as `value` are forwarded unchanged).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose updates lie in span(P).
  """
  base = optax.with_extra_args_support(base_optimizer)

  def init_fn(params):
    spanned, _ = _in_span(basis, params, "scale_by_subspace: params")
    return base.init(basis.coordinates(spanned))

  def update_fn(updates, state, params=None, **extra_args):
    spanned, back = _in_span(basis, updates, "scale_by_subspace: updates")
    coords = None
    if params is not None:
      coords = basis.coordinates(
          _in_span(basis, params, "scale_by_subspace: params")[0])
    delta, state = base.update(basis.coordinates(spanned), state, coords,
                               **extra_args)
    return back(basis.from_coordinates(delta)), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
