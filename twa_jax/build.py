"""The basis builder: snapshots -> `Basis` or `BlockBasis`.

One entry point per source of snapshots (`from_snapshots`, `from_store`,
`from_matrix`, exported as `twa_jax.basis_from_*`) and one builder behind
them that chooses the granularity (one basis, or one per block of leaves),
the placement (one device, or sharded over a mesh) and the storage dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from twa_jax import basis as basis_lib
from twa_jax import blocks
from twa_jax import kernels
from twa_jax import quantization
from twa_jax import sharding
from twa_jax import tree as tree_lib
from twa_jax.basis import Basis
from twa_jax.blocks import BlockBasis
from twa_jax.orthonormalize import check_rtol, default_rtol, orthonormalize

PyTree = Any
# Bytes: a host array this aligned is aliased by the CPU device, not copied.
_ALIGN = 64


def from_snapshots(snapshots: Sequence[PyTree] | PyTree, *,
                   rtol: float | None = None, dtype=jnp.float32,
                   granularity: blocks.Granularity = "global",
                   mesh: Mesh | None = None,
                   axis: kernels.AxisName | None = None,
                   layout: str = "basis",
                   trainable: PyTree | Callable[[str], bool] | None = None
                   ) -> Basis | BlockBasis:
  """Orthonormal basis of span{w_1..w_n}.

  Args:
    snapshots: a non-empty list or tuple of parameter pytrees with
      identical structure, shapes and float dtypes, or one pytree (not a
      list or tuple) whose leaves carry a leading axis n.
    rtol: directions whose singular value is at most `rtol` times the
      largest snapshot's norm are dropped, in (0, 1); default: 10 x the
      rounding noise of the snapshots' dtypes (`orthonormalize.default_rtol`:
      about 6e-7 for float32, 4e-2 for bfloat16), so every difference the
      snapshots resolve is kept. Dropped directions are logged and counted
      in `Basis.dropped`.
    dtype: storage dtype of P: float32, bfloat16, or "int8" / "int4"
      (quantized per group with a scale and zero point, see
      `twa_jax.quantization`: 4x / 8x smaller, no longer exactly
      orthonormal); products accumulate in float32.
    granularity: "global" (one basis, n coefficients), "leaf" (a basis
      per parameter leaf) or a callable from leaf path to block name;
      the latter two give a `BlockBasis`.
    mesh: shard the basis over this mesh (see `twa_jax.sharding`);
      default: one device.
    axis: the mesh axis (or tuple of axes) to shard over; default: the
      mesh's only axis, or all of its axes.
    layout: "basis" or "params", the sharded layout (see
      `twa_jax.sharding`).
    trainable: span only these leaves (a mask pytree or a predicate on
      leaf paths, see `ParamSpec.of`); the others are frozen: the
      transformations give them a zero update, or they may be absent.

  Returns:
    The basis (a `BlockBasis` for a granularity other than "global"),
    ordered by decreasing singular value of the snapshots.

  Raises:
    ValueError: bad snapshots (the leaf and snapshot named) or rtol.
    EmptySpanError: every snapshot is zero.
  """
  check_rtol(rtol)
  spec, matrix = tree_lib.stack_snapshots(snapshots, trainable=trainable)
  if granularity == "global" and mesh is None:
    matrix = _to_ref(matrix)  # the host matrix is dropped here
  return from_matrix(spec, matrix, rtol=rtol, dtype=dtype,
                     granularity=granularity, mesh=mesh, axis=axis,
                     layout=layout)


def from_store(store, steps: Sequence[int] | None = None, *,
               rtol: float | None = None, dtype=jnp.float32,
               granularity: blocks.Granularity = "global",
               mesh: Mesh | None = None,
               axis: kernels.AxisName | None = None,
               layout: str = "basis") -> Basis | BlockBasis:
  """Basis of snapshots read one at a time from a store.

  One basis on one device: each snapshot is read through `store.columns`
  straight into the buffer the basis is built in (no host copy of the
  matrix). With `mesh`, each process reads through `store.columns` only the
  column slices of its own devices (with a `granularity`, its slices of
  each block's columns). A block basis on one device reads the matrix with
  `store.read_matrix`.

  Args:
    store: an open `twa_jax.store.TrajectoryStore`, or any object with its
      `read_matrix(steps)` and `columns(steps)`, each returning
      (`ParamSpec`, n x D matrix or `blocks.ColumnSource`).
    steps: the steps to use (default: all complete snapshots).
    rtol, dtype, granularity, mesh, axis, layout: as for `from_snapshots`.
  """
  check_rtol(rtol)
  one = granularity == "global" and mesh is None
  read = store.read_matrix if mesh is None and not one else store.columns
  spec, matrix = read(steps)
  if one:
    matrix = _to_ref(matrix)
  return from_matrix(spec, matrix, rtol=rtol, dtype=dtype,
                     granularity=granularity, mesh=mesh, axis=axis,
                     layout=layout)


def from_matrix(spec: tree_lib.ParamSpec, matrix, *,
                rtol: float | None = None, dtype=jnp.float32,
                granularity: blocks.Granularity = "global",
                mesh: Mesh | None = None,
                axis: kernels.AxisName | None = None,
                layout: str = "basis") -> Basis | BlockBasis:
  """Basis of the rows of a flattened snapshot matrix.

  Args:
    spec: the layout of one snapshot.
    matrix: W, n x D, one flattened snapshot per row (consumed: a jax
      array is deleted): numpy, a jax array, or a `blocks.ColumnSource`.
    rtol, dtype, granularity, mesh, axis, layout: as for `from_snapshots`.

  Raises:
    ValueError: `matrix` is not n x D, holds NaN or Inf, or rtol is bad.
  """
  check_rtol(rtol)
  if len(matrix.shape) != 2:
    raise ValueError(f"matrix: expected n x D (one flattened snapshot per "
                     f"row), got shape {tuple(matrix.shape)}.")
  if mesh is None and (axis is not None or layout != "basis"):
    raise ValueError(f"axis={axis!r}, layout={layout!r}: a sharded layout "
                     "needs a mesh (pass mesh=).")
  build = functools.partial(_global, rtol=rtol, dtype=dtype, mesh=mesh,
                            axis=axis, layout=layout)
  if granularity != "global":
    return blocks.block_basis(spec, matrix, granularity, build)
  return build(spec, matrix)


def _global(spec: tree_lib.ParamSpec, matrix, *, rtol: float | None, dtype,
            mesh: Mesh | None, axis: kernels.AxisName | None,
            layout: str) -> Basis:
  """One basis of all columns of `matrix`, on one device or sharded."""
  low_bit = dtype if dtype in quantization.BITS else None
  dtype = jnp.dtype(jnp.float32 if low_bit else dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"dtype: basis storage must be floating point, "
                    f"'int8' or 'int4'; got {dtype}.")
  # A Ref comes from `_to_ref` of a matrix that came with its spec.
  if not isinstance(matrix, jax.Ref) and matrix.shape[1] != spec.num_params:
    raise ValueError(f"matrix has {matrix.shape[1]} columns, the parameter "
                     f"tree has {spec.num_params} entries.")
  rtol = default_rtol(spec, matrix.shape[0]) if rtol is None else float(rtol)
  if mesh is not None:
    return sharding.sharded_basis(spec, matrix, rtol=rtol,
                                  dtype=low_bit or dtype, mesh=mesh,
                                  axis=axis, layout=layout)
  if not isinstance(matrix, jax.Ref):
    matrix = _to_ref(matrix)
  vectors, spectrum = orthonormalize(matrix, rtol=rtol, dtype=dtype)
  dim = int(vectors.shape[0])
  if low_bit:
    vectors = quantization.quantize(vectors, low_bit)
  return Basis(basis_lib.to_refs(vectors), spec, dim, spectrum=spectrum)


def _to_ref(matrix) -> jax.Ref:
  """The rows of `matrix` (n x D) written one at a time into a float32
  `jax.Ref` of zeros, n x `_width(D)`: the buffer the basis is built in.

  Args:
    matrix: numpy, a `blocks.ColumnSource` (each snapshot read once, as it
      is written: one row is held besides the Ref), or a jax array (copied
      whole into the Ref, then deleted).

  Returns:
    The Ref.
  """
  n, d = matrix.shape
  width = _width(d)
  if isinstance(matrix, jax.Array):  # on the device already: one copy
    padded = matrix.astype(jnp.float32)
    if width > d:  # small D only: a copy of no concern
      padded = jnp.pad(padded, ((0, 0), (0, width - d)))
    ref = jax.new_ref(padded)
    matrix.delete()
    return ref
  ref = jax.new_ref(_host_zeros((n, width)))
  for r in range(n):  # each host row moved without a copy (see `_host_copy`)
    _write_row(ref, jax.device_put(_host_copy(matrix[r:r + 1, :]),
                                   may_alias=True), r)
  return ref


def _width(d: int) -> int:
  """Columns of the orthonormalizer's buffer for D parameters: small D is
  zero-padded to a power of two (few compiles)."""
  return d if d >= kernels.CHUNK else 1 << max(d - 1, 0).bit_length()


def _host_zeros(shape: tuple[int, ...]) -> np.ndarray:
  """A float32 host array of zeros whose data is `_ALIGN`-byte aligned.

  The CPU device aliases such an array rather than copying it (`jax.new_ref`
  and `jax.device_put(..., may_alias=True)`). Numpy maps a large array of
  zeros lazily: its pages take no memory until written, so `jax.new_ref` of
  it costs one buffer of memory on CPU, not two. (An accelerator copies it
  to the device first: two buffers there while the Ref is made.)
  """
  nbytes = math.prod(shape) * 4
  raw = np.zeros(nbytes + _ALIGN, np.uint8)
  start = -raw.ctypes.data % _ALIGN
  return raw[start:start + nbytes].view(np.float32).reshape(shape)


def _host_copy(row: np.ndarray) -> np.ndarray:
  """`row` as float32 in a fresh `_host_zeros` array (one the CPU device
  aliases: moving rows through a device copy was seen to leave 10-16 rows'
  worth of freed memory held by the allocator)."""
  out = _host_zeros(row.shape)
  out[...] = row
  return out


@jax.jit
def _write_row(ref: jax.Ref, row: jax.Array, r: jax.Array) -> None:
  """Writes the 1 x D `row` into the first D columns of row r of `ref`."""
  ref[r, :row.shape[1]] = row[0].astype(jnp.float32)
