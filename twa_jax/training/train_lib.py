"""The phases of train.py (sgd, swa, twa, surface, report) and `run`."""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging
import jax
import ml_collections
import optax

import twa_jax
from twa_jax.store import TrajectoryStore
from twa_jax.training import configuration
from twa_jax.training import experiment as experiment_lib
from twa_jax.training import loop
from twa_jax.training import parallel
from twa_jax.training import report
from twa_jax.training import steps as steps_lib
from twa_jax.training import surface as surface_lib
from twa_jax.training import twa_training
from twa_jax.training import workdir as workdir_lib
from twa_jax.training.configuration import ConfigError
from twa_jax.training.experiment import Experiment
from twa_jax.training.steps import TrainState

PyTree = Any


def run(config: ml_collections.ConfigDict,
        workdir: str | os.PathLike) -> dict[str, Any] | None:
  """Runs the phases `config.phases` in `workdir`, in the order of `PHASES`.

  Everything that can be checked before training is: the config, the
  workdir's saved config, the data and model, the parameters sgd starts
  from (`sgd.init_from`), the snapshots the phases need. Each phase resumes where an earlier invocation stopped and is
  skipped when finished.

  Args:
    config: an experiment config (see `configs/common.py`).
    workdir: output directory (created; see `workdir.LAYOUT`).

  Returns:
    The summary when the report phase ran, else None.

  Raises:
    ConfigError: bad config, unwritable workdir, a workdir started with a
      different config, an `sgd.init_from` that does not fit the model, or
      a snapshot range the store cannot satisfy.
    TrainingDiverged: NaN loss (what was saved is kept).
  """
  phases = parse_phases(config.phases)
  configuration.validate_config(config)
  with workdir_lib.opened(workdir) as workdir:
    logging.info("twa_jax %s: config %s, workdir %s, phases %s",
                 twa_jax.__version__, config.name, workdir, ",".join(phases))
    saved = workdir_lib.check_saved_config(config, workdir)
    exp = experiment_lib.create(config)
    check_snapshots(exp, workdir, phases)
    if "sgd" in phases and not workdir_lib.is_done(workdir, "sgd"):
      experiment_lib.initial_variables(exp)  # sgd.init_from fits the model
    if saved != configuration.to_json_data(config):
      workdir_lib.write_json(workdir / "config.json",
                             configuration.to_json_data(config))
    summary = None
    for phase in phases:
      parallel.barrier(f"before {phase}")  # process 0 has written its files
      outputs = _outputs(exp, phase)
      if outputs and all(workdir_lib.is_done(workdir, o) for o in outputs):
        logging.info("%s: finished earlier (%s); skipped", phase, ", ".join(
            str(workdir_lib.result_path(workdir, o)) for o in outputs))
        continue
      try:
        summary = PHASES[phase](exp, workdir)
      except Exception as e:
        logging.error("%s stopped: %s: %s", phase, type(e).__name__, e)
        raise
    parallel.barrier("phases done")
    return summary


def _outputs(exp: Experiment, phase: str) -> list[str]:
  """The results (<workdir>/<name>/result.json) that mark a phase finished."""
  if phase in ("report", "sweep"):  # rewritten every time (sweep: per head)
    return []
  if phase == "twa" and exp.holdout is not None:
    return ["twa", "twa_v"]
  return [phase]


def parse_phases(phases: str) -> list[str]:
  """The phase names of a comma-separated string, checked and in run order."""
  names = [p.strip() for p in str(phases).split(",") if p.strip()]
  unknown = [p for p in names if p not in PHASES]
  if unknown or not names:
    raise ConfigError(f"config.phases={phases!r}: unknown or no phase "
                      f"{unknown}; choose from {','.join(PHASES)}")
  return [p for p in PHASES if p in names]


def open_store(workdir: pathlib.Path, read_only: bool) -> TrajectoryStore:
  """The workdir's trajectory store (read-only: it must exist)."""
  path = workdir / "trajectory"
  if read_only and not path.exists():
    raise ConfigError(f"no trajectory store at {path}: run the sgd phase "
                      "first")
  return TrajectoryStore(path, create=not read_only, read_only=read_only)


