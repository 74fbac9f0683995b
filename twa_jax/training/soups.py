"""Averaging across runs: model soups against TWA, from several workdirs.

`run(config, workdir, sources)` (train.py --soup) takes one snapshot from each
of k train.py workdirs (one model on one dataset, trained with different
hyper-parameters) and compares, on the test and the held-out data:

  ingredients    each source's final snapshot, or the one at a chosen step
  uniform soup   their mean (`twa_jax.swa`)
  greedy soup    `twa_jax.greedy_soup` ranked by held-out accuracy (Wortsman
                 et al. 2022: add models while held-out accuracy does not drop)
  TWA            projected SGD (config.twa) in the span of the k models,
                 started from their mean, resumable like the twa phase

every one with batch-norm statistics recomputed over the training data. The
held-out data is a part of the training set no source trained on: the
sources must have been trained with data.holdout_fraction > 0 (the test split
is then that part) or with twa.holdout_fraction > 0 (TWA-v's part).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Sequence
from typing import Any

from absl import logging
import ml_collections

import twa_jax
from twa_jax.store import TrajectoryStore
from twa_jax.training import configuration
from twa_jax.training import experiment as experiment_lib
from twa_jax.training import report
from twa_jax.training import twa_training
from twa_jax.training import workdir as workdir_lib
from twa_jax.training.configuration import ConfigError
from twa_jax.training.experiment import Experiment

PyTree = Any

WORKDIR_LAYOUT = """\
soup workdir layout (--soup):
  log.txt             the log
  metrics.jsonl       TWA's per-epoch records (phase "soup")
  soup/run.json       the sources and the config the soup run started with;
                      a rerun must match them
  soup/checkpoints/   orbax checkpoints of the TWA state, one per epoch
  soup/summary.json   every ingredient, the uniform and greedy soups and TWA
                      side by side; marks the run finished
"""

# What the sources and the soup run must share: one model on one dataset and
# one held-out part (data.holdout_seed draws it); seeds may differ.
_SOURCE_FIELDS = ("data", "model", "twa.holdout_fraction")
# What the soup run's TWA checkpoints depend on.
_RUN_FIELDS = ("seed", "data", "model", "sgd.batch_size", "twa")


@dataclasses.dataclass(frozen=True)
class Source:
  """Where an ingredient comes from: a train.py workdir and a snapshot step."""

  workdir: pathlib.Path
  step: int | None  # None: the final snapshot

  def __str__(self) -> str:
    return str(self.workdir) + ("" if self.step is None else f":{self.step}")


@dataclasses.dataclass(frozen=True)
class Ingredient:
  """A source's snapshot: its step, training epochs and parameters."""

  source: Source
  step: int
  epochs: float | int
  params: PyTree

  @property
  def label(self) -> str:
    return f"{self.source.workdir.name}:{self.step}"


def parse_sources(specs: Sequence[str]) -> list[Source]:
  """The sources of `WORKDIR[:STEP]` strings (the --soup list), checked.

  Args:
    specs: at least two distinct WORKDIR or WORKDIR:STEP strings; STEP is a
      step of the workdir's trajectory store (default: its final snapshot).

  Returns:
    The sources, workdirs made absolute.
  """
  sources = []
  for spec in specs:
    head, colon, tail = spec.rpartition(":")
    if colon and not tail.isdigit():
      raise ConfigError(f"--soup source {spec!r}: STEP in WORKDIR:STEP must "
                        "be a non-negative integer (a snapshot step)")
    workdir, step = (head, int(tail)) if colon else (spec, None)
    sources.append(Source(pathlib.Path(workdir).expanduser().absolute(), step))
  if len(sources) < 2:
    raise ConfigError(f"--soup: {len(sources)} source; a soup needs at least "
                      "two (WORKDIR[:STEP],WORKDIR[:STEP],...)")
  repeated = sorted({str(s) for s in sources if sources.count(s) > 1})
  if repeated:
    raise ConfigError(f"--soup: {', '.join(repeated)} given twice")
  return sources


def check_sources(config: ml_collections.ConfigDict,
                  sources: Sequence[Source]) -> None:
  """Refuses sources that differ from each other or from `config`.

  They must agree, with each other and with the soup run's config, on the
  fields in `_SOURCE_FIELDS` (their config.json against `config`).
  """
  configs = {}
  for source in sources:
    path = source.workdir / "config.json"
    if not path.is_file():
      raise ConfigError(f"soup source {source}: no {path}; not a train.py "
                        "workdir")
    configs[str(source.workdir)] = workdir_lib.read_json(path)
  configs["the soup run's config"] = configuration.to_json_data(config)
  lines = configuration.differences(configs, _SOURCE_FIELDS)
  if lines:
    raise ConfigError(
        "the soup's sources must be one model on one dataset with one "
        "held-out part (data.holdout_*); they differ in:\n  "
        + "\n  ".join(lines)
        + "\nRun the soup with the sources' --config and overrides.")


