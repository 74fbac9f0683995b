"""Parameter-tree layout: validation, flattening to one vector and back.

A :class:`ParamSpec` records the structure, leaf paths, shapes and dtypes of a
parameter pytree. It is hashable, so it can be a static field of a jitted
pytree, and all of its checks run at trace time (they cost nothing per step).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """Structure, leaf paths, shapes and dtypes of a parameter pytree."""

  treedef: jax.tree_util.PyTreeDef
  paths: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[np.dtype, ...]

  @classmethod
  def of(cls, tree: PyTree, *, what: str = "parameters") -> ParamSpec:
    """Reads the layout of `tree`; every leaf must be a floating-point array."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(_unwrap(tree))
    paths, shapes, dtypes = [], [], []
    for path, leaf in leaves:
      name = jax.tree_util.keystr(path) or "<root>"
      dtype = _dtype(leaf)
      if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{what}: leaf {name} has dtype {dtype}; only floating-point "
            "leaves can be averaged (keep integer state out of the tree).")
      paths.append(name)
      shapes.append(tuple(int(d) for d in np.shape(leaf)))
      dtypes.append(dtype)
    return cls(treedef, tuple(paths), tuple(shapes), tuple(dtypes))

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(math.prod(s) for s in self.shapes)

  @property
  def num_params(self) -> int:
    return sum(self.sizes)

  @property
  def eps(self) -> float:
    """Machine epsilon of the coarsest leaf dtype."""
    return max((float(jnp.finfo(d).eps) for d in self.dtypes), default=0.0)

  def check(self, tree: PyTree, *, what: str = "tree",
            check_dtypes: bool = False) -> list[jax.Array]:
    """Returns the leaves of `tree` after checking it matches this layout.

    Raises:
      ValueError: structure or a leaf shape differs (the leaf path is named).
      TypeError: a leaf is not floating point, or (with `check_dtypes`) its
        dtype differs.
    """
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(
        _unwrap(tree))
    if treedef != self.treedef:
      raise ValueError(
          f"{what}: tree structure differs from the basis' parameters: "
          f"{_structure_difference(self, leaves_with_path)}")
    leaves = []
    for (path, leaf), name, shape, dtype in zip(
        leaves_with_path, self.paths, self.shapes, self.dtypes):
      leaf_shape = tuple(np.shape(leaf))
      if leaf_shape != shape:
        raise ValueError(
            f"{what}: leaf {name} has shape {leaf_shape}, expected {shape}.")
      leaf_dtype = _dtype(leaf)
      if not jnp.issubdtype(leaf_dtype, jnp.floating):
        raise TypeError(
            f"{what}: leaf {name} has non-float dtype {leaf_dtype}.")
      if check_dtypes and leaf_dtype != dtype:
        raise TypeError(
            f"{what}: leaf {name} has dtype {leaf_dtype}, expected {dtype}.")
      leaves.append(leaf)
    return leaves

  def ravel(self, tree: PyTree, *, what: str = "tree",
            pad_to: int | None = None) -> jax.Array:
    """Flattens `tree` into one float32 vector of length `num_params`.

    With `pad_to`, zeros are appended up to that length (for sharded layouts).
    """
    leaves = self.check(tree, what=what)
    parts = [jnp.ravel(leaf).astype(jnp.float32) for leaf in leaves]
    if pad_to is not None and pad_to > self.num_params:
      parts.append(jnp.zeros((pad_to - self.num_params,), jnp.float32))
    if not parts:
      return jnp.zeros((0,), jnp.float32)
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]

  def unravel(self, vector: jax.Array,
              dtypes: Sequence[np.dtype] | None = None) -> PyTree:
    """Inverse of :meth:`ravel` (extra padding at the end is ignored)."""
    dtypes = self.dtypes if dtypes is None else dtypes
    offsets = np.cumsum((0,) + self.sizes)
    leaves = [
        vector[start:stop].reshape(shape).astype(dtype)
        for start, stop, shape, dtype in zip(
            offsets[:-1], offsets[1:], self.shapes, dtypes)
    ]
    return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _unwrap(tree: PyTree) -> PyTree:
  """Replaces flax NNX Variables by their values (`nnx.as_pure`).

  `nnx.Optimizer` initializes with an `nnx.State` of Variables and updates
  with the pure one; both must match the same layout.
  """
  nnx = sys.modules.get("flax.nnx")  # only present if the caller uses NNX
  return tree if nnx is None else nnx.as_pure(tree)


