"""The phases of train.py: SGD recording its trajectory, SWA, EMA, TWA, report.

`run(config, workdir)` validates everything it can before training, then runs
the phases `config.phases` names, in this order, each resumable and each
skipped when an earlier invocation finished it:

  sgd     regular training for `sgd.epochs`, recording snapshots of the
          parameters into the workdir's trajectory store (`sgd.
          snapshots_per_epoch`, plus the initial weights), tracking an EMA of
          the parameters, evaluating every epoch; at the end of the averaging
          range it also evaluates SGD there and keeps the EMA.
  swa     the uniform average of the snapshots in the averaging range.
  twa     TWA training (`twa.epochs`) in the span of those snapshots, started
          from their mean (head stage) or the last one (tail stage); with
          `twa.holdout_fraction` also TWA-v, trained on held-out data.
  surface (not run by default) train loss and test error over the plane
          through SGD, SWA and TWA, on a `surface.steps`-square grid.
  report  summary.json, the comparison table and the plots.

SWA, EMA and TWA are evaluated after recomputing the batch-norm statistics
with one pass over the training data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging as py_logging
import os
import pathlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import auto as tqdm

import twa_jax
from twa_jax.sampling import SamplingSchedule
from twa_jax.store import TrajectoryStore
from twa_jax.training import input_pipeline
from twa_jax.training import models
from twa_jax.training import report
from twa_jax.training import steps as steps_lib
from twa_jax.training import surface as surface_lib

PyTree = Any
PHASES = ("sgd", "swa", "twa", "surface", "report")

WORKDIR_LAYOUT = """\
workdir layout:
  config.json         the config the workdir was started with; a rerun must
                      match it in the fields of every phase already started
  log.txt             the log
  metrics.jsonl       one record per epoch and phase: train/test loss and
                      accuracy, learning rate, seconds
  trajectory/         the SGD snapshots (twa_jax.TrajectoryStore)
  sgd/checkpoints/    orbax checkpoints of the SGD state, one per epoch
  sgd/ema_head/       the EMA parameters at the end of the averaging range,
                      with SGD's evaluation there in the metadata
  sgd/result.json     SGD (full budget and at the end of the averaging
                      range) and EMA results; marks the phase finished
  swa/result.json     SWA result
  twa/checkpoints/    orbax checkpoints of the TWA state, one per epoch
  twa/result.json     TWA result, snapshots used, basis dimension,
                      averaging coefficients
  twa_v/              the same for TWA-v (with twa.holdout_fraction > 0)
  surface/result.json the loss surface through SGD, SWA and TWA
  summary.json        all results side by side
  plots/accuracy.png, plots/coefficients.png, plots/surface.png
