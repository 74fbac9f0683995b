"""Orthonormal basis of the span of weight snapshots, and its orthonormalizer.

The basis P = [e_1..e_k] (D x k) is stored row-major as `vectors` (k x D):
row i is e_i, so P^T g is one matrix-vector product over contiguous rows and
P beta another. The orthonormalizer is a rank-revealing CholeskyQR2 on the
snapshot matrix W (n x D) with the small Gram matrices accumulated in float64;
see :func:`orthonormalize`.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from twa_jax import quantization
from twa_jax import tree as tree_lib

PyTree = Any
AxisName = str | tuple[str, ...]
Vectors = jax.Array | quantization.QuantizedVectors  # the stored basis rows
_CHUNK = 1 << 15  # columns per float64 Gram block: keeps the float64 copy small
_LOW_PRECISION_BLOCK = 4096  # columns per converted block in bfloat16 products


class Layout(Protocol):
  """How a sharded basis computes its products (see `twa_jax.sharding`)."""

  def coordinates(self, vectors: Vectors, flat: jax.Array) -> jax.Array:
    ...

  def expand(self, vectors: Vectors, beta: jax.Array) -> jax.Array:
    ...

  def project(self, vectors: Vectors, flat: jax.Array) -> jax.Array:
    ...


def over_columns(cols: int, body, carry, chunk: int = _CHUNK):
  """Folds body(carry, start, size) over column blocks of width `chunk`."""
  full = cols // chunk
  if full:
    carry = jax.lax.fori_loop(
        0, full, lambda i, c: body(c, i * chunk, chunk), carry)
  if cols % chunk:
    carry = body(carry, full * chunk, cols % chunk)
  return carry


def _columns64(x: jax.Array, start, size: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1).astype(jnp.float64)


def _gram64(a: jax.Array, axis_name: AxisName | None = None) -> jax.Array:
  """a @ a.T accumulated in float64 over column blocks (call under x64).

  With `axis_name` (inside `jax.shard_map`, columns sharded over that mesh
  axis), the per-device Grams are summed with one psum of n x n floats.
  """
  def body(gram, start, size):
    block = _columns64(a, start, size)
    return gram + block @ block.T
  gram = over_columns(a.shape[1], body,
                       jnp.zeros((a.shape[0], a.shape[0]), jnp.float64))
  return gram if axis_name is None else jax.lax.psum(gram, axis_name)


def _combine64(c: jax.Array, v: jax.Array, dtype) -> jax.Array:
  """c @ v in float64 over column blocks, rounded once to `dtype`."""
  def body(out, start, size):
    block = (c @ _columns64(v, start, size)).astype(dtype)
    return jax.lax.dynamic_update_slice_in_dim(out, block, start, axis=1)
  return over_columns(v.shape[1], body,
                       jnp.zeros((c.shape[0], v.shape[1]), dtype))


def _center(w: jax.Array, axis_name: AxisName | None = None
            ) -> tuple[jax.Array, jax.Array]:
  """Rows w_i - w_r (i != r) and w_r itself, r = n // 2; their float64 Gram."""
  r = w.shape[0] // 2
  v = (w - w[r]).at[r].set(w[r])
  return v, _gram64(v, axis_name)


def _combine_and_gram(c: jax.Array, v: jax.Array,
                      axis_name: AxisName | None = None
                      ) -> tuple[jax.Array, jax.Array]:
  q = _combine64(c, v, jnp.float32)
  return q, _gram64(q, axis_name)


class ColumnPasses(NamedTuple):
  """The device side of :func:`orthonormalize`: its passes over the columns.

  `twa_jax.sharding` supplies column-sharded versions (the same functions
  under `jax.shard_map`, Grams summed by psum); the host side is shared.

  Attributes:
    put: host float64 matrix -> device array (replicated where sharded).
    center: W -> (V, V V^T), see `_center`; consumes W.
    combine_and_gram: (C, V) -> (Q = C V, Q Q^T); consumes V.
    combine: (C, Q, dtype) -> C Q rounded to dtype; consumes Q.
  """

  put: Callable[[np.ndarray], jax.Array]
  center: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
  combine_and_gram: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
  combine: Callable[[jax.Array, jax.Array, Any], jax.Array]


LOCAL_PASSES = ColumnPasses(
    put=jnp.asarray,
    center=jax.jit(_center, donate_argnums=0),
    combine_and_gram=jax.jit(_combine_and_gram, donate_argnums=1),
    combine=jax.jit(_combine64, static_argnums=2, donate_argnums=1),
)


