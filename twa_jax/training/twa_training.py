"""TWA in the span of given snapshots: basis, optimizer, training, result."""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import twa_jax
from twa_jax.store import TrajectoryStore
from twa_jax.training import experiment as experiment_lib
from twa_jax.training import input_pipeline
from twa_jax.training import loop
from twa_jax.training import report
from twa_jax.training import steps as steps_lib
from twa_jax.training.steps import TrainState

PyTree = Any


@dataclasses.dataclass(frozen=True)
class StoredSnapshots:
  """Snapshots of a trajectory store, read only when used and one at a time.

  Iterating loads them one after the other (one in host memory at a time);
  `build_basis` reads them from the store (on a mesh, each process reads only
  its devices' column slices).

  Attributes:
    directory: the `twa_jax.store.TrajectoryStore`'s directory.
    steps: the snapshots' steps, in order.
  """

  directory: pathlib.Path
  steps: tuple[int, ...]

  def __len__(self) -> int:
    return len(self.steps)

  def __iter__(self) -> Iterator[PyTree]:
    with self.open() as store:
      for step in self.steps:
        yield store.load(step)

  def __getitem__(self, index: int) -> PyTree:
    with self.open() as store:
      return store.load(self.steps[index])

  def open(self) -> TrajectoryStore:
    """The store, read-only."""
    return TrajectoryStore(self.directory, create=False, read_only=True)


# The snapshots TWA trains in the span of: parameter trees, or stored ones.
Snapshots = Sequence[PyTree] | StoredSnapshots


@dataclasses.dataclass(frozen=True)
class TwaOutcome:
  """A finished TWA training.

  Attributes:
    params: the trained parameters.
    metrics: their `experiment.row_splits` metrics, batch norm recomputed.
    seconds: setup, training (summed over invocations), coefficients and
      batch-norm statistics; not the evaluation.
    basis: `basis_record` of the basis.
    coefficients: `coefficients_record` of the averaging coefficients.
  """

  params: PyTree
  metrics: dict[str, experiment_lib.Metrics]
  seconds: float
  basis: dict[str, Any]
  coefficients: dict[str, Any]


def build_basis(exp: experiment_lib.Experiment,
                snapshots: Snapshots) -> twa_jax.Basis | twa_jax.BlockBasis:
  """The basis of the snapshots' span (`config.twa` granularity, storage),
  sharded over the mesh in `config.parallel.basis_layout` when it has more
  than one device (stored snapshots: each process reads its column slices
  only)."""
  cfg = exp.config.twa
  sharded = exp.mesh.size > 1
  options = dict(
      granularity=_layer if cfg.granularity == "layer" else cfg.granularity,
      dtype=(cfg.storage if cfg.storage in ("int8", "int4")
             else jnp.dtype(cfg.storage)),
      mesh=exp.mesh if sharded else None,
      layout=exp.config.parallel.basis_layout if sharded else "basis")
  if isinstance(snapshots, StoredSnapshots):
    with snapshots.open() as store:
      return twa_jax.basis_from_store(store, snapshots.steps, **options)
  return twa_jax.basis_from_snapshots(snapshots, **options)


def _layer(path: str) -> str:
  """The block of a leaf for granularity "layer": its path less the last key."""
  cut = max(path.rfind("["), path.rfind("."))
  return path[:cut] if cut > 0 else path


def twa_optimizer(cfg: ml_collections.ConfigDict, schedule: optax.Schedule,
                  basis: twa_jax.Basis | twa_jax.BlockBasis
                  ) -> optax.GradientTransformation:
  """The TWA optimizer: projected SGD, or Adam on the coefficients."""
  if cfg.optimizer == "sgd":
    return twa_jax.twa(basis, schedule, momentum=cfg.momentum,
                       weight_decay=cfg.weight_decay)
  return twa_jax.scale_by_subspace(
      basis, steps_lib.base_optimizer(cfg.optimizer, schedule,
                                      momentum=cfg.momentum,
                                      weight_decay=cfg.weight_decay))