def holdout_split(config: ml_collections.ConfigDict) -> str:
  """The `experiment.evaluate` split holding data that no source trained on."""
  if config.twa.holdout_fraction > 0:
    return "holdout"
  if config.data.holdout_fraction > 0:
    return "test"
  raise ConfigError(
      "greedy soup ranks the ingredients on held-out data, and the sources "
      "were trained on the whole training set (data.holdout_fraction and "
      "twa.holdout_fraction are 0): train them with e.g. "
      "--config.data.holdout_fraction=0.1 (the test split is then a held-out "
      "part of the training data) and run the soup with the same")


def load_ingredients(sources: Sequence[Source]) -> list[Ingredient]:
  """Each source's chosen snapshot, or its final one (sgd phase finished)."""
  ingredients = []
  for source in sources:
    path = source.workdir / "trajectory"
    if not path.is_dir():
      raise ConfigError(f"soup source {source}: no trajectory store at "
                        f"{path}; train it with train.py first")
    if source.step is None and not (
        source.workdir / "sgd" / "result.json").exists():
      raise ConfigError(
          f"soup source {source}: its sgd phase has not finished, so it has "
          "no final snapshot; finish it, or choose a recorded snapshot as "
          f"{source.workdir}:STEP")
    with TrajectoryStore(path, read_only=True) as store:
      step = source.step
      if step is None:
        step = store.steps()[-1]  # the sgd phase finished: not empty
      try:
        params = store.load(step)
        epochs = store.metadata(step)["epoch"]
      except ValueError as e:
        raise ConfigError(f"soup source {source}: {e}") from e
    ingredients.append(Ingredient(source, step, epochs, params))
  return ingredients


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
        sources: Sequence[str]) -> dict[str, Any]:
  """Compares the ingredients, their uniform and greedy soups, and TWA.

  Args:
    config: the soup run's config: the sources' data, model and seed;
      `twa` (TWA's training), `sgd.batch_size` (its batches).
    workdir: output directory (see `WORKDIR_LAYOUT`); a rerun resumes TWA
      and returns the finished summary.
    sources: WORKDIR or WORKDIR:STEP strings (see `parse_sources`).

  Returns:
    The summary (also soup/summary.json): "ingredients" (workdir, step,
    epochs), "results" {ingredient_<i>, uniform_soup, greedy_soup, twa: row
    with test, train and held-out loss and accuracy}, "greedy_soup" (the
    kept ingredients, in the order added), "twa" (basis dimension,
    averaging coefficients).

  Raises:
    ConfigError: bad sources, or sources that differ, lack held-out data or
      a step; a workdir started with other sources or config.
    TrainingDiverged: NaN loss in TWA.
  """
  parsed = parse_sources(sources)
  configuration.validate_config(config)
  check_sources(config, parsed)
  split = holdout_split(config)
  ingredients = load_ingredients(parsed)
  with workdir_lib.opened(workdir) as workdir:
    logging.info("twa_jax %s: soup of %d sources in %s: %s",
                 twa_jax.__version__, len(parsed), workdir,
                 ", ".join(i.label for i in ingredients))
    record = {"sources": [{"workdir": str(i.source.workdir), "step": i.step}
                          for i in ingredients],
              "config": configuration.to_json_data(config)}
    _check_run(workdir, record)
    path = workdir / "soup" / "summary.json"
    if path.exists():
      logging.info("soup: finished earlier (%s)", path)
      summary = workdir_lib.read_json(path)
    else:
      exp = experiment_lib.create(config)
      workdir_lib.write_json(workdir / "soup" / "run.json", record)
      summary = compare(exp, workdir, ingredients, split)
      workdir_lib.write_json(path, summary)
    print(table(summary), flush=True)
    return summary


def _check_run(workdir: pathlib.Path, record: dict[str, Any]) -> None:
  """Refuses a soup workdir started with other sources or TWA settings."""
  path = workdir / "soup" / "run.json"
  if not path.exists():
    return
  saved = workdir_lib.read_json(path)
  if saved["sources"] != record["sources"]:
    names = [f"{s['workdir']}:{s['step']}" for s in saved["sources"]]
    raise ConfigError(f"the soup in {workdir} was started from other "
                      f"sources: {', '.join(names)}; use another --workdir "
                      f"or delete {workdir / 'soup'}")
  lines = configuration.differences(
      {"the soup workdir": saved["config"], "this config": record["config"]},
      _RUN_FIELDS)
  if lines:
    raise ConfigError(
        f"the config does not match the soup started in {workdir} ({path}):"
        "\n  " + "\n  ".join(lines) + f"\nUse another --workdir, restore "
        f"those fields, or delete {workdir / 'soup'} to redo it.")