def check_snapshots(exp: Experiment, workdir: pathlib.Path,
                    phases: Sequence[str]) -> None:
  """Fails early when swa/twa will need snapshots the store lacks."""
  needs = [p for p in ("swa", "twa") if p in phases
           and not workdir_lib.is_done(workdir, p)]
  if not needs or "sgd" in phases or workdir_lib.is_done(workdir, "sgd"):
    return
  with open_store(workdir, read_only=True) as store:
    have = set(store.steps())
  missing = [s for s in exp.selected_steps if s not in have]
  if missing:
    avg = exp.config.averaging
    unit = "epochs" if avg.unit == "epoch" else "indices"
    raise ConfigError(
        f"phases {','.join(needs)} average the snapshots of "
        f"{unit} {avg.start}-{avg.end} ({len(exp.selected_steps)} "
        f"snapshots, steps {exp.selected_steps[0]}-{exp.averaging_end}); the "
        f"store {workdir / 'trajectory'} lacks {len(missing)} of them "
        f"(first missing step {missing[0]}; it has {len(have)}): run the "
        "sgd phase to the end of the range first")


def _stored_snapshots(workdir: pathlib.Path, steps: Sequence[int]
                      ) -> twa_training.StoredSnapshots:
  """The snapshots at `steps` of the workdir's trajectory store (read when
  used, one at a time)."""
  return twa_training.StoredSnapshots(workdir / "trajectory", tuple(steps))


def _sgd_at_averaging_end(workdir: pathlib.Path,
                          exp: Experiment) -> dict[str, Any] | None:
  """SGD's row and seconds at the end of the averaging range (sgd phase)."""
  path = workdir / "sgd" / "ema_head"
  if not path.exists():
    return None
  with TrajectoryStore(path, create=False, read_only=True) as store:
    return store.metadata(exp.averaging_end) if store.steps() else None


def _wall_time(exp: Experiment, workdir: pathlib.Path,
               seconds: float) -> float | None:
  """SGD's seconds to the end of the averaging range plus `seconds`."""
  record = _sgd_at_averaging_end(workdir, exp)
  return None if record is None else record["elapsed_s"] + seconds


def _finish(workdir: pathlib.Path, phase: str, result: dict[str, Any]) -> None:
  """Logs the phase's rows and writes its result.json (marks it finished)."""
  for method, row in result["results"].items():
    logging.info("%s: test accuracy %.4f, train accuracy %.4f (running, "
                 "train mode: %s), test loss %.4f, epochs %s", method,
                 row["test_accuracy"], row["train_accuracy"],
                 report.fraction_text(row.get("running_train_accuracy")),
                 row["test_loss"], row["epochs"])
  workdir_lib.write_json(workdir_lib.result_path(workdir, phase), result)


class _TrajectoryRecorder:
  """SGD's `loop.Recorder`: the snapshots, and at the end of the averaging
  range SGD's evaluation and the bias-corrected EMA."""

  def __init__(self, exp: Experiment, store: TrajectoryStore,
               ema_store: TrajectoryStore):
    self.exp, self.store, self.ema_store = exp, store, ema_store
    self.steps = frozenset(exp.planned_steps)
    self.saved = set(store.steps())
    self.kept = f"the snapshots recorded so far in {store.directory}"

  def record(self, step: int, state: TrainState, elapsed_s: float) -> None:
    exp = self.exp
    if step not in self.saved:
      self.store.save(step, steps_lib.evaluation_params(state),
                      metadata={"epoch": exp.epochs_at(step)})
      self.saved.add(step)
    if step == exp.averaging_end and step not in self.ema_store.steps():
      metrics, _ = experiment_lib.evaluate_state(
          exp, state, experiment_lib.row_splits(exp))
      row = experiment_lib.summary_row(metrics, epochs=exp.epochs_at(step),
                                       wall_time_s=elapsed_s)
      logging.info("sgd at the end of the averaging range (step %d, epoch "
                   "%s): test accuracy %.4f", step, exp.epochs_at(step),
                   row["test_accuracy"])
      decay = exp.config.sgd.ema_decay
      ema = jax.tree.map(lambda e: e / (1.0 - decay**step), state.ema)
      self.ema_store.save(step, ema, metadata={
          "epoch": exp.epochs_at(step), "elapsed_s": elapsed_s, "sgd": row})
      self.ema_store.wait_until_finished()

  def flush(self) -> None:
    self.store.wait_until_finished()


