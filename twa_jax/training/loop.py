"""The epoch loop of a phase: resume, train, evaluate, checkpoint, NaN check."""

from __future__ import annotations

import contextlib
import pathlib
import time
from collections.abc import Callable
from typing import Any, Protocol

from absl import logging
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from tqdm import auto as tqdm

from twa_jax.training import experiment as experiment_lib
from twa_jax.training import input_pipeline
from twa_jax.training import parallel
from twa_jax.training import steps as steps_lib
from twa_jax.training import workdir as workdir_lib
from twa_jax.training.steps import TrainState

MAX_CHECKPOINTS = 2


class TrainingDiverged(FloatingPointError):
  """The training loss became NaN or infinite."""


class Recorder(Protocol):
  """Records the state at some steps of the loop (SGD's trajectory).

  Attributes:
    steps: the steps (0: before training) after which `record` runs; the
      loss is checked for NaN first.
    kept: what it recorded, for the message of a diverged run.
  """

  steps: frozenset[int]
  kept: str

  def record(self, step: int, state: TrainState, elapsed_s: float) -> None:
    """Records `state` after `step`, `elapsed_s` seconds into the phase."""

  def flush(self) -> None:
    """Waits until what was recorded is durable (before each checkpoint)."""


def checkpoint_dir(workdir: pathlib.Path, phase: str) -> pathlib.Path:
  return (workdir / phase / "checkpoints").absolute()


def train(exp: experiment_lib.Experiment, workdir: pathlib.Path, phase: str,
          state: TrainState, train_step: Callable[..., Any],
          schedule: optax.Schedule, *, epochs: int,
          data: input_pipeline.Dataset, data_seed: int,
          recorder: Recorder | None = None) -> tuple[TrainState, float]:
  """Trains `epochs` epochs, resuming from the phase's last checkpoint.

  Every epoch: train on `data`, evaluate on the test split
  (`experiment.evaluate_state`), append the record to metrics.jsonl, flush
  the recorder, checkpoint. Also checkpoints every `checkpoint_every_steps`
  steps inside an epoch; a checkpoint holds the state, the epoch's metrics
  so far and the input iterator's state, so that a resumed run continues
  with the batches the interrupted one would have drawn.

  Args:
    exp: the experiment (batch size, evaluation, mesh, logging interval).
    workdir: the run's workdir (checkpoints in <phase>/checkpoints).
    phase: names the checkpoints and the metrics ("sgd", "twa", ...).
    state: the initial state (replaced by a checkpoint's); placed on the
      mesh as `config.parallel.param_sharding` says
      (`parallel.state_sharding`).
    train_step: from `steps.make_train_step`.
    schedule: the learning rate per step (for the log).
    epochs: the phase's epochs.
    data: the dataset whose train split the steps draw batches from.
    data_seed: the batch order is a function of (data_seed, epoch).
    recorder: records the state at its steps (see `Recorder`).

  Returns:
    The final state and the seconds spent in this phase's epochs (summed
    over the invocations that trained them).

  Raises:
    TrainingDiverged: NaN or infinite loss; what was saved is kept.
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=MAX_CHECKPOINTS,
                                         create=True)
  spe = input_pipeline.steps_per_epoch(data, exp.config.sgd.batch_size)
  state = jax.device_put(state, parallel.state_sharding(
      state, exp.mesh, exp.config.parallel.param_sharding))
  batches = experiment_lib.train_batches(exp, data, data_seed)
  with ocp.CheckpointManager(checkpoint_dir(workdir, phase),
                             options=options) as manager, \
      contextlib.closing(batches):
    state, metrics, done, elapsed = _restore(manager, state, batches, spe,
                                             phase)
    start_epoch = done // spe
    workdir_lib.truncate_metrics(workdir, phase, start_epoch)
    if done == 0 and recorder is not None and 0 in recorder.steps:
      recorder.record(0, state, 0.0)
    saver = _Saver(manager, recorder, batches,
                   exp.config.checkpoint_every_steps)
    with tqdm.tqdm(total=epochs * spe, initial=done, desc=phase,
                   unit="step", dynamic_ncols=True, disable=None) as bar:
      for epoch in range(start_epoch, epochs):
        start = time.perf_counter()
        lr = float(schedule(epoch * spe))
        state, train_metrics = _train_epoch(
            exp, state, train_step, batches, metrics, epoch=epoch,
            epochs=epochs, first=done - epoch * spe, steps_per_epoch=spe,
            lr=lr, elapsed=elapsed, bar=bar, recorder=recorder, saver=saver,
            check=_FiniteCheck(phase, manager, recorder, spe))
        done, metrics = (epoch + 1) * spe, parallel.replicate(
            steps_lib.new_metrics(), exp.mesh)
        test = experiment_lib.evaluate_state(exp, state,
                                             {"test": None})[0]["test"]
        seconds = time.perf_counter() - start
        elapsed += seconds
        _record_epoch(workdir, phase, epoch, epochs, spe, lr, train_metrics,
                      test, seconds)
        saver.save(done, state, metrics, elapsed)
    manager.wait_until_finished()
  return state, elapsed


def final_params(workdir: pathlib.Path, phase: str) -> Any:
  """The parameters of the phase's last checkpoint."""
  with ocp.CheckpointManager(
      checkpoint_dir(workdir, phase),
      options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    return manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]["params"]