class EmptySpanError(ValueError):
  """Every snapshot is zero (found on the devices, so by every process)."""


def default_rtol(eps: float) -> float:
  """Relative singular-value cut-off for snapshots stored with precision eps."""
  return 10.0 * eps


def orthonormalize(matrix: jax.Array | np.ndarray, *, rtol: float,
                   dtype=jnp.float32, passes: ColumnPasses = LOCAL_PASSES
                   ) -> tuple[jax.Array, np.ndarray]:
  """Rank-revealing orthonormal basis of the row space of `matrix`.

  CholeskyQR2 on a better-conditioned generating set: the rows are replaced
  by the middle snapshot w_r and the differences w_i - w_r (the same span,
  exactly, since w_i = (w_i - w_r) + w_r), which are far from collinear along
  a training trajectory even when the snapshots themselves have cosine
  similarity 0.99999. The Gram matrices are
  accumulated in float64 and factored on the host (they are n x n); the three
  passes over the D columns are jitted, blockwise float64 matrix products
  (each result rounded to float32 once), with their inputs donated.

  Args:
    matrix: W, n x D, one snapshot per row (float32). It is consumed (its
      device buffer is donated).
    rtol: directions whose singular value of W is below `rtol` times the
      largest one are dropped.
    dtype: storage dtype of the result.
    passes: the device passes over the columns (default: one device;
      `twa_jax.sharding` passes column-sharded ones).

  Returns:
    The basis rows (k x D, orthonormal, ordered by decreasing singular value
    of W) and the k kept singular values of W.

  Raises:
    EmptySpanError: every snapshot is zero.
  """
  w = jnp.asarray(matrix, jnp.float32)
  n = w.shape[0]
  with jax.enable_x64(True), warnings.catch_warnings():
    # Donation only helps where shapes match (k == n); the rest is expected.
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    v, gram = passes.center(w)
    gram = np.asarray(gram)
    # Pass 1: whiten the normalized generating set; drop exact dependencies.
    norms = np.sqrt(np.diag(gram))
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    evals, evecs = np.linalg.eigh(scale[:, None] * gram * scale[None, :])
    keep = evals > max(evals[-1], 0.0) * 1e-12
    if not keep.any():
      raise EmptySpanError(
          "snapshots: every snapshot is zero; the span is empty.")
    c1 = (evecs[:, keep] / np.sqrt(evals[keep])).T * scale[None, :]
    q, gram2 = passes.combine_and_gram(passes.put(c1), v)
    del v
    # Pass 2 (CholeskyQR2): re-orthonormalize, then rank-reveal on W itself.
    chol = np.linalg.cholesky(np.asarray(gram2))
    chol_inv = scipy.linalg.solve_triangular(
        chol, np.eye(chol.shape[0]), lower=True)
    # W = T^-1 V with w_i = v_i + v_r (i != r) and w_r = v_r.
    t_inv = np.eye(n)
    t_inv[:, n // 2] = 1.0
    # W Q^T = T^-1 (V V^T) C1^T L^-T, all n x k and float64.
    r = t_inv @ gram @ c1.T @ chol_inv.T
    _, svals, zt = np.linalg.svd(r, full_matrices=False)
    kept = svals > rtol * svals[0]
    rotation = zt[kept] @ chol_inv
    vectors = passes.combine(passes.put(rotation), q, jnp.dtype(dtype))
  return vectors, svals[kept]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["vectors"], meta_fields=["spec", "dim", "layout"])
