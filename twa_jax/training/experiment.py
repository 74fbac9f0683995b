"""A run's data, model and snapshot plan, and evaluation on its data."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm import auto as tqdm

from twa_jax import batch_norm
from twa_jax.sampling import SamplingSchedule
from twa_jax.training import init_from
from twa_jax.training import input_pipeline
from twa_jax.training import models
from twa_jax.training import parallel
from twa_jax.training import steps as steps_lib
from twa_jax.training.configuration import ConfigError

PyTree = Any
Metrics = dict[str, float]  # {"loss", "accuracy"} of one split


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What every phase of one config shares: data, model, steps, snapshot plan.

  Attributes:
    config: the experiment config.
    dataset: train and test splits (with `data.holdout_fraction`, the test
      split is a held-out part of the training set).
    holdout: TWA-v's held-out part (`twa.holdout_fraction`), which the sgd
      phase never trains on; None without TWA-v.
    model: the flax module.
    steps_per_epoch: SGD's training steps per epoch.
    planned_steps: every step at which the sgd phase records a snapshot.
    selected_steps: the averaged ones (SWA, EMA's end, TWA's snapshots).
    eval_step: `steps.make_eval_step(model)`.
    stats_apply: `steps.make_stats_apply(model)`, the training-mode pass
      that `twa_jax.batch_norm.update_bn` recomputes statistics with.
    mesh: `parallel.data_mesh()`, every device of every process.
  """

  config: ml_collections.ConfigDict
  dataset: input_pipeline.Dataset
  holdout: input_pipeline.Dataset | None
  model: Any
  steps_per_epoch: int
  planned_steps: list[int]
  selected_steps: list[int]
  eval_step: Callable[..., jax.Array]
  stats_apply: Callable[..., Any]
  mesh: Mesh

  @property
  def averaging_end(self) -> int:
    """The step of the last averaged snapshot (end of the averaging range)."""
    return self.selected_steps[-1]

  def epochs_at(self, step: int) -> float | int:
    """SGD's epochs after `step` steps (an int when whole)."""
    epochs = step / self.steps_per_epoch
    return int(epochs) if epochs == int(epochs) else round(epochs, 4)