def _sgd_training(exp: Experiment, epochs: int
                  ) -> tuple[TrainState, Callable[..., Any], optax.Schedule]:
  """The initial state, step and schedule of `epochs` epochs of config.sgd
  (its step schedule's decay fractions apply to `epochs`)."""
  cfg = exp.config.sgd
  schedule = steps_lib.learning_rate_schedule(cfg, epochs,
                                              exp.steps_per_epoch)
  tx = steps_lib.base_optimizer(cfg.optimizer, schedule,
                                momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay,
                                nesterov=cfg.nesterov)
  params, batch_stats = experiment_lib.initial_variables(exp)
  state = TrainState.create(params, batch_stats, tx, ema=True)
  train_step = steps_lib.make_train_step(exp.model, tx,
                                         ema_decay=cfg.ema_decay,
                                         seed=exp.config.seed)
  return state, train_step, schedule


def phase_sgd(exp: Experiment, workdir: pathlib.Path) -> None:
  """Regular training recording the trajectory; SGD, SGD at the end of the
  averaging range, and the EMA there.

  With `sgd.optimizer="schedule_free_sgd"`, the trajectory and SGD's rows
  are its evaluation parameters (`steps.evaluation_params`).
  """
  cfg = exp.config.sgd
  state, train_step, schedule = _sgd_training(exp, cfg.epochs)
  with open_store(workdir, read_only=False) as store, \
      TrajectoryStore(workdir / "sgd" / "ema_head") as ema_store:
    state, elapsed = loop.train(
        exp, workdir, "sgd", state, train_step, schedule, epochs=cfg.epochs,
        data=exp.dataset, data_seed=exp.config.seed,
        recorder=_TrajectoryRecorder(exp, store, ema_store))
    store.wait_until_finished()
    ema_store.wait_until_finished()
    at_end = ema_store.metadata(exp.averaging_end)
    ema = ema_store.load(exp.averaging_end)
  splits = experiment_lib.row_splits(exp)
  metrics, seconds = experiment_lib.evaluate_state(exp, state, splits)
  results = {"sgd": experiment_lib.summary_row(
      metrics, epochs=cfg.epochs, wall_time_s=elapsed + seconds,
      running_train_accuracy=workdir_lib.running_train_accuracy(
          workdir, "sgd"))}
  if exp.averaging_end < cfg.epochs * exp.steps_per_epoch:
    head = at_end["sgd"]  # evaluated before its epoch's record was written
    results["sgd_head"] = {**head, **experiment_lib.running_columns(
        workdir_lib.running_train_accuracy(workdir, "sgd", exp.averaging_end),
        head["test_accuracy"])}
  metrics, seconds = experiment_lib.evaluate_averaged(exp, ema, splits)
  results["ema"] = experiment_lib.summary_row(
      metrics, epochs=exp.epochs_at(exp.averaging_end),
      wall_time_s=at_end["elapsed_s"] + seconds)
  _finish(workdir, "sgd", {"results": results})


def phase_swa(exp: Experiment, workdir: pathlib.Path) -> None:
  """The uniform average of the averaged snapshots, batch norm recomputed."""
  start = time.perf_counter()
  params = twa_jax.swa(iter(_stored_snapshots(workdir, exp.selected_steps)))
  averaging = time.perf_counter() - start
  metrics, seconds = experiment_lib.evaluate_averaged(
      exp, params, experiment_lib.row_splits(exp))
  row = experiment_lib.summary_row(
      metrics, epochs=exp.epochs_at(exp.averaging_end),
      wall_time_s=_wall_time(exp, workdir, averaging + seconds))
  _finish(workdir, "swa", {"results": {"swa": row},
                           "swa": {"snapshots": len(exp.selected_steps)}})


def phase_twa(exp: Experiment, workdir: pathlib.Path) -> None:
  """TWA in the span of the averaged snapshots; TWA-v also on held-out data.

  "twa" trains the coefficients on the sgd phase's training data; with
  `twa.holdout_fraction` > 0, "twa_v" trains them again, from the same
  start, on the held-out part that SGD never saw.
  """
  runs = {"twa": exp.dataset}
  if exp.holdout is not None:
    runs["twa_v"] = exp.holdout
  for name, data in runs.items():
    if workdir_lib.is_done(workdir, name):
      continue
    cfg = exp.config.twa
    outcome = twa_training.train_twa(
        exp, workdir, name, _stored_snapshots(workdir, exp.selected_steps),
        start=cfg.start, data=data)
    last = workdir_lib.last_metrics(workdir, name)
    end_epochs = exp.epochs_at(exp.averaging_end)
    row = experiment_lib.summary_row(
        outcome.metrics, epochs=end_epochs + cfg.epochs,
        wall_time_s=_wall_time(exp, workdir, outcome.seconds),
        running_train_accuracy=(None if last is None
                                else last["train_accuracy"]))
    selected = exp.selected_steps
    details = {
        "snapshots": len(selected), "snapshot_steps": selected,
        "snapshot_epochs": [exp.epochs_at(s) for s in selected],
        **outcome.basis,
        "granularity": cfg.granularity, "storage": cfg.storage,
        "trained_on": data.num_train, "start": cfg.start,
        "head_epochs": end_epochs, "epochs": cfg.epochs, "lr": cfg.lr,
        **outcome.coefficients,
        "last_epoch_test_accuracy": (
            None if last is None else last["test_accuracy"]),
    }
    _finish(workdir, name, {"results": {name: row}, name: details})


