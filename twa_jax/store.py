"""Trajectory store: weight snapshots of a training run, on orbax-checkpoint.

A store is a directory holding

* ``twa_store.json``: the format name and version, and the parameter spec and
  tree skeleton recorded with the first snapshot (see `store_format`);
* ``twa_store.lock``: the writer's lock (see `lock`): one writer at a time;
* one orbax checkpoint per step: ``<step>/params`` (the parameter tree, one
  zarr array per leaf in OCDBT, leaves over `chunk_bytes` split into chunks
  of at most that size), ``<step>/metadata`` (a small JSON dict) and
  ``<step>/checksums`` (a checksum per `chunk_bytes` block of every leaf,
  see `checksums`), written asynchronously and atomically by
  ``orbax.checkpoint.CheckpointManager``: a step directory appears only once
  the snapshot is complete.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from twa_jax import checksums as checksums_lib
from twa_jax import column_reader
from twa_jax import lock as lock_lib
from twa_jax import store_format
from twa_jax import tree as tree_lib
from twa_jax.column_reader import ColumnView

PyTree = Any
INFO_FILE = store_format.INFO_FILE
LOCK_FILE = "twa_store.lock"
_PARAMS, _METADATA, _CHECKSUMS = "params", "metadata", "checksums"
_barrier_ids = itertools.count()


class StoreWriteError(OSError):
  """A snapshot could not be written (disk full, no permission, ...); the
  store's complete snapshots are intact."""