class _FiniteCheck:
  """Fetches an epoch's metrics to the host and stops on a NaN loss."""

  def __init__(self, phase: str, manager: ocp.CheckpointManager,
               recorder: Recorder | None, steps_per_epoch: int):
    self.phase, self.manager = phase, manager
    self.recorder, self.steps_per_epoch = recorder, steps_per_epoch

  def __call__(self, metrics: steps_lib.Metrics,
               epoch: int) -> dict[str, float]:
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if m["nan_step"] < 0:
      return m
    step, spe = int(m["nan_step"]), self.steps_per_epoch
    kept = self.manager.latest_step()
    kept = ("no checkpoint" if kept is None
            else f"the checkpoint after step {kept}")
    if self.recorder is not None:
      kept += f", and {self.recorder.kept}"
    raise TrainingDiverged(
        f"{self.phase}: the training loss is NaN or infinite at step {step} "
        f"(epoch {epoch + 1}, step {step - epoch * spe} of {spe}); stopped. "
        f"Kept: {kept} (in {self.manager.directory}). Lower the learning "
        "rate or check the data.")


def _train_epoch(exp: experiment_lib.Experiment, state: TrainState,
                 train_step: Callable[..., Any], batches: Any,
                 metrics: steps_lib.Metrics, *, epoch: int, epochs: int,
                 first: int, steps_per_epoch: int, lr: float, elapsed: float,
                 bar: Any, recorder: Recorder | None, saver: _Saver,
                 check: _FiniteCheck) -> tuple[TrainState, dict[str, float]]:
  """The epoch's steps from its step `first` on (after a resume, `metrics`
  holds those before); returns the state and the epoch's metrics."""
  bs, every = exp.config.sgd.batch_size, exp.config.log_every_steps
  start = last_time = time.perf_counter()
  last_log = first
  for i in range(first, steps_per_epoch):
    state, metrics = train_step(state, metrics, next(batches))
    step = epoch * steps_per_epoch + i + 1
    if recorder is not None and step in recorder.steps:
      check(metrics, epoch)
      recorder.record(step, state, elapsed + time.perf_counter() - start)
    if (i + 1) % every == 0 or i + 1 == steps_per_epoch:
      m = check(metrics, epoch)
      now = time.perf_counter()
      bar.update(i + 1 - last_log)
      bar.set_postfix(
          epoch=f"{epoch + 1}/{epochs}",
          loss=f"{m['loss'] / m['count']:.4f}",
          acc=f"{m['correct'] / m['count']:.4f}", lr=f"{lr:.3g}",
          img_s=f"{(i + 1 - last_log) * bs / (now - last_time):.0f}")
      last_log, last_time = i + 1, now
    if saver.due(step) and i + 1 < steps_per_epoch:
      check(metrics, epoch)
      saver.save(step, state, metrics, elapsed + time.perf_counter() - start)
  m = check(metrics, epoch)
  return state, {"loss": m["loss"] / m["count"],
                 "accuracy": m["correct"] / m["count"]}