Kill a run at any point and rerun the same command: it resumes from the last
complete checkpoint and finishes with the result of an uninterrupted run.
"""

# Config fields each phase's outputs depend on; a workdir in which a phase has
# started refuses a config that changes any of them. Other fields (name,
# phases, eval_batch_size, log_every_steps) may change between invocations.
# A field names a section ("sgd") or one entry ("twa.holdout_fraction": TWA-v's
# held-out part is missing from the sgd phase's training data).
_SHARED_FIELDS = ("seed", "data", "model", "sgd", "averaging",
                  "train_eval_size", "twa.holdout_fraction")
_PHASE_FIELDS = {"sgd": _SHARED_FIELDS, "swa": _SHARED_FIELDS,
                 "twa": _SHARED_FIELDS + ("twa",),
                 "surface": _SHARED_FIELDS + ("twa", "surface")}
# Fields added since workdirs were first written, with the value that
# reproduces what a workdir without them did (its config.json lacks them;
# data.holdout_seed: its seed).
_ADDED_FIELDS = {"twa.holdout_fraction": 0.0, "twa.granularity": "global",
                 "twa.storage": "float32"}
GRANULARITIES = ("global", "layer", "leaf")
STORAGES = ("float32", "bfloat16", "int8", "int4")
_MAX_CHECKPOINTS = 2


class ConfigError(ValueError):
  """A config, workdir or store problem found before training starts."""


class TrainingDiverged(FloatingPointError):
  """The training loss became NaN or infinite."""


def run(config: ml_collections.ConfigDict,
        workdir: str | os.PathLike) -> dict[str, Any] | None:
  """Runs the phases `config.phases` in `workdir`.

  Args:
    config: an experiment config (see `configs/common.py`).
    workdir: output directory (created; see `WORKDIR_LAYOUT`).

  Returns:
    The summary when the report phase ran, else None.

  Raises:
    ConfigError: bad config, unwritable workdir, a workdir started with a
      different config, or a snapshot range the store cannot satisfy.
    TrainingDiverged: NaN loss (what was saved is kept).
  """
  phases = parse_phases(config.phases)
  validate_config(config)
  workdir = prepare_workdir(workdir)
  with log_to(workdir / "log.txt"):
    logging.info("twa_jax %s: config %s, workdir %s, phases %s",
                 twa_jax.__version__, config.name, workdir, ",".join(phases))
    saved = _check_saved_config(config, workdir)
    experiment = Experiment.create(config, workdir)
    experiment.check_snapshots(phases)
    if saved != config_dict(config):
      write_json(workdir / "config.json", config_dict(config))
    summary = None
    for phase in phases:
      try:
        summary = getattr(experiment, f"phase_{phase}")()
      except Exception as e:
        logging.error("%s stopped: %s: %s", phase, type(e).__name__, e)
        raise
    return summary


def parse_phases(phases: str) -> list[str]:
  """The phase names of a comma-separated string, checked and in run order."""
  names = [p.strip() for p in str(phases).split(",") if p.strip()]
  unknown = [p for p in names if p not in PHASES]
  if unknown or not names:
    raise ConfigError(f"config.phases={phases!r}: unknown or no phase "
                      f"{unknown}; choose from {','.join(PHASES)}")
  return [p for p in PHASES if p in names]


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the fields that need no data: positive numbers, known choices."""
  errors = []

  def need(ok: bool, field: str, message: str):
    if not ok:
      errors.append(f"config.{field}={_get(config, field)!r}: {message}")

  for section in ("sgd", "twa"):
    s = config[section]
    need(s.epochs >= 1 and isinstance(s.epochs, int), f"{section}.epochs",
         "must be a positive integer")
    need(s.lr > 0, f"{section}.lr", "the learning rate must be positive")
    need(s.optimizer in steps_lib.OPTIMIZERS, f"{section}.optimizer",
         f"choose from {steps_lib.OPTIMIZERS}")
    need(s.schedule in (steps_lib.SCHEDULES if section == "sgd" else ("step",)),
         f"{section}.schedule", "unknown schedule")
    need(0 <= s.momentum < 1, f"{section}.momentum", "must be in [0, 1)")
    need(s.weight_decay >= 0, f"{section}.weight_decay", "must be >= 0")
    need(0 < s.decay_factor <= 1, f"{section}.decay_factor",
         "must be in (0, 1]")
    need(all(0 < f <= 1 for f in s.decay_at), f"{section}.decay_at",
         "fractions of the epochs, in (0, 1]")
    need(0 <= s.linear_epochs <= s.epochs, f"{section}.linear_epochs",
         "must be in [0, epochs]")
  sgd = config.sgd
  need(sgd.batch_size >= 1, "sgd.batch_size", "must be positive")
  need(0 <= sgd.ema_decay < 1, "sgd.ema_decay", "must be in [0, 1)")
  need(sgd.snapshots_per_epoch >= 1, "sgd.snapshots_per_epoch",
       "must be positive")
  if sgd.schedule == "swa":
    need(sgd.swa_lr > 0, "sgd.swa_lr", "must be positive")
    need(sgd.swa_start >= 1, "sgd.swa_start", "must be a positive epoch")
  avg = config.averaging
  need(avg.unit in ("epoch", "index"), "averaging.unit",
       "choose 'epoch' or 'index'")
  need(0 <= avg.start <= avg.end, "averaging.start",
       f"need 0 <= start <= end (end={avg.end})")
  if avg.unit == "epoch":
    need(1 <= avg.end <= sgd.epochs, "averaging.end",
         f"must be an epoch in [1, sgd.epochs={sgd.epochs}]")
  need(config.twa.start in ("mean", "last"), "twa.start",
       "choose 'mean' (head stage) or 'last' (tail stage)")
  need(config.twa.granularity in GRANULARITIES, "twa.granularity",
       f"choose from {GRANULARITIES}")
  need(config.twa.storage in STORAGES, "twa.storage",
       f"choose from {STORAGES}")
  for field in ("data.holdout_fraction", "twa.holdout_fraction"):
    need(0 <= _get(config, field) < 1, field, "must be in [0, 1)")
  need(config.surface.steps >= 2, "surface.steps", "need at least 2")
  need(config.surface.margin >= 0, "surface.margin", "must be >= 0")
  need(config.eval_batch_size >= 1, "eval_batch_size", "must be positive")
  need(config.train_eval_size is None or config.train_eval_size >= 1,
       "train_eval_size", "must be positive (or None: all)")
  need(config.log_every_steps >= 1, "log_every_steps", "must be positive")
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


