"""Hypothesis strategies for random parameter pytrees and snapshot sets.

Importable from any test module (`import strategies`): pytest puts `tests/`
on `sys.path`. Trees are generated as a *layout* (nested dicts, lists and
tuples of leaf shapes and dtypes), then filled from a numpy seed. Every
layout is padded with one extra leaf to a total size in `SIZES`, so that the
jitted orthonormalizer, which compiles per (n, D), sees only a few shapes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

PyTree = Any
SIZES = (64, 256)  # total parameter counts D after padding
NUM_SNAPSHOTS = (1, 2, 3, 5, 8)  # n of generated snapshot sets
LEAF_SHAPES = ((), (0,), (1,), (3,), (2, 3), (4, 0), (2, 2, 2), (7,), (4, 5))
DTYPES = (jnp.float32, jnp.bfloat16)


@dataclasses.dataclass(frozen=True)
class Leaf:
  """A leaf placeholder in a generated layout."""

  shape: tuple[int, ...]
  dtype: Any = jnp.float32


def _keys():
  return st.text(alphabet="abcdefgh_", min_size=1, max_size=4)


def layouts(dtypes=(jnp.float32,), max_leaves: int = 8) -> st.SearchStrategy:
  """Nested dicts/lists/tuples of `Leaf`s, padded to a size in `SIZES`."""
  leaf = st.builds(Leaf, st.sampled_from(LEAF_SHAPES), st.sampled_from(dtypes))
  tree = st.recursive(
      leaf,
      lambda children: st.one_of(
          st.lists(children, min_size=1, max_size=3),
          st.lists(children, min_size=1, max_size=3).map(tuple),
          st.dictionaries(_keys(), children, min_size=1, max_size=3)),
      max_leaves=max_leaves)
  return st.one_of(tree, flax_layouts(dtypes)).flatmap(
      lambda t: st.sampled_from(dtypes).map(lambda d: _pad(t, d)))


def flax_layouts(dtypes=(jnp.float32,)) -> st.SearchStrategy:
  """Linen-style `{'params': {'Dense_i': {'kernel', 'bias'}}}` layouts."""
  def build(widths, dtype):
    layers = {}
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
      layers[f"Dense_{i}"] = {"kernel": Leaf((a, b), dtype),
                              "bias": Leaf((b,), dtype)}
    return {"params": layers}
  return st.builds(build, st.lists(st.integers(1, 5), min_size=2, max_size=4),
                   st.sampled_from(dtypes))


def _size(layout) -> int:
  return sum(math.prod(l.shape) for l in
             jax.tree_util.tree_leaves(layout, is_leaf=_is_leaf))


def _is_leaf(x) -> bool:
  return isinstance(x, Leaf)


def _pad(layout, dtype):
  """Adds one leaf (possibly empty) so the total size is in `SIZES`."""
  size = _size(layout)
  target = min(s for s in SIZES if s >= size)
  pad = Leaf((target - size,), dtype)
  if isinstance(layout, dict):
    return {**layout, "zpad": pad}
  if isinstance(layout, list):
    return layout + [pad]
  if isinstance(layout, tuple):
    return layout + (pad,)
  return (layout, pad)


def fill(layout, vector: np.ndarray) -> PyTree:
  """A tree of `layout` whose flattened leaves are `vector` (cast per leaf)."""
  leaves, treedef = jax.tree_util.tree_flatten(layout, is_leaf=_is_leaf)
  out, offset = [], 0
  for leaf in leaves:
    size = math.prod(leaf.shape)
    values = vector[offset:offset + size].reshape(leaf.shape)
    out.append(jnp.asarray(values.astype(leaf.dtype)))  # host cast: no compile
    offset += size
  return jax.tree_util.tree_unflatten(treedef, out)


def flat(tree: PyTree) -> np.ndarray:
  """All leaves of `tree` raveled into one float64 numpy vector."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return np.zeros((0,))
  return np.concatenate([np.asarray(l).astype(np.float64).ravel() for l in leaves])


def basis_rows(basis) -> np.ndarray:
  """The basis rows P^T (dim x D, float64), after checking that any padding
  rows and columns of the stored vectors are zero."""
  vectors = np.asarray(basis.read_vectors(), np.float64)
  d = basis.num_params
  assert not vectors[basis.dim:].any() and not vectors[:, d:].any()
  return vectors[:basis.dim, :d]


@dataclasses.dataclass
class SnapshotSet:
  """Generated snapshots with what is known about them."""

  layout: Any
  kind: str
  matrix: np.ndarray  # n x D float64: the snapshots as stored (after rounding)
  snapshots: list

  @property
  def n(self) -> int:
    return self.matrix.shape[0]


def _matrix(kind: str, n: int, d: int, rng: np.random.Generator) -> np.ndarray:
  if kind == "random":
    return rng.normal(size=(n, d))
  if kind == "trajectory":
    # w_i = w_0 + small drift; consecutive cosine similarity above 0.999.
    w0 = rng.normal(size=d)
    steps = rng.normal(size=(n, d)) * (0.02 / math.sqrt(d)) * np.linalg.norm(w0)
    steps[0] = 0.0
    return w0 + np.cumsum(steps, axis=0)
  if kind == "deficient":
    # Duplicates and exact linear combinations of a few independent rows.
    rank = max(1, n // 2)
    base = rng.normal(size=(rank, d))
    mix = rng.normal(size=(n - rank, rank))
    mix[rng.random(mix.shape) < 0.5] = 0.0  # many rows are (scaled) copies
    rows = np.concatenate([base, mix @ base])
    return rows[rng.permutation(n)]
  raise ValueError(kind)


KINDS = ("random", "trajectory", "deficient")


def fixed_layouts() -> st.SearchStrategy:
  """A few fixed float32 layouts (nested containers, scalar and empty leaves,
  a flax-style dict), for tests that jit per layout."""
  nested = {"a": [Leaf((2, 3)), (Leaf(()), Leaf((0,)))], "b": {"c": Leaf((4,))}}
  flax_style = {"params": {"Dense_0": {"kernel": Leaf((3, 4)), "bias": Leaf((4,))},
                           "Dense_1": {"kernel": Leaf((4, 2)), "bias": Leaf((2,))}}}
  return st.sampled_from([_pad(nested, jnp.float32),
                          _pad(flax_style, jnp.float32),
                          _pad(Leaf((5, 2)), jnp.float32)])


def snapshot_sets(dtypes=(jnp.float32,), kinds=KINDS,
                  layout_strategy=None) -> st.SearchStrategy:
  """Random `SnapshotSet`s over random layouts (or `layout_strategy`'s)."""
  def build(layout, kind, n, seed):
    d = _size(layout)
    rng = np.random.default_rng(seed)
    rows = _matrix(kind, n, d, rng)
    snapshots = [fill(layout, row) for row in rows]
    matrix = np.stack([flat(s) for s in snapshots])
    return SnapshotSet(layout, kind, matrix, snapshots)
  if layout_strategy is None:
    layout_strategy = layouts(dtypes)
  return st.builds(build, layout_strategy, st.sampled_from(kinds),
                   st.sampled_from(NUM_SNAPSHOTS), st.integers(0, 2**32 - 1))
