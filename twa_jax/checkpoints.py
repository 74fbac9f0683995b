"""Snapshots read from an existing orbax `CheckpointManager` directory.

Past flax/orbax runs left one checkpoint per step; `CheckpointSnapshots`
reads the parameters inside them (an item and a key path), read-only, with
the reading protocol of `TrajectoryStore` (`steps`, `load`, `read_matrix`,
`columns`), so a basis is built from the steps one chooses.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from twa_jax import column_reader
from twa_jax import tree as tree_lib
from twa_jax.column_reader import ColumnView

PyTree = Any
Key = str | int


class CheckpointSnapshots:
  """The parameters stored in an orbax `CheckpointManager` directory.

  Usage::

    with CheckpointSnapshots("/runs/old/checkpoints", key=("params",)) as ckpt:
      print(ckpt.steps())
      basis = twa_jax.basis_from_store(ckpt, steps=ckpt.steps()[-20:])

  Nothing is ever written to the directory. Each checkpoint's item is read
  through its orbax metadata; only the arrays under `key` are read.

  Args:
    directory: the `CheckpointManager` directory (holding one directory per
      step).
    item: the item holding the parameters (e.g. "state"); default: the only
      PyTree item of the checkpoints ("default" for a manager without item
      names).
    key: the path of keys (dict keys, or list indices) from the item's root
      to the parameter tree, e.g. ("params",) for a flax `TrainState` or a
      dict {"params": ..., "opt_state": ...}; default: the whole item.

  Raises:
    FileNotFoundError: the directory does not exist.
    ValueError: it holds no orbax checkpoint (its entries named), or the
      item is missing or ambiguous (the items found named).
  """

  def __init__(self, directory: str | os.PathLike[str], *,
               item: str | None = None, key: Sequence[Key] = ()):
    if "://" not in str(directory):
      directory = os.path.abspath(os.path.expanduser(directory))
    self._directory = epath.Path(directory)
    self._key = tuple(key)
    where = f"CheckpointSnapshots({str(self._directory)!r})"
    if not self._directory.is_dir():
      raise FileNotFoundError(f"{where}: the directory does not exist.")
    options = ocp.CheckpointManagerOptions(
        read_only=True, create=False, lightweight_initialize=True,
        save_root_metadata=False)
    self._manager = ocp.CheckpointManager(self._directory, options=options)
    self._where = where
    self._closed = False
    try:
      self._steps = sorted(int(s) for s in self._manager.all_steps())
      self._item = self._find_item(item)
      node = self._stored(self._steps[-1], where)[1]
      self._spec = tree_lib.ParamSpec.of(
          node, what=f"{where}: item {self._item!r}")
    except BaseException:
      self.close()
      raise

  def _find_item(self, item: str | None) -> str:
    """`item`, or the only PyTree item of the newest checkpoint."""
    if not self._steps:
      entries = sorted(p.name for p in self._directory.iterdir())
      raise ValueError(
          f"{self._where}: not an orbax CheckpointManager directory: no step "
          f"checkpoints in it; found {entries[:8]}"
          + (" ..." if len(entries) > 8 else "") + ".")
    items = sorted(p.name for p in self._step_dir(self._steps[-1]).iterdir()
                   if (p / "_METADATA").exists())
    if item is None and len(items) != 1:
      raise ValueError(f"{self._where}: the checkpoints hold the items "
                       f"{items}; choose one with item=...")
    if item is not None and item not in items:
      raise ValueError(f"{self._where}: no item {item!r} in the checkpoint of "
                       f"step {self._steps[-1]}; found items {items}.")
    return items[0] if item is None else item

  @property
  def directory(self) -> epath.Path:
    return self._directory

  @property
  def spec(self) -> tree_lib.ParamSpec:
    """The parameter spec (of the newest checkpoint)."""
    return self._spec

  def steps(self) -> list[int]:
    """The steps of the checkpoints (when opened), sorted."""
    self._check_open()
    return list(self._steps)

  def load(self, step: int) -> PyTree:
    """The parameter tree at `step` (numpy arrays, the stored dtypes).

    Raises:
      ValueError: `step` is missing, or its parameters differ from the spec.
    """
    self._check_open()
    self._existing(step, f"load(step={step})")
    _, view = self._columns([step], "load")
    return jax.tree_util.tree_unflatten(self._spec.treedef, [
        view.read_leaf(0, i) for i in range(len(self._spec.paths))])

  def read_matrix(self, steps: Sequence[int] | None = None
                  ) -> tuple[tree_lib.ParamSpec, np.ndarray]:
    """The parameter spec and the n x D float32 snapshot matrix (as
    `TrajectoryStore.read_matrix`)."""
    spec, view = self._columns(steps, "read_matrix")
    return spec, view[:, :]

  def columns(self, steps: Sequence[int] | None = None
              ) -> tuple[tree_lib.ParamSpec, ColumnView]:
    """The parameter spec and the snapshot matrix as a lazy `ColumnView`
    (as `TrajectoryStore.columns`)."""
    return self._columns(steps, "columns")

  def _columns(self, steps: Sequence[int] | None, what: str
               ) -> tuple[tree_lib.ParamSpec, ColumnView]:
    self._check_open()
    steps = self._steps if steps is None else list(steps)
    if not steps:
      raise ValueError(f"{what}: no steps to read.")
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    if repeated:
      raise ValueError(f"{what}: steps {repeated} are requested twice.")
    for s in steps:
      self._existing(s, what)
    context = column_reader.new_context()
    rows = []
    for s in steps:
      item, node = self._stored(s, f"{what}(step={s})")
      leaves = self._spec.check(node, what=f"{what}(step={s})",
                                check_dtypes=True)
      rows.append([column_reader.StoredLeaf(item.read_spec(leaf, context))
                   for leaf in leaves])
    return self._spec, ColumnView(self._spec.paths, self._spec.shapes,
                                  list(steps), rows, context, what)

  def _stored(self, step: int, what: str
              ) -> tuple[column_reader.StoredItem, PyTree]:
    """The item at `step` and its metadata tree under `key`."""
    item = column_reader.StoredItem.open(self._step_dir(step) / self._item,
                                         what)
    node = item.tree
    for depth, key in enumerate(self._key):
      found = (sorted(map(str, node)) if isinstance(node, dict) else
               f"a list of {len(node)}" if isinstance(node, (list, tuple))
               else f"a leaf {node!r}")
      at = "".join(f"[{k!r}]" for k in self._key[:depth]) or "<root>"
      try:
        node = node[key]
      except (KeyError, IndexError, TypeError):
        raise ValueError(
            f"{what}: item {self._item!r} has no key {key!r} at {at}; found "
            f"{found}.") from None
    return item, node

  def _step_dir(self, step: int) -> epath.Path:
    return ocp.step.build_step_path(
        self._directory, ocp.step.standard_name_format(), step)

  def _existing(self, step: int, what: str) -> None:
    if step not in self._steps:
      raise ValueError(f"{what}: step {step!r} is not in {self._where}; "
                       f"steps found: {self._steps}.")

  def _check_open(self) -> None:
    if self._closed:
      raise ValueError(f"{self._where} is closed.")

  def close(self) -> None:
    """Releases orbax' resources."""
    if not self._closed:
      self._closed = True
      self._manager.close()

  def __enter__(self) -> CheckpointSnapshots:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
