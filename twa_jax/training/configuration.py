"""Checks experiment configs: valid fields, differences between configs."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections

from twa_jax.training import steps as steps_lib

GRANULARITIES = ("global", "layer", "leaf")
STORAGES = ("float32", "bfloat16", "int8", "int4")
BASIS_LAYOUTS = ("params", "basis")  # config.parallel.basis_layout
PARAM_SHARDINGS = ("replicated", "fsdp")  # config.parallel.param_sharding
MISSING = "<missing>"


class ConfigError(ValueError):
  """A config, workdir or store problem found before training starts."""


def to_json_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON data (tuples become lists)."""
  return json.loads(config.to_json())


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"sgd.lr": 0.1, ...}: the leaves of nested dicts by dotted path."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def get_field(config: ml_collections.ConfigDict, field: str) -> Any:
  """The value of a dotted field, e.g. "twa.holdout_fraction"."""
  for part in field.split("."):
    config = config[part]
  return config


def differences(configs: Mapping[str, Mapping[str, Any]],
                fields: Iterable[str] | None = None) -> list[str]:
  """Where configs differ: one line per field.

  Args:
    configs: {where: a config as JSON data}, `where` naming its place.
    fields: sections or entries to compare (e.g. ("seed", "model",
      "twa.holdout_fraction")); None: all.

  Returns:
    "field: value in where, ...; value in where, ..." for each field whose
    value differs, values as JSON, sorted by field.
  """
  flat = {where: flatten(c) for where, c in configs.items()}
  fields = None if fields is None else tuple(fields)
  keys = sorted({k for f in flat.values() for k in f
                 if fields is None or any(k == s or k.startswith(s + ".")
                                          for s in fields)})
  lines = []
  for key in keys:
    groups: dict[str, list[str]] = {}
    for where, f in flat.items():
      value = json.dumps(f[key]) if key in f else MISSING
      groups.setdefault(value, []).append(where)
    if len(groups) > 1:
      lines.append(f"{key}: " + "; ".join(
          f"{value} in {', '.join(places)}"
          for value, places in groups.items()))
  return lines


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the fields that need no data: finite positive numbers, choices.

  Raises:
    ConfigError: naming every bad field with its value.
  """
  errors = []

  def need(ok: bool, field: str, message: str) -> None:
    if not ok:
      errors.append(f"config.{field}={get_field(config, field)!r}: {message}")

  for field, value in flatten(config.to_dict()).items():
    need(not isinstance(value, float) or math.isfinite(value), field,
         "must be finite")
  if errors:  # the checks below compare numbers
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
  for section in ("sgd", "twa"):
    s = config[section]
    need(s.epochs >= 1 and isinstance(s.epochs, int), f"{section}.epochs",
         "must be a positive integer")
    need(s.lr > 0, f"{section}.lr", "the learning rate must be positive")
    choices = (steps_lib.OPTIMIZERS if section == "sgd"
               else steps_lib.TWA_BASE_OPTIMIZERS)
    need(s.optimizer in choices, f"{section}.optimizer",
         f"choose from {choices}")
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
  if sgd.optimizer == "schedule_free_sgd":
    need(0 < sgd.momentum < 1, "sgd.momentum",
         "schedule_free_sgd's interpolation b1 must be in (0, 1)")
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
  need(config.parallel.workers >= 0, "parallel.workers", "must be >= 0")
  need(config.parallel.basis_layout in BASIS_LAYOUTS, "parallel.basis_layout",
       f"choose from {BASIS_LAYOUTS}")
  need(config.parallel.param_sharding in PARAM_SHARDINGS,
       "parallel.param_sharding", f"choose from {PARAM_SHARDINGS}")
  need(config.checkpoint_every_steps >= 0, "checkpoint_every_steps",
       "must be >= 0 (0: after each epoch only)")
  for field in ("data.holdout_fraction", "twa.holdout_fraction"):
    need(0 <= get_field(config, field) < 1, field, "must be in [0, 1)")
  heads = config.sweep.heads
  need(all(isinstance(k, int) and max(avg.start, 1) <= k <= sgd.epochs
           for k in heads) and len(set(heads)) == len(heads), "sweep.heads",
       f"distinct epochs in [max(averaging.start, 1), sgd.epochs="
       f"{sgd.epochs}]")
  if config.sweep.budget_matched_sgd:
    need(sgd.schedule == "step", "sgd.schedule",
         "sweep.budget_matched_sgd compresses a step schedule")
  if "sweep" in [p.strip() for p in str(config.phases).split(",")]:
    need(bool(heads), "sweep.heads", "the sweep phase needs head epochs")
    need(avg.unit == "epoch", "averaging.unit",
         "the sweep phase averages epochs: set 'epoch'")
  need(config.surface.steps >= 2, "surface.steps", "need at least 2")
  need(config.surface.margin >= 0, "surface.margin", "must be >= 0")
  need(config.eval_batch_size >= 1, "eval_batch_size", "must be positive")
  need(config.train_eval_size is None or config.train_eval_size >= 1,
       "train_eval_size", "must be positive (or None: all)")
  need(config.log_every_steps >= 1, "log_every_steps", "must be positive")
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def override_error(error: KeyError | AttributeError,
                   overrides: Sequence[str]) -> ConfigError:
  """The error of a `--config.FIELD` override naming no field of the config.

  Args:
    error: what ml_collections raised for the unknown name.
    overrides: the command line's `--config.FIELD=VALUE` arguments.

  Returns:
    A one-line error naming the override and the unknown name.
  """
  message = error
  while isinstance(message, BaseException) and message.args:
    message = message.args[0]  # AttributeError(KeyError(text))
  name, _, hint = str(message).partition("\n")
  name = name.strip("'\"")
  flags = [a.split("=")[0] for a in overrides if a.startswith("--config.")
           and name in a.split("=")[0].split(".")]
  where = flags[0] if flags else "a --config.FIELD override"
  return ConfigError(f"{where}: the config has no field {name!r}"
                     + (f" ({hint.strip()})" if hint.strip() else ""))
