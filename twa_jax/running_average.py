"""Averaging while training: a running average of the parameters (uniform, as
SWA, or exponential, as EMA) and the SWA learning-rate schedule.

The counterparts of `torch.optim.swa_utils.AveragedModel` and `SWALR`. For
an average of finished snapshots see `twa_jax.swa`.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class RunningAverage(NamedTuple):
  """A running average of parameters.

  Attributes:
    params: the average (float leaves averaged, others copied from the last
      update).
    count: how many parameter sets it averages (int32; 0 before the first).
  """

  params: PyTree
  count: jax.Array


def init_running_average(params: PyTree) -> RunningAverage:
  """An empty running average shaped like `params` (count 0)."""
  return RunningAverage(jax.tree.map(jnp.zeros_like, params),
                        jnp.zeros((), jnp.int32))


def update_running_average(average: RunningAverage, params: PyTree, *,
                           decay: float | jax.Array | None = None
                           ) -> RunningAverage:
  """Adds `params` to the average (jit-compatible).

  The first update copies `params`; later ones compute, per float leaf,
  avg + (w - avg) / (count + 1) (uniform, `decay=None`: the mean of every
  set added, as SWA) or decay * avg + (1 - decay) * w (exponential, EMA) —
  `torch.optim.swa_utils.AveragedModel` with its default or EMA `avg_fn`.

  Args:
    average: the running average.
    params: the parameters to add (same structure).
    decay: None for the uniform average, else the EMA decay in [0, 1).

  Returns:
    The updated average.
  """
  count = average.count
  def leaf(avg, w):
    if not jnp.issubdtype(jnp.result_type(w), jnp.floating):
      return jnp.asarray(w)
    weight = (1.0 / (count + 1).astype(jnp.float32) if decay is None
              else 1.0 - jnp.asarray(decay, jnp.float32))
    weight = jnp.where(count == 0, 1.0, weight)
    return (avg + weight * (w - avg)).astype(avg.dtype)
  return RunningAverage(jax.tree.map(leaf, average.params, params), count + 1)


class AveragedState(NamedTuple):
  """State of :func:`with_running_average`: the inner optimizer's state,
  the running average, and the number of updates so far."""

  inner_state: optax.OptState
  average: RunningAverage
  step: jax.Array


def with_running_average(inner: optax.GradientTransformation, *,
                         start: int = 0, every: int = 1,
                         decay: float | None = None
                         ) -> optax.GradientTransformationExtraArgs:
  """Wraps an optimizer so that its state keeps a running average of the
  parameters it produces (SWA or EMA while training).

  After update number s (1-based) with s >= `start` and (s - start) divisible
  by `every`, the new parameters (params + updates) are added to
  `state.average` (see :func:`update_running_average`). Read the average as
  ``opt_state.average.params``. Needs `params` in `update`.

  Args:
    inner: the optimizer (e.g. `optax.sgd`, `twa_jax.twa`).
    start: the first update whose result is averaged.
    every: average every `every` updates from `start` on.
    decay: None for the uniform (SWA) average, else the EMA decay.

  Returns:
    An `optax.GradientTransformationExtraArgs` with state `AveragedState`.

  Raises:
    ValueError: `every` < 1 or `start` < 0.
  """
  if every < 1 or start < 0:
    raise ValueError(f"with_running_average: need every >= 1 and start >= 0; "
                     f"got every={every}, start={start}.")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return AveragedState(inner.init(params), init_running_average(params),
                         jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("with_running_average: update needs `params`.")
    updates, inner_state = inner.update(updates, state.inner_state, params,
                                        **extra_args)
    step = state.step + 1
    due = (step >= start) & ((step - start) % every == 0)
    new_params = optax.apply_updates(params, updates)
    average = jax.lax.cond(
        due, lambda avg: update_running_average(avg, new_params, decay=decay),
        lambda avg: avg, state.average)
    return updates, AveragedState(inner_state, average, step)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def swa_lr_schedule(init_value: float, swa_lr: float, anneal_steps: int, *,
                    anneal: Literal["cos", "linear"] = "cos") -> optax.Schedule:
  """The SWA learning rate (`torch.optim.swa_utils.SWALR`) as an optax schedule.

  lr(t) = swa_lr * a + init_value * (1 - a), with a = f(min(t /
  anneal_steps, 1)), f(x) = (1 - cos(pi x)) / 2 ("cos") or x ("linear"), t
  counted from the start of averaging. Join it to the schedule before
  averaging with `optax.join_schedules`.

  Args:
    init_value: the learning rate when averaging starts.
    swa_lr: the learning rate reached after `anneal_steps` and kept.
    anneal_steps: steps (or epochs, if the schedule is stepped per epoch)
      of annealing; 0 starts at `swa_lr`.
    anneal: "cos" or "linear".

  Returns:
    An `optax.Schedule`.

  Raises:
    ValueError: bad `anneal` or a negative `anneal_steps`.
  """
  if anneal not in ("cos", "linear"):
    raise ValueError(f"swa_lr_schedule: anneal must be 'cos' or 'linear'; "
                     f"got {anneal!r}.")
  if anneal_steps < 0:
    raise ValueError(f"swa_lr_schedule: anneal_steps must be >= 0; got "
                     f"{anneal_steps}.")

  def schedule(count):
    t = 1.0 if anneal_steps == 0 else jnp.clip(
        jnp.asarray(count, jnp.float32) / anneal_steps, 0.0, 1.0)
    a = (1.0 - jnp.cos(math.pi * t)) / 2.0 if anneal == "cos" else t
    return swa_lr * a + init_value * (1.0 - a)

  return schedule