def basis_record(basis: twa_jax.Basis | twa_jax.BlockBasis) -> dict[str, Any]:
  """The basis as JSON data: basis_dim (directions kept), basis_dropped
  (directions of the snapshots the orthonormalizer dropped: dependent or
  below its cut-off), basis_condition (the condition number of the snapshot
  matrix W, the largest over blocks; None when infinite: dependent
  snapshots) and num_params (see `report.condition_text`)."""
  condition = basis.condition
  return {"basis_dim": basis.dim, "basis_dropped": basis.dropped,
          "basis_condition": (None if condition is None
                              or not np.isfinite(condition)
                              else float(condition)),
          "num_params": basis.num_params}


def coefficients_record(alpha: PyTree) -> dict[str, Any]:
  """The averaging coefficients and their sum as JSON data (per block)."""
  alpha = jax.tree.map(lambda a: np.asarray(a, np.float64), alpha)
  return {"coefficients": jax.tree.map(lambda a: a.tolist(), alpha),
          "coefficient_sum": jax.tree.map(lambda a: float(a.sum()), alpha)}


def train_twa(exp: experiment_lib.Experiment, workdir: pathlib.Path,
              phase: str, snapshots: Snapshots, *, start: str,
              data: input_pipeline.Dataset) -> TwaOutcome:
  """TWA (`config.twa`) in the span of the snapshots, resumable.

  Stored snapshots are never all in one host's memory: the basis is read
  from the store (`build_basis`), and the start and the coefficients go
  through them one at a time.

  Args:
    exp: the experiment (model, batch size, seed, evaluation).
    workdir: the run's workdir (checkpoints in <phase>/checkpoints).
    phase: "twa", "twa_v" or "soup": names checkpoints and metrics.
    snapshots: the snapshots, a list of parameter trees or stored ones.
    start: "mean" (their mean, head stage) or "last" (the last one, tail
      stage).
    data: the dataset the steps draw batches from.

  Returns:
    The trained parameters, their metrics, cost, basis and coefficients.

  Raises:
    TrainingDiverged: NaN or infinite loss.
  """
  cfg, seed = exp.config.twa, exp.config.seed
  started = time.perf_counter()
  basis = build_basis(exp, snapshots)
  params = twa_jax.swa(iter(snapshots)) if start == "mean" else snapshots[-1]
  record = basis_record(basis)
  logging.info("%s: basis of %d snapshots has dimension %d, %d dropped, "
               "condition number of W %s (%d parameters; %s coefficients, %s "
               "storage); training on %d examples", phase, len(snapshots),
               basis.dim, basis.dropped,
               report.condition_text(record["basis_condition"]),
               basis.num_params, cfg.granularity, cfg.storage,
               data.num_train)
  spe = input_pipeline.steps_per_epoch(data, exp.config.sgd.batch_size)
  schedule = steps_lib.learning_rate_schedule(cfg, cfg.epochs, spe)
  tx = twa_optimizer(cfg, schedule, basis)
  _, batch_stats = experiment_lib.init_variables(exp)
  state = TrainState.create(params, batch_stats, tx)
  train_step = steps_lib.make_train_step(exp.model, tx, seed=seed + 1)
  setup = time.perf_counter() - started
  state, elapsed = loop.train(exp, workdir, phase, state, train_step,
                              schedule, epochs=cfg.epochs, data=data,
                              data_seed=seed + 1)
  started = time.perf_counter()
  alpha = twa_jax.averaging_coefficients(state.params, iter(snapshots), basis)
  coefficients = time.perf_counter() - started
  metrics, bn_seconds = experiment_lib.evaluate_averaged(
      exp, state.params, experiment_lib.row_splits(exp))
  return TwaOutcome(state.params, metrics,
                    setup + elapsed + coefficients + bn_seconds, record,
                    coefficients_record(alpha))
