"""The orthonormal basis P of the span of weight snapshots, and its products.

P = [e_1..e_k] (D x k) is stored row-major as `vectors` (k x D): row i is
e_i, so P^T g is one matrix-vector product over contiguous rows and P beta
another. The rows live in `jax.Ref`s: a jitted step that closes over the
basis reads them in place, neither embedding P in the program as a constant
nor copying it per call. Build a basis with `twa_jax.basis_from_snapshots`
(or `basis_from_store`, `basis_from_matrix`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from twa_jax import kernels
from twa_jax import tree as tree_lib
from twa_jax.orthonormalize import Spectrum

PyTree = Any
Vectors = kernels.Vectors


class Layout(Protocol):
  """How a sharded basis computes its products (see `twa_jax.sharding`)."""

  def coordinates(self, vectors: Vectors, flat: jax.Array) -> jax.Array:
    ...

  def expand(self, vectors: Vectors, beta: jax.Array) -> jax.Array:
    ...

  def project(self, vectors: Vectors, flat: jax.Array) -> jax.Array:
    ...


def to_refs(vectors: Vectors) -> Vectors:
  """`vectors` with each array moved into a `jax.Ref` (the arrays deleted;
  Refs are kept as they are).

  `jax.new_ref` copies; each source is deleted right after its copy, so a
  second copy of P lives only while its Ref is filled.
  """
  def move(x: jax.Array | jax.Ref):
    if isinstance(x, jax.Ref):
      return x
    ref = jax.new_ref(x)
    x.delete()
    return ref
  return jax.tree.map(move, vectors)


def read(vectors: Vectors) -> Vectors:
  """The arrays behind `vectors` (inside jit: a read of the Refs in place)."""
  return jax.tree.map(lambda ref: ref[...], vectors)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["vectors"], meta_fields=["spec", "dim", "layout", "spectrum"])
@dataclasses.dataclass(frozen=True)
class Basis:
  """Orthonormal basis P of the span of weight snapshots.

  A pytree: `vectors` holds its only arrays (as `jax.Ref`s), so a `Basis`
  can be closed over by, or passed to, a jitted function; the parameter
  layout is static. Its methods work eagerly and inside `jax.jit`; a Basis
  is never returned from jit (Refs cannot be).

  Attributes:
    vectors: k x D basis rows (P^T) in `jax.Ref`s, in the storage dtype or,
      for "int8" / "int4", a `twa_jax.quantization.QuantizedVectors` of
      Refs; a sharded or quantized basis may carry padding rows and columns
      beyond `dim` and `num_params` (never reaching the results).
    spec: layout of the parameter tree the basis spans.
    dim: k, the number of basis vectors kept.
    layout: None for a single-device basis; a sharded layout from
      `twa_jax.sharding` otherwise.
    spectrum: the singular values of the snapshot matrix W and the cut-off
      that kept `dim` of them (None for a basis not built from snapshots).
  """

  vectors: Vectors
  spec: tree_lib.ParamSpec
  dim: int
  layout: Layout | None = None
  spectrum: Spectrum | None = None

  @property
  def num_params(self) -> int:
    """D, the number of parameters."""
    return self.spec.num_params

  @property
  def dropped(self) -> int:
    """Directions of the snapshots dropped (dependent or below the cut-off)."""
    return 0 if self.spectrum is None else self.spectrum.dropped

  @property
  def condition(self) -> float | None:
    """The condition number of the snapshot matrix W (inf: dependent rows)."""
    return None if self.spectrum is None else self.spectrum.condition

  @property
  def nbytes(self) -> int:
    """Bytes of the stored rows (codes, scales and offsets if quantized)."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(self.vectors))

  def read_vectors(self) -> Vectors:
    """A copy of the stored rows as arrays (for inspection and export)."""
    return read(self.vectors)

  def coordinates(self, tree: PyTree) -> jax.Array:
    """P^T w: the float32 coordinates (dim,) of a parameter-like tree."""
    return _coordinates(self, tree)

  def from_coordinates(self, beta: jax.Array) -> PyTree:
    """P beta as a parameter tree (the basis' dtypes)."""
    return _from_coordinates(self, beta)

  def project(self, tree: PyTree) -> PyTree:
    """P P^T g, with the structure and leaf dtypes of `tree`."""
    return _project(self, tree)


# The products run jitted with the basis as an argument: eagerly, P is then
# read in place (reading a Ref outside jit would copy it); inside a caller's
# jit they are inlined.


def _flat(basis: Basis, tree: PyTree, what: str) -> jax.Array:
  return basis.spec.ravel(tree, what=what, pad_to=basis.vectors.shape[1])


@jax.jit
def _coordinates(basis: Basis, tree: PyTree) -> jax.Array:
  flat = _flat(basis, tree, "coordinates")
  vectors = read(basis.vectors)
  if basis.layout is not None:
    return basis.layout.coordinates(vectors, flat)[:basis.dim]
  return kernels.matvec(vectors, flat)


@jax.jit
def _from_coordinates(basis: Basis, beta: jax.Array) -> PyTree:
  beta = jnp.asarray(beta, jnp.float32)
  if beta.shape != (basis.dim,):
    raise ValueError(
        f"from_coordinates: beta has shape {beta.shape}, expected ({basis.dim},).")
  vectors = read(basis.vectors)
  if basis.layout is not None:
    pad = vectors.shape[0] - basis.dim
    flat = basis.layout.expand(vectors, jnp.pad(beta, (0, pad)))
  else:
    flat = kernels.vecmat(beta, vectors)
  return basis.spec.unravel(flat)


@jax.jit
def _project(basis: Basis, tree: PyTree) -> PyTree:
  flat = _flat(basis, tree, "project")
  vectors = read(basis.vectors)
  if basis.layout is not None:
    out = basis.layout.project(vectors, flat)
  else:
    out = kernels.vecmat(kernels.matvec(vectors, flat), vectors)
  dtypes = [leaf.dtype for leaf in jax.tree_util.tree_leaves(tree)]
  return basis.spec.unravel(out, dtypes)