def _dtype(leaf) -> np.dtype:
  """The dtype of an array or Python scalar leaf (without converting arrays)."""
  return np.dtype(leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf))


def _structure_difference(spec: ParamSpec, leaves_with_path) -> str:
  got = [jax.tree_util.keystr(p) or "<root>" for p, _ in leaves_with_path]
  missing = [p for p in spec.paths if p not in got]
  extra = [p for p in got if p not in spec.paths]
  parts = []
  if missing:
    parts.append(f"missing leaf {missing[0]}"
                 + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  if extra:
    parts.append(f"unexpected leaf {extra[0]}"
                 + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
  return "; ".join(parts) or "same leaf paths but different container types"


def stack_snapshots(snapshots: Sequence[PyTree] | PyTree
                    ) -> tuple[ParamSpec, np.ndarray]:
  """Validates snapshots and returns their layout and the n x D float32 matrix.

  Args:
    snapshots: a non-empty list or tuple of parameter pytrees with identical
      structure, shapes and dtypes, or one pytree (not itself a list or
      tuple) whose leaves carry a leading axis n.

  Returns:
    The layout of one snapshot and the host matrix W (n x D, float32, one row
    per snapshot), filled row by row.
  """
  if isinstance(snapshots, (list, tuple)):
    if not snapshots:
      raise ValueError("snapshots: got an empty sequence; need at least one.")
    spec = ParamSpec.of(snapshots[0], what="snapshot 0")
    matrix = np.empty((len(snapshots), spec.num_params), np.float32)
    for i, snapshot in enumerate(snapshots):
      matrix[i] = flatten_snapshot(spec, snapshot, what=f"snapshot {i}")
    return spec, matrix
  leaves, treedef = jax.tree_util.tree_flatten(_unwrap(snapshots))
  if not leaves:
    raise ValueError("snapshots: the tree has no leaves.")
  counts = {int(np.shape(leaf)[0]) if np.ndim(leaf) else None for leaf in leaves}
  if len(counts) != 1 or None in counts:
    raise ValueError(
        "snapshots: a stacked tree needs the same leading axis n on every "
        f"leaf; got leading sizes {sorted(map(str, counts))}.")
  n = counts.pop()
  if n == 0:
    raise ValueError("snapshots: the stacked tree has n = 0 snapshots.")
  first = jax.tree_util.tree_unflatten(treedef, [leaf[0] for leaf in leaves])
  spec = ParamSpec.of(first, what="snapshots")
  matrix = np.empty((n, spec.num_params), np.float32)
  for i in range(n):
    row = jax.tree_util.tree_unflatten(treedef, [leaf[i] for leaf in leaves])
    matrix[i] = flatten_snapshot(spec, row, what=f"snapshot {i}")
  return spec, matrix


def flatten_snapshot(spec: ParamSpec, snapshot: PyTree, *,
                     what: str) -> np.ndarray:
  """Host-side flatten of one snapshot with exact-layout and finiteness checks."""
  leaves = spec.check(snapshot, what=what, check_dtypes=True)
  out = np.empty((spec.num_params,), np.float32)
  offset = 0
  for leaf, name, size in zip(leaves, spec.paths, spec.sizes):
    values = np.asarray(jax.device_get(leaf)).astype(np.float32).reshape(-1)
    if not np.all(np.isfinite(values)):
      raise ValueError(f"{what}: leaf {name} contains NaN or Inf.")
    out[offset:offset + size] = values
    offset += size
  return out