def phase_surface(exp: Experiment, workdir: pathlib.Path) -> None:
  """Train loss and test error over the plane through SGD, SWA and TWA."""
  if not workdir_lib.is_done(workdir, "twa"):
    raise ConfigError("surface: needs the TWA solution; run the twa phase "
                      "first")
  with open_store(workdir, read_only=True) as store:
    sgd = store.load(exp.planned_steps[-1])
  swa = twa_jax.swa(iter(_stored_snapshots(workdir, exp.selected_steps)))
  twa = loop.final_params(workdir, "twa")
  splits = {"train": exp.config.surface.train_eval_size, "test": None}

  def evaluate(params: PyTree) -> dict[str, float]:
    m, _ = experiment_lib.evaluate_averaged(exp, params, splits)
    return {"train_loss": m["train"]["loss"],
            "train_error": 1 - m["train"]["accuracy"],
            "test_loss": m["test"]["loss"],
            "test_error": 1 - m["test"]["accuracy"]}

  result = surface_lib.surface([sgd, swa, twa], evaluate,
                               steps=exp.config.surface.steps,
                               margin=exp.config.surface.margin)
  workdir_lib.write_json(workdir_lib.result_path(workdir, "surface"),
                         surface_lib.to_dict(result))


def phase_sweep(exp: Experiment, workdir: pathlib.Path) -> None:
  """The head-length sweep: SWA and TWA over epochs start..k per head k.

  From the sgd phase's one trajectory, for each k of `sweep.heads`: SWA of
  the snapshots of epochs `averaging.start`..k and TWA (config.twa) in
  their span, each head its own resumable TWA run; with
  `sweep.budget_matched_sgd`, SGD trained from the start for k + twa.epochs
  epochs with its schedule compressed. Finished heads are kept, so heads
  can be added by a later invocation. Writes sweep/result.json and
  plots/sweep.png (`report.sweep_summary`) and prints the table.
  """
  if not workdir_lib.is_done(workdir, "sgd"):
    raise ConfigError("sweep: needs the sgd phase's trajectory; run the sgd "
                      "phase first")
  with open_store(workdir, read_only=True) as store:
    have = set(store.steps())
  curve = {r["epoch"]: r for r in workdir_lib.read_metrics(workdir)
           if r["phase"] == "sgd"}
  heads = [_sweep_head(exp, workdir, k, curve, have)
           for k in sorted(exp.config.sweep.heads)]
  if exp.config.sweep.budget_matched_sgd:
    for head in heads:
      head["budget_matched_sgd"] = _budget_matched_sgd(
          exp, workdir, head["twa"]["epochs"])
  sgd = workdir_lib.read_json(workdir_lib.result_path(workdir, "sgd"))
  result = report.sweep_summary(
      exp.config, sgd["results"]["sgd"],
      [[e, curve[e]["test_accuracy"]] for e in sorted(curve)], heads)
  workdir_lib.write_json(workdir_lib.result_path(workdir, "sweep"), result)
  path = (report.sweep_plot(result, workdir / "plots" / "sweep.png")
          if parallel.is_primary() else None)
  print(report.sweep_table(result), flush=True)
  logging.info("sweep: %s; plot: %s",
               workdir_lib.result_path(workdir, "sweep"), path)


