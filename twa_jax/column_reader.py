"""Reads column ranges of stored snapshots straight from TensorStore.

The only code that uses orbax's lower-level type-handler API (the part most
likely to change with an orbax upgrade) is `StoredItem`: the leaves of one
orbax PyTree item on disk and the TensorStore spec that reads each.
`ColumnView` reads the n x D snapshot matrix by column ranges through it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from twa_jax import checksums as checksums_lib

PyTree = Any
ReadSpec = dict[str, Any]
# Chunk cache of a `ColumnView`: the boxes of one leaf read at once share
# the chunks at their edges, which are then fetched once.
_CACHE_BYTES = 16 << 20


def new_context() -> ts.Context:
  """A TensorStore context for one `ColumnView` (its own chunk cache)."""
  return ts.Context({"cache_pool": {"total_bytes_limit": _CACHE_BYTES}},
                    parent=ocp.type_handlers.get_ts_context())


@dataclasses.dataclass(frozen=True)
class StoredItem:
  """One orbax PyTree item on disk (e.g. ``<step>/params``).

  Attributes:
    directory: the item's directory.
    tree: the stored tree with a metadata leaf (`.shape`, `.dtype`) per
      array, as orbax describes it.
  """

  directory: epath.Path
  tree: PyTree
  use_zarr3: bool

  @classmethod
  def open(cls, directory: epath.Path, what: str) -> StoredItem:
    """Reads the item's metadata (not its arrays).

    Raises:
      ValueError: the item's metadata is missing or unreadable (e.g. a
        truncated ``_METADATA``), naming `what` and the directory.
    """
    handler = ocp.PyTreeCheckpointHandler()
    try:
      metadata = handler.metadata(directory)
    except (OSError, ValueError, KeyError, TypeError) as e:
      reason = ("its _METADATA is not valid JSON (truncated?)"
                if isinstance(e, json.JSONDecodeError) else str(e))
      raise ValueError(f"{what}: cannot read the stored item "
                       f"{str(directory)!r}: {reason}.") from e
    finally:
      handler.close()
    return cls(directory, metadata.tree, bool(metadata.use_zarr3))

  def read_spec(self, leaf: Any, context: ts.Context) -> ReadSpec:
    """The TensorStore spec that reads the array of metadata `leaf`."""
    use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(self.directory)
    return ocp.type_handlers.get_json_tspec_read(
        ocp.type_handlers.ParamInfo(
            name=leaf.name, parent_dir=self.directory,
            is_ocdbt_checkpoint=use_ocdbt, use_zarr3=self.use_zarr3,
            ts_context=context), use_ocdbt=use_ocdbt)


@dataclasses.dataclass(frozen=True)
class StoredLeaf:
  """Where one snapshot's leaf is stored and how to verify it.

  Attributes:
    spec: the TensorStore read spec (None: an empty leaf, not stored).
    checksums: the leaf's block checksums (None: not recorded).
  """

  spec: ReadSpec | None
  checksums: Sequence[int] | None = None


class ColumnView:
  """A snapshot matrix (n x D float32), read by column ranges.

  `view[rows, start:stop]` (rows: a slice) reads, of each snapshot, only the
  leaves overlapping columns [start, stop) and, within a leaf, only the
  boxes of its C-order entries in that range (widened to whole checksum
  blocks when checksums are recorded), hence only the stored chunks holding
  them (each once: the view keeps a small chunk cache). Each leaf read is
  verified against its checksums and checked for NaN/Inf (the step and leaf
  named). `view.leaves(indices)` is the view of some leaves' columns only
  (one block of a layer-wise basis).

  Attributes:
    steps: the snapshots' steps, one per row.
  """

  dtype = np.dtype(np.float32)

  def __init__(self, paths: Sequence[str],
               shapes: Sequence[tuple[int, ...]], steps: list[int],
               stored: list[list[StoredLeaf]], context: ts.Context,
               what: str, block_bytes: int | None = None):
    self.steps = steps
    self._paths = tuple(paths)
    self._shapes = tuple(shapes)
    self._stored = stored
    self._context = context
    self._what = what
    self._block_bytes = block_bytes
    self._offsets = np.cumsum([0] + [math.prod(s) for s in self._shapes])

  @property
  def shape(self) -> tuple[int, int]:
    return len(self.steps), int(self._offsets[-1])

  def leaves(self, indices: Sequence[int]) -> ColumnView:
    """The matrix of only the leaves `indices` (of this view, in that order):
    their columns side by side. Nothing is read."""
    indices = list(indices)
    return ColumnView([self._paths[i] for i in indices],
                      [self._shapes[i] for i in indices], self.steps,
                      [[row[i] for i in indices] for row in self._stored],
                      self._context, self._what, self._block_bytes)

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

  def read_leaf(self, r: int, i: int) -> np.ndarray:
    """Leaf `i` of snapshot row `r`, whole, in its stored dtype (verified,
    not checked for NaN/Inf)."""
    what = f"{self._what}(step={self.steps[r]})"
    size = math.prod(self._shapes[i])
    try:
      values, _ = self._read_leaves(r, [(i, 0, size)])[0]
    except checksums_lib.ChecksumError:
      raise  # names the step and leaf already
    except ValueError as e:
      raise ValueError(f"{what}: cannot read the stored snapshot: {e}") from e
    return values.reshape(self._shapes[i])

  def _read(self, r: int, start: int, stop: int, out: np.ndarray) -> None:
    """Columns [start, stop) of snapshot row `r` into `out`."""
    what = f"{self._what}(step={self.steps[r]})"
    offsets = self._offsets
    ranges = [(i, max(start, offsets[i]) - offsets[i],
               min(stop, offsets[i + 1]) - offsets[i])
              for i in range(len(self._shapes))]
    ranges = [(i, a, b) for i, a, b in ranges if a < b]
    try:
      reads = self._read_leaves(r, ranges)
    except checksums_lib.ChecksumError:
      raise  # names the step and leaf already
    except ValueError as e:
      raise ValueError(f"{what}: cannot read the stored snapshot: {e}") from e
    for (i, a, b), (values, lo) in zip(ranges, reads):
      at = offsets[i] + a - start
      out[at:at + b - a] = values[a - lo:b - lo]
      if not np.isfinite(out[at:at + b - a]).all():
        raise ValueError(
            f"{what}: leaf {self._paths[i]} contains NaN or Inf.")

  def _read_leaves(self, r: int, ranges: list[tuple[int, int, int]]
                   ) -> list[tuple[np.ndarray, int]]:
    """Entries [a, b) of each (leaf i, a, b), widened to whole checksum
    blocks and verified: (flat values in the stored dtype, their first
    entry). All leaves are opened, then all their boxes read, concurrently.
    """
    stored = [self._stored[r][i] for i, _, _ in ranges]
    opened = [ts.open(leaf.spec, context=self._context) for leaf in stored]
    widened = []
    for (i, a, b), leaf, array in zip(ranges, stored, opened):
      if leaf.checksums is not None:
        block = self._block_bytes // array.result().dtype.numpy_dtype.itemsize
        size = math.prod(self._shapes[i])
        a, b = a // block * block, min(-(-b // block) * block, size)
      widened.append((a, [array.result()[box].read() for box in flat_boxes(
          self._shapes[i], a, b)]))
    out = []
    for (i, _, _), leaf, (a, boxes) in zip(ranges, stored, widened):
      parts = [box.result().reshape(-1) for box in boxes]
      values = np.concatenate(parts) if len(parts) != 1 else parts[0]
      if leaf.checksums is not None:
        block = self._block_bytes // values.dtype.itemsize
        checksums_lib.verify(
            values, self._block_bytes, leaf.checksums, a // block,
            f"{self._what}(step={self.steps[r]}): leaf {self._paths[i]}")
      out.append((values, a))
    return out


def flat_boxes(shape: tuple[int, ...], start: int, stop: int
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
            for box in flat_boxes(shape[1:], a, b)]
  boxes = []
  if a:
    boxes += [(slice(first, first + 1),) + box
              for box in flat_boxes(shape[1:], a, inner)]
    first += 1
  if first < last:
    boxes.append((slice(first, last),) + (slice(None),) * (len(shape) - 1))
  return boxes + [(slice(last, last + 1),) + box
                  for box in flat_boxes(shape[1:], 0, b)]
