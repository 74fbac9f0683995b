"""A run's workdir: its JSON files, metrics.jsonl, log and saved config.

With several processes, process 0 alone writes these files, holds the lock
and writes log.txt (`parallel.is_primary`); the others read them.
"""

from __future__ import annotations

import contextlib
import json
import logging as py_logging
import math
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

from absl import logging
import ml_collections

from twa_jax.lock import FileLock, LockedError
from twa_jax.training import configuration
from twa_jax.training import parallel
from twa_jax.training.configuration import ConfigError

LAYOUT = """\
workdir layout:
  config.json         the config the workdir was started with; a rerun must
                      match it in the fields of every phase already started
  lock                held by the one process running in the workdir (an OS
                      lock: a second process is refused, naming its pid)
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
  twa/result.json     TWA result, snapshots used, basis dimension (with the
                      directions dropped and W's condition number),
                      averaging coefficients
  twa_v/              the same for TWA-v (with twa.holdout_fraction > 0)
  surface/result.json the loss surface through SGD, SWA and TWA
  sweep/twa_<k>/       TWA over the snapshots of epochs start..k (sweep.heads),
                      checkpoints and result.json per head k
  sweep/sgd_<b>/       budget-matched SGD of b epochs (sweep.budget_matched_sgd)
  sweep/result.json   the sweep's table (rewritten by every sweep phase)
  summary.json        all results side by side
  plots/accuracy.png, plots/coefficients.png, plots/surface.png,
  plots/sweep.png
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
PHASE_FIELDS = {"sgd": _SHARED_FIELDS, "swa": _SHARED_FIELDS,
                "twa": _SHARED_FIELDS + ("twa",),
                "surface": _SHARED_FIELDS + ("twa", "surface"),
                "sweep": _SHARED_FIELDS + ("twa",)}  # sweep.*: may grow
# Fields added since workdirs were first written, with the value that
# reproduces what a workdir without them did (its config.json lacks them;
# data.holdout_seed: its seed).
_ADDED_FIELDS = {"twa": {"holdout_fraction": 0.0, "granularity": "global",
                         "storage": "float32"},
                 "sgd": {"init_from": ""}}
SAVED, GIVEN = "the workdir", "this config"


def prepare(workdir: str | os.PathLike) -> pathlib.Path:
  """The workdir as an absolute path, created and checked writable.

  Raises:
    ConfigError: it cannot be created or written.
  """
  path = pathlib.Path(workdir).expanduser().absolute()
  probe = path / ".write_test"
  try:
    path.mkdir(parents=True, exist_ok=True)
    if parallel.is_primary():
      probe.write_text("ok")
      probe.unlink()
  except OSError as e:
    raise ConfigError(f"workdir {path} is not writable: {e}") from e
  return path


@contextlib.contextmanager
def opened(workdir: str | os.PathLike) -> Iterator[pathlib.Path]:
  """The workdir (see `prepare`), held by this process alone and logged to.

  Raises:
    ConfigError: it cannot be written, or another process holds it (two
      runs in one workdir would mix their snapshots and results).
  """
  path = prepare(workdir)
  if not parallel.is_primary():
    yield path
    return
  try:
    held = FileLock(path / "lock", what=f"workdir {path}")
  except LockedError as e:
    raise ConfigError(str(e)) from None
  with held, log_to(path / "log.txt"):
    yield path


def _strict(obj: Any) -> Any:
  """JSON data with NaN and infinities replaced by None (null)."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, Mapping):
    return {k: _strict(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_strict(v) for v in obj]
  return obj


def dumps(obj: Any, **kwargs: Any) -> str:
  """Strict JSON (non-finite numbers become null)."""
  return json.dumps(_strict(obj), allow_nan=False, **kwargs)


def write_json(path: pathlib.Path, obj: Any) -> None:
  """Atomic write: a reader sees the old or the new file, never a part.
  Process 0 writes; the others return."""
  if not parallel.is_primary():
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(dumps(obj, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


def read_json(path: pathlib.Path) -> Any:
  return json.loads(path.read_text())


def result_path(workdir: pathlib.Path, phase: str) -> pathlib.Path:
  """The file whose presence marks a phase ("sgd", "twa_v", ...) finished."""
  return workdir / phase / "result.json"


def is_done(workdir: pathlib.Path, phase: str) -> bool:
  return result_path(workdir, phase).exists()


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


def last_metrics(workdir: pathlib.Path, phase: str) -> dict[str, Any] | None:
  """The phase's last metrics.jsonl record, if any."""
  records = [r for r in read_metrics(workdir) if r["phase"] == phase]
  return records[-1] if records else None


def running_train_accuracy(workdir: pathlib.Path, phase: str,
                           step: int | None = None) -> float | None:
  """The phase's running train accuracy over its epoch ending at `step`
  (None: its last epoch) from metrics.jsonl; None if no epoch ends there."""
  records = [r for r in read_metrics(workdir) if r["phase"] == phase
             and (step is None or r["step"] == step)]
  return records[-1]["train_accuracy"] if records else None


def append_metrics(workdir: pathlib.Path, record: dict[str, Any]) -> None:
  """Appends a record to metrics.jsonl (process 0; the others return)."""
  if not parallel.is_primary():
    return
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write(dumps(record) + "\n")


def truncate_metrics(workdir: pathlib.Path, phase: str, epoch: int) -> None:
  """Drops the phase's records after `epoch` (from a run killed later).

  The file is rewritten from its parsed records, which also drops a line
  torn by a kill in the middle of a write. Process 0 writes; the others
  return.
  """
  if not parallel.is_primary():
    return
  records = read_metrics(workdir)
  kept = [r for r in records if r["phase"] != phase or r["epoch"] <= epoch]
  if (workdir / "metrics.jsonl").exists():
    tmp = workdir / "metrics.jsonl.tmp"
    tmp.write_text("".join(dumps(r) + "\n" for r in kept))
    os.replace(tmp, workdir / "metrics.jsonl")


def _started(workdir: pathlib.Path, phase: str) -> bool:
  if phase == "sgd":
    return (workdir / "sgd").exists() or (workdir / "trajectory").exists()
  if phase == "twa":
    return (workdir / "twa").exists() or (workdir / "twa_v").exists()
  return (workdir / phase).exists()


def _with_added_fields(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config with the fields it predates at their reproducing value."""
  out = json.loads(json.dumps(saved))
  for section, fields in _ADDED_FIELDS.items():
    out.setdefault(section, {})
    for key, value in fields.items():
      out[section].setdefault(key, value)
  out.setdefault("data", {}).setdefault("holdout_seed", out.get("seed"))
  return out


def check_saved_config(config: ml_collections.ConfigDict,
                       workdir: pathlib.Path) -> dict[str, Any] | None:
  """Compares `config` with the workdir's config.json.

  Returns:
    The saved config (None if the workdir has none).

  Raises:
    ConfigError: a field that a phase started in the workdir depends on
      (`PHASE_FIELDS`) differs.
  """
  path = workdir / "config.json"
  if not path.exists():
    return None
  saved = read_json(path)
  configs = {SAVED: _with_added_fields(saved),
             GIVEN: configuration.to_json_data(config)}
  started = [p for p in PHASE_FIELDS if _started(workdir, p)]
  conflicts = configuration.differences(
      configs, [f for p in started for f in PHASE_FIELDS[p]])
  if conflicts:
    raise ConfigError(
        f"the config does not match the workdir {workdir} (its config.json; "
        f"phases started there: {', '.join(started)}):\n  "
        + "\n  ".join(conflicts)
        + "\nUse another --workdir, restore those fields, or delete the "
        "phase's folder in the workdir to redo it (sgd: also trajectory/).")
  changed = configuration.differences(configs)
  if changed:
    logging.info("config fields changed for phases not started yet: %s",
                 "; ".join(changed))
  return saved


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
