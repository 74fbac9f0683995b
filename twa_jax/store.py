"""Trajectory store: weight snapshots of a training run, on orbax-checkpoint.

A store is a directory holding

* ``twa_store.json``: the format name and version, and the parameter layout
  (tree structure, leaf paths, shapes, dtypes) recorded with the first
  snapshot; written atomically (temporary file, then rename);
* one orbax checkpoint per step, ``<step>/params`` (the parameter tree, one
  zarr array per leaf in OCDBT, leaves over 4 MiB split into chunks of at
  most 4 MiB) and ``<step>/metadata`` (a small JSON dict), written
  asynchronously and atomically by ``orbax.checkpoint.CheckpointManager``:
  a step directory appears only once the snapshot is complete.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from twa_jax import tree as tree_lib

PyTree = Any
FORMAT = "twa_jax.TrajectoryStore"
VERSION = 1
INFO_FILE = "twa_store.json"
_PARAMS, _METADATA = "params", "metadata"
# Largest stored chunk: a column slice of a larger leaf reads only the chunks
# holding its entries (see `ColumnView`).
_CHUNK_BYTES = 4 << 20
# Chunk cache of a `ColumnView`: the boxes of one leaf read at once share
# the chunks at their edges, which are then fetched once.
_CACHE_BYTES = 16 << 20
_barrier_ids = itertools.count()


class TrajectoryStore:
  """Weight snapshots of one training run, saved asynchronously with orbax.

  Usage::

    with twa.TrajectoryStore("/runs/a/trajectory") as store:
      for step in range(num_steps + 1):
        if schedule.should_sample(step):
          store.save(step, params, metadata={"epoch": step // steps_per_epoch})
        params = train_step(params, ...)

    with twa.TrajectoryStore("/runs/a/trajectory", read_only=True) as store:
      basis = twa.Basis.from_store(store)

  Snapshots are parameter pytrees built from plain dicts (string or integer
  keys), lists, tuples and None, with floating-point array leaves (flax linen
  params; for nnx use ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``).
  The first snapshot fixes the store's layout; every later save and read is
  checked against it. A snapshot is never overwritten or deleted.

  `save` returns once the arrays are copied to host memory; the files are
  written in the background (at most one save in flight: the next `save`,
  and any read, first waits for it; `steps` lists complete snapshots only).
  A process killed during a save leaves only complete snapshots visible; the
  partial one is removed on the next writable open. One writer at a time:
  any number of read-only stores may follow it from other processes.

  Multi-host: create the store and call `save` (with the same step, metadata
  and globally sharded params), `wait_until_finished` and `close` on every
  process, with `directory` on a file system all processes share (e.g. GCS
  or NFS); orbax writes each process' shards, and only the primary process
  (process 0) writes ``twa_store.json`` and the metadata. Readers
  (`load`, `read_matrix`) may run on any process, each reading the full
  snapshots into its own host memory; `columns` reads only column slices
  (`Basis.from_store` with a mesh reads those of the process' devices).

  Args:
    directory: the store's directory (a local path or an `etils.epath` URL).
    create: create the directory and an empty store if it does not exist (or
      is an empty directory).
    read_only: open for reading only; nothing is ever written, and `save`
      raises.
  """

  def __init__(self, directory: str | os.PathLike[str], *, create: bool = True,
               read_only: bool = False):
    if "://" not in str(directory):  # orbax needs absolute local paths
      directory = os.path.abspath(os.path.expanduser(directory))
    self._directory = epath.Path(directory)
    self._read_only = read_only
    info_path = self._directory / INFO_FILE
    exists = info_path.exists()
    if not exists:
      self._check_can_create(create and not read_only)
    if not read_only:  # every process looks before process 0 writes
      _barrier("open")
    if not exists:
      self._initialize()
    self._spec, self._skeleton = _read_layout(info_path)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, enable_async_checkpointing=True, create=False,
        read_only=read_only, cleanup_tmp_directories=not read_only,
        lightweight_initialize=True, save_root_metadata=False)
    self._manager = ocp.CheckpointManager(
        self._directory, options=options, item_names=(_PARAMS, _METADATA))
    self._closed = False
    self._in_flight = None  # the step of the last save started

  def _check_can_create(self, create: bool) -> None:
    """Raises unless `directory` (without a store file) may become a store.

    Runs on every process before the "open" barrier, so that all of them
    see the directory as it was before process 0 writes to it.
    """
    where = f"TrajectoryStore({str(self._directory)!r})"
    if self._directory.exists():
      entries = sorted(p.name for p in self._directory.iterdir())
      if entries:
        raise ValueError(
            f"{where}: not a trajectory store: the directory has no "
            f"{INFO_FILE} but contains {entries[:5]}"
            + (" ..." if len(entries) > 5 else "") + ".")
    elif not create:
      raise FileNotFoundError(f"{where}: the directory does not exist.")
    if not create:
      raise FileNotFoundError(
          f"{where}: the directory is empty, not a trajectory store "
          f"(no {INFO_FILE}); open it with create=True to start one.")

  def _initialize(self) -> None:
    """Makes `directory` an empty store (process 0 writes), then syncs."""
    if jax.process_index() == 0:
      self._directory.mkdir(parents=True, exist_ok=True)
      _write_info(self._directory, None)
    _barrier("init")

  @property
  def directory(self) -> epath.Path:
    return self._directory

  @property
  def spec(self) -> tree_lib.ParamSpec | None:
    """The recorded parameter layout (None before the first snapshot)."""
    return self._spec

  def steps(self) -> list[int]:
    """Steps of the complete snapshots, sorted.

    A read-only store rereads the directory (another process may be saving);
    a writable one knows its steps.
    """
    self._check_open()
    if self._read_only:
      self._manager.reload()
    elif self._in_flight is not None:
      if self._manager.is_saving_in_progress():
        return sorted(int(s) for s in self._manager.all_steps()
                      if s != self._in_flight)
      self._manager.wait_until_finished()  # done: raises if the save failed
      self._in_flight = None
    return sorted(int(s) for s in self._manager.all_steps())

  def save(self, step: int, params: PyTree, *,
           metadata: dict[str, Any] | None = None) -> bool:
    """Starts an asynchronous, atomic save of `params` as snapshot `step`.

    Returns after the arrays are copied to host (the caller may donate or
    overwrite them); the files are written in the background.

    Args:
      step: a non-negative integer not yet in the store.
      params: the parameter pytree; the first snapshot fixes the layout.
      metadata: a small JSON-serializable dict (epoch, learning rate, loss).

    Returns:
      True if a save was started; False if `step` already holds a snapshot
      bit-identical to `params` (a no-op, as when a preempted job redoes a
      step; the stored metadata is kept).

    Raises:
      ValueError: the store is read-only; `step` is negative or holds
        different parameters; the structure, a shape or a dtype differs from
        the store's layout (the leaf is named).
      TypeError: a node of `params` is not a dict, list, tuple or None, a
        leaf is not floating point, or `metadata` is not JSON-serializable.
    """
    self._check_open()
    if self._read_only:
      raise ValueError(
          f"save(step={step}): the store {str(self._directory)!r} is "
          "open read-only.")
    step = _check_step(step, "save")
    what = f"save(step={step})"
    skeleton = _skeleton(params, what)
    if self._spec is None:
      spec = tree_lib.ParamSpec.of(params, what=what)
      if not spec.num_params:
        raise ValueError(f"{what}: the parameter tree has no entries.")
    else:
      _check_layout(self._spec, params, what)
    metadata = {} if metadata is None else metadata
    try:
      json.dumps(metadata)
    except (TypeError, ValueError) as e:
      raise TypeError(
          f"{what}: metadata must be a JSON-serializable dict: {e}") from e
    if not isinstance(metadata, dict):
      raise TypeError(f"{what}: metadata must be a dict, got "
                      f"{type(metadata).__name__}.")
    self._manager.wait_until_finished()
    if step in self.steps():
      if _bit_identical(self.load(step), params):
        logging.info("%s: identical snapshot already stored; skipped.", what)
        return False
      raise ValueError(
          f"{what}: step {step} already holds a different snapshot in "
          f"{str(self._directory)!r}; snapshots are never overwritten.")
    if self._spec is None:
      if jax.process_index() == 0:
        _write_info(self._directory, (spec, skeleton))
      self._spec, self._skeleton = spec, skeleton
    # orbax cannot save zero-size arrays; the layout restores them.
    leaves = [None if not size else
              leaf if isinstance(leaf, jax.Array) else np.array(leaf)
              for leaf, size in zip(jax.tree_util.tree_leaves(params),
                                    self._spec.sizes)]
    item = _build(skeleton, iter(leaves), orbax=True)
    save_args = _build(skeleton, iter(
        [ocp.SaveArgs(chunk_byte_size=_CHUNK_BYTES) if size else None
         for size in self._spec.sizes]), orbax=True)
    self._manager.save(step, args=ocp.args.Composite(**{
        _PARAMS: ocp.args.PyTreeSave(item, save_args=save_args),
        _METADATA: ocp.args.JsonSave(metadata)}), force=True)
    self._in_flight = step
    return True

  def load(self, step: int) -> PyTree:
    """The snapshot at `step`: the recorded structure, numpy array leaves."""
    self._check_open()
    return self._restore(self._existing(step, "load"))

  def _restore(self, step: int) -> PyTree:
    spec = self._spec
    restore_args = _build(self._skeleton, iter(
        [ocp.RestoreArgs(restore_type=np.ndarray) if size else None
         for size in spec.sizes]), orbax=True)
    what = f"load(step={step})"
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          _PARAMS: ocp.args.PyTreeRestore(restore_args=restore_args)}))
    except (KeyError, IndexError, TypeError, ValueError) as e:
      raise ValueError(f"{what}: the stored snapshot does not match the "
                       f"store's layout: {e}") from e
    leaves = _stored_leaves(self._skeleton, restored[_PARAMS], what)
    leaves = [np.zeros(shape, dtype) if leaf is None and not size else leaf
              for leaf, shape, dtype, size in zip(
                  leaves, spec.shapes, spec.dtypes, spec.sizes)]
    tree = _build(self._skeleton, iter(leaves), orbax=False)
    _check_layout(spec, tree, what)
    return tree

  def metadata(self, step: int) -> dict[str, Any]:
    """The metadata dict saved with snapshot `step`."""
    self._check_open()
    step = self._existing(step, "metadata")
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        _METADATA: ocp.args.JsonRestore()}))
    return dict(restored[_METADATA] or {})

  def read_matrix(self, steps: Sequence[int] | None = None
                  ) -> tuple[tree_lib.ParamSpec, np.ndarray]:
    """The layout and the n x D float32 snapshot matrix, one row per step.

    Snapshots are read one at a time into the preallocated matrix, so peak
    host memory is the matrix plus about one snapshot.

    Args:
      steps: the steps to read, in this order (default: all, sorted).

    Raises:
      ValueError: no snapshots, a step is missing or repeated, or a snapshot
        differs from the layout or holds NaN/Inf (the step and leaf named).
    """
    spec, view = self._columns(steps, "read_matrix")
    return spec, view[:, :]

  def columns(self, steps: Sequence[int] | None = None
              ) -> tuple[tree_lib.ParamSpec, ColumnView]:
    """The layout and the snapshot matrix as a lazy `ColumnView`.

    Nothing is read but the snapshots' metadata, which is checked against
    the layout here; `view[:, start:stop]` then reads only the stored chunks
    holding columns [start, stop) of each snapshot.

    Args:
      steps: the steps, in this order (default: all, sorted).

    Raises:
      ValueError: as `read_matrix`; NaN/Inf is found when a slice is read.
    """
    return self._columns(steps, "columns")

  def _columns(self, steps: Sequence[int] | None, what: str
               ) -> tuple[tree_lib.ParamSpec, ColumnView]:
    self._check_open()
    self._manager.wait_until_finished()
    available = self.steps()
    if steps is None:
      steps = available
    steps = [_check_step(s, what) for s in steps]
    if not steps:
      raise ValueError(
          f"{what}: no snapshots to read from {str(self._directory)!r}.")
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    if repeated:
      raise ValueError(f"{what}: steps {repeated} are requested twice.")
    for s in steps:
      self._existing(s, what, available)
    context = ts.Context({"cache_pool": {"total_bytes_limit": _CACHE_BYTES}},
                         parent=ocp.type_handlers.get_ts_context())
    handler = ocp.PyTreeCheckpointHandler()
    try:
      stored = [self._stored_arrays(handler, context, s, f"{what}(step={s})")
                for s in steps]
    finally:
      handler.close()
    return self._spec, ColumnView(self._spec.paths, self._spec.shapes, steps,
                                  stored, context, what)

  def _stored_arrays(self, handler: ocp.PyTreeCheckpointHandler,
                     context: ts.Context, step: int, what: str
                     ) -> list[dict[str, Any] | None]:
    """TensorStore read specs of snapshot `step`'s leaves (None: empty leaf),
    from its orbax metadata, checked against the layout."""
    directory = ocp.step.build_step_path(
        self._directory, ocp.step.standard_name_format(), step) / _PARAMS
    metadata = handler.metadata(directory)
    arrays = _stored_leaves(self._skeleton, metadata.tree, what)
    shapes = []
    for array, name, shape, dtype, size in zip(
        arrays, self._spec.paths, self._spec.shapes, self._spec.dtypes,
        self._spec.sizes):
      if array is None and size:
        raise ValueError(f"{what}: leaf {name} is not stored.")
      shapes.append(np.zeros(shape, dtype) if array is None else
                    jax.ShapeDtypeStruct(array.shape, array.dtype))
    _check_layout(self._spec, _build(self._skeleton, iter(shapes),
                                     orbax=False), what)
    use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(directory)
    return [None if array is None else ocp.type_handlers.get_json_tspec_read(
        ocp.type_handlers.ParamInfo(
            name=array.name, parent_dir=directory,
            is_ocdbt_checkpoint=use_ocdbt, use_zarr3=metadata.use_zarr3,
            ts_context=context), use_ocdbt=use_ocdbt)
            for array in arrays]

  def wait_until_finished(self) -> None:
    """Blocks until the save in flight (if any) is on disk; raises its error."""
    self._check_open()
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the save in flight and releases orbax' resources."""
    if not self._closed:
      self._closed = True
      self._manager.close()

  def __enter__(self) -> TrajectoryStore:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def __repr__(self) -> str:
    return (f"TrajectoryStore({str(self._directory)!r}, "
            f"read_only={self._read_only})")

  def _check_open(self) -> None:
    if self._closed:
      raise ValueError(f"{self!r} is closed.")

  def _existing(self, step: int, what: str,
                available: list[int] | None = None) -> int:
    step = _check_step(step, what)
    if available is None:
      self._manager.wait_until_finished()
      available = self.steps()
    if step not in available:
      raise ValueError(
          f"{what}: step {step} is not in the store "
          f"{str(self._directory)!r}; stored steps: {_short(available)}.")
    return step


class ColumnView:
  """A store's n x D float32 snapshot matrix, read by column ranges.

  Made by `TrajectoryStore.columns`. `view[rows, start:stop]` (rows: a
  slice) reads, of each snapshot, only the leaves overlapping columns
  [start, stop) and, within a leaf, only the boxes of its C-order entries in
  that range, hence only the stored chunks holding them (each once: the
  view keeps a small chunk cache). Each leaf read is
  checked for NaN/Inf (the step and leaf named). `view.leaves(indices)` is
  the view of some leaves' columns only (one block of a layer-wise basis).

  Attributes:
    steps: the snapshots' steps, one per row.
  """

  dtype = np.dtype(np.float32)

  def __init__(self, paths: Sequence[str],
               shapes: Sequence[tuple[int, ...]], steps: list[int],
               stored: list[list[dict[str, Any] | None]], context: ts.Context,
               what: str):
    self.steps = steps
    self._paths = tuple(paths)
    self._shapes = tuple(shapes)
    self._stored = stored
    self._context = context
    self._what = what
    self._offsets = np.cumsum([0] + [math.prod(s) for s in self._shapes])

  @property
  def shape(self) -> tuple[int, int]:
    return len(self.steps), int(self._offsets[-1])

  def leaves(self, indices: Sequence[int]) -> ColumnView:
    """The matrix of only the leaves `indices` (of this view, in that order;
    of the store's layout for a view from `columns`): their columns side by
    side. Nothing is read."""
    indices = list(indices)
    return ColumnView([self._paths[i] for i in indices],
                      [self._shapes[i] for i in indices], self.steps,
                      [[row[i] for i in indices] for row in self._stored],
                      self._context, self._what)

  def __getitem__(self, index: tuple[slice, slice]) -> np.ndarray:
    if not (isinstance(index, tuple) and len(index) == 2
            and all(isinstance(i, slice) for i in index)
            and index[1].step in (None, 1)):
      raise TypeError("ColumnView: index with [rows, start:stop] (slices, "
                      f"contiguous columns), got {index!r}.")
    rows, cols = index
    start, stop, _ = cols.indices(self.shape[1])
    rows = range(*rows.indices(self.shape[0]))
    out = np.empty((len(rows), max(stop - start, 0)), np.float32)
    for row, r in zip(out, rows):
      self._read(r, start, stop, row)
    return out

  def _read(self, r: int, start: int, stop: int, out: np.ndarray) -> None:
    """Columns [start, stop) of snapshot row `r` into `out`.

    All of the row's leaves are opened, then all their boxes read,
    concurrently.
    """
    what = f"{self._what}(step={self.steps[r]})"
    offsets, shapes = self._offsets, self._shapes
    leaves = [(i, max(start, offsets[i]), min(stop, offsets[i + 1]))
              for i in range(len(shapes))]
    leaves = [(i, lo, hi) for i, lo, hi in leaves if lo < hi]
    try:
      opened = [ts.open(self._stored[r][i], context=self._context)
                for i, _, _ in leaves]
      reads = [[array.result()[box].read() for box in _flat_boxes(
          shapes[i], lo - offsets[i], hi - offsets[i])]
               for (i, lo, hi), array in zip(leaves, opened)]
      for (_, lo, _), boxes in zip(leaves, reads):
        at = lo - start
        for box in boxes:
          values = box.result().reshape(-1)
          out[at:at + values.size] = values
          at += values.size
    except ValueError as e:
      raise ValueError(f"{what}: cannot read the stored snapshot: {e}") from e
    for i, lo, hi in leaves:
      if not np.isfinite(out[lo - start:hi - start]).all():
        raise ValueError(
            f"{what}: leaf {self._paths[i]} contains NaN or Inf.")


def _flat_boxes(shape: tuple[int, ...], start: int, stop: int
                ) -> list[tuple[slice, ...]]:
  """The boxes (index tuples) that hold exactly the C-order entries
  [start, stop) of an array of `shape`, in order (at most 2 ndim - 1)."""
  if start >= stop:
    return []
  if not shape:
    return [()]
  inner = math.prod(shape[1:])
  (first, a), (last, b) = divmod(start, inner), divmod(stop, inner)
  if first == last:
    return [(slice(first, first + 1),) + box
            for box in _flat_boxes(shape[1:], a, b)]
  boxes = []
  if a:
    boxes += [(slice(first, first + 1),) + box
              for box in _flat_boxes(shape[1:], a, inner)]
    first += 1
  if first < last:
    boxes.append((slice(first, last),) + (slice(None),) * (len(shape) - 1))
  return boxes + [(slice(last, last + 1),) + box
                  for box in _flat_boxes(shape[1:], 0, b)]


def _check_step(step: Any, what: str) -> int:
  if isinstance(step, (bool, np.bool_)) or not isinstance(
      step, (int, np.integer)) or step < 0:
    raise ValueError(f"{what}: step must be a non-negative integer, "
                     f"got {step!r}.")
  return int(step)


def _short(steps: list[int]) -> str:
  if len(steps) <= 12:
    return str(steps)
  return f"[{', '.join(map(str, steps[:6]))}, ..., " \
         f"{', '.join(map(str, steps[-3:]))}] ({len(steps)} steps)"


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(
        f"twa_jax.TrajectoryStore:{name}:{next(_barrier_ids)}")


# Structure skeleton: JSON for the plain-container part of a pytree.
# null = None node; "leaf"; {"dict": [[key, child], ...]} with keys in JAX's
# (sorted) order; {"list": [...]}; {"tuple": [...]}.


def _skeleton(tree: PyTree, what: str, path: str = "") -> Any:
  """JSON description of the containers of `tree`; rejects other nodes."""
  if tree is None:
    return None
  if type(tree) is dict:  # pylint: disable=unidiomatic-typecheck
    for key in tree:
      if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise TypeError(f"{what}: key {key!r} at {path or '<root>'} is a "
                        f"{type(key).__name__}; keys must be str or int.")
    return {"dict": [[k, _skeleton(tree[k], what, f"{path}[{k!r}]")]
                     for k in sorted(tree)]}
  if type(tree) in (list, tuple):
    kind = type(tree).__name__
    return {kind: [_skeleton(c, what, f"{path}[{i}]")
                   for i, c in enumerate(tree)]}
  if not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(tree)):
    raise TypeError(
        f"{what}: the node at {path or '<root>'} is a {type(tree).__name__}; "
        "a stored tree holds plain dicts, lists, tuples and arrays (convert "
        "it first, e.g. with flax.core.unfreeze or nnx.to_pure_dict).")
  return "leaf"


def _build(skeleton: Any, leaves: Iterator[Any], *, orbax: bool) -> PyTree:
  """The tree described by `skeleton` with `leaves` in order.

  With `orbax`, in the form orbax saves and restores: string keys (see
  `_orbax_key`), lists for tuples.
  """
  if skeleton is None:
    return None
  if skeleton == "leaf":
    return next(leaves)
  (kind, children), = skeleton.items()
  if kind == "dict":
    return {_orbax_key(k) if orbax else k: _build(c, leaves, orbax=orbax)
            for k, c in children}
  built = [_build(c, leaves, orbax=orbax) for c in children]
  return tuple(built) if kind == "tuple" and not orbax else built


def _orbax_key(key: str | int) -> str:
  """The key as orbax stores it: a string without '.' (orbax joins leaf
  names with '.', so {'a.b': x} and {'a': {'b': y}} would collide)."""
  return str(key).replace("%", "%25").replace(".", "%2E")


def _orbax_leaves(skeleton: Any, node: Any, path: str) -> list[Any]:
  """The leaves, in order, of a tree orbax restored in the form of `skeleton`.

  Raises ValueError naming the first container that differs.
  """
  if skeleton is None:
    return []
  if skeleton == "leaf":
    if isinstance(node, (dict, list)):
      raise ValueError(f"{path or '<root>'} is a container, not a leaf")
    return [node]
  (kind, children), = skeleton.items()
  if kind == "dict":
    if not isinstance(node, dict):
      raise ValueError(f"{path or '<root>'} is not a dict")
    missing = [k for k, _ in children if _orbax_key(k) not in node]
    if missing:
      raise ValueError(f"missing key {missing[0]!r} at {path or '<root>'}")
    pairs = [(c, node[_orbax_key(k)], f"{path}[{k!r}]") for k, c in children]
  else:
    if not isinstance(node, (list, tuple)) or len(node) != len(children):
      raise ValueError(
          f"{path or '<root>'} is not a {kind} of {len(children)}")
    pairs = [(c, n, f"{path}[{i}]")
             for i, (c, n) in enumerate(zip(children, node))]
  return [leaf for c, n, p in pairs for leaf in _orbax_leaves(c, n, p)]


def _stored_leaves(skeleton: Any, node: Any, what: str) -> list[Any]:
  """`_orbax_leaves` of a stored snapshot; a mismatch names `what`."""
  try:
    return _orbax_leaves(skeleton, node, "")
  except ValueError as e:
    raise ValueError(f"{what}: the stored snapshot does not match the "
                     f"store's layout: {e}") from e


def _check_layout(spec: tree_lib.ParamSpec, tree: PyTree, what: str) -> None:
  """Raises ValueError naming the leaf where `tree` differs from `spec`."""
  leaves = spec.check(tree, what=what)
  for leaf, name, dtype in zip(leaves, spec.paths, spec.dtypes):
    leaf_dtype = tree_lib._dtype(leaf)  # pylint: disable=protected-access
    if leaf_dtype != dtype:
      raise ValueError(f"{what}: leaf {name} has dtype {leaf_dtype}, the "
                       f"store's layout has {dtype}.")


def _bit_identical(a: PyTree, b: PyTree) -> bool:
  return all(
      np.asarray(x).tobytes() == np.asarray(jax.device_get(y)).tobytes()
      for x, y in zip(jax.tree_util.tree_leaves(a),
                      jax.tree_util.tree_leaves(b)))


def _write_info(directory: epath.Path, layout) -> None:
  """Writes twa_store.json atomically (temporary file, then rename)."""
  info = {"format": FORMAT, "version": VERSION, "layout": None}
  if layout is not None:
    spec, skeleton = layout
    info["layout"] = {
        "structure": skeleton, "paths": list(spec.paths),
        "shapes": [list(s) for s in spec.shapes],
        "dtypes": [np.dtype(d).name for d in spec.dtypes]}
  tmp = directory / f"{INFO_FILE}.tmp-{os.getpid()}"
  tmp.write_text(json.dumps(info))
  tmp.replace(directory / INFO_FILE)


def _read_layout(path: epath.Path):
  """Reads twa_store.json: (spec, skeleton), or (None, None) if no snapshot."""
  try:
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT:
      raise ValueError(f"format is {info.get('format')!r}, not {FORMAT!r}")
  except (ValueError, AttributeError) as e:
    raise ValueError(f"{path}: not a trajectory store file ({e}).") from e
  if info.get("version") != VERSION:
    raise ValueError(
        f"{path}: store format version {info.get('version')!r}; this "
        f"twa_jax reads version {VERSION} (use the twa_jax release that "
        "wrote it).")
  layout = info["layout"]
  if layout is None:
    return None, None
  skeleton = layout["structure"]
  n = len(layout["paths"])
  placeholder = _build(skeleton, iter(range(n)), orbax=False)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(placeholder)
  paths = tuple(jax.tree_util.keystr(p) or "<root>" for p, _ in leaves)
  if [i for _, i in leaves] != list(range(n)) or paths != tuple(
      layout["paths"]):
    raise ValueError(f"{path}: corrupted layout (structure and leaf paths "
                     "disagree).")
  spec = tree_lib.ParamSpec(
      treedef, paths, tuple(tuple(s) for s in layout["shapes"]),
      tuple(np.dtype(jax.numpy.dtype(d)) for d in layout["dtypes"]))
  return spec, skeleton