def create(config: ml_collections.ConfigDict) -> Experiment:
  """Loads the data and the model and plans the snapshots; no training.

  Raises:
    ConfigError: unknown dataset or model, a batch larger than a training
      split, or an averaging range without snapshots.
  """
  try:
    dataset = input_pipeline.load_dataset(config.data)
  except (ValueError, FileNotFoundError, KeyError) as e:
    raise ConfigError(f"config.data (name={config.data.name!r}): {e}") from e
  if config.data.holdout_fraction > 0:
    train, holdout = input_pipeline.holdout_split(
        dataset, config.data.holdout_fraction, config.data.holdout_seed)
    dataset = dataclasses.replace(train, x_test=holdout.x_train,
                                  y_test=holdout.y_train)
    logging.info("holdout: %d training examples, %d held out and used as "
                 "the test split", dataset.num_train, dataset.num_test)
  holdout = None
  if config.twa.holdout_fraction > 0:
    dataset, holdout = input_pipeline.holdout_split(
        dataset, config.twa.holdout_fraction, config.data.holdout_seed + 1)
    logging.info("TWA-v: %d training examples held out of the sgd phase "
                 "for training the coefficients (%d left for sgd)",
                 holdout.num_train, dataset.num_train)
  try:
    model = models.create_model(config.model.name, dataset.num_classes,
                                **config.model.kwargs.to_dict())
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from e
  mesh = parallel.data_mesh()
  try:
    parallel.check_batch_size(config.sgd.batch_size, mesh,
                              "config.sgd.batch_size")
    parallel.check_batch_size(config.eval_batch_size, mesh,
                              "config.eval_batch_size")
    spe = input_pipeline.steps_per_epoch(dataset, config.sgd.batch_size)
    if holdout is not None:
      input_pipeline.steps_per_epoch(holdout, config.sgd.batch_size)
  except ValueError as e:
    raise ConfigError(f"{e} (twa.holdout_fraction="
                      f"{config.twa.holdout_fraction})") from e
  planned = planned_snapshot_steps(config.sgd, spe)
  selected = select_snapshot_steps(config.averaging, planned, spe)
  logging.info("data parallel over %d device(s) of %d process(es) (this is "
               "process %d); %d examples per device and step", mesh.size,
               jax.process_count(), jax.process_index(),
               config.sgd.batch_size // mesh.size)
  logging.info(
      "%s: %d train / %d test examples, %d classes, input %s; model %s; "
      "%d steps per epoch; %d snapshots planned, %d averaged (steps %d-%d)",
      dataset.name, dataset.num_train, dataset.num_test, dataset.num_classes,
      dataset.input_shape, config.model.name, spe, len(planned),
      len(selected), selected[0], selected[-1])
  return Experiment(config, dataset, holdout, model, spe, planned, selected,
                    steps_lib.make_eval_step(model),
                    steps_lib.make_stats_apply(model), mesh)


def train_batches(exp: Experiment, data: input_pipeline.Dataset, seed: int,
                  augment: bool = True) -> Iterator[dict[str, jax.Array]]:
  """`data`'s training batches over consecutive epochs (`sgd.batch_size`),
  this process's share of each loaded (`input_pipeline.train_iterator`)
  and joined into global arrays split over the mesh. Its `iterator` is the
  grain iterator (its state goes into checkpoints)."""
  return GlobalBatches(exp.mesh, input_pipeline.train_iterator(
      data, exp.config.sgd.batch_size, seed=seed, augment=augment,
      process_index=jax.process_index(), process_count=jax.process_count(),
      workers=exp.config.parallel.workers))


@dataclasses.dataclass
class GlobalBatches:
  """Global batches of a per-process iterator (`parallel.global_batch`)."""

  mesh: Mesh
  iterator: Any  # grain.DatasetIterator: next(), get_state(), set_state()

  def __iter__(self) -> GlobalBatches:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    return parallel.global_batch(next(self.iterator), self.mesh)

  def close(self) -> None:
    """Stops the iterator's worker processes, if any."""
    self.iterator.close()


def planned_snapshot_steps(sgd: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> list[int]:
  """Every step at which the sgd phase records a snapshot."""
  schedule = SamplingSchedule(
      per_epoch=sgd.snapshots_per_epoch, steps_per_epoch=steps_per_epoch,
      include_initial=sgd.include_initial)
  total = sgd.epochs * steps_per_epoch
  return [s for s in range(total + 1) if schedule.should_sample(s)]


def select_snapshot_steps(averaging: ml_collections.ConfigDict,
                          planned: Sequence[int],
                          steps_per_epoch: int) -> list[int]:
  """The planned steps in the averaging range (inclusive at both ends).

  Raises:
    ConfigError: the range selects no snapshot taken after training started.
  """
  if averaging.unit == "epoch":
    lo, hi = averaging.start * steps_per_epoch, averaging.end * steps_per_epoch
    selected = [s for s in planned if lo <= s <= hi]
  else:
    if averaging.end >= len(planned):
      raise ConfigError(
          f"config.averaging.end={averaging.end}: the sgd phase records "
          f"{len(planned)} snapshots (indices 0-{len(planned) - 1})")
    selected = list(planned[averaging.start:averaging.end + 1])
  if not selected or selected[-1] == 0:
    raise ConfigError(
        f"config.averaging: {averaging.unit}s {averaging.start}-"
        f"{averaging.end} select {len(selected)} snapshots"
        + (" (only the initial weights)" if selected else "")
        + "; the range must include snapshots taken after training started")
  return selected


def init_variables(exp: Experiment) -> tuple[PyTree, PyTree]:
  """Initial (params, batch_stats) from the seed (fresh buffers each call)."""
  shape = (1,) + tuple(exp.dataset.input_shape)
  variables = exp.model.init(jax.random.PRNGKey(exp.config.seed),
                             jnp.zeros(shape, jnp.float32), train=False)
  return variables["params"], variables.get("batch_stats", {})


def initial_variables(exp: Experiment) -> tuple[PyTree, PyTree]:
  """The (params, batch_stats) the sgd phase starts from: `init_variables`,
  or those of `config.sgd.init_from` (checked against them).

  Raises:
    ConfigError: `sgd.init_from` is unreadable or does not match the model.
  """
  params, batch_stats = init_variables(exp)
  source = exp.config.sgd.init_from
  if not source:
    return params, batch_stats
  return init_from.load(source, params, batch_stats)


def row_splits(exp: Experiment) -> dict[str, int | None]:
  """The splits of a summary row, each with its example limit (None: all)."""
  splits = {"test": None, "train": exp.config.train_eval_size}
  if exp.holdout is not None:
    splits["holdout"] = None
  return splits


def evaluate(exp: Experiment, params: PyTree, batch_stats: PyTree,
             splits: Mapping[str, int | None]) -> dict[str, Metrics]:
  """Loss and accuracy on each split (on its first `limit` examples).

  Args:
    exp: the experiment.
    params, batch_stats: the model's variables.
    splits: {split: limit}; splits are "train" (what SGD trains on), "test",
      and with TWA-v "holdout".

  Returns:
    {split: {"loss", "accuracy"}}.
  """
  return {name: _evaluate_split(exp, params, batch_stats, name, limit)
          for name, limit in splits.items()}


def _evaluate_split(exp: Experiment, params: PyTree, batch_stats: PyTree,
                    name: str, limit: int | None) -> Metrics:
  if name == "holdout":
    if exp.holdout is None:
      raise ConfigError("no held-out split: set config.twa.holdout_fraction")
    data, split = exp.holdout, "train"
  else:
    data, split = exp.dataset, name
  bs = exp.config.eval_batch_size
  totals = parallel.replicate(jnp.zeros((3,), jnp.float32), exp.mesh)
  variables = parallel.replicate(steps_lib.variables(params, batch_stats),
                                 exp.mesh)
  seen = 0
  # This process's rows of each global batch: its positions p::count.
  rows = np.arange(jax.process_index(), bs, jax.process_count())
  for batch in input_pipeline.eval_batches(
      data, split, bs, process_index=jax.process_index(),
      process_count=jax.process_count()):
    if limit is not None:
      if seen >= limit:
        break
      batch["mask"] &= seen + rows < limit
    seen += bs
    totals = exp.eval_step(totals, variables,
                           parallel.global_batch(batch, exp.mesh))
  loss, correct, count = np.asarray(totals, np.float64)
  return {"loss": float(loss / count), "accuracy": float(correct / count)}


def recompute_batch_stats(exp: Experiment, params: PyTree) -> PyTree:
  """Exact batch-norm statistics of `params`: one pass over the train data
  (`twa_jax.batch_norm.update_bn`).

  Returns:
    The statistics ({} for a model without batch norm).
  """
  shapes = jax.eval_shape(lambda: init_variables(exp))[1]
  if not shapes:
    return {}
  template = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  with contextlib.closing(train_batches(exp, exp.dataset,
                                       exp.config.seed)) as batches:
    images = (next(batches)["image"] for _ in tqdm.trange(
        exp.steps_per_epoch, desc="batch-norm statistics", leave=False,
        disable=None))
    variables = batch_norm.update_bn(
        exp.stats_apply, parallel.replicate(
            {"params": params, "batch_stats": template}, exp.mesh), images)
  return variables["batch_stats"]


def evaluate_averaged(exp: Experiment, params: PyTree,
                      splits: Mapping[str, int | None]
                      ) -> tuple[dict[str, Metrics], float]:
  """Recomputes the batch-norm statistics of `params`, then evaluates them.

  For parameters that no training step produced (averages, TWA, points of
  the loss surface), whose running statistics are stale.

  Returns:
    The metrics of each split (as `evaluate`) and the seconds spent
    recomputing the statistics (part of the method's cost).
  """
  start = time.perf_counter()
  batch_stats = recompute_batch_stats(exp, params)
  seconds = time.perf_counter() - start
  return evaluate(exp, params, batch_stats, splits), seconds


def evaluate_state(exp: Experiment, state: steps_lib.TrainState,
                   splits: Mapping[str, int | None]
                   ) -> tuple[dict[str, Metrics], float]:
  """Evaluates a training state, as `evaluate_averaged` returns.

  Its params with its running batch statistics; with schedule-free SGD its
  `steps.evaluation_params`, with batch-norm statistics recomputed for them
  (the running ones were taken at the gradient points).
  """
  if steps_lib.is_schedule_free(state):
    return evaluate_averaged(exp, steps_lib.evaluation_params(state), splits)
  return evaluate(exp, state.params, state.batch_stats, splits), 0.0


def summary_row(metrics: Mapping[str, Metrics], *, epochs: float | int,
                wall_time_s: float | None,
                running_train_accuracy: float | None = None
                ) -> dict[str, Any]:
  """A method's row of the summary from its `row_splits` metrics.

  Two train accuracies, two gaps (train - test accuracy): `train_accuracy`
  and `generalization_gap` are the clean ones (evaluation mode, no
  augmentation, `train_eval_size` examples); `running_train_accuracy` and
  `running_generalization_gap` the paper's (the running average over the
  last training epoch's augmented, train-mode batches, as its reference code
  reports it: None for a method without training epochs of its own, e.g.
  SWA). See `report.table`.

  Args:
    metrics: {split: {"loss", "accuracy"}} of `row_splits`.
    epochs: the training epochs the method spent.
    wall_time_s: its seconds (None: unknown).
    running_train_accuracy: the paper's train accuracy (see above).
  """
  test, train = metrics["test"], metrics["train"]
  row = {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
         "train_accuracy": train["accuracy"], "train_loss": train["loss"],
         "generalization_gap": train["accuracy"] - test["accuracy"],
         **running_columns(running_train_accuracy, test["accuracy"]),
         "epochs": epochs, "wall_time_s": wall_time_s}
  if "holdout" in metrics:
    row.update(holdout_accuracy=metrics["holdout"]["accuracy"],
               holdout_loss=metrics["holdout"]["loss"])
  return row


def running_columns(running_train_accuracy: float | None,
                    test_accuracy: float) -> dict[str, float | None]:
  """A row's running_train_accuracy and running_generalization_gap (see
  `summary_row`)."""
  return {"running_train_accuracy": running_train_accuracy,
          "running_generalization_gap": (
              None if running_train_accuracy is None
              else running_train_accuracy - test_accuracy)}
