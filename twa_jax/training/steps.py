"""The train state, jitted steps, schedules and base optimizers of training."""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from twa_jax.training import models

PyTree = Any
Metrics = dict[str, jax.Array]
SCHEDULES = ("step", "swa")
OPTIMIZERS = ("sgd", "adam", "schedule_free_sgd")
TWA_BASE_OPTIMIZERS = ("sgd", "adam")  # config.twa.optimizer's choices


@struct.dataclass
class TrainState:
  """What a training step updates (and a checkpoint holds).

  Attributes:
    step: steps taken.
    params: the model parameters.
    batch_stats: the batch-norm running statistics ({} without batch norm).
    opt_state: the optimizer state.
    ema: an exponential moving average of the parameters, or None (not
      tracked). Started at zero: divide by 1 - decay**step for the
      bias-corrected average, as Adam does.
  """

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  ema: PyTree | None = None

  @classmethod
  def create(cls, params: PyTree, batch_stats: PyTree,
             tx: optax.GradientTransformation, *,
             ema: bool = False) -> TrainState:
    """Step 0, the optimizer's initial state and a zero EMA if `ema`."""
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               batch_stats=batch_stats, opt_state=tx.init(params),
               ema=jax.tree.map(jnp.zeros_like, params) if ema else None)

  def to_dict(self) -> dict[str, PyTree]:
    """The fields as a dict (no "ema" when not tracked): the checkpoint."""
    out = {"step": self.step, "params": self.params,
           "batch_stats": self.batch_stats, "opt_state": self.opt_state}
    if self.ema is not None:
      out["ema"] = self.ema
    return out


def milestone_epochs(decay_at, epochs: int) -> list[int]:
  """Epochs after which a step schedule decays, rounded as the reference code.

  The reference TWA script decays at `[int(0.5 E), int(0.75 E + 0.9)]`: the
  first fraction rounds down, every later one is `int(f E + 0.9)` (up, unless
  f E lies less than 0.1 above an integer). E = 10: 5, 8; E = 5: 2, 4;
  E = 3: 1, 3. For the sgd phases: 200 epochs at (0.5, 0.75): 100, 150;
  90 at (1/3, 2/3): 30, 60.

  Args:
    decay_at: fractions of the epochs, in order.
    epochs: the epochs they are fractions of.

  Returns:
    One milestone epoch per fraction.
  """
  return [int(round(f * epochs, 6) + (0.9 if i else 0.0))
          for i, f in enumerate(decay_at)]