class _Saver:
  """Saves checkpoints: state, the epoch's metrics so far, iterator state."""

  def __init__(self, manager: ocp.CheckpointManager,
               recorder: Recorder | None,
               batches: experiment_lib.GlobalBatches, every: int):
    self.manager, self.recorder = manager, recorder
    self.batches, self.every = batches, every

  def due(self, step: int) -> bool:
    """Whether a checkpoint inside an epoch is due after `step`."""
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state: TrainState, metrics: steps_lib.Metrics,
           elapsed: float) -> None:
    """Checkpoints after `step` steps of the phase (the recorder flushed
    first, so that no checkpoint runs ahead of the snapshots)."""
    if self.recorder is not None:
      self.recorder.flush()
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_copy(state.to_dict())),
        meta=ocp.args.JsonSave({
            "step": step, "elapsed_s": elapsed,
            "epoch_metrics": {k: v.item() for k, v in
                              jax.device_get(metrics).items()},
            "iterator": self.batches.iterator.get_state()})))


def _copy(tree: Any) -> Any:
  """A device copy that an asynchronous save can read while the training
  step donates the original buffers."""
  return jax.tree.map(lambda x: x.copy(), tree)


def _record_epoch(workdir: pathlib.Path, phase: str, epoch: int, epochs: int,
                  steps_per_epoch: int, lr: float, train: dict[str, float],
                  test: dict[str, float], seconds: float) -> None:
  """Appends the epoch's record to metrics.jsonl and logs it."""
  workdir_lib.append_metrics(workdir, {
      "phase": phase, "epoch": epoch + 1,
      "step": (epoch + 1) * steps_per_epoch, "lr": lr,
      "train_loss": train["loss"], "train_accuracy": train["accuracy"],
      "test_loss": test["loss"], "test_accuracy": test["accuracy"],
      "seconds": seconds})
  logging.info("%s epoch %d/%d: train loss %.4f acc %.4f, test loss %.4f "
               "acc %.4f, lr %.3g, %.1fs", phase, epoch + 1, epochs,
               train["loss"], train["accuracy"], test["loss"],
               test["accuracy"], lr, seconds)


def _restore(manager: ocp.CheckpointManager, state: TrainState,
             batches: experiment_lib.GlobalBatches, steps_per_epoch: int,
             phase: str
             ) -> tuple[TrainState, steps_lib.Metrics, int, float]:
  """The latest checkpoint's state, epoch metrics, steps and seconds (else
  the given state at step 0); sets the iterator to where it was.

  Checkpoints written before iterator states were saved (meta without
  "step": labelled by epoch) resume at the start of the next epoch.
  """
  metrics = steps_lib.new_metrics()
  latest = manager.latest_step()
  if latest is not None:
    meta = manager.restore(latest, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state.to_dict())
    state = TrainState(**manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"])
    if "step" in meta:
      done = int(meta["step"])
      metrics = {k: jnp.asarray(meta["epoch_metrics"][k], v.dtype)
                 for k, v in metrics.items()}
      batches.iterator.set_state(meta["iterator"])
    else:
      done = int(meta["epoch"]) * steps_per_epoch
      _skip_to(batches, done)
    epoch, step = divmod(done, steps_per_epoch)
    where = (f"epoch {epoch}" if not step
             else f"step {step} of {steps_per_epoch} in epoch {epoch + 1}")
    logging.info("%s: resuming after %s (step %d) from %s", phase, where,
                 done, manager.directory)
    return state, parallel.replicate(metrics, batches.mesh), done, float(
        meta["elapsed_s"])
  return state, parallel.replicate(metrics, batches.mesh), 0, 0.0


def _skip_to(batches: experiment_lib.GlobalBatches, step: int) -> None:
  """Advances a fresh iterator past the batches of `step` steps."""
  for _ in range(step):
    next(batches.iterator)