@dataclasses.dataclass(frozen=True)
class Basis:
  """Orthonormal basis P of the span of weight snapshots.

  A pytree: `vectors` is its only array, so a `Basis` passes through
  `jax.jit` and into optax states; the parameter layout is static.

  Attributes:
    vectors: k x D basis rows (P^T), in the storage dtype or, for "int8" /
      "int4", a `twa_jax.quantization.QuantizedVectors`; a sharded or
      quantized basis may carry padding rows and columns beyond `dim` and
      `num_params` (never reaching the results).
    spec: layout of the parameter tree the basis spans.
    dim: k, the number of basis vectors kept.
    layout: None for a single-device basis; a sharded layout from
      `twa_jax.sharding` otherwise.
  """

  vectors: Vectors
  spec: tree_lib.ParamSpec
  dim: int
  layout: Layout | None = None

  @classmethod
  def from_snapshots(cls, snapshots: Sequence[PyTree] | PyTree, *,
                     rtol: float | None = None, dtype=jnp.float32,
                     granularity="global", **layout_kwargs) -> Basis:
    """Orthonormal basis of span{w_1..w_n}.

    Args:
      snapshots: a non-empty list or tuple of parameter pytrees with
        identical structure, shapes and float dtypes, or one pytree (not a
        list or tuple) whose leaves carry a leading axis n.
      rtol: directions whose singular value is below `rtol` times the
        largest are dropped; default 10 x the epsilon of the coarsest
        snapshot dtype (1.2e-6 for float32).
      dtype: storage dtype of P: float32, bfloat16, or "int8" / "int4"
        (quantized per group with a scale and zero point, see
        `twa_jax.quantization`: 4x / 8x smaller, no longer exactly
        orthonormal); products accumulate in float32.
      granularity: "global" (one basis, n coefficients), "leaf" (a basis
        per parameter leaf) or a callable from leaf path to block name;
        the latter two return a `twa_jax.blocks.BlockBasis`.
      **layout_kwargs: `mesh`, `axis`, `layout` for a sharded basis.

    Returns:
      The basis, ordered by decreasing singular value of the snapshots.
    """
    spec, matrix = tree_lib.stack_snapshots(snapshots)
    if granularity == "global" and not layout_kwargs:
      matrix = _to_device(matrix)
    return cls.from_matrix(spec, matrix, rtol=rtol, dtype=dtype,
                           granularity=granularity, **layout_kwargs)

  @classmethod
  def from_store(cls, store, steps: Sequence[int] | None = None, *,
                 rtol: float | None = None, dtype=jnp.float32,
                 granularity="global", **layout_kwargs) -> Basis:
    """Basis of snapshots read one at a time from a `TrajectoryStore`.

    With `mesh`, the snapshots are read through `store.columns`: each
    process reads only the column slices of its own devices (with a
    `granularity`, its slices of each block's columns).

    Args:
      store: an open `twa_jax.TrajectoryStore`.
      steps: the steps to use (default: all complete snapshots).
      rtol, dtype, granularity, **layout_kwargs: as for
        :meth:`from_snapshots`.
    """
    read = store.columns if layout_kwargs else store.read_matrix
    spec, matrix = read(steps)
    if granularity == "global" and not layout_kwargs:
      matrix = _to_device(matrix)
    return cls.from_matrix(spec, matrix, rtol=rtol, dtype=dtype,
                           granularity=granularity, **layout_kwargs)

  @classmethod
  def from_matrix(cls, spec: tree_lib.ParamSpec, matrix, *,
                  rtol: float | None = None, dtype=jnp.float32,
                  granularity="global", **layout_kwargs) -> Basis:
    """Basis of the rows of a flattened snapshot matrix (n x D, consumed)."""
    if granularity != "global":
      from twa_jax import blocks  # pylint: disable=g-import-not-at-top
      return blocks.block_basis(spec, matrix, granularity, rtol=rtol,
                                dtype=dtype, **layout_kwargs)
    low_bit = dtype if dtype in quantization.BITS else None
    dtype = jnp.dtype(jnp.float32 if low_bit else dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"dtype: basis storage must be floating point, "
                      f"'int8' or 'int4'; got {dtype}.")
    if matrix.shape[1] != spec.num_params:
      raise ValueError(f"matrix has {matrix.shape[1]} columns, the parameter "
                       f"tree has {spec.num_params} entries.")
    rtol = default_rtol(spec.eps) if rtol is None else float(rtol)
    if layout_kwargs:
      from twa_jax import sharding  # pylint: disable=g-import-not-at-top
      return sharding.sharded_basis(spec, matrix, rtol=rtol,
                                    dtype=low_bit or dtype, **layout_kwargs)
    if matrix.shape[1] < _CHUNK:  # pad small D to a power of two: few compiles
      cols = 1 << max(matrix.shape[1] - 1, 0).bit_length()
      matrix = jnp.pad(jnp.asarray(matrix), ((0, 0), (0, cols - matrix.shape[1])))
    vectors, _ = orthonormalize(matrix, rtol=rtol, dtype=dtype)
    if low_bit:
      vectors = quantization.quantize(vectors, low_bit)
    return cls(vectors, spec, int(vectors.shape[0]))

  @property
  def num_params(self) -> int:
    """D, the number of parameters."""
    return self.spec.num_params

  def _flat(self, tree: PyTree, what: str) -> jax.Array:
    return self.spec.ravel(tree, what=what, pad_to=self.vectors.shape[1])

  def coordinates(self, tree: PyTree) -> jax.Array:
    """P^T w: the float32 coordinates (dim,) of a parameter-like tree."""
    flat = self._flat(tree, "coordinates")
    if self.layout is not None:
      return self.layout.coordinates(self.vectors, flat)[:self.dim]
    return _matvec(self.vectors, flat)

  def from_coordinates(self, beta: jax.Array) -> PyTree:
    """P beta as a parameter tree (the basis' dtypes)."""
    beta = jnp.asarray(beta, jnp.float32)
    if beta.shape != (self.dim,):
      raise ValueError(
          f"from_coordinates: beta has shape {beta.shape}, expected ({self.dim},).")
    if self.layout is not None:
      pad = self.vectors.shape[0] - self.dim
      flat = self.layout.expand(self.vectors, jnp.pad(beta, (0, pad)))
    else:
      flat = _vecmat(beta, self.vectors)
    return self.spec.unravel(flat)

  def project(self, tree: PyTree) -> PyTree:
    """P P^T g, with the structure and leaf dtypes of `tree`."""
    flat = self._flat(tree, "project")
    if self.layout is not None:
      out = self.layout.project(self.vectors, flat)
    else:
      out = _vecmat(_matvec(self.vectors, flat), self.vectors)
    dtypes = [leaf.dtype for leaf in jax.tree_util.tree_leaves(tree)]
    return self.spec.unravel(out, dtypes)


