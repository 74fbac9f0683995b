"""Layer-wise coefficients: one orthonormal basis per block of leaves.

With `granularity="leaf"` every parameter leaf gets its own basis of the
snapshots restricted to that leaf (n coefficients per leaf instead of n in
all); a callable maps leaf paths to block names (e.g. one block per layer).
This is the journal version's layer-wise TWA (Li et al., arXiv 2205.13104).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from twa_jax import tree as tree_lib
from twa_jax.basis import Basis
from twa_jax.orthonormalize import EmptySpanError

PyTree = Any
Granularity = str | Callable[[str], str]


@runtime_checkable
class ColumnSource(Protocol):
  """An n x D snapshot matrix read by column ranges, without holding it.

  What `TrajectoryStore.columns` returns: `source[rows, start:stop]` reads
  those columns (a numpy array); `source.leaves(indices)` is the source of
  only those leaves' columns, side by side.
  """

  @property
  def shape(self) -> tuple[int, int]:
    ...

  def __getitem__(self, index: tuple[slice, slice]) -> np.ndarray:
    ...

  def leaves(self, indices: Sequence[int]) -> ColumnSource:
    ...


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["bases"], meta_fields=["spec", "names", "members"])
@dataclasses.dataclass(frozen=True)
class BlockBasis:
  """Block-diagonal basis: an independent `Basis` per block of leaves.

  Coordinates are a dict {block name: (k_b,) float32 array}; `project`,
  `coordinates` and `from_coordinates` mirror `Basis`, so the optax
  transformations accept either.

  Attributes:
    bases: one `Basis` per block, over that block's leaves (as a list).
    spec: layout of the whole parameter tree.
    names: the block names, in order.
    members: for each block, the indices of its leaves in `spec`.
  """

  bases: tuple[Basis, ...]
  spec: tree_lib.ParamSpec
  names: tuple[str, ...]
  members: tuple[tuple[int, ...], ...]

  @property
  def dims(self) -> dict[str, int]:
    return {name: b.dim for name, b in zip(self.names, self.bases)}

  @property
  def dim(self) -> int:
    """Total number of coefficients over all blocks."""
    return sum(b.dim for b in self.bases)

  @property
  def num_params(self) -> int:
    return self.spec.num_params

  @property
  def dropped(self) -> int:
    """Directions dropped over all blocks (see `Basis.dropped`)."""
    return sum(b.dropped for b in self.bases)

  @property
  def condition(self) -> float | None:
    """The largest condition number of a block's snapshot matrix."""
    known = [b.condition for b in self.bases if b.condition is not None]
    return max(known, default=None)

  def _blocks(self, tree: PyTree, what: str) -> list[list[jax.Array]]:
    leaves = self.spec.check(tree, what=what)
    return [[leaves[i] for i in idx] for idx in self.members]

  def _assemble(self, parts) -> PyTree:
    leaves = [None] * len(self.spec.paths)
    for idx, part in zip(self.members, parts):
      for i, leaf in zip(idx, part):
        leaves[i] = leaf
    return jax.tree_util.tree_unflatten(self.spec.treedef, leaves)

  def project(self, tree: PyTree) -> PyTree:
    """Block-wise P_b P_b^T g, with the structure and dtypes of `tree`."""
    return self._assemble(
        b.project(part) for b, part in zip(self.bases, self._blocks(
            tree, "project")))

  def coordinates(self, tree: PyTree) -> dict[str, jax.Array]:
    """{block name: P_b^T w_b}."""
    return {name: b.coordinates(part) for name, b, part in zip(
        self.names, self.bases, self._blocks(tree, "coordinates"))}

  def from_coordinates(self, beta: dict[str, jax.Array]) -> PyTree:
    """Sum of P_b beta_b as a parameter tree."""
    if set(beta) != set(self.names):
      raise ValueError(
          f"from_coordinates: expected blocks {sorted(self.names)}, "
          f"got {sorted(beta)}.")
    return self._assemble(
        b.from_coordinates(beta[name]) for name, b in zip(self.names, self.bases))


def block_names(spec: tree_lib.ParamSpec,
                granularity: Granularity) -> list[str]:
  """The block name of every leaf ("leaf": its path; callable: its value)."""
  if granularity == "leaf":
    return list(spec.paths)
  if callable(granularity):
    names = [granularity(path) for path in spec.paths]
    for path, name in zip(spec.paths, names):
      if not isinstance(name, str):
        raise TypeError(f"granularity: returned {name!r} for leaf {path}; "
                        "block names must be strings.")
    return names
  raise ValueError(f"granularity: expected 'global', 'leaf' or a callable "
                   f"from leaf path to block name, got {granularity!r}.")


def block_basis(spec: tree_lib.ParamSpec, matrix: np.ndarray | ColumnSource,
                granularity: Granularity,
                build: Callable[[tree_lib.ParamSpec, Any], Basis]
                ) -> BlockBasis:
  """Orthonormalizes the snapshot matrix block by block.

  Args:
    spec: the layout of one snapshot.
    matrix: W, n x D (host), one flattened snapshot per row: numpy or a
      `ColumnSource` such as a `TrajectoryStore.columns` view (with a mesh:
      each process reads only its devices' slices of each block's columns).
    granularity: "leaf" or a callable from leaf path to block name.
    build: the basis of one block from (its spec, its columns), e.g. a
      sharded one (see `twa_jax.build`).

  Returns:
    The block basis, blocks in order of first appearance. A block whose
    entries are zero in every snapshot (an empty leaf, a frozen zero bias)
    gets an empty basis: its updates are projected to zero (found on the
    devices, from the block's Gram matrix).
  """
  names = block_names(spec, granularity)
  order = list(dict.fromkeys(names))
  offsets = np.cumsum((0,) + spec.sizes)
  bases, members = [], []
  for name in order:
    idx = tuple(i for i, n in enumerate(names) if n == name)
    sub = tree_lib.ParamSpec(
        jax.tree_util.tree_structure([0] * len(idx)),
        tuple(spec.paths[i] for i in idx), tuple(spec.shapes[i] for i in idx),
        tuple(spec.dtypes[i] for i in idx))
    if isinstance(matrix, ColumnSource):
      columns = matrix.leaves(idx)
    else:
      columns = np.concatenate(
          [matrix[:, offsets[i]:offsets[i + 1]] for i in idx], axis=1)
    try:
      bases.append(build(sub, columns))
    except EmptySpanError:  # e.g. an empty leaf, or one that stays zero
      # No rows to keep in a Ref: an uncommitted empty array goes anywhere
      # (beside the blocks of a sharded basis too).
      bases.append(Basis(jnp.zeros((0, sub.num_params)), sub, 0))
    members.append(idx)
  return BlockBasis(tuple(bases), spec, tuple(order), tuple(members))