def _sweep_head(exp: Experiment, workdir: pathlib.Path, k: int,
                curve: dict[int, dict[str, Any]],
                have: set[int]) -> dict[str, Any]:
  """SWA and TWA over the snapshots of epochs start..k (kept once done)."""
  name = f"sweep/twa_{k}"
  path = workdir_lib.result_path(workdir, name)
  if path.exists():
    return workdir_lib.read_json(path)
  averaging = exp.config.averaging.copy_and_resolve_references()
  averaging.end = k
  selected = experiment_lib.select_snapshot_steps(
      averaging, exp.planned_steps, exp.steps_per_epoch)
  missing = [s for s in selected if s not in have]
  if missing:
    raise ConfigError(f"sweep.heads: head {k} needs the snapshots of steps "
                      f"{selected[0]}-{selected[-1]}; the store lacks "
                      f"{len(missing)} (first: step {missing[0]})")

  snapshots = _stored_snapshots(workdir, selected)
  sgd_seconds = sum(curve[e]["seconds"] for e in range(1, k + 1))
  splits = experiment_lib.row_splits(exp)
  start = time.perf_counter()
  swa = twa_jax.swa(iter(snapshots))
  averaging_s = time.perf_counter() - start
  metrics, seconds = experiment_lib.evaluate_averaged(exp, swa, splits)
  cfg = exp.config.twa
  outcome = twa_training.train_twa(exp, workdir, name, snapshots,
                                   start=cfg.start, data=exp.dataset)
  last = workdir_lib.last_metrics(workdir, name)
  head = {
      "head_epochs": k, "snapshots": len(selected),
      "sgd_test_accuracy": curve[k]["test_accuracy"],
      "swa": experiment_lib.summary_row(
          metrics, epochs=k, wall_time_s=sgd_seconds + averaging_s + seconds),
      "twa": experiment_lib.summary_row(
          outcome.metrics, epochs=k + cfg.epochs,
          wall_time_s=sgd_seconds + outcome.seconds,
          running_train_accuracy=last["train_accuracy"]),
      "twa_basis": outcome.basis,
  }
  workdir_lib.write_json(path, head)
  return head


def _budget_matched_sgd(exp: Experiment, workdir: pathlib.Path,
                        epochs: int) -> dict[str, Any]:
  """SGD from the start for `epochs` epochs, its schedule compressed."""
  name = f"sweep/sgd_{epochs}"
  path = workdir_lib.result_path(workdir, name)
  if path.exists():
    return workdir_lib.read_json(path)
  state, train_step, schedule = _sgd_training(exp, epochs)
  state, elapsed = loop.train(exp, workdir, name, state, train_step,
                              schedule, epochs=epochs, data=exp.dataset,
                              data_seed=exp.config.seed)
  metrics, seconds = experiment_lib.evaluate_state(
      exp, state, experiment_lib.row_splits(exp))
  row = experiment_lib.summary_row(
      metrics, epochs=epochs, wall_time_s=elapsed + seconds,
      running_train_accuracy=workdir_lib.last_metrics(
          workdir, name)["train_accuracy"])
  workdir_lib.write_json(path, row)
  return row


def phase_report(exp: Experiment, workdir: pathlib.Path) -> dict[str, Any]:
  """summary.json, the printed table and the plots."""
  parts = {p: workdir_lib.read_json(workdir_lib.result_path(workdir, p))
           for p in ("sgd", "swa", "twa", "twa_v")
           if workdir_lib.is_done(workdir, p)}
  if not parts:
    raise ConfigError(f"report: no finished phase in {workdir}; run "
                      "sgd, swa or twa first")
  summary = report.summary(exp.config, exp.dataset.name, parts,
                           exp.steps_per_epoch)
  workdir_lib.write_json(workdir / "summary.json", summary)
  records = workdir_lib.read_metrics(workdir)
  paths = (report.plots(summary, records, workdir / "plots")
           if parallel.is_primary() else [])
  if workdir_lib.is_done(workdir, "surface") and parallel.is_primary():
    paths.append(surface_lib.plot(
        surface_lib.from_dict(workdir_lib.read_json(
            workdir_lib.result_path(workdir, "surface"))),
        workdir / "plots" / "surface.png"))
  print(report.table(summary), flush=True)
  logging.info("summary: %s; plots: %s", workdir / "summary.json",
               ", ".join(str(p) for p in paths))
  return summary


# The phases in run order; each takes the experiment and the workdir.
PHASES: dict[str, Callable[[Experiment, pathlib.Path], Any]] = {
    "sgd": phase_sgd,
    "swa": phase_swa,
    "twa": phase_twa,
    "surface": phase_surface,
    "sweep": phase_sweep,
    "report": phase_report,
}