def _to_device(matrix: np.ndarray) -> jax.Array:
  """Moves the host snapshot matrix to the device and waits, so that the
  caller can drop the host copy before the orthonormalizer runs (it consumes
  the device copy): peak memory stays near 2.5x the matrix, not 3.5x."""
  return jax.block_until_ready(jnp.asarray(matrix, jnp.float32))


def _column_blocks(vectors: Vectors) -> tuple[Any, int] | None:
  """For storage that XLA cannot multiply at full speed (bfloat16 on CPU,
  int8/int4 codes): a function giving float32 columns [start, start + size)
  and the block width; None for float32, which goes to one matrix product."""
  if isinstance(vectors, quantization.QuantizedVectors):
    return vectors.dequantize, vectors.block
  if vectors.dtype == jnp.float32 or jax.default_backend() != "cpu":
    return None  # accelerators multiply bfloat16 natively
  def columns(start, size):
    return jax.lax.dynamic_slice_in_dim(vectors, start, size, axis=1).astype(
        jnp.float32)
  return columns, _LOW_PRECISION_BLOCK


def _zeros(vectors: Vectors, size: int) -> jax.Array:
  """A float32 (size,) accumulator for products with `vectors`; under
  `jax.shard_map` it varies over their mesh axes, as the loop's results do."""
  if isinstance(vectors, quantization.QuantizedVectors):
    vectors = vectors.scale
  return jnp.zeros_like(vectors, jnp.float32, shape=(size,))


def _matvec(vectors: Vectors, flat: jax.Array) -> jax.Array:
  """P^T g in float32 whatever the storage; never a float32 copy of P."""
  blocks = _column_blocks(vectors)
  if blocks is None:
    return jnp.dot(vectors, flat.astype(vectors.dtype),
                   preferred_element_type=jnp.float32)
  columns, width = blocks
  def body(acc, start, size):
    return acc + columns(start, size) @ jax.lax.dynamic_slice_in_dim(
        flat, start, size)
  return over_columns(vectors.shape[1], body,
                      _zeros(vectors, vectors.shape[0]), width)


def _vecmat(beta: jax.Array, vectors: Vectors) -> jax.Array:
  """P beta in float32 whatever the storage; never a float32 copy of P."""
  blocks = _column_blocks(vectors)
  if blocks is None:
    return jnp.dot(beta.astype(vectors.dtype), vectors,
                   preferred_element_type=jnp.float32)
  columns, width = blocks
  def body(out, start, size):
    return jax.lax.dynamic_update_slice_in_dim(
        out, beta @ columns(start, size), start, axis=0)
  return over_columns(vectors.shape[1], body,
                      _zeros(vectors, vectors.shape[1]), width)