def compare(exp: Experiment, workdir: pathlib.Path,
            ingredients: Sequence[Ingredient], split: str) -> dict[str, Any]:
  """Evaluates the ingredients and their soups, trains and evaluates TWA.

  Args:
    exp: the soup run's experiment.
    workdir: the soup run's workdir (TWA's checkpoints in soup/checkpoints).
    ingredients: from `load_ingredients`.
    split: the held-out split (`holdout_split`).

  Returns:
    The summary (see `run`).
  """
  splits = experiment_lib.row_splits(exp)

  def row(metrics: dict[str, Any], epochs: float | int,
          seconds: float | None) -> dict[str, Any]:
    out = experiment_lib.summary_row(metrics, epochs=epochs,
                                     wall_time_s=seconds)
    if split == "test":  # data.holdout_fraction: the test split is held out
      out.update(holdout_accuracy=out["test_accuracy"],
                 holdout_loss=out["test_loss"])
    return out

  def evaluate(params: PyTree, epochs: float | int,
               start: float | None) -> dict[str, Any]:
    """A row; its wall time runs from `start` to the batch-norm statistics."""
    before = None if start is None else time.perf_counter() - start
    metrics, seconds = experiment_lib.evaluate_averaged(exp, params, splits)
    return row(metrics, epochs, None if before is None else before + seconds)

  def score(params: PyTree) -> float:
    metrics, _ = experiment_lib.evaluate_averaged(exp, params, {split: None})
    return metrics[split]["accuracy"]

  models = [i.params for i in ingredients]
  results = {f"ingredient_{n}": evaluate(i.params, i.epochs, None)
             for n, i in enumerate(ingredients)}
  scores = [r["holdout_accuracy"] for r in results.values()]
  epochs = sum(i.epochs for i in ingredients)
  start = time.perf_counter()
  results["uniform_soup"] = evaluate(twa_jax.swa(models), epochs, start)
  start = time.perf_counter()
  greedy, kept = twa_jax.greedy_soup(models, score, scores=scores)
  results["greedy_soup"] = evaluate(greedy, epochs, start)
  logging.info("greedy soup: kept %s of %d ingredients (held-out accuracy "
               "%.4f)", kept, len(models),
               results["greedy_soup"]["holdout_accuracy"])
  cfg = exp.config.twa
  outcome = twa_training.train_twa(exp, workdir, "soup", models,
                                   start="mean", data=exp.dataset)
  results["twa"] = row(outcome.metrics, epochs + cfg.epochs, outcome.seconds)
  for method, r in results.items():
    logging.info("%s: held-out accuracy %.4f, test accuracy %.4f", method,
                 r["holdout_accuracy"], r["test_accuracy"])
  config = exp.config
  return {
      "name": config.name, "dataset": exp.dataset.name,
      "model": config.model.name, "holdout_split": split,
      "holdout_fraction": (config.twa.holdout_fraction if split == "holdout"
                           else config.data.holdout_fraction),
      "ingredients": [{"workdir": str(i.source.workdir), "step": i.step,
                       "epochs": i.epochs, "label": i.label}
                      for i in ingredients],
      "results": results, "greedy_soup": {"kept": kept},
      "twa": {**outcome.basis, "epochs": cfg.epochs,
              **outcome.coefficients}}


def table(summary: dict[str, Any]) -> str:
  """The comparison table of a soup summary."""
  results, kept = summary["results"], summary["greedy_soup"]["kept"]
  labels = [i["label"] for i in summary["ingredients"]]
  names = {f"ingredient_{n}": f"ingredient {n} ({label})"
           for n, label in enumerate(labels)}
  names.update(uniform_soup=f"uniform soup ({len(labels)})",
               greedy_soup=f"greedy soup ({len(kept)} of {len(labels)})",
               twa=f"TWA ({report.basis_text(summary['twa'])})")
  header = ("method", "epochs", "held-out acc", "test acc", "train acc",
            "test loss", "wall time")
  rows = []
  for method in names:  # summary.json sorts its keys
    r = results[method]
    rows.append((names[method], str(r["epochs"]),
                 report.percent(r["holdout_accuracy"]),
                 report.percent(r["test_accuracy"]),
                 report.percent(r["train_accuracy"]),
                 f"{r['test_loss']:.4f}", report.wall_time(r)))
  lines = report.columns(header, rows)
  held = ("the test split" if summary["holdout_split"] == "test"
          else "TWA-v's part")
  return "\n".join(
      [f"{summary['name']}: {summary['model']} on {summary['dataset']}, soup "
       f"of {len(labels)} runs; held-out data: {held} "
       f"({summary['holdout_fraction']:g} of the training set)"]
      + lines
      + [f"greedy soup: kept ingredients {', '.join(map(str, kept))} (in the "
         "order added)",
         f"TWA: from the uniform soup, {summary['twa']['epochs']} epochs; "
         "averaging coefficients sum to "
         f"{report.coefficient_sums(summary['twa'])}",
         "epochs = training epochs spent: the ingredients' sum, TWA: + its "
         "own"])
