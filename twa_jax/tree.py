"""Parameter-tree layout: validation, flattening to one vector and back.

A :class:`ParamSpec` records the structure, leaf paths, shapes and dtypes of a
parameter pytree. It is hashable, so it can be a static field of a jitted
pytree, and all of its checks run at trace time (they cost nothing per step).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """Structure, leaf paths, shapes and dtypes of a parameter pytree.

  Trees are matched leaf by leaf on their paths (`jax.tree_util.keystr`), so
  containers that flatten to the same paths agree: an `nnx.State` and the
  pure dict of the same model, a tree whose untrained leaves `optax.masked`
  replaced by `optax.MaskedNode`. A spec built with `trainable` covers only
  the trained leaves and records the others as `frozen`: a tree may carry
  them (they get a zero update) or leave them out.

  Attributes:
    treedef: structure of the spanned leaves (frozen leaves read as None).
    paths: the spanned leaves' paths, in flattening order.
    shapes: their shapes.
    dtypes: their dtypes.
    frozen: paths of leaves the basis leaves out (untrained).
  """

  treedef: jax.tree_util.PyTreeDef
  paths: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[np.dtype, ...]
  frozen: tuple[str, ...] = ()

  @classmethod
  def of(cls, tree: PyTree, *, what: str = "parameters",
         trainable: PyTree | Callable[[str], bool] | None = None) -> ParamSpec:
    """Reads the layout of `tree`; every spanned leaf must be floating point.

    Args:
      tree: a parameter pytree.
      what: how errors name `tree`.
      trainable: which leaves the basis spans: None (all), a pytree of bools
        with the structure of `tree` or a prefix of it (an `optax.masked`
        mask; for a mask function pass `mask_fn(params)`), or a predicate on
        the leaf path string (e.g. ``lambda path: "head" in path``).

    Raises:
      TypeError: a spanned leaf is not floating point; a dict mixes key types.
      ValueError: `trainable` does not fit `tree`, or selects no leaf.
    """
    named, treedef = _flatten(tree, what)
    flags = _trainable_flags(tree, named, trainable, what)
    if trainable is not None and not any(flags):
      raise ValueError(f"{what}: `trainable` selects none of the "
                       f"{len(named)} leaves.")
    paths, shapes, dtypes, frozen = [], [], [], []
    for (name, leaf), keep in zip(named, flags):
      if not keep:
        frozen.append(name)
        continue
      dtype = _dtype(leaf)
      if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{what}: leaf {name} has dtype {dtype}; only floating-point "
            "leaves can be averaged (keep integer state out of the tree, or "
            "leave it out of the basis with `trainable`).")
      paths.append(name)
      shapes.append(tuple(int(d) for d in np.shape(leaf)))
      dtypes.append(dtype)
    if frozen:
      treedef = jax.tree_util.tree_structure(jax.tree_util.tree_unflatten(
          treedef, [leaf if keep else None
                    for (_, leaf), keep in zip(named, flags)]))
    return cls(treedef, tuple(paths), tuple(shapes), tuple(dtypes),
               tuple(frozen))

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
    """Returns the spanned leaves of `tree`, in this spec's order.

    Raises:
      ValueError: a spanned leaf is missing, a leaf is neither spanned nor
        frozen, or a leaf shape differs (the leaf and both sides are named).
      TypeError: a leaf is not floating point, or (with `check_dtypes`) its
        dtype differs.
    """
    return self.select(tree, what=what, check_dtypes=check_dtypes)[0]

  def select(self, tree: PyTree, *, what: str = "tree",
             check_dtypes: bool = False
             ) -> tuple[list[jax.Array], Callable[[Sequence[jax.Array]], PyTree]]:
    """The spanned leaves of `tree` and the inverse that puts leaves back.

    Returns:
      The spanned leaves in this spec's order, and a function from such a
      list to a tree with the structure of `tree` (the unwrapped one, for
      NNX Variables), whose frozen leaves are zeros.

    Raises:
      As :meth:`check`.
    """
    named, treedef = _flatten(tree, what)
    if treedef == self.treedef:  # same structure: leaves match by position
      named = [(name, leaf) for name, (_, leaf) in zip(self.paths, named)]
    position = {name: i for i, (name, _) in enumerate(named)}
    frozen = set(self.frozen)
    for name, leaf in named:
      if name not in self._index and name not in frozen:
        raise ValueError(
            f"{what}: unexpected leaf {name} (shape {np.shape(leaf)}, dtype "
            f"{_dtype(leaf)}): the basis spans {len(self.paths)} leaves "
            f"({_listing(self.paths)}) and freezes {_listing(self.frozen)}; "
            "build the basis with `trainable=` to leave a leaf out.")
    leaves = []
    for name, shape, dtype in zip(self.paths, self.shapes, self.dtypes):
      if name not in position:
        masked = " (masked out, e.g. by optax.masked: build the basis with " \
                 "`trainable=` the same mask)" if _has_masked_node(tree) else ""
        raise ValueError(
            f"{what}: missing leaf {name}: the basis spans it (shape {shape}, "
            f"dtype {np.dtype(dtype).name}) but the tree has no such "
            f"leaf{masked}.")
      leaf = named[position[name]][1]
      leaf_shape, leaf_dtype = tuple(np.shape(leaf)), _dtype(leaf)
      if leaf_shape != shape:
        raise ValueError(
            f"{what}: leaf {name} has shape {leaf_shape}, expected {shape} "
            "(the basis' parameters).")
      if not jnp.issubdtype(leaf_dtype, jnp.floating):
        raise TypeError(
            f"{what}: leaf {name} has non-float dtype {leaf_dtype}.")
      if check_dtypes and leaf_dtype != dtype:
        raise TypeError(
            f"{what}: leaf {name} has dtype {leaf_dtype}, expected "
            f"{np.dtype(dtype).name} (the basis' parameters).")
      leaves.append(leaf)

    def place(new_leaves: Sequence[jax.Array]) -> PyTree:
      out = [new_leaves[self._index[name]] if name in self._index
             else jnp.zeros_like(leaf) for name, leaf in named]
      return jax.tree_util.tree_unflatten(treedef, out)

    return leaves, place

  def mask(self, tree: PyTree) -> PyTree:
    """A pytree of bools shaped like `tree` (NNX Variables unwrapped): True
    at the leaves this spec spans, e.g. an `optax.masked` mask."""
    named, treedef = _flatten(tree, "mask")
    return jax.tree_util.tree_unflatten(
        treedef, [name in self._index for name, _ in named])

  @functools.cached_property
  def _index(self) -> dict[str, int]:
    return {name: i for i, name in enumerate(self.paths)}

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


def _flatten(tree: PyTree, what: str) -> tuple[list[tuple[str, Any]], Any]:
  """(path string, leaf) pairs of `tree` and its treedef, with clear errors."""
  try:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(_unwrap(tree))
  except (TypeError, ValueError) as e:  # jax wraps the sort's TypeError
    mixed = _mixed_key_dict(tree, ())
    if mixed is None:
      raise
    path, kinds = mixed
    raise TypeError(
        f"{what}: the dict at {jax.tree_util.keystr(path) or '<root>'} mixes "
        f"key types ({', '.join(kinds)}); JAX sorts dict keys, so use keys "
        "of one type (e.g. all str).") from e
  return [(jax.tree_util.keystr(p) or "<root>", leaf) for p, leaf in leaves], treedef


def _mixed_key_dict(node, path) -> tuple[tuple, list[str]] | None:
  """Path and key type names of the first dict in `node` with unsortable keys."""
  if isinstance(node, Mapping):
    kinds = sorted({type(k).__name__ for k in node})
    if len(kinds) > 1:
      return path, kinds
    children = [(jax.tree_util.DictKey(k), v) for k, v in node.items()]
  elif isinstance(node, (list, tuple)):
    children = [(jax.tree_util.SequenceKey(i), v) for i, v in enumerate(node)]
  else:
    return None
  for key, child in children:
    found = _mixed_key_dict(child, path + (key,))
    if found is not None:
      return found
  return None


def _trainable_flags(tree: PyTree, named, trainable, what: str) -> list[bool]:
  """One bool per leaf of `tree`: whether the basis spans it."""
  if trainable is None:
    return [True] * len(named)
  if callable(trainable):
    return [bool(trainable(name)) for name, _ in named]
  try:
    full = jax.tree.map(lambda flag, sub: jax.tree.map(lambda _: flag, sub),
                        trainable, _unwrap(tree))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{what}: the `trainable` mask does not fit the tree "
                     f"(it must have its structure or a prefix of it): {e}"
                     ) from e
  return [bool(flag) for flag in jax.tree_util.tree_leaves(full)]


def _has_masked_node(tree: PyTree) -> bool:
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  return any(is_masked(x) for x in jax.tree_util.tree_leaves(
      tree, is_leaf=is_masked))


def _listing(paths: Sequence[str]) -> str:
  if not paths:
    return "none"
  return ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def _dtype(leaf) -> np.dtype:
  """The dtype of an array or Python scalar leaf (without converting arrays)."""
  return np.dtype(leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf))


def stack_snapshots(snapshots: Sequence[PyTree] | Iterator[PyTree] | PyTree, *,
                    trainable: PyTree | Callable[[str], bool] | None = None
                    ) -> tuple[ParamSpec, np.ndarray]:
  """Validates snapshots and returns their layout and the n x D float32 matrix.

  Args:
    snapshots: a non-empty list, tuple or iterator (e.g. a generator) of
      parameter pytrees with identical structure, shapes and dtypes, or one
      pytree (not itself a list or tuple) whose leaves carry a leading axis n.
    trainable: the leaves to span (see `ParamSpec.of`); the others are left
      out of the matrix and recorded as frozen.

  Returns:
    The layout of one snapshot and the host matrix W (n x D, float32, one row
    per snapshot), filled row by row.
  """
  if isinstance(snapshots, Iterator):
    snapshots = tuple(snapshots)
  spec, n, rows = snapshot_rows(snapshots, trainable=trainable)
  matrix = np.empty((n, spec.num_params), np.float32)
  for i, row in enumerate(rows):
    matrix[i] = row
  return spec, matrix


def snapshot_rows(snapshots: Sequence[PyTree] | Iterator[PyTree] | PyTree, *,
                  trainable: PyTree | Callable[[str], bool] | None = None
                  ) -> tuple[ParamSpec, int | None, Iterator[np.ndarray]]:
  """The snapshots one at a time: their layout and flattened rows.

  Only one snapshot's row is held at a time: an iterator (e.g. a generator
  loading each snapshot from a store) is read as the rows are consumed.

  Args:
    snapshots, trainable: as for `stack_snapshots`.

  Returns:
    The layout of one snapshot (read from the first), the number of
    snapshots (None for an iterator) and an iterator over their rows (D
    float32 each), each checked against the layout and for NaN/Inf as it is
    produced (errors name the snapshot's index and the leaf).
  """
  if isinstance(snapshots, Iterator):
    n, trees = None, snapshots
  elif isinstance(snapshots, (list, tuple)):
    n, trees = len(snapshots), iter(snapshots)
  else:
    n, trees = _stacked_trees(snapshots)
  first = next(trees, None)
  if first is None:
    raise ValueError("snapshots: got an empty sequence; need at least one.")
  spec = ParamSpec.of(first, what="snapshot 0", trainable=trainable)
  trees = itertools.chain([first], trees)
  del first  # the chain drops it once read
  return spec, n, (flatten_snapshot(spec, s, what=f"snapshot {i}")
                   for i, s in enumerate(trees))


def _stacked_trees(snapshots: PyTree) -> tuple[int, Iterator[PyTree]]:
  """n and the snapshots of one tree whose leaves carry a leading axis n."""
  named, treedef = _flatten(snapshots, "snapshots")
  if not named:
    raise ValueError("snapshots: the tree has no leaves.")
  leading = {name: int(np.shape(leaf)[0]) if np.ndim(leaf) else None
             for name, leaf in named}
  counts = set(leading.values())
  if len(counts) != 1 or None in counts:
    sizes = ", ".join(f"{name}: {'scalar' if n is None else n}"
                      for name, n in list(leading.items())[:4])
    raise ValueError(
        "snapshots: expected a list, tuple or iterator of parameter trees, "
        "or one tree whose leaves all carry the same leading axis n; got "
        f"{type(snapshots).__name__} with leading sizes {sizes}"
        + (" ..." if len(leading) > 4 else "") + ".")
  n = counts.pop()
  if n == 0:
    raise ValueError("snapshots: the stacked tree has n = 0 snapshots.")
  leaves = [leaf for _, leaf in named]
  return n, (jax.tree_util.tree_unflatten(treedef, [leaf[i] for leaf in leaves])
             for i in range(n))


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
