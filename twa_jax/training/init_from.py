"""The variables the sgd phase starts from (`config.sgd.init_from`).

`sgd.init_from` names existing parameters to fine-tune from, in one of two
forms:

  DIR or DIR:STEP  an orbax `CheckpointManager` directory whose item (the
                   only PyTree item of its checkpoints, e.g. "state") is a
                   dict with "params" and, optionally, "batch_stats": a flax
                   `TrainState`, or a twa_jax workdir's sgd/checkpoints. The
                   latest step, or STEP.
  FILE.npz         an .npz of the variables (`NPZ_FORMAT`), as `save_npz`
                   writes it (converted pretrained weights, for example).

The tree must match the model's leaf by leaf (paths, shapes, dtypes);
batch-norm statistics are taken from the source when it has them, else the
seed's initial ones are kept.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from twa_jax.checkpoints import CheckpointSnapshots
from twa_jax.tree import ParamSpec
from twa_jax.training.configuration import ConfigError

PyTree = Any
COLLECTIONS = ("params", "batch_stats")
NPZ_FORMAT = """\
.npz format: one array per leaf, named by its collection and its path of
dict keys joined with "/": "params/Dense_0/kernel", "batch_stats/BatchNorm_0/
mean". A file without "batch_stats/..." entries keeps the seed's initial
statistics. Write one with `twa_jax.training.init_from.save_npz`, or with
`np.savez(path, **{"params/" + "/".join(keys): array, ...})`."""


def save_npz(path: str | os.PathLike, params: PyTree,
             batch_stats: PyTree | None = None) -> None:
  """Writes `params` (and `batch_stats`) as an .npz in `NPZ_FORMAT`.

  Args:
    path: the file to write.
    params: the parameter tree (nested dicts with string keys).
    batch_stats: the batch-norm statistics, if any.

  Raises:
    ValueError: a key is not a string or contains "/".
  """
  arrays = {}
  for collection, tree in (("params", params), ("batch_stats", batch_stats)):
    if tree:
      arrays.update(_flat(tree, collection))
  np.savez(path, **arrays)


def _flat(tree: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
  """{"prefix/a/b": array} of a tree of nested dicts."""
  out = {}
  for key, value in tree.items():
    if not isinstance(key, str) or "/" in key:
      raise ValueError(f"{prefix}: key {key!r} is not a string without '/'")
    if isinstance(value, Mapping):
      out.update(_flat(value, f"{prefix}/{key}"))
    else:
      out[f"{prefix}/{key}"] = np.asarray(value)
  return out


def load(source: str, params: PyTree,
         batch_stats: PyTree) -> tuple[PyTree, PyTree]:
  """The variables at `source`, checked against the model's.

  Args:
    source: the value of `config.sgd.init_from` (see the module docstring).
    params, batch_stats: the model's initial variables (the reference for
      the leaves; `batch_stats` is returned when the source has none).

  Returns:
    (params, batch_stats) as device arrays.

  Raises:
    ConfigError: the source is missing or unreadable, or its tree does not
      match the model's (naming the missing, unexpected or mismatched leaf).
  """
  where = f"config.sgd.init_from={source!r}"
  if source.endswith(".npz"):
    loaded = _read_npz(source, where)
  else:
    loaded = _read_checkpoint(source, where, bool(batch_stats))
  out = [_checked(loaded["params"], params, f"{where}: params")]
  if batch_stats and "batch_stats" in loaded:
    out.append(_checked(loaded["batch_stats"], batch_stats,
                        f"{where}: batch_stats"))
  else:
    if batch_stats:
      logging.info("%s has no batch_stats: the seed's initial batch-norm "
                   "statistics are kept", where)
    out.append(batch_stats)
  logging.info("sgd starts from %s", where)
  return out[0], out[1]


def _checked(tree: PyTree, model: PyTree, what: str) -> PyTree:
  """`tree` as device arrays with the model's structure, once it matches."""
  try:
    leaves = ParamSpec.of(model, what=what).check(tree, what=what,
                                                  check_dtypes=True)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{e} The expected leaves are the model's "
                      "(config.model).") from None
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(model),
                                      [jnp.asarray(x) for x in leaves])


def _read_npz(path: str, where: str) -> dict[str, PyTree]:
  """The collections of an .npz in `NPZ_FORMAT`."""
  try:
    with np.load(os.path.expanduser(path), allow_pickle=False) as f:
      arrays = {name: f[name] for name in f.files}
  except (OSError, ValueError) as e:
    raise ConfigError(f"{where}: cannot read the .npz: {e}") from e
  out: dict[str, dict] = {}
  for name, array in arrays.items():
    collection, *keys = name.split("/")
    if collection not in COLLECTIONS or not keys:
      raise ConfigError(f"{where}: entry {name!r} is neither params/... nor "
                        f"batch_stats/...\n{NPZ_FORMAT}")
    node = out.setdefault(collection, {})
    for key in keys[:-1]:
      node = node.setdefault(key, {})
      if not isinstance(node, dict):
        raise ConfigError(f"{where}: entry {name!r} is inside the leaf "
                          f"{key!r}")
    node[keys[-1]] = array
  if "params" not in out:
    raise ConfigError(f"{where}: no params/... entry\n{NPZ_FORMAT}")
  return out


def _read_checkpoint(source: str, where: str,
                     batch_stats: bool) -> dict[str, PyTree]:
  """The params (and, if wanted and present, the batch_stats) of the
  checkpoint at DIR or DIR:STEP."""
  match = re.fullmatch(r"(.+):(\d+)", source)
  directory, step = (match[1], int(match[2])) if match else (source, None)
  try:
    with CheckpointSnapshots(directory, key=("params",)) as ckpt:
      step = ckpt.steps()[-1] if step is None else step
      out = {"params": ckpt.load(step)}
    if not batch_stats:
      return out
    try:
      stats = CheckpointSnapshots(directory, key=("batch_stats",))
    except ValueError:  # the item has no batch_stats: keep the model's
      return out
    with stats:
      out["batch_stats"] = stats.load(step)
  except (FileNotFoundError, ValueError, TypeError) as e:
    raise ConfigError(f"{where}: not a file ending in .npz, nor a readable "
                      f"orbax checkpoint directory with params: {e}") from e
  return out