@dataclasses.dataclass
class Experiment:
  """Data, model, jitted steps and snapshot plan of one run."""

  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  dataset: input_pipeline.Dataset
  model: Any
  steps_per_epoch: int
  holdout: input_pipeline.Dataset | None  # TWA-v's part; SGD never sees it
  planned_steps: list[int]  # every snapshot step SGD records
  selected_steps: list[int]  # the averaging range: SWA, EMA end, TWA
  eval_step: Callable[..., Any]
  batch_stats_step: Callable[..., Any]

  @classmethod
  def create(cls, config: ml_collections.ConfigDict,
             workdir: pathlib.Path) -> Experiment:
    """Loads the data and the model and plans the snapshots; no training."""
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
    try:
      spe = input_pipeline.steps_per_epoch(dataset, config.sgd.batch_size)
      if holdout is not None:
        input_pipeline.steps_per_epoch(holdout, config.sgd.batch_size)
    except ValueError as e:
      raise ConfigError(f"config.sgd.batch_size (twa.holdout_fraction="
                        f"{config.twa.holdout_fraction}): {e}") from e
    planned = planned_snapshot_steps(config.sgd, spe)
    selected = select_snapshot_steps(config.averaging, planned, spe)
    logging.info(
        "%s: %d train / %d test examples, %d classes, input %s; model %s; "
        "%d steps per epoch; %d snapshots planned, %d averaged (steps %d-%d)",
        dataset.name, dataset.num_train, dataset.num_test, dataset.num_classes,
        dataset.input_shape, config.model.name, spe, len(planned),
        len(selected), selected[0], selected[-1])
    return cls(config, workdir, dataset, model, spe, holdout, planned, selected,
               steps_lib.make_eval_step(model),
               steps_lib.make_batch_stats_step(model))

  # ------------------------------------------------------------ helpers

  @property
  def head_step(self) -> int:
    """The step of the last averaged snapshot (end of the averaging range)."""
    return self.selected_steps[-1]

  def epochs_at(self, step: int) -> float | int:
    epochs = step / self.steps_per_epoch
    return int(epochs) if epochs == int(epochs) else round(epochs, 4)

  def done(self, phase: str) -> bool:
    return (self.workdir / phase / "result.json").exists()

  def init_variables(self) -> tuple[PyTree, PyTree]:
    """Initial (params, batch_stats) from the seed."""
    shape = (1,) + tuple(self.dataset.input_shape)
    variables = self.model.init(jax.random.PRNGKey(self.config.seed),
                                jnp.zeros(shape, jnp.float32), train=False)
    return variables["params"], variables.get("batch_stats", {})

  def open_store(self, read_only: bool) -> TrajectoryStore:
    path = self.workdir / "trajectory"
    if read_only and not path.exists():
      raise ConfigError(f"no trajectory store at {path}: run the sgd phase "
                        "first")
    return TrajectoryStore(path, create=not read_only, read_only=read_only)

  def check_snapshots(self, phases: Sequence[str]) -> None:
    """Fails early when swa/twa will need snapshots the store lacks."""
    needs = [p for p in ("swa", "twa") if p in phases and not self.done(p)]
    if not needs or "sgd" in phases or self.done("sgd"):
      return
    with self.open_store(read_only=True) as store:
      have = set(store.steps())
    missing = [s for s in self.selected_steps if s not in have]
    if missing:
      avg = self.config.averaging
      unit = "epochs" if avg.unit == "epoch" else "indices"
      raise ConfigError(
          f"phases {','.join(needs)} average the snapshots of "
          f"{unit} {avg.start}-{avg.end} ({len(self.selected_steps)} "
          f"snapshots, steps {self.selected_steps[0]}-{self.head_step}); the "
          f"store {self.workdir / 'trajectory'} lacks {len(missing)} of them "
          f"(first missing step {missing[0]}; it has {len(have)}): run the "
          "sgd phase to the end of the range first")

  def evaluate(self, params: PyTree, batch_stats: PyTree, split: str,
               limit: int | None = None) -> dict[str, float]:
    """Loss and accuracy on a split (the first `limit` examples).

    Splits: "train" (what SGD trains on), "test", and with TWA-v "holdout".
    """
    bs = self.config.eval_batch_size
    totals = jnp.zeros((3,), jnp.float32)
    variables = steps_lib.variables(params, batch_stats)
    seen = 0
    data, split = self.split(split)
    for batch in input_pipeline.eval_batches(data, split, bs, pad=True):
      if limit is not None:
        if seen >= limit:
          break
        batch["mask"][max(limit - seen, 0):] = False
      seen += bs
      totals = self.eval_step(totals, variables, batch)
    loss, correct, count = np.asarray(totals, np.float64)
    return {"loss": float(loss / count), "accuracy": float(correct / count)}

  def split(self, name: str) -> tuple[input_pipeline.Dataset, str]:
    """The dataset and its split that hold the examples of split `name`."""
    if name == "holdout":
      if self.holdout is None:
        raise ConfigError("no held-out split: set config.twa.holdout_fraction")
      return self.holdout, "train"
    return self.dataset, name

  def recompute_batch_stats(self, params: PyTree,
                            batch_stats: PyTree) -> PyTree:
    """Exact batch-norm statistics of `params`: one pass over the train data."""
    if not batch_stats:
      return batch_stats
    sums = jax.tree.map(jnp.zeros_like, batch_stats)
    total = 0
    batches = input_pipeline.train_batches(
        self.dataset, self.config.sgd.batch_size, seed=self.config.seed,
        epoch=0)
    for batch in tqdm.tqdm(batches, total=self.steps_per_epoch,
                           desc="batch-norm statistics", leave=False,
                           disable=None):
      sums = self.batch_stats_step(sums, params, batch_stats, batch["image"])
      total += batch["image"].shape[0]
    return jax.tree.map(lambda s: s / total, sums)

  def result(self, params: PyTree, batch_stats: PyTree, *,
             epochs: float | int, wall_time_s: float | None
             ) -> dict[str, Any]:
    """A method's row of the summary: test and train metrics, cost."""
    test = self.evaluate(params, batch_stats, "test")
    train = self.evaluate(params, batch_stats, "train",
                          self.config.train_eval_size)
    row = {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
           "train_accuracy": train["accuracy"], "train_loss": train["loss"],
           "generalization_gap": train["accuracy"] - test["accuracy"],
           "epochs": epochs, "wall_time_s": wall_time_s}
    if self.holdout is not None:
      holdout = self.evaluate(params, batch_stats, "holdout")
      row.update(holdout_accuracy=holdout["accuracy"],
                 holdout_loss=holdout["loss"])
    return row

  def head_record(self) -> dict[str, Any] | None:
    """SGD's evaluation and time at the end of the averaging range."""
    path = self.workdir / "sgd" / "ema_head"
    if not path.exists():
      return None
    with TrajectoryStore(path, create=False, read_only=True) as store:
      return store.metadata(self.head_step) if store.steps() else None

  def head_time(self) -> float | None:
    record = self.head_record()
    return None if record is None else record["elapsed_s"]

  def snapshots(self, store: TrajectoryStore) -> PyTree:
    """The averaged snapshots as one tree with a leading snapshot axis."""
    spec, matrix = store.read_matrix(self.selected_steps)
    offsets = np.cumsum((0,) + spec.sizes)
    n = matrix.shape[0]
    leaves = [matrix[:, a:b].reshape((n,) + shape).astype(dtype, copy=False)
              for a, b, shape, dtype in zip(offsets[:-1], offsets[1:],
                                            spec.shapes, spec.dtypes)]
    return jax.tree_util.tree_unflatten(spec.treedef, leaves)

  # ------------------------------------------------------------ phases

  def phase_sgd(self) -> None:
    """Regular training; records the trajectory, the EMA and SGD at the head."""
    if self._skip("sgd"):
      return
    cfg = self.config.sgd
    schedule = steps_lib.learning_rate_schedule(cfg, cfg.epochs,
                                                self.steps_per_epoch)
    tx = steps_lib.base_optimizer(cfg.optimizer, schedule,
                                  momentum=cfg.momentum,
                                  weight_decay=cfg.weight_decay,
                                  nesterov=cfg.nesterov)
    params, batch_stats = self.init_variables()
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "batch_stats": batch_stats, "opt_state": tx.init(params),
             "ema": jax.tree.map(jnp.zeros_like, params)}
    train_step = steps_lib.make_train_step(
        self.model, tx, ema_decay=cfg.ema_decay, seed=self.config.seed)
    planned = set(self.planned_steps)
    with self.open_store(read_only=False) as store, \
        TrajectoryStore(self.workdir / "sgd" / "ema_head") as ema_store:
      saved = set(store.steps())

      def on_step(step: int, state: dict, elapsed: float) -> None:
        if step in planned and step not in saved:
          store.save(step, state["params"],
                     metadata={"epoch": self.epochs_at(step)})
          saved.add(step)
        if step == self.head_step and step not in ema_store.steps():
          self._record_head(ema_store, state, elapsed)

      state, elapsed = self.train(
          "sgd", state, train_step, schedule, epochs=cfg.epochs,
          data_seed=self.config.seed, hook_steps=planned,
          on_step=on_step, before_checkpoint=store.wait_until_finished)
      store.wait_until_finished()
      ema_store.wait_until_finished()
      head = ema_store.metadata(self.head_step)
      ema = ema_store.load(self.head_step)
    start = time.perf_counter()
    ema_stats = self.recompute_batch_stats(ema, state["batch_stats"])
    ema_time = time.perf_counter() - start
    results = {"sgd": self.result(state["params"], state["batch_stats"],
                                  epochs=cfg.epochs, wall_time_s=elapsed)}
    if self.head_step < cfg.epochs * self.steps_per_epoch:
      results["sgd_head"] = head["sgd"]
    results["ema"] = self.result(ema, ema_stats,
                                 epochs=self.epochs_at(self.head_step),
                                 wall_time_s=head["elapsed_s"] + ema_time)
    self._finish("sgd", {"results": results})

  def _record_head(self, ema_store: TrajectoryStore, state: dict,
                   elapsed: float) -> None:
    """At the end of the averaging range: evaluate SGD, keep the EMA."""
    step = self.head_step
    row = self.result(state["params"], state["batch_stats"],
                      epochs=self.epochs_at(step), wall_time_s=elapsed)
    logging.info("sgd at the end of the averaging range (step %d, epoch %s): "
                 "test accuracy %.4f", step, self.epochs_at(step),
                 row["test_accuracy"])
    decay = self.config.sgd.ema_decay
    ema = jax.tree.map(lambda e: e / (1.0 - decay**step), state["ema"])
    ema_store.save(step, ema,
                   metadata={"epoch": self.epochs_at(step),
                             "elapsed_s": elapsed, "sgd": row})
    ema_store.wait_until_finished()

  def phase_swa(self) -> None:
    """The uniform average of the averaged snapshots, batch norm recomputed."""
    if self._skip("swa"):
      return
    start = time.perf_counter()
    with self.open_store(read_only=True) as store:
      params = twa_jax.swa(self.snapshots(store))
    _, batch_stats = self.init_variables()
    batch_stats = self.recompute_batch_stats(params, batch_stats)
    seconds = time.perf_counter() - start
    head = self.head_time()
    row = self.result(params, batch_stats,
                      epochs=self.epochs_at(self.head_step),
                      wall_time_s=None if head is None else head + seconds)
    self._finish("swa", {"results": {"swa": row},
                         "swa": {"snapshots": len(self.selected_steps)}})

  def phase_twa(self) -> None:
    """TWA in the span of the averaged snapshots; with TWA-v also on held-out data.

    "twa" trains the coefficients on the sgd phase's training data; with
    `twa.holdout_fraction` > 0, "twa_v" trains them again, from the same
    start, on the held-out part that SGD never saw.
    """
    self._twa("twa", self.dataset)
    if self.holdout is not None:
      self._twa("twa_v", self.holdout)

  def basis(self, store: TrajectoryStore) -> twa_jax.Basis:
    """The basis of the averaged snapshots, as `config.twa` asks."""
    return twa_jax.Basis.from_store(store, self.selected_steps,
                                    **basis_options(self.config.twa))

  def _twa(self, name: str, data: input_pipeline.Dataset) -> None:
    """One TWA run ("twa" or "twa_v") whose steps draw batches from `data`."""
    if self._skip(name):
      return
    cfg = self.config.twa
    start = time.perf_counter()
    with self.open_store(read_only=True) as store:
      basis = self.basis(store)
      if cfg.start == "mean":
        params = twa_jax.swa(self.snapshots(store))
      else:
        params = store.load(self.head_step)
    logging.info("%s: basis of %d snapshots has dimension %d (%d parameters; "
                 "%s coefficients, %s storage); training on %d examples",
                 name, len(self.selected_steps), basis.dim, basis.num_params,
                 cfg.granularity, cfg.storage, data.num_train)
    spe = input_pipeline.steps_per_epoch(data, self.config.sgd.batch_size)
    schedule = steps_lib.learning_rate_schedule(cfg, cfg.epochs, spe)
    tx = twa_optimizer(cfg, schedule, basis)
    _, batch_stats = self.init_variables()
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "batch_stats": batch_stats, "opt_state": tx.init(params)}
    train_step = steps_lib.make_train_step(self.model, tx,
                                           seed=self.config.seed + 1)
    setup = time.perf_counter() - start
    state, elapsed = self.train(
        name, state, train_step, schedule, epochs=cfg.epochs,
        data_seed=self.config.seed + 1, basis=basis, data=data)
    basis = twa_jax.basis_of(state["opt_state"])  # the steps donated the old buffers
    start = time.perf_counter()
    last_epoch_test = self._last_record(name)
    batch_stats = self.recompute_batch_stats(state["params"],
                                             state["batch_stats"])
    with self.open_store(read_only=True) as store:  # not held while training
      alpha = twa_jax.averaging_coefficients(
          state["params"], self.snapshots(store), basis)
    seconds = setup + elapsed + time.perf_counter() - start
    head = self.head_time()
    head_epochs = self.epochs_at(self.head_step)
    row = self.result(state["params"], batch_stats,
                      epochs=head_epochs + cfg.epochs,
                      wall_time_s=None if head is None else head + seconds)
    details = {
        "snapshots": len(self.selected_steps),
        "snapshot_steps": self.selected_steps,
        "snapshot_epochs": [self.epochs_at(s) for s in self.selected_steps],
        "basis_dim": basis.dim, "num_params": basis.num_params,
        "granularity": cfg.granularity, "storage": cfg.storage,
        "trained_on": data.num_train,
        "start": cfg.start, "head_epochs": head_epochs, "epochs": cfg.epochs,
        **coefficients_record(alpha),
        "last_epoch_test_accuracy": (
            None if last_epoch_test is None
            else last_epoch_test["test_accuracy"]),
    }
    self._finish(name, {"results": {name: row}, name: details})

  def phase_surface(self) -> None:
    """Train loss and test error over the plane through SGD, SWA and TWA."""
    if self._skip("surface"):
      return
    if not self.done("twa"):
      raise ConfigError("surface: needs the TWA solution; run the twa phase "
                        "first")
    with self.open_store(read_only=True) as store:
      sgd = store.load(self.planned_steps[-1])
      swa = twa_jax.swa(self.snapshots(store))
    with ocp.CheckpointManager(
        (self.workdir / "twa" / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
      twa = manager.restore(manager.latest_step(), args=ocp.args.Composite(
          state=ocp.args.StandardRestore()))["state"]["params"]
    _, init_stats = self.init_variables()
    limit = self.config.surface.train_eval_size

    def evaluate(params: PyTree) -> dict[str, float]:
      stats = self.recompute_batch_stats(params, init_stats)
      train = self.evaluate(params, stats, "train", limit)
      test = self.evaluate(params, stats, "test")
      return {"train_loss": train["loss"], "train_error": 1 - train["accuracy"],
              "test_loss": test["loss"], "test_error": 1 - test["accuracy"]}

    result = surface_lib.surface([sgd, swa, twa], evaluate,
                                 steps=self.config.surface.steps,
                                 margin=self.config.surface.margin)
    write_json(self.workdir / "surface" / "result.json",
                surface_lib.to_dict(result))

  def phase_report(self) -> dict[str, Any]:
    """summary.json, the printed table and the plots."""
    parts = {p: read_json(self.workdir / p / "result.json")
             for p in ("sgd", "swa", "twa", "twa_v") if self.done(p)}
    if not parts:
      raise ConfigError(f"report: no finished phase in {self.workdir}; run "
                        "sgd, swa or twa first")
    summary = report.summary(self.config, self.dataset.name, parts,
                             self.steps_per_epoch)
    write_json(self.workdir / "summary.json", summary)
    records = read_metrics(self.workdir)
    paths = report.plots(summary, records, self.workdir / "plots")
    if self.done("surface"):
      paths.append(surface_lib.plot(
          surface_lib.from_dict(read_json(
              self.workdir / "surface" / "result.json")),
          self.workdir / "plots" / "surface.png"))
    table = report.table(summary)
    print(table, flush=True)
    logging.info("summary: %s; plots: %s", self.workdir / "summary.json",
                 ", ".join(str(p) for p in paths))
    return summary

  # ------------------------------------------------------------ the loop

  def train(self, phase: str, state: dict, train_step: Callable,
             schedule: optax.Schedule, *, epochs: int, data_seed: int,
             hook_steps: set[int] = frozenset(),
             on_step: Callable[[int, dict, float], None] | None = None,
             before_checkpoint: Callable[[], None] | None = None,
             basis: twa_jax.Basis | None = None,
             data: input_pipeline.Dataset | None = None) -> tuple[dict, float]:
    """The epoch loop of sgd and twa: resume, train, evaluate, checkpoint.

    Checkpoints leave out the TWA basis (`twa_jax.strip_basis`): it is
    rebuilt from the store and put back on resume.

    Args:
      phase: "sgd" or "twa" (names the checkpoints and metrics).
      state: the initial training state (replaced by a checkpoint's).
      train_step: from `steps.make_train_step`.
      schedule: the learning rate per step (for the log).
      epochs: the phase's epochs.
      data_seed: the data order is a function of (data_seed, epoch).
      hook_steps: steps (0 = before training) after which `on_step(step,
        state, seconds so far)` runs; the loss is checked first.
      on_step: see `hook_steps`.
      before_checkpoint: runs before each epoch's checkpoint is written.
      basis: the TWA basis to put back into a restored state.
      data: the training batches' dataset (default: the experiment's).

    Returns:
      The final state and the seconds spent in this phase's epochs (summed
      over the invocations that trained them).
    """
    ckpt_dir = (self.workdir / phase / "checkpoints").absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=_MAX_CHECKPOINTS,
                                           create=True)
    with ocp.CheckpointManager(ckpt_dir, options=options) as manager:
      state, start_epoch, elapsed = self._restore(manager, state, phase, basis)
      _truncate_metrics(self.workdir, phase, start_epoch)
      data = self.dataset if data is None else data
      spe = input_pipeline.steps_per_epoch(data, self.config.sgd.batch_size)
      loop = _Loop(phase, train_step, manager, epochs, data, spe, data_seed,
                   hook_steps, on_step)
      if start_epoch == 0 and 0 in hook_steps:
        on_step(0, state, 0.0)
      with tqdm.tqdm(total=epochs * spe, initial=start_epoch * spe, desc=phase,
                     unit="step", dynamic_ncols=True, disable=None) as bar:
        for epoch in range(start_epoch, epochs):
          start = time.perf_counter()
          lr = float(schedule(epoch * spe))
          state, train = self._train_epoch(loop, state, epoch, lr, elapsed, bar)
          test = self.evaluate(state["params"], state["batch_stats"], "test")
          seconds = time.perf_counter() - start
          elapsed += seconds
          self._record_epoch(loop, epoch, lr, train, test, seconds)
          if before_checkpoint is not None:
            before_checkpoint()
          saved = steps_lib.host(_without_basis(state))
          manager.save(epoch + 1, args=ocp.args.Composite(
              state=ocp.args.StandardSave(saved),
              meta=ocp.args.JsonSave({"epoch": epoch + 1,
                                      "elapsed_s": elapsed})))
      manager.wait_until_finished()
    return state, elapsed

  def _train_epoch(self, loop: _Loop, state: dict, epoch: int, lr: float,
                   elapsed: float, bar: Any) -> tuple[dict, dict[str, float]]:
    """One epoch of training; returns the state and the epoch's metrics."""
    spe, bs = loop.steps_per_epoch, self.config.sgd.batch_size
    every = self.config.log_every_steps
    start = last_time = time.perf_counter()
    last_log = 0
    metrics = steps_lib.new_metrics()
    batches = input_pipeline.train_batches(loop.data, bs,
                                           seed=loop.data_seed, epoch=epoch)
    for i, batch in enumerate(batches):
      state, metrics = loop.train_step(state, metrics, batch)
      step = epoch * spe + i + 1
      if step in loop.hook_steps:
        self._check_finite(loop, metrics, epoch)
        loop.on_step(step, state, elapsed + time.perf_counter() - start)
      if (i + 1) % every == 0 or i + 1 == spe:
        m = self._check_finite(loop, metrics, epoch)
        now = time.perf_counter()
        bar.update(i + 1 - last_log)
        bar.set_postfix(
            epoch=f"{epoch + 1}/{loop.epochs}",
            loss=f"{m['loss'] / m['count']:.4f}",
            acc=f"{m['correct'] / m['count']:.4f}", lr=f"{lr:.3g}",
            img_s=f"{(i + 1 - last_log) * bs / (now - last_time):.0f}")
        last_log, last_time = i + 1, now
    m = self._check_finite(loop, metrics, epoch)
    return state, {"loss": m["loss"] / m["count"],
                   "accuracy": m["correct"] / m["count"]}

  def _record_epoch(self, loop: _Loop, epoch: int, lr: float,
                    train: dict[str, float], test: dict[str, float],
                    seconds: float) -> None:
    """Appends the epoch's record to metrics.jsonl and logs it."""
    phase, epochs = loop.phase, loop.epochs
    _append_metrics(self.workdir, {
        "phase": phase, "epoch": epoch + 1,
        "step": (epoch + 1) * loop.steps_per_epoch, "lr": lr,
        "train_loss": train["loss"], "train_accuracy": train["accuracy"],
        "test_loss": test["loss"], "test_accuracy": test["accuracy"],
        "seconds": seconds})
    logging.info("%s epoch %d/%d: train loss %.4f acc %.4f, test loss %.4f "
                 "acc %.4f, lr %.3g, %.1fs", phase, epoch + 1, epochs,
                 train["loss"], train["accuracy"], test["loss"],
                 test["accuracy"], lr, seconds)

  def _restore(self, manager: ocp.CheckpointManager, state: dict, phase: str,
               basis: twa_jax.Basis | None) -> tuple[dict, int, float]:
    latest = manager.latest_step()
    if latest is None:
      return state, 0, 0.0
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            _without_basis(state))
    restored = manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    state, meta = restored["state"], restored["meta"]
    if basis is not None:
      state["opt_state"] = twa_jax.restore_basis(state["opt_state"], basis)
    logging.info("%s: resuming after epoch %d from %s", phase, meta["epoch"],
                 manager.directory)
    return state, int(meta["epoch"]), float(meta["elapsed_s"])

  def _check_finite(self, loop: _Loop, metrics: dict,
                    epoch: int) -> dict[str, float]:
    """Host copy of the epoch's metrics; stops the phase on a NaN loss."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if m["nan_step"] < 0:
      return m
    step, spe = int(m["nan_step"]), loop.steps_per_epoch
    kept = loop.manager.latest_step()
    kept = ("no checkpoint" if kept is None
            else f"the checkpoint after epoch {kept}")
    if loop.phase == "sgd":
      kept += (f", and the snapshots recorded so far in "
               f"{self.workdir / 'trajectory'}")
    raise TrainingDiverged(
        f"{loop.phase}: the training loss is NaN or infinite at step {step} "
        f"(epoch {epoch + 1}, step {step - epoch * spe} of {spe}); stopped. "
        f"Kept: {kept} (in {loop.manager.directory}). Lower the learning "
        "rate or check the data.")

  def _last_record(self, phase: str) -> dict[str, Any] | None:
    records = [r for r in read_metrics(self.workdir) if r["phase"] == phase]
    return records[-1] if records else None

  def _skip(self, phase: str) -> bool:
    if self.done(phase):
      logging.info("%s: finished earlier (%s); skipped", phase,
                   self.workdir / phase / "result.json")
      return True
    return False

  def _finish(self, phase: str, result: dict[str, Any]) -> None:
    for method, row in result["results"].items():
      logging.info("%s: test accuracy %.4f, train accuracy %.4f, test loss "
                   "%.4f, epochs %s", method, row["test_accuracy"],
                   row["train_accuracy"], row["test_loss"], row["epochs"])
    write_json(self.workdir / phase / "result.json", result)


@dataclasses.dataclass(frozen=True)
class _Loop:
  """What the epoch loop of one phase needs besides the state."""

  phase: str
  train_step: Callable[..., Any]
  manager: ocp.CheckpointManager
  epochs: int
  data: input_pipeline.Dataset
  steps_per_epoch: int
  data_seed: int
  hook_steps: set[int]
  on_step: Callable[[int, dict, float], None] | None


def twa_optimizer(cfg: ml_collections.ConfigDict, schedule: optax.Schedule,
                   basis: twa_jax.Basis) -> optax.GradientTransformation:
  """The TWA optimizer: projected SGD, or Adam on the coefficients."""
  if cfg.optimizer == "sgd":
    return twa_jax.twa(basis, schedule, momentum=cfg.momentum,
                       weight_decay=cfg.weight_decay)
  return twa_jax.scale_by_subspace(
      basis, steps_lib.base_optimizer(cfg.optimizer, schedule,
                                      momentum=cfg.momentum,
                                      weight_decay=cfg.weight_decay))


def basis_options(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """`Basis.from_*` keywords of `config.twa`'s granularity and storage."""
  return {"granularity": _layer if cfg.granularity == "layer"
                         else cfg.granularity,
          "dtype": cfg.storage if cfg.storage in ("int8", "int4")
                   else jnp.dtype(cfg.storage)}


