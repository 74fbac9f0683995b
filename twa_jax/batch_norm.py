"""Exact batch-norm statistics for averaged weights (torch's `update_bn`).

Weights found by averaging (SWA) or in a subspace (TWA) never ran forward
during training, so the running statistics of their batch-norm layers belong
to other weights. These functions recompute them with one pass over the
data: every batch's mean and variance (training-mode batch statistics, the
flax convention: biased variance), averaged over the batches weighted by
their size. This is `torch.optim.swa_utils.update_bn` (`momentum=None`);
torch weighs batches equally and applies Bessel's correction to the variance,
so the two agree for equal-size batches up to that factor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

PyTree = Any


def _batch_size(batch: PyTree) -> int:
  leaves = jax.tree_util.tree_leaves(batch)
  if not leaves or not jnp.ndim(leaves[0]):
    raise ValueError("update_bn: a batch must hold arrays with a leading "
                     "batch axis.")
  return int(jnp.shape(leaves[0])[0])


def _average(batches: Iterable[PyTree], stats_of: Callable[[PyTree], PyTree]
             ) -> PyTree:
  """Batch-size-weighted average of `stats_of(batch)` over `batches`."""
  sums, total = None, 0
  for batch in batches:
    n = _batch_size(batch)
    stats = jax.tree.map(lambda s: n * s.astype(jnp.float32), stats_of(batch))
    sums = stats if sums is None else jax.tree.map(jnp.add, sums, stats)
    total += n
  if sums is None:
    raise ValueError("update_bn: `batches` is empty; need at least one batch.")
  return jax.tree.map(lambda s: s / total, sums)


@functools.partial(jax.jit, static_argnums=0)
def _linen_stats(apply_fn: Callable[[PyTree, PyTree], Any], variables: PyTree,
                 batch: PyTree) -> dict[tuple[str, ...], PyTree]:
  """{layer path: this batch's own mean and var} of every `nn.BatchNorm` that
  `apply_fn` runs (compiled once per `apply_fn` and shapes)."""
  stats, inside = {}, []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (isinstance(module, nn.BatchNorm) and context.method_name == "__call__"
        and not inside):  # not the exact copy called below
      path = module.scope.path
      if nn.merge_param("use_running_average", module.use_running_average,
                        kwargs.get("use_running_average")):
        raise ValueError(
            f"update_bn: apply_fn runs the BatchNorm at {'/'.join(path)} in "
            "inference mode (use_running_average=True); run the model in "
            "training mode (e.g. train=True).")
      # The same layer with momentum 0 writes exactly this batch's stats.
      exact = module.clone(parent=None, momentum=0.0,
                           use_running_average=False)
      call_kwargs = {k: v for k, v in kwargs.items()
                     if k != "use_running_average"}
      inside.append(path)
      try:
        _, new = exact.apply(module.variables, *args, **call_kwargs,
                             mutable=["batch_stats"])
      finally:
        inside.pop()
      stats[path] = new["batch_stats"]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    apply_fn(variables, batch)
  return stats


def update_bn(apply_fn: Callable[[PyTree, PyTree], Any], variables: PyTree,
              batches: Iterable[PyTree]) -> PyTree:
  """Recomputes the `batch_stats` of a linen model with `nn.BatchNorm` layers.

  Example::

    variables = twa_jax.batch_norm.update_bn(
        lambda v, batch: model.apply(v, batch["image"], train=True,
                                     mutable=["batch_stats"]),
        {"params": params, "batch_stats": batch_stats}, train_batches)

  Args:
    apply_fn: `apply_fn(variables, batch)` runs the model in training mode
      (batch-norm layers normalize with batch statistics, e.g. `train=True`
      and `mutable=["batch_stats"]`); its output is ignored. Dropout and other
      randomness only change the statistics as they change the activations.
      It is compiled once per `apply_fn` object: pass the same function on
      every call to reuse the compilation.
    variables: the model's variables, with a `batch_stats` collection.
    batches: an iterable of batches (each with a leading batch axis).

  Returns:
    `variables` with every batch-norm layer's `mean` and `var` replaced by
    their average over `batches` (the other collections unchanged).

  Raises:
    ValueError: `batches` is empty; `apply_fn` runs a batch-norm layer in
      inference mode; a layer of `batch_stats` was never called.
  """
  if "batch_stats" not in variables:
    raise ValueError("update_bn: `variables` has no 'batch_stats' collection "
                     f"(found {sorted(variables)}).")

  averages = _average(batches,
                      lambda batch: _linen_stats(apply_fn, variables, batch))
  entries, treedef = jax.tree_util.tree_flatten_with_path(
      variables["batch_stats"])
  leaves = []
  for path, old in entries:
    layer, name = tuple(k.key for k in path[:-1]), path[-1].key
    if layer not in averages or name not in averages[layer]:
      raise ValueError(
          f"update_bn: batch_stats entry {jax.tree_util.keystr(path)} belongs "
          "to no BatchNorm that apply_fn called.")
    leaves.append(averages[layer][name].astype(old.dtype))
  return {**variables,
          "batch_stats": jax.tree_util.tree_unflatten(treedef, leaves)}


def update_bn_nnx(model: nnx.Module, batches: Iterable[PyTree],
                  forward: Callable[[nnx.Module, PyTree], Any] | None = None
                  ) -> None:
  """Recomputes, in place, the statistics of an NNX model's `nnx.BatchNorm`s.

  Each `nnx.BatchNorm` runs with batch statistics during the pass (whatever
  its mode) and keeps its mode and momentum afterwards; other layers (e.g.
  dropout) keep their mode.

  Args:
    model: the NNX model (its parameters already set, e.g. to the average).
    batches: an iterable of batches (each with a leading batch axis).
    forward: `forward(model, batch)` runs the model on a batch; default
      `model(batch)`.

  Raises:
    ValueError: `batches` is empty, or the model has no `nnx.BatchNorm`.
  """
  forward = forward or (lambda m, batch: m(batch))
  layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
  if not layers:
    raise ValueError("update_bn_nnx: the model has no nnx.BatchNorm layer.")
  saved = [(bn.momentum, bn.use_running_average) for bn in layers]

  @nnx.jit
  def stats_of(model, batch):
    forward(model, batch)
    return [(bn.mean[...], bn.var[...]) for _, bn in nnx.iter_graph(model)
            if isinstance(bn, nnx.BatchNorm)]

  try:
    for bn in layers:
      bn.momentum, bn.use_running_average = 0.0, False
    averages = _average(batches, lambda batch: stats_of(model, batch))
  finally:
    for bn, (momentum, use_running_average) in zip(layers, saved):
      bn.momentum, bn.use_running_average = momentum, use_running_average
  for bn, (mean, var) in zip(layers, averages):
    bn.mean[...] = mean.astype(bn.mean[...].dtype)
    bn.var[...] = var.astype(bn.var[...].dtype)
