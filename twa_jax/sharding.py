"""Sharded TWA: the basis P laid out over a mesh axis with `jax.sharding`.

P (n x D, stored as its k x D rows) holds n copies of the model; for large
models it does not fit one accelerator. Pass a `jax.sharding.Mesh` to
`twa_jax.basis_from_snapshots` / `basis_from_store` and the rows are laid out over
the k devices of one mesh axis (or several, as a tuple) in one of two ways:

* ``layout="basis"`` (the paper's scheme, Li et al. 2023, Sec. 4): device i
  holds ceil(n/k) whole basis vectors P_i (shape ceil(n/k) x D), computes
  P_i P_i^T g locally and the partial projections are summed by one psum of
  D floats. Gradients and updates stay whole (replicated), so it fits plain
  data parallelism; communication per step is an all-reduce of D floats on
  top of the gradient all-reduce, i.e. the step's communication doubles.
* ``layout="params"``: device i holds a ceil(D/k) column slice of every
  basis vector (n x ceil(D/k)). The coordinates P^T g are partial sums
  combined by a psum of only n floats; each device then forms its own slice
  of P beta, and the slices are all-gathered into the whole update (D
  floats, but an all-gather sends half the bytes of an all-reduce). Per
  data-parallel step (ring algorithms, k = 8): gradient all-reduce + n +
  all-gather = 1.75 + 0.875 = 2.6 D floats sent per device, against 3.5 D
  for the paper's scheme. With FSDP-style sharding on Explicit mesh axes
  (the flat gradient typed as sharded over `axis`) nothing is gathered: the
  update stays sharded and the psum of n floats is all that is sent. Its
  cost: every device touches all n coordinates of its slice, and the flat
  vector is the concatenation of the leaves, so leaves sharded along their
  own axes are resliced.

Both hold n D / k elements of P per device. n and D need not divide by k:
the rows (basis) or columns (params) are zero-padded, `Basis.dim` is the true
n and padding never reaches the results. Both work on meshes with Auto axes
(XLA places what is outside the maps) and Explicit axes (inputs and results
are resharded to the types the maps need).

Low-bit storage (``dtype="int8"`` or ``"int4"``, see `twa_jax.quantization`)
is quantized after the float32 orthonormalization by each device, of its
own shard: whole rows for ``"basis"``; for ``"params"`` each device's column
slice is padded to a whole number of groups. The group is fitted to the
width of a device's rows (at most 256 entries, so that narrow shards, of a
small block or of D / k, are not padded up to 256). Codes, scales and
offsets are sharded like the float32 rows, the products dequantize them
block by block inside the maps, and the collectives stay the same.

The orthonormalization never materializes W or P on one device: W is laid
out column-sharded (each device receives only its slice, from the host
matrix via `jax.make_array_from_callback`; in a multi-process run each
process copies only the slices of its own devices, and `basis_from_store` reads
from disk only those, through `TrajectoryStore.columns`) and the passes of
`twa_jax.orthonormalize` run under `jax.shard_map`, where only the
n x n float64 Gram matrices are summed by psum; the host side (eigh,
Cholesky, the rank-revealing SVD) is shared with the single-device path.
For ``layout="basis"`` one all-to-all then moves the rows to their devices.

The rows are kept in `jax.Ref`s like any basis' (see `twa_jax.basis`), so a
jitted step reads the sharded rows where they are.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from twa_jax import basis as basis_lib
from twa_jax import kernels
from twa_jax import quantization
from twa_jax import tree as tree_lib
from twa_jax.orthonormalize import ColumnPasses, orthonormalize

AxisName = kernels.AxisName
Vectors = kernels.Vectors
LAYOUTS = ("basis", "params")


@dataclasses.dataclass(frozen=True)
class ShardedLayout(abc.ABC):
  """Base of the two layouts; hashable, a static field of `Basis`.

  Attributes:
    mesh: the device mesh.
    axis: the mesh axis (or tuple of axes) the basis is sharded over; other
      mesh axes hold replicas.
    dim: n, the number of basis vectors (without padding).
    num_params: D, the number of parameters (without padding).
    group: entries per scale and offset of low-bit ("int8" / "int4")
      storage, 1 for float storage; each device's columns are a whole
      number of groups.
  """

  mesh: Mesh
  axis: AxisName
  dim: int
  num_params: int
  group: int = 1
  kind: ClassVar[str]

  @property
  def num_shards(self) -> int:
    """k, the number of devices along `axis`."""
    return num_shards(self.mesh, self.axis)

  @property
  @abc.abstractmethod
  def shape(self) -> tuple[int, int]:
    """Global (padded) shape of the stored rows."""

  @property
  @abc.abstractmethod
  def spec(self) -> P:
    """PartitionSpec of the stored rows."""

  @property
  def sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec)

  def _map(self, body, in_specs, out_specs, check_vma: bool = True):
    """`body` under `jax.shard_map`; inputs resharded to `in_specs` (Explicit)."""
    mapped = jax.shard_map(body, mesh=self.mesh, in_specs=in_specs,
                           out_specs=out_specs, check_vma=check_vma)
    return lambda *args: mapped(*map(self._as, args, in_specs))

  @property
  def _explicit(self) -> bool:
    return jax.sharding.AxisType.Explicit in self.mesh.axis_types

  def _as(self, x: jax.Array, spec: P) -> jax.Array:
    """Reshards `x` to `spec` on a mesh with Explicit axes.

    There shardings are types: shard_map wants its inputs typed as its
    in_specs, and a flat vector typed as sharded could not be cut into
    leaves. On Auto axes XLA's sharding propagation places `x`.
    """
    if self._explicit:
      return jax.sharding.reshard(x, NamedSharding(self.mesh, spec))
    return x


def num_shards(mesh: Mesh, axis: AxisName) -> int:
  """Number of devices along a mesh axis or tuple of axes."""
  axes = (axis,) if isinstance(axis, str) else axis
  return math.prod(mesh.shape[a] for a in axes)


def _round_up(x: int, k: int) -> int:
  return -(-x // k) * k


def _columns(d: int, k: int, group: int = 1) -> int:
  """Padded D of the params layout: k slices of whole groups."""
  return k * _round_up(-(-d // k), group)


def _group(width: int) -> int:
  """Quantization group for rows of `width` columns on one device.

  Even (int4 packs two codes a byte), at most `quantization.GROUP`, and
  splitting `width` into equal groups: the padding is under 2 columns per
  group, where a fixed group would pad a narrow slice up to a whole one.
  """
  width = max(width, 1)  # an empty block still gets a valid group
  groups = -(-width // quantization.GROUP)
  return _round_up(-(-width // groups), 2)


@dataclasses.dataclass(frozen=True)
class BasisLayout(ShardedLayout):
  """Whole basis vectors per device; projection = psum of D floats."""

  kind: ClassVar[str] = "basis"

  @property
  def shape(self) -> tuple[int, int]:
    return (_round_up(self.dim, self.num_shards),
            _round_up(self.num_params, self.group))

  @property
  def spec(self) -> P:
    return P(self.axis, None)

  def coordinates(self, vectors: Vectors, flat: jax.Array) -> jax.Array:
    """P^T g, (rows,) sharded like the rows (Auto axes); no communication."""
    out = self._map(kernels.matvec, (self.spec, P()), P(self.axis))(
        vectors, flat)
    return self._as(out, P())

  def _psum(self, partial: jax.Array) -> jax.Array:
    """psum of D floats: the group padding of low-bit rows is cut first."""
    return jax.lax.psum(partial[:self.num_params], self.axis)

  def expand(self, vectors: Vectors, beta: jax.Array) -> jax.Array:
    """P beta, (D,) replicated: local partial sums and one psum of D."""
    def body(v, b):
      return self._psum(kernels.vecmat(b, v))
    return self._map(body, (self.spec, P(self.axis)), P())(vectors, beta)

  def project(self, vectors: Vectors, flat: jax.Array) -> jax.Array:
    """P P^T g = sum_i P_i P_i^T g, (D,) replicated: one psum of D."""
    def body(v, g):
      return self._psum(kernels.vecmat(kernels.matvec(v, g), v))
    return self._map(body, (self.spec, P()), P())(vectors, flat)


@dataclasses.dataclass(frozen=True)
class ParamsLayout(ShardedLayout):
  """A D/k slice of every basis vector per device; psum of n floats."""

  kind: ClassVar[str] = "params"

  @property
  def shape(self) -> tuple[int, int]:
    return self.dim, _columns(self.num_params, self.num_shards, self.group)

  @property
  def spec(self) -> P:
    return P(None, self.axis)

  def _sharded(self, flat: jax.Array) -> bool:
    """Whether `flat` is typed as sharded (Explicit axes; FSDP-style)."""
    return self._explicit and any(jax.typeof(flat).sharding.spec)

  def _coordinates(self, v: jax.Array, g: jax.Array) -> jax.Array:
    """psum of the local partial products; `g` whole or this device's slice.

    A whole (replicated) `g` enters the map as such and is sliced here: left
    to XLA, the slicing of the flattened gradient is sometimes partitioned
    differently and gathered back (measured: an extra all-gather of D).
    """
    cols = v.shape[1]
    if g.shape[0] != cols:
      start = jax.lax.axis_index(self.axis) * cols
      g = jax.lax.dynamic_slice_in_dim(g, start, cols)
    return jax.lax.psum(kernels.matvec(v, g), self.axis)

  def _in_spec(self, flat: jax.Array) -> P:
    return P(self.axis) if self._sharded(flat) else P()

  def coordinates(self, vectors: Vectors, flat: jax.Array) -> jax.Array:
    """P^T g, (n,) replicated: partial sums and one psum of n."""
    return self._map(self._coordinates, (self.spec, self._in_spec(flat)),
                     P())(vectors, flat)

  def _slices(self, body, in_spec: P, gather: bool):
    """Maps `body` (-> this device's slice of a (cols,) vector); gathers."""
    if not gather:
      return self._map(body, (self.spec, in_spec), P(self.axis))
    def gathered(v, x):
      return jax.lax.all_gather(body(v, x), self.axis, tiled=True)
    # check_vma=False: all_gather's result is replicated but typed varying.
    return self._map(gathered, (self.spec, in_spec), P(), check_vma=False)

  def expand(self, vectors: Vectors, beta: jax.Array) -> jax.Array:
    """P beta, (cols,) replicated: local slices, an all-gather of D."""
    return self._slices(lambda v, b: kernels.vecmat(b, v), P(), True)(
        vectors, beta)

  def project(self, vectors: Vectors, flat: jax.Array) -> jax.Array:
    """P P^T g: a psum of n floats; each device forms its slice of P beta.

    The slices are all-gathered into a replicated (cols,) result, except on
    Explicit mesh axes where `flat` is typed as sharded over `axis` (an
    FSDP-style flat vector): then the result stays sharded like it and the
    psum of n floats is all that is sent.
    """
    sharded = self._sharded(flat)
    def body(v, g):
      return kernels.vecmat(self._coordinates(v, g), v)
    return self._slices(body, self._in_spec(flat), not sharded)(vectors, flat)


@functools.lru_cache(maxsize=8)
def column_passes(mesh: Mesh, axis: AxisName) -> ColumnPasses:
  """`orthonormalize`'s device passes on W sharded by columns over `axis`."""
  cols = P(None, axis)

  def mapped(body, in_specs, out_specs):
    # check_vma=False: the Gram accumulators start unvarying and gain the
    # axis inside fori_loop; the psum makes them equal across the axis.
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs,
                         out_specs=out_specs, check_vma=False)

  center = mapped(functools.partial(kernels.center, axis_name=axis),
                  (cols,), (cols, P()))
  combine_and_gram = mapped(
      functools.partial(kernels.combine_and_gram, axis_name=axis),
      (P(), cols), (cols, P()))

  def combine(c, q, dtype):
    return mapped(functools.partial(kernels.combine64, dtype=dtype),
                  (P(), cols), cols)(c, q)

  replicated = NamedSharding(mesh, P())
  return ColumnPasses(
      put=lambda c: jax.device_put(c, replicated),
      center=jax.jit(center, donate_argnums=0),
      combine_and_gram=jax.jit(combine_and_gram, donate_argnums=1),
      combine=jax.jit(combine, static_argnums=2, donate_argnums=1),
  )