def coefficients_record(alpha) -> dict[str, Any]:
  """The averaging coefficients and their sum as JSON data (per block if a
  dict)."""
  alpha = jax.tree.map(lambda a: np.asarray(a, np.float64), alpha)
  return {"coefficients": jax.tree.map(lambda a: a.tolist(), alpha),
          "coefficient_sum": jax.tree.map(lambda a: float(a.sum()), alpha)}


def _layer(path: str) -> str:
  """The block of a leaf for granularity "layer": its path less the last key."""
  cut = max(path.rfind("["), path.rfind("."))
  return path[:cut] if cut > 0 else path


def _without_basis(state: dict) -> dict:
  return dict(state, opt_state=twa_jax.strip_basis(state["opt_state"]))


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
  """The planned steps in the averaging range (inclusive at both ends)."""
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


# ---------------------------------------------------------------- workdir


def prepare_workdir(workdir: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(workdir).expanduser().absolute()
  probe = path / ".write_test"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"workdir {path} is not writable: {e}") from e
  return path


def config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON data (tuples become lists)."""
  return json.loads(config.to_json())


def flatten_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten_config(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  for part in field.split("."):
    config = config[part]
  return config


def _check_saved_config(config: ml_collections.ConfigDict,
                        workdir: pathlib.Path) -> dict[str, Any] | None:
  """Compares with the workdir's config.json; returns the saved config."""
  path = workdir / "config.json"
  if not path.exists():
    return None
  saved = read_json(path)
  old = flatten_config(saved)
  old = {**_ADDED_FIELDS, "data.holdout_seed": old.get("seed"), **old}
  new = flatten_config(config_dict(config))
  changed = sorted(k for k in old.keys() | new.keys()
                   if old.get(k, "<missing>") != new.get(k, "<missing>"))
  started = [p for p in _PHASE_FIELDS if _started(workdir, p)]
  conflicts = [k for k in changed if any(
      k == f or k.startswith(f + ".") for p in started
      for f in _PHASE_FIELDS[p])]
  if conflicts:
    lines = [f"{k}: {old.get(k, '<missing>')!r} there, "
             f"{new.get(k, '<missing>')!r} now" for k in conflicts]
    raise ConfigError(
        f"the config does not match the workdir {workdir} (its config.json; "
        f"phases started there: {', '.join(started)}):\n  " + "\n  ".join(lines)
        + "\nUse another --workdir, restore those fields, or delete the "
        "phase's folder in the workdir to redo it (sgd: also trajectory/).")
  if changed:
    logging.info("config fields changed for phases not started yet: %s",
                 ", ".join(changed))
  return saved


