"""The basis builder: snapshots -> `Basis` or `BlockBasis`.

One entry point per source of snapshots (`from_snapshots`, `from_store`,
`from_matrix`, exported as `twa_jax.basis_from_*`) and one builder behind
them that chooses the granularity (one basis, or one per block of leaves),
the placement (one device, or sharded over a mesh) and the storage dtype.
"""

from __future__ import annotations

import functools
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
    matrix = _to_device(matrix)
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

  With `mesh`, the snapshots are read through `store.columns`: each
  process reads only the column slices of its own devices (with a
  `granularity`, its slices of each block's columns).

  Args:
    store: an open `twa_jax.store.TrajectoryStore`, or any object with its
      `read_matrix(steps)` and `columns(steps)`, each returning
      (`ParamSpec`, n x D matrix or `blocks.ColumnSource`).
    steps: the steps to use (default: all complete snapshots).
    rtol, dtype, granularity, mesh, axis, layout: as for `from_snapshots`.
  """
  check_rtol(rtol)
  read = store.read_matrix if mesh is None else store.columns
  spec, matrix = read(steps)
  if granularity == "global" and mesh is None:
    matrix = _to_device(matrix)
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
    matrix: W, n x D, one flattened snapshot per row (consumed): numpy, a
      jax array, or a `blocks.ColumnSource` (with `mesh`).
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
  if matrix.shape[1] != spec.num_params:
    raise ValueError(f"matrix has {matrix.shape[1]} columns, the parameter "
                     f"tree has {spec.num_params} entries.")
  rtol = default_rtol(spec, matrix.shape[0]) if rtol is None else float(rtol)
  if mesh is not None:
    return sharding.sharded_basis(spec, matrix, rtol=rtol,
                                  dtype=low_bit or dtype, mesh=mesh,
                                  axis=axis, layout=layout)
  if matrix.shape[1] < kernels.CHUNK:  # pad small D to a power of two: few compiles
    cols = 1 << max(matrix.shape[1] - 1, 0).bit_length()
    matrix = jnp.pad(jnp.asarray(matrix), ((0, 0), (0, cols - matrix.shape[1])))
  vectors, spectrum = orthonormalize(matrix, rtol=rtol, dtype=dtype)
  dim = int(vectors.shape[0])
  if low_bit:
    vectors = quantization.quantize(vectors, low_bit)
  return Basis(basis_lib.to_refs(vectors), spec, dim, spectrum=spectrum)


def _to_device(matrix: np.ndarray) -> jax.Array:
  """Moves the host snapshot matrix to the device and waits, so that the
  caller can drop the host copy before the orthonormalizer runs (it works in
  the device copy): peak memory stays near 2x the matrix (the move, and the
  basis' copy into its `jax.Ref`), not 3x."""
  return jax.block_until_ready(jnp.asarray(matrix, jnp.float32))