def put_columns(matrix, mesh: Mesh, axis: AxisName, cols: int) -> jax.Array:
  """W (n x D, host) as an n x cols float32 array sharded by columns.

  Each device receives only its column slice (zero beyond D); in a
  multi-process run each process reads only the slices of its devices.
  `matrix` is a numpy array or any object with `shape` and numpy-style
  `matrix[:, start:stop]` (a `TrajectoryStore.columns` view reads only that
  slice from disk).

  Raises:
    ValueError: reading a slice failed (e.g. NaN/Inf in the store), on every
      process: the processes agree before any collective, so none is left
      waiting in one. A process whose own read failed raises that error;
      the others name the failed processes.
  """
  n, d = matrix.shape

  def block(index):
    start, stop, _ = index[1].indices(cols)
    out = np.zeros((n, stop - start), np.float32)
    stop_d = min(stop, d)
    if stop_d > start:
      out[:, :stop_d - start] = np.asarray(matrix[:, start:stop_d])
    return out[index[0]]

  error = None
  try:
    w = jax.make_array_from_callback(
        (n, cols), NamedSharding(mesh, P(None, axis)), block)
  except ValueError as e:
    error = e
  _raise_on_every_process(error, "put_columns: reading the column slices of W")
  return w


def _raise_on_every_process(error: ValueError | None, what: str) -> None:
  """Raises `error` here, and a ValueError naming the processes it was
  raised on everywhere else (one all-gather of a flag per process)."""
  failed = []
  if jax.process_count() > 1:
    flags = multihost_utils.process_allgather(np.int32(error is not None))
    failed = np.flatnonzero(flags).tolist()
  if error is not None:
    raise error
  if failed:
    raise ValueError(f"{what} failed on process(es) {failed}; see the error "
                     "raised there.")