def _started(workdir: pathlib.Path, phase: str) -> bool:
  if phase == "sgd":
    return (workdir / "sgd").exists() or (workdir / "trajectory").exists()
  if phase == "twa":
    return (workdir / "twa").exists() or (workdir / "twa_v").exists()
  return (workdir / phase).exists()


def write_json(path: pathlib.Path, obj: Any) -> None:
  """Atomic write: a reader sees the old or the new file, never a part."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


def read_json(path: pathlib.Path) -> Any:
  return json.loads(path.read_text())


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of metrics.jsonl (a torn last line is ignored)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


def _append_metrics(workdir: pathlib.Path, record: dict[str, Any]) -> None:
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write(json.dumps(record) + "\n")


def _truncate_metrics(workdir: pathlib.Path, phase: str, epoch: int) -> None:
  """Drops the phase's records after `epoch` (from a run killed later).

  The file is rewritten from its parsed records, which also drops a line
  torn by a kill in the middle of a write.
  """
  records = read_metrics(workdir)
  kept = [r for r in records if r["phase"] != phase or r["epoch"] <= epoch]
  if (workdir / "metrics.jsonl").exists():
    tmp = workdir / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, workdir / "metrics.jsonl")


# Orbax warns about every checkpoint manager opened read-only (the stores the
# swa, twa and report phases read); these are expected, not problems.
_EXPECTED_WARNINGS = ("CheckpointManagerOptions.read_only=True",
                      "Given directory is read only")


def _quiet_libraries(record: py_logging.LogRecord) -> bool:
  """Keeps the libraries' (orbax, jax) chatter out of the log."""
  if not any(f"{os.sep}{lib}{os.sep}" in record.pathname
             for lib in ("orbax", "jax")):
    return True
  if record.levelno < py_logging.WARNING:
    return False
  return not str(record.msg).startswith(_EXPECTED_WARNINGS)


@contextlib.contextmanager
def log_to(path: pathlib.Path) -> Iterator[None]:
  """Logs at INFO, also to `path`, while the block runs."""
  handler = py_logging.FileHandler(path)
  handler.setFormatter(py_logging.Formatter(
      "%(asctime)s %(levelname)s %(message)s"))
  handler.addFilter(_quiet_libraries)
  logger = logging.get_absl_logger()
  logger.addHandler(handler)
  logger.addFilter(_quiet_libraries)
  old_level = logging.get_verbosity()
  logging.set_verbosity(logging.INFO)
  try:
    yield
  finally:
    logger.removeFilter(_quiet_libraries)
    logger.removeHandler(handler)
    handler.close()
    logging.set_verbosity(old_level)
