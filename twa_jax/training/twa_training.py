"""TWA in the span of given snapshots: basis, optimizer, training, result."""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import twa_jax
from twa_jax.training import experiment as experiment_lib
from twa_jax.training import input_pipeline
from twa_jax.training import loop
from twa_jax.training import report
from twa_jax.training import steps as steps_lib
from twa_jax.training.steps import TrainState

PyTree = Any
Snapshots = Sequence[PyTree] | PyTree  # a list, or one tree with a leading axis


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
  than one device."""
  cfg = exp.config.twa
  granularity = _layer if cfg.granularity == "layer" else cfg.granularity
  dtype = (cfg.storage if cfg.storage in ("int8", "int4")
           else jnp.dtype(cfg.storage))
  sharded = exp.mesh.size > 1
  return twa_jax.basis_from_snapshots(
      snapshots, granularity=granularity, dtype=dtype,
      mesh=exp.mesh if sharded else None,
      layout=exp.config.parallel.basis_layout if sharded else "basis")


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
              phase: str, load_snapshots: Callable[[], Snapshots], *,
              start: str, data: input_pipeline.Dataset) -> TwaOutcome:
  """TWA (`config.twa`) in the span of the snapshots, resumable.

  Args:
    exp: the experiment (model, batch size, seed, evaluation).
    workdir: the run's workdir (checkpoints in <phase>/checkpoints).
    phase: "twa", "twa_v" or "soup": names checkpoints and metrics.
    load_snapshots: returns the snapshots (called before and after training,
      so that they are not held while training).
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
  snapshots = load_snapshots()
  basis = build_basis(exp, snapshots)
  params = twa_jax.swa(snapshots) if start == "mean" else _last(snapshots)
  record = basis_record(basis)
  logging.info("%s: basis of %d snapshots has dimension %d, %d dropped, "
               "condition number of W %s (%d parameters; %s coefficients, %s "
               "storage); training on %d examples", phase, _count(snapshots),
               basis.dim, basis.dropped,
               report.condition_text(record["basis_condition"]),
               basis.num_params, cfg.granularity, cfg.storage,
               data.num_train)
  del snapshots
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
  alpha = twa_jax.averaging_coefficients(state.params, load_snapshots(),
                                         basis)
  coefficients = time.perf_counter() - started
  metrics, bn_seconds = experiment_lib.evaluate_averaged(
      exp, state.params, experiment_lib.row_splits(exp))
  return TwaOutcome(state.params, metrics,
                    setup + elapsed + coefficients + bn_seconds, record,
                    coefficients_record(alpha))


def _last(snapshots: Snapshots) -> PyTree:
  if isinstance(snapshots, (list, tuple)):
    return snapshots[-1]
  return jax.tree.map(lambda s: s[-1], snapshots)


def _count(snapshots: Snapshots) -> int:
  if isinstance(snapshots, (list, tuple)):
    return len(snapshots)
  return jax.tree_util.tree_leaves(snapshots)[0].shape[0]