def learning_rate_schedule(section: Any, epochs: int,
                           steps_per_epoch: int) -> optax.Schedule:
  """The per-step learning rate of a config section (`sgd` or `twa`).

  "step": `lr`, multiplied by `decay_factor` after each milestone epoch of
  the first `epochs - linear_epochs` epochs (see `milestone_epochs`; epoch e
  runs at `lr * decay_factor ** #{milestones <= e}`, as PyTorch's
  MultiStepLR, so a milestone 0 decays from the first step); the last
  `linear_epochs` epochs then decay linearly to 0. "swa": the SWA
  paper's schedule, per epoch e with t = e / swa_start: `lr` for t <= 0.5,
  linear to `swa_lr` at t = 0.9, `swa_lr` after.

  Args:
    section: the config section (fields lr, schedule, ...).
    epochs: the phase's epochs.
    steps_per_epoch: training steps per epoch.

  Returns:
    An optax schedule of the step count.
  """
  lr = float(section.lr)
  if section.schedule == "swa":
    ratio = float(section.swa_lr) / lr
    swa_start = float(section.swa_start)

    def swa_schedule(step):
      t = (step // steps_per_epoch) / swa_start
      factor = jnp.where(t <= 0.5, 1.0, jnp.where(
          t <= 0.9, 1.0 - (1.0 - ratio) * (t - 0.5) / 0.4, ratio))
      return lr * factor
    return swa_schedule
  linear = int(section.linear_epochs)
  step_epochs = epochs - linear
  boundaries: dict[int, float] = {}
  milestones = (milestone_epochs(section.decay_at, step_epochs)
                if step_epochs else [])  # all linear: nothing to step
  for m in milestones:  # fractions in (0, 1]: 0 <= m <= step_epochs
    step = m * steps_per_epoch
    boundaries[step] = boundaries.get(step, 1.0) * float(section.decay_factor)
  constant = optax.piecewise_constant_schedule(lr, boundaries)
  if not linear:
    return constant
  final = lr * math.prod(boundaries.values())
  return optax.join_schedules(
      [constant, optax.linear_schedule(final, 0.0, linear * steps_per_epoch)],
      [step_epochs * steps_per_epoch])


def base_optimizer(name: str, learning_rate: optax.ScalarOrSchedule, *,
                   momentum: float, weight_decay: float,
                   nesterov: bool = False) -> optax.GradientTransformation:
  """PyTorch-style optimizers: weight decay added to the gradient first.

  Args:
    name: "sgd" (heavy-ball momentum), "adam", or "schedule_free_sgd"
      (`optax.contrib.schedule_free_sgd`, momentum as its interpolation b1;
      evaluate its `evaluation_params`; meant for a constant learning rate).
    learning_rate: a float or schedule.
    momentum: SGD momentum, schedule-free's b1 (ignored by Adam).
    weight_decay: coupled L2 coefficient.
    nesterov: Nesterov momentum (SGD).
  """
  if name == "schedule_free_sgd":
    return optax.contrib.schedule_free_sgd(learning_rate, b1=momentum,
                                           weight_decay=weight_decay)
  if name == "sgd":
    inner = optax.sgd(learning_rate, momentum=momentum or None,
                      nesterov=nesterov)
  elif name == "adam":
    inner = optax.adam(learning_rate)
  else:
    raise ValueError(f"unknown optimizer {name!r}; known: {OPTIMIZERS}")
  return optax.chain(optax.add_decayed_weights(weight_decay), inner)


def is_schedule_free(state: TrainState) -> bool:
  """Whether the state's optimizer is `optax.contrib.schedule_free`."""
  return isinstance(state.opt_state, optax.contrib.ScheduleFreeState)


def evaluation_params(state: TrainState) -> PyTree:
  """The parameters to evaluate: schedule-free's averaged sequence x
  (`optax.contrib.schedule_free_eval_params`) when the state's optimizer is
  schedule-free (its `params` are the gradient points y), else `params`."""
  if is_schedule_free(state):
    return optax.contrib.schedule_free_eval_params(state.opt_state,
                                                   state.params)
  return state.params


def variables(params: PyTree, batch_stats: PyTree) -> dict[str, PyTree]:
  """The flax variables of a model (no `batch_stats` for models without BN)."""
  out = {"params": params}
  if batch_stats:
    out["batch_stats"] = batch_stats
  return out


def new_metrics() -> Metrics:
  """Zeroed on-device accumulators of one epoch of training."""
  return {"loss": jnp.zeros((), jnp.float32),
          "correct": jnp.zeros((), jnp.float32),
          "count": jnp.zeros((), jnp.float32),
          "nan_step": jnp.full((), -1, jnp.int32)}


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    *, ema_decay: float | None = None, seed: int = 0
                    ) -> Callable[[TrainState, Metrics, dict],
                                  tuple[TrainState, Metrics]]:
  """One jitted training step, `(state, metrics, batch) -> (state, metrics)`.

  Compiled with `models.compiler_options()` (on CPU, convolutions through
  XLA's own kernels). With `ema_decay`, the state's `ema` is updated after every step. Both
  state and metrics are donated.
  `metrics` accumulates the epoch's summed loss, correct predictions and
  example count on the device, and `nan_step`: the first step whose loss
  was not finite (-1: none), so the host only syncs when it wants to.

  Args:
    model: the flax module.
    tx: the optimizer.
    ema_decay: EMA decay, or None for no EMA.
    seed: dropout randomness, folded with the step number.

  Returns:
    The jitted step.
  """

  def step(state: TrainState, metrics: Metrics, batch: dict):
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
    labels = batch["label"]

    def loss_fn(params):
      logits, updates = _apply_train(
          model, variables(params, state.batch_stats), batch["image"], rng)
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()
      return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    deltas, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, deltas)
    ema = state.ema
    if ema_decay is not None:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                         ema, params)
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state, ema=ema,
                              batch_stats=updates.get("batch_stats", {}))
    n = labels.shape[0]
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    first_bad = (metrics["nan_step"] < 0) & ~jnp.isfinite(loss)
    new_metrics_ = {
        "loss": metrics["loss"] + loss * n,
        "correct": metrics["correct"] + correct,
        "count": metrics["count"] + n,
        "nan_step": jnp.where(first_bad, state.step + 1,
                              metrics["nan_step"]),
    }
    return new_state, new_metrics_

  return jax.jit(step, donate_argnums=(0, 1),
                 compiler_options=models.compiler_options())


def _apply_train(model: nn.Module, variables_: dict, images: jax.Array,
                 rng: jax.Array) -> tuple[jax.Array, dict]:
  """Training-mode forward pass; returns logits and the updated collections."""
  if "batch_stats" in variables_:
    return model.apply(variables_, images, train=True, rngs={"dropout": rng},
                       mutable=["batch_stats"])
  return model.apply(variables_, images, train=True,
                     rngs={"dropout": rng}), {}


def make_eval_step(model: nn.Module) -> Callable[[jax.Array, dict, dict],
                                                 jax.Array]:
  """Jitted `(totals, variables, batch) -> totals + [loss, correct, count]`.

  Evaluation mode (running batch statistics); the batch's `mask` excludes
  padding. `totals` is donated.
  """

  def step(totals, variables_, batch):
    logits = model.apply(variables_, batch["image"], train=False)
    mask = batch["mask"].astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return totals + jnp.stack([jnp.sum(losses * mask), jnp.sum(correct * mask),
                               jnp.sum(mask)])

  return jax.jit(step, donate_argnums=0,
                 compiler_options=models.compiler_options())


def make_stats_apply(model: nn.Module) -> Callable[[dict, jax.Array], Any]:
  """`(variables, images) -> model output` in training mode, for
  `twa_jax.batch_norm.update_bn` (one function object per model, so its
  statistics pass compiles once). Dropout draws from a fixed key."""

  def apply(variables_: dict, images: jax.Array):
    return model.apply(variables_, images, train=True,
                       rngs={"dropout": jax.random.PRNGKey(0)},
                       mutable=["batch_stats"])

  return apply


def host(tree: PyTree) -> PyTree:
  """A host copy of a device tree (numpy), e.g. to hand to an async save
  while the step keeps donating the device buffers."""
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)