class TrajectoryStore:
  """Weight snapshots of one training run, saved asynchronously with orbax.

  Usage (the class is `twa_jax.store.TrajectoryStore`)::

    with TrajectoryStore("/runs/a/trajectory") as store:
      for step in range(num_steps + 1):
        if schedule.should_sample(step):
          store.save(step, params, metadata={"epoch": step // steps_per_epoch})
        params = train_step(params, ...)

    with TrajectoryStore("/runs/a/trajectory", read_only=True) as store:
      basis = twa_jax.basis_from_store(store)

  Snapshots are parameter pytrees built from plain dicts (string or integer
  keys), lists, tuples and None, with floating-point array leaves (flax
  linen params), or an `nnx.State` (stored as `nnx.to_pure_dict`). The first
  snapshot fixes the store's parameter spec; every later save and read is
  checked against it. A snapshot is never overwritten or deleted.

  `save` returns once the arrays are copied to host memory; the files are
  written in the background (at most one save in flight: the next `save`,
  and any read, first waits for it; `steps` lists complete snapshots only).
  A failed write (e.g. a full disk) raises `StoreWriteError` naming the step
  and directory, at the latest from the next call. A process killed during
  a save leaves only complete snapshots visible; the partial one is removed
  on the next writable open. Every read verifies the stored bytes against
  checksums recorded at save time (`checksums.ChecksumError` names the step
  and leaf).

  One writer at a time: a writable open takes an OS file lock on the store
  (released when the writer closes the store or dies), and a second one
  raises `lock.LockedError` naming the holder's pid. Any number of read-only
  stores may follow the writer from other processes; they never write,
  nor touch a save in progress.

  Multi-host: create the store and call `save` (with the same step, metadata
  and globally sharded params), `wait_until_finished` and `close` on every
  process, with `directory` on a file system all processes share (e.g. GCS
  or NFS); orbax writes each process' shards, and only the primary process
  (process 0) holds the lock and writes ``twa_store.json``, the metadata and
  the checksums (a sharded leaf is gathered to every process' host memory
  for them). Readers (`load`, `read_matrix`) may run on any process, each
  reading the full snapshots into its own host memory; `columns` reads only
  column slices. Remote directories (a URL) are not locked.

  Args:
    directory: the store's directory (a local path or an `etils.epath` URL).
    create: create the directory and an empty store if it does not exist (or
      is an empty directory).
    read_only: open for reading only; nothing is ever written, and `save`
      raises.
    chunk_bytes: the largest stored chunk of a leaf, and the block size of
      its checksums: a column slice of a larger leaf reads only the chunks
      holding its entries (a multiple of 8).
  """

  def __init__(self, directory: str | os.PathLike[str], *, create: bool = True,
               read_only: bool = False, chunk_bytes: int = 4 << 20):
    if "://" not in str(directory):  # orbax needs absolute local paths
      directory = os.path.abspath(os.path.expanduser(directory))
    self._directory = epath.Path(directory)
    self._read_only = read_only
    if chunk_bytes <= 0 or chunk_bytes % 8:
      raise ValueError(f"{self!r}: chunk_bytes must be a positive multiple "
                       f"of 8, got {chunk_bytes}.")
    self._chunk_bytes = chunk_bytes
    self._lock = None
    self._closed = True  # until the manager exists
    info_path = self._directory / INFO_FILE
    exists = info_path.exists()
    if not exists:
      self._check_can_create(create and not read_only)
    if not read_only:  # every process looks before process 0 writes
      self._take_lock()
    try:
      if not read_only:
        _barrier("open")
      if not exists:
        self._initialize()
      self._version, self._spec, self._skeleton = store_format.read_info(
          info_path)
      # A writable open holds the lock, so every temporary directory left is
      # a dead writer's: orbax removes them.
      options = ocp.CheckpointManagerOptions(
          max_to_keep=None, enable_async_checkpointing=True, create=False,
          read_only=read_only, cleanup_tmp_directories=not read_only,
          lightweight_initialize=True, save_root_metadata=False)
      self._manager = ocp.CheckpointManager(
          self._directory, options=options,
          item_names=(_PARAMS, _METADATA, _CHECKSUMS))
    except BaseException:
      self._release_lock()
      raise
    self._closed = False
    self._in_flight = None  # the step of the last save started

  def _check_can_create(self, create: bool) -> None:
    """Raises unless `directory` (without a store file) may become a store.

    Runs on every process before the "open" barrier, so that all of them
    see the directory as it was before process 0 writes to it.
    """
    where = f"TrajectoryStore({str(self._directory)!r})"
    if self._directory.exists():
      entries = sorted(p.name for p in self._directory.iterdir()
                       if p.name != LOCK_FILE)
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

  def _take_lock(self) -> None:
    """Process 0 locks a local store; every process raises if it failed."""
    error = None
    if jax.process_index() == 0 and "://" not in str(self._directory):
      try:
        os.makedirs(self._directory, exist_ok=True)
        self._lock = lock_lib.FileLock(self._directory / LOCK_FILE,
                                       what=repr(self))
      except lock_lib.LockedError as e:
        error = e
    if jax.process_count() > 1:
      failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
      if failed and error is None:
        self._release_lock()
        raise lock_lib.LockedError(
            f"{self!r}: process 0 could not lock the store; see its error.")
    if error is not None:
      raise error

  def _release_lock(self) -> None:
    if self._lock is not None:
      self._lock.release()
      self._lock = None

  def _initialize(self) -> None:
    """Makes `directory` an empty store (process 0 writes), then syncs."""
    if jax.process_index() == 0:
      self._directory.mkdir(parents=True, exist_ok=True)
      store_format.write_info(self._directory)
    _barrier("init")

  @property
  def directory(self) -> epath.Path:
    return self._directory

  @property
  def chunk_bytes(self) -> int:
    """The largest stored chunk, and the checksums' block size, of a save."""
    return self._chunk_bytes

  @property
  def spec(self) -> tree_lib.ParamSpec | None:
    """The recorded parameter spec (None before the first snapshot)."""
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
      self._finish()  # done: raises if the save failed
    return sorted(int(s) for s in self._manager.all_steps())

  def save(self, step: int, params: PyTree, *,
           metadata: dict[str, Any] | None = None) -> bool:
    """Starts an asynchronous, atomic save of `params` as snapshot `step`.

    Returns after the arrays are copied to host (the caller may donate or
    overwrite them); the files are written in the background.

    Args:
      step: a non-negative integer not yet in the store.
      params: the parameter pytree (or `nnx.State`); the first snapshot fixes
        the parameter spec.
      metadata: a small JSON-serializable dict (epoch, learning rate, loss).

    Returns:
      True if a save was started; False if `step` already holds a snapshot
      bit-identical to `params` (a no-op, as when a preempted job redoes a
      step; the stored metadata is kept).

    Raises:
      ValueError: the store is read-only; `step` is negative or holds
        different parameters; the structure or a shape differs from the
        store's parameter spec (the leaf is named).
      TypeError: a node of `params` is not a dict, list, tuple or None, a
        leaf is not floating point or its dtype differs from the spec, or
        `metadata` is not JSON-serializable.
      StoreWriteError: writing this or the previous snapshot failed.
    """
    self._check_open()
    if self._read_only:
      raise ValueError(
          f"save(step={step}): the store {str(self._directory)!r} is "
          "open read-only.")
    step = _check_step(step, "save")
    what = f"save(step={step})"
    nnx = sys.modules.get("flax.nnx")  # only present if the caller uses NNX
    if nnx is not None and isinstance(params, nnx.State):
      params = nnx.to_pure_dict(params)
    skeleton = store_format.skeleton_of(params, what)
    if self._spec is None:
      spec = tree_lib.ParamSpec.of(params, what=what)
      if not spec.num_params:
        raise ValueError(f"{what}: the parameter tree has no entries.")
    else:
      spec = self._spec
      spec.check(params, what=what, check_dtypes=True)
    metadata = {} if metadata is None else metadata
    try:
      json.dumps(metadata)
    except (TypeError, ValueError) as e:
      raise TypeError(
          f"{what}: metadata must be a JSON-serializable dict: {e}") from e
    if not isinstance(metadata, dict):
      raise TypeError(f"{what}: metadata must be a dict, got "
                      f"{type(metadata).__name__}.")
    self._finish()
    if step in self.steps():
      if _bit_identical(self.load(step), params):
        logging.info("%s: identical snapshot already stored; skipped.", what)
        return False
      raise ValueError(
          f"{what}: step {step} already holds a different snapshot in "
          f"{str(self._directory)!r}; snapshots are never overwritten.")
    if self._spec is None:
      if jax.process_index() == 0:
        store_format.write_info(self._directory, spec, skeleton)
      self._spec, self._skeleton = spec, skeleton
    # orbax cannot save zero-size arrays; the spec restores them.
    leaves = [None if not size else
              leaf if isinstance(leaf, jax.Array) else np.array(leaf)
              for leaf, size in zip(jax.tree_util.tree_leaves(params),
                                    spec.sizes)]
    sums = [[] if leaf is None else checksums_lib.block_checksums(
        _host(leaf), self._chunk_bytes) for leaf in leaves]
    item = store_format.build(skeleton, iter(leaves), stored=True)
    save_args = store_format.build(skeleton, iter(
        [ocp.SaveArgs(chunk_byte_size=self._chunk_bytes) if size else None
         for size in spec.sizes]), stored=True)
    self._in_flight = step
    try:
      self._manager.save(step, args=ocp.args.Composite(**{
          _PARAMS: ocp.args.PyTreeSave(item, save_args=save_args),
          _METADATA: ocp.args.JsonSave(metadata),
          _CHECKSUMS: ocp.args.JsonSave(
              {"block_bytes": self._chunk_bytes, "leaves": sums})}),
                         force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._raise_write_error(e)
    return True

  def _finish(self) -> None:
    """Waits for the save in flight; raises `StoreWriteError` if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._raise_write_error(e)
    self._in_flight = None

  def _raise_write_error(self, error: Exception) -> None:
    step, self._in_flight = self._in_flight, None
    raise StoreWriteError(
        f"save(step={step}): writing the snapshot to "
        f"{str(self._directory)!r} failed: {_root_cause(error)}. The "
        "snapshots stored before it are intact.") from error

  def load(self, step: int) -> PyTree:
    """The snapshot at `step`: the recorded structure, numpy array leaves.

    Raises:
      ValueError: `step` is not stored; the stored snapshot does not match
        the spec or cannot be read.
      checksums.ChecksumError: the stored bytes are corrupted.
    """
    self._check_open()
    step = self._existing(step, "load")
    spec, what = self._spec, f"load(step={step})"
    restore_args = store_format.build(self._skeleton, iter(
        [ocp.RestoreArgs(restore_type=np.ndarray) if size else None
         for size in spec.sizes]), stored=True)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          _PARAMS: ocp.args.PyTreeRestore(restore_args=restore_args)}))
    except json.JSONDecodeError as e:
      raise ValueError(f"{what}: cannot read the stored snapshot: a "
                       f"metadata file is not valid JSON (truncated?): {e}"
                       ) from e
    except (KeyError, IndexError, TypeError, ValueError) as e:
      raise ValueError(f"{what}: the stored snapshot does not match the "
                       f"store's parameter spec: {e}") from e
    leaves = store_format.stored_leaves(self._skeleton, restored[_PARAMS],
                                        what)
    leaves = [np.zeros(shape, dtype) if leaf is None and not size else leaf
              for leaf, shape, dtype, size in zip(
                  leaves, spec.shapes, spec.dtypes, spec.sizes)]
    tree = store_format.build(self._skeleton, iter(leaves), stored=False)
    spec.check(tree, what=what, check_dtypes=True)
    block_bytes, sums = self._checksums(step, what)
    if sums is not None:
      for leaf, name, expected in zip(leaves, spec.paths, sums):
        checksums_lib.verify(leaf, block_bytes, expected, 0,
                             f"{what}: leaf {name}")
    return tree

  def metadata(self, step: int) -> dict[str, Any]:
    """The metadata dict saved with snapshot `step`."""
    self._check_open()
    step = self._existing(step, "metadata")
    return dict(self._restore_json(step, _METADATA,
                                   f"metadata(step={step})") or {})

  def _restore_json(self, step: int, item: str, what: str) -> Any:
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          item: ocp.args.JsonRestore()}))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise ValueError(f"{what}: cannot read the stored {item} (truncated "
                       f"or missing?): {e}") from e
    return restored[item]

  def _checksums(self, step: int, what: str
                 ) -> tuple[int, list[list[int]] | None]:
    """(block bytes, per-leaf block checksums) of `step`; None for a
    version-1 store (none recorded)."""
    if self._version < 2:
      return 0, None
    recorded = self._restore_json(step, _CHECKSUMS, what)
    if (not isinstance(recorded, dict)
        or len(recorded.get("leaves", ())) != len(self._spec.paths)):
      raise ValueError(f"{what}: the stored checksums do not "
                       "match the store's parameter spec.")
    return int(recorded["block_bytes"]), recorded["leaves"]

  def read_matrix(self, steps: Sequence[int] | None = None
                  ) -> tuple[tree_lib.ParamSpec, np.ndarray]:
    """The parameter spec and the n x D float32 snapshot matrix, one row per
    step.

    Snapshots are read one at a time into the preallocated matrix, so peak
    host memory is the matrix plus about one snapshot.

    Args:
      steps: the steps to read, in this order (default: all, sorted).

    Raises:
      ValueError: no snapshots, a step is missing or repeated, or a snapshot
        differs from the spec or holds NaN/Inf (the step and leaf named).
      checksums.ChecksumError: stored bytes are corrupted.
    """
    spec, view = self._columns(steps, "read_matrix")
    return spec, view[:, :]

  def columns(self, steps: Sequence[int] | None = None
              ) -> tuple[tree_lib.ParamSpec, ColumnView]:
    """The parameter spec and the snapshot matrix as a lazy `ColumnView`.

    Nothing is read but the snapshots' metadata and checksums, which are
    checked against the spec here; `view[:, start:stop]` then reads only the
    stored chunks holding columns [start, stop) of each snapshot.

    Args:
      steps: the steps, in this order (default: all, sorted).

    Raises:
      ValueError: as `read_matrix`; NaN/Inf and corruption are found when a
        slice is read.
    """
    return self._columns(steps, "columns")

  def _columns(self, steps: Sequence[int] | None, what: str
               ) -> tuple[tree_lib.ParamSpec, ColumnView]:
    self._check_open()
    self._finish()
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
    context = column_reader.new_context()
    stored, block_bytes = [], None
    for s in steps:
      block_bytes, leaves = self._stored_leaves(s, f"{what}(step={s})",
                                                context)
      stored.append(leaves)
    return self._spec, ColumnView(self._spec.paths, self._spec.shapes, steps,
                                  stored, context, what, block_bytes)

  def _stored_leaves(self, step: int, what: str, context
                     ) -> tuple[int, list[column_reader.StoredLeaf]]:
    """Read specs and checksums of snapshot `step`'s leaves, from its
    orbax metadata, checked against the spec."""
    directory = ocp.step.build_step_path(
        self._directory, ocp.step.standard_name_format(), step) / _PARAMS
    item = column_reader.StoredItem.open(directory, what)
    arrays = store_format.stored_leaves(self._skeleton, item.tree, what)
    spec = self._spec
    shapes = []
    for array, name, shape, dtype, size in zip(
        arrays, spec.paths, spec.shapes, spec.dtypes, spec.sizes):
      if array is None and size:
        raise ValueError(f"{what}: leaf {name} is not stored.")
      shapes.append(np.zeros(shape, dtype) if array is None else
                    jax.ShapeDtypeStruct(array.shape, array.dtype))
    spec.check(store_format.build(self._skeleton, iter(shapes), stored=False),
               what=what, check_dtypes=True)
    block_bytes, sums = self._checksums(step, what)
    sums = [None] * len(arrays) if sums is None else sums
    return block_bytes, [column_reader.StoredLeaf(
        None if array is None else item.read_spec(array, context), s)
                         for array, s in zip(arrays, sums)]

  def wait_until_finished(self) -> None:
    """Blocks until the save in flight (if any) is on disk.

    Raises:
      StoreWriteError: the save failed (naming its step and the directory).
    """
    self._check_open()
    self._finish()

  def close(self) -> None:
    """Waits for the save in flight, releases orbax' resources and the lock.

    Raises:
      StoreWriteError: the save in flight failed (the store is closed).
    """
    if not self._closed:
      self._closed = True
      try:
        self._finish()
      finally:
        self._manager.close()
        self._release_lock()

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
      self._finish()
      available = self.steps()
    if step not in available:
      raise ValueError(
          f"{what}: step {step} is not in the store "
          f"{str(self._directory)!r}; stored steps: {_short(available)}.")
    return step


def _host(leaf: jax.Array | np.ndarray) -> np.ndarray:
  """The whole value of `leaf` in this process' host memory (a sharded leaf
  of a multi-host run is gathered from every process)."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
  return np.asarray(leaf)


def _root_cause(error: BaseException) -> str:
  """One line: the innermost OS error of `error`'s chain (as Python or
  TensorStore reports it), else the innermost message."""
  chain = [error]
  while chain[-1].__cause__ or chain[-1].__context__:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  for e in reversed(chain):
    if isinstance(e, OSError) and e.errno:
      return f"[Errno {e.errno}] {os.strerror(e.errno)}"
    code = re.search(r"os_error_code='(\d+)'", str(e))
    if code:
      return f"[Errno {code[1]}] {os.strerror(int(code[1]))}"
  lines = str(chain[-1]).strip().splitlines() or [type(chain[-1]).__name__]
  return lines[0][:300]


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


def _bit_identical(a: PyTree, b: PyTree) -> bool:
  return all(
      np.asarray(x).tobytes() == np.asarray(jax.device_get(y)).tobytes()
      for x, y in zip(jax.tree_util.tree_leaves(a),
                      jax.tree_util.tree_leaves(b)))