def _to_rows(layout: BasisLayout, vectors: jax.Array) -> jax.Array:
  """Column-sharded rows (dim x cols) -> the row-sharded `layout` (all-to-all)."""
  rows = layout.shape[0]

  def body(local):
    local = jnp.pad(local, ((0, rows - local.shape[0]), (0, 0)))
    whole = jax.lax.all_to_all(local, layout.axis, 0, 1, tiled=True)
    return whole[:, :layout.num_params]

  return jax.jit(layout._map(body, (P(None, layout.axis),), layout.spec))(
      vectors)


def _check_args(mesh, axis, layout) -> AxisName:
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}.")
  if layout not in LAYOUTS:
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}.")
  if axis is None:
    axis = mesh.axis_names[0] if len(mesh.axis_names) == 1 else tuple(mesh.axis_names)
  for name in (axis,) if isinstance(axis, str) else axis:
    if name not in mesh.axis_names:
      raise ValueError(
          f"axis: {name!r} is not an axis of the mesh {mesh.axis_names}.")
  return axis


def _quantize(layout: ShardedLayout, vectors: jax.Array, dtype: str
              ) -> quantization.QuantizedVectors:
  """Quantizes each device's shard of the rows on that device."""
  body = functools.partial(quantization.quantize, dtype=dtype,
                           group=layout.group)
  return jax.jit(layout._map(body, (layout.spec,), layout.spec))(vectors)


def sharded_basis(spec: tree_lib.ParamSpec, matrix, *, rtol: float,
                  dtype=jnp.float32, mesh: Mesh, axis: AxisName | None = None,
                  layout: str = "basis") -> basis_lib.Basis:
  """Orthonormal basis of the rows of W, sharded over a mesh axis.

  Called by `twa_jax.build` (`basis_from_snapshots`, `_from_store`,
  `_from_matrix`) when given `mesh`.

  Args:
    spec: layout of the parameter tree.
    matrix: W, n x D float32 host array: numpy, or a
      `TrajectoryStore.columns` view (only the column slices of this
      process' devices are read).
    rtol: relative singular-value cut-off, as for `orthonormalize`.
    dtype: storage dtype of P: a float dtype, or "int8" / "int4" (each
      device quantizes its own float32 shard; see the module doc).
    mesh: the device mesh.
    axis: mesh axis name (or tuple of names) to shard over; default: the
      mesh's only axis, or all of its axes.
    layout: "basis" (whole vectors per device, psum of D per projection) or
      "params" (a D/k slice of every vector, psum of n); see the module doc.

  Returns:
    A `Basis` whose `vectors` (for low-bit storage: their codes, scales and
    offsets) carry `layout.sharding` and whose `layout` is a `BasisLayout`
    or `ParamsLayout`.
  """
  axis = _check_args(mesh, axis, layout)
  d, k = spec.num_params, num_shards(mesh, axis)
  low_bit = dtype if dtype in quantization.BITS else None
  params = layout == "params"
  group = _group(-(-d // k) if params else d) if low_bit else 1
  w = put_columns(matrix, mesh, axis, _columns(d, k, group if params else 1))
  vectors, spectrum = orthonormalize(
      w, rtol=rtol, dtype=jnp.float32 if low_bit else dtype,
      passes=column_passes(mesh, axis))
  dim = int(vectors.shape[0])
  if params:
    out = ParamsLayout(mesh, axis, dim, d, group)
  else:
    out = BasisLayout(mesh, axis, dim, d, group)
    vectors = _to_rows(out, vectors)
  if low_bit:
    vectors = _quantize(out, vectors, low_bit)
  return basis_lib.Basis(basis_lib.to_refs(vectors), spec, dim, out, spectrum)
