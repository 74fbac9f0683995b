"""Sharded-basis checks on 8 simulated CPU devices, run by test_sharding.py.

Not collected by the main suite (its name does not start with ``test_``):
`tests/test_sharding.py` runs it with pytest in one subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax loads.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import hlo
import strategies
import twa_jax as twa
from twa_jax import basis as basis_lib
from twa_jax import quantization
from twa_jax import sharding
from twa_jax.store import TrajectoryStore

if jax.device_count() != 8:
  raise RuntimeError(
      "multidevice_sharding.py needs 8 devices: run it through "
      "tests/test_sharding.py (XLA_FLAGS=--xla_force_host_platform_device_count=8).")

KS = (2, 4, 8)
LAYOUTS = ("basis", "params")
LOW_BITS = ("int8", "int4")
N = 11  # snapshots: divisible by none of KS
SHAPES = {"hidden": {"kernel": (5, 7), "bias": (7,)}, "head": (7, 3)}
D = 63  # 35 + 7 + 21: divisible by none of KS
TOL = dict(rtol=2e-5, atol=2e-6)


def _mesh(k: int, axis_type=AxisType.Auto):
  return jax.make_mesh((k,), ("x",), axis_types=(axis_type,),
                       devices=jax.devices()[:k])


def _tree(vector: np.ndarray):
  leaves, treedef = jax.tree.flatten(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
  sizes = np.cumsum([0] + [math.prod(s) for s in leaves])
  return jax.tree.unflatten(treedef, [
      jnp.asarray(vector[a:b].reshape(s), jnp.float32)
      for a, b, s in zip(sizes[:-1], sizes[1:], leaves)])


def _snapshots(kind: str, seed: int = 0, n: int = N):
  rng = np.random.default_rng(seed)
  if kind == "trajectory":
    w0 = rng.normal(size=D)
    steps = rng.normal(size=(n, D)) * 0.02 / math.sqrt(D) * np.linalg.norm(w0)
    rows = w0 + np.cumsum(steps, axis=0)
  else:  # rank-deficient: duplicates and combinations of 4 rows
    base = rng.normal(size=(4, D))
    rows = np.concatenate([base, rng.normal(size=(n - 4, 4)) @ base])
    rows[-1] = rows[0]
  return [_tree(r) for r in rows]


def _random_tree(seed: int):
  return _tree(np.random.default_rng(seed).normal(size=D))


def _plain(basis: twa.Basis) -> twa.Basis:
  """The same basis vectors, unsharded and without padding.

  Low-bit rows keep their padding columns, which belong to their groups:
  gathered, the shards' codes, scales and offsets are one unsharded
  `QuantizedVectors` (each device quantized whole rows or whole groups).
  """
  if isinstance(basis.vectors, quantization.QuantizedVectors):
    vectors = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)[:basis.dim]),
                           basis.read_vectors())
  else:
    vectors = jnp.asarray(
        np.asarray(basis.read_vectors())[:basis.dim, :basis.num_params])
  return twa.Basis(basis_lib.to_refs(vectors), basis.spec, basis.dim)


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(l, np.float64))
                         for l in jax.tree.leaves(tree)])


def _projector(basis: twa.Basis) -> np.ndarray:
  q = np.asarray(basis.read_vectors(), np.float64)[:basis.dim, :basis.num_params]
  return q.T @ q


_BASES = {}


def _basis(k: int, layout: str, kind: str = "trajectory",
           axis_type=AxisType.Auto, dtype="float32") -> twa.Basis:
  key = (k, layout, kind, axis_type, dtype)
  if key not in _BASES:
    _BASES[key] = twa.basis_from_snapshots(
        _snapshots(kind), mesh=_mesh(k, axis_type), axis="x", layout=layout,
        dtype=dtype)
  return _BASES[key]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", KS)
def test_shards_hold_what_the_layout_promises(k, layout):
  basis = _basis(k, layout)
  n = basis.dim
  assert n == N and basis.num_params == D
  assert basis.layout.kind == layout and basis.layout.num_shards == k
  rows, cols = (-(-n // k) * k, D) if layout == "basis" else (n, -(-D // k) * k)
  assert basis.vectors.shape == (rows, cols) == basis.layout.shape
  shard = (rows // k, D) if layout == "basis" else (n, cols // k)
  shards = basis.read_vectors().addressable_shards
  assert len(shards) == k
  assert {s.data.shape for s in shards} == {shard}
  assert len({s.device for s in shards}) == k
  # Padding rows / columns are exactly zero.
  full = np.asarray(basis.read_vectors())
  assert not full[n:].any() and not full[:, D:].any()
  q = full[:n, :D].astype(np.float64)
  np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-5)


@pytest.mark.parametrize("dtype", ("float32", "int8"))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_refs_work_eagerly_closed_over_and_as_argument(layout, dtype):
  """P stays in sharded Refs; the products run eagerly, inside a jit that
  closes over the basis, and inside one that takes it as an argument."""
  basis = _basis(4, layout, dtype=dtype)
  for x in jax.tree.leaves(basis.vectors):
    assert isinstance(x, jax.Ref)
    assert x.sharding.is_equivalent_to(basis.layout.sharding, 2), x.sharding
  g = _random_tree(3)
  want = _flat(_plain(basis).project(g))
  for got in (basis.project(g), jax.jit(lambda t: basis.project(t))(g),
              jax.jit(lambda b, t: b.project(t))(basis, g),
              jax.jit(lambda t: basis.from_coordinates(basis.coordinates(t)))(g)):
    np.testing.assert_allclose(_flat(got), want, **TOL)


@pytest.mark.parametrize("dtype", LOW_BITS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", (2, 8))
def test_low_bit_shards_are_quantized_on_their_devices(k, layout, dtype):
  """Codes, scales and offsets sharded like the float32 rows; a device holds
  1/4 (int8) or 1/8 (int4) of its float32 shard plus 8 bytes per group,
  each entry within half a step of the float32 basis."""
  basis, exact = _basis(k, layout, dtype=dtype), _basis(k, layout)
  q, n = basis.read_vectors(), basis.dim
  assert isinstance(q, quantization.QuantizedVectors) and q.dtype == dtype
  assert basis.layout.group == q.group and q.shape == basis.layout.shape
  assert q.group % 2 == 0 and q.group <= quantization.GROUP
  # One shard of each array per device, cut like the float32 rows.
  devices = {s.device for s in exact.read_vectors().addressable_shards}
  for x in (q.codes, q.scale, q.offset):
    assert x.sharding.is_equivalent_to(basis.layout.sharding, 2), x.sharding
    assert {s.device for s in x.addressable_shards} == devices
  rows, width = exact.read_vectors().addressable_shards[0].data.shape
  cols = q.shape[1] // k if layout == "params" else q.shape[1]
  assert cols % q.group == 0 and cols - width < 2 * -(-width // q.group)
  per_device = collections.Counter()
  for x in (q.codes, q.scale, q.offset):
    for shard in x.addressable_shards:
      per_device[shard.device] += shard.data.nbytes
  # Codes: 1/4 or 1/8 of the float32 shard, widened to whole groups.
  codes = rows * width * 4 * q.bits // 32 * cols // width
  want = codes + 8 * rows * cols // q.group
  assert set(per_device.values()) == {want}, (per_device, want)
  # Each entry within half a step of the float32 basis (same W, same passes);
  # padding rows stay exactly zero.
  deq = np.asarray(q.dequantize(0, q.shape[1]))
  full = np.asarray(exact.read_vectors())
  full = np.pad(full, ((0, 0), (0, q.shape[1] - full.shape[1])))
  step = np.repeat(np.asarray(q.scale), q.group, axis=1)
  assert np.all(np.abs(deq - full) <= 0.5 * step + 1e-6)
  assert not deq[n:].any()
  # Coordinates: the bound of test_quantization.py against the float32 basis.
  g = _random_tree(1)
  l1 = np.pad(np.abs(_flat(g)), (0, q.shape[1] - D)).reshape(-1, q.group).sum(1)
  bound = 0.5 * np.asarray(q.scale)[:n] @ l1
  coordinates = jax.jit(lambda b: b.coordinates(g))
  err = np.abs(np.asarray(coordinates(basis)) - np.asarray(coordinates(exact)))
  assert np.all(err <= bound * (1 + 1e-4) + 1e-5)


# Explicit mesh axes (shardings as types) are checked on the largest mesh;
# low-bit storage on two mesh sizes (shards compared with the same codes on
# one device).
CASES = [(k, layout, AxisType.Auto, "float32") for k in KS
         for layout in LAYOUTS] + [
             (8, layout, AxisType.Explicit, dtype) for layout in LAYOUTS
             for dtype in ("float32", "int4")] + [
                 (k, layout, AxisType.Auto, dtype) for k in (2, 8)
                 for layout in LAYOUTS for dtype in LOW_BITS]


@pytest.mark.parametrize("k,layout,axis_type,dtype", CASES)
def test_products_equal_unsharded(k, layout, axis_type, dtype):
  basis = _basis(k, layout, axis_type=axis_type, dtype=dtype)
  plain = _plain(basis)
  g = _random_tree(1)
  beta = jnp.asarray(np.random.default_rng(2).normal(size=basis.dim), jnp.float32)
  fns = {
      "coordinates": lambda b, g, beta: b.coordinates(g),
      "project": lambda b, g, beta: b.project(g),
      "from_coordinates": lambda b, g, beta: b.from_coordinates(beta),
  }
  for name, fn in fns.items():
    want = jax.jit(fn)(plain, g, beta)
    # Eager: compiles per op (and dequantizes block by block), so only once.
    eager = [fn(basis, g, beta)] if k == 8 and dtype == "float32" else []
    for got in eager + [jax.jit(fn)(basis, g, beta)]:
      assert jax.tree.structure(got) == jax.tree.structure(want), name
      for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert x.shape == y.shape and x.dtype == y.dtype, name
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL,
                                   err_msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_wide_shards_loop_over_column_blocks(layout):
  """D = 10 000 on 2 devices: the blockwise products (bfloat16 on CPU, int8,
  int4) loop over column blocks inside the map."""
  rng = np.random.default_rng(7)
  snaps = [{"w": rng.normal(size=10_000).astype(np.float32)} for _ in range(4)]
  g = {"w": jnp.asarray(rng.normal(size=10_000), jnp.float32)}
  beta = jnp.asarray(rng.normal(size=4), jnp.float32)
  fns = [jax.jit(fn) for fn in (lambda b: b.project(g),
                                lambda b: b.coordinates(g),
                                lambda b: b.from_coordinates(beta))]
  for dtype in (jnp.bfloat16, "int8", "int4"):
    basis = twa.basis_from_snapshots(snaps, mesh=_mesh(2), layout=layout,
                                     dtype=dtype)
    for fn in fns:
      np.testing.assert_allclose(_flat(fn(basis)), _flat(fn(_plain(basis))),
                                 rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k,layout,kind", [
    (k, layout, "trajectory") for k in KS for layout in LAYOUTS] + [
        (8, layout, "deficient") for layout in LAYOUTS])
def test_orthonormalization_equals_unsharded_span(k, layout, kind):
  """Same span; rank-deficient sets also run on random meshes below."""
  sharded = _basis(k, layout, kind)
  plain = twa.basis_from_snapshots(_snapshots(kind))
  assert sharded.dim == plain.dim == (N if kind == "trajectory" else 4)
  np.testing.assert_allclose(_projector(sharded), _projector(plain), atol=2e-5)
  # Every snapshot lies in the sharded span.
  for w in _snapshots(kind)[::3]:
    np.testing.assert_allclose(_flat(sharded.project(w)), _flat(w),
                               rtol=1e-4, atol=1e-4)


@settings(max_examples=6)
@given(strategies.snapshot_sets(kinds=("trajectory", "deficient")),
       st.sampled_from((3, 5, 6, 7)), st.sampled_from(LAYOUTS))
def test_random_trees_on_odd_meshes(snaps, k, layout):
  """Random pytrees (D = 64 or 256, n in 1..8) on meshes of 3, 5, 6, 7."""
  plain = twa.basis_from_snapshots(snaps.snapshots)
  sharded = twa.basis_from_snapshots(snaps.snapshots, mesh=_mesh(k),
                                     layout=layout)
  assert sharded.dim == plain.dim
  np.testing.assert_allclose(_projector(sharded), _projector(plain), atol=3e-5)
  g = strategies.fill(snaps.layout, np.random.default_rng(0).normal(
      size=plain.num_params))
  np.testing.assert_allclose(_flat(sharded.project(g)),
                             _flat(_plain(sharded).project(g)),
                             rtol=1e-5, atol=1e-5)


def _loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return jnp.mean((h @ params["head"] - y) ** 2)


def _batch(seed: int):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(16, 5)), jnp.float32),
          jnp.asarray(rng.normal(size=(16, 3)), jnp.float32))


_START = _snapshots("trajectory")[N // 2]
_BATCHES = [_batch(i) for i in range(3)]


@functools.partial(jax.jit, static_argnums=0)
def _step(tx, params, opt_state, batch):
  grads = jax.grad(_loss)(params, batch)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _run(tx, params, batches):
  opt_state = tx.init(params)
  for batch in batches:
    params, opt_state = _step(tx, params, opt_state, batch)
  return params, opt_state


def _optimizers(basis, adam: bool):
  txs = [twa.twa(basis, 0.5, weight_decay=1e-3)]
  return txs + [twa.scale_by_subspace(basis, optax.adam(0.05))] if adam else txs


@functools.cache
def _unsharded_twa() -> np.ndarray:
  """TWA steps with the unsharded basis (P P^T g: any basis of the span)."""
  plain = twa.basis_from_snapshots(_snapshots("trajectory"))
  params, _ = _run(_optimizers(plain, False)[0], _START, _BATCHES)
  return _flat(params)


def _is_basis(x) -> bool:
  return isinstance(x, twa.Basis)


@pytest.mark.parametrize("k,layout,axis_type,dtype", CASES)
def test_data_parallel_steps_equal_unsharded(k, layout, axis_type, dtype):
  """twa.twa on every mesh; scale_by_subspace(adam) too on the largest."""
  basis = _basis(k, layout, axis_type=axis_type, dtype=dtype)
  exact = dtype == "float32"
  mesh = basis.layout.mesh
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(_START, replicated)
  batches = [jax.device_put(b, NamedSharding(mesh, P("x"))) for b in _BATCHES]
  adam = k == 8
  for i, tx in enumerate(_optimizers(basis, adam)):
    got, state = _run(tx, params, batches)
    if i == 0 and exact:
      want = _unsharded_twa()
    else:  # Adam on coordinates depends on the basis, not only on its span;
      # low-bit vectors span only nearly the same space.
      want = _flat(_run(_optimizers(_plain(basis), adam)[i], _START, _BATCHES)[0])
    np.testing.assert_allclose(_flat(got), want, rtol=1e-5, atol=1e-6)
    # Updates keep the parameters' (replicated) sharding, and so does the
    # optimizer state, which holds no basis (the transformation closes over
    # it); the basis keeps its layout.
    stats = jax.tree.leaves(state, is_leaf=_is_basis)
    assert not any(_is_basis(leaf) for leaf in stats)
    for leaf in jax.tree.leaves(got) + stats:
      assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim), leaf.sharding
    assert all(x.sharding.is_equivalent_to(basis.layout.sharding, 2)
               for x in jax.tree.leaves(basis.read_vectors()))
    if exact:  # The iterate stays in the span.
      np.testing.assert_allclose(_flat(basis.project(got)), _flat(got),
                                 rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", ("float32",) + LOW_BITS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", KS)
def test_compiled_projection_communicates_what_layout_promises(k, layout, dtype):
  """basis: one all-reduce of D; params: one all-reduce of n (and, for a
  replicated result, one all-gather of the D/k slices), none larger; the
  same for low-bit shards (dequantized on their devices)."""
  basis = _basis(k, layout, dtype=dtype)
  g = _random_tree(3)
  cols = basis.vectors.shape[1]
  text = jax.jit(lambda b, g: b.project(g)).lower(basis, g).compile().as_text()
  if layout == "basis":
    want = [("all-reduce", D, 4 * D)]
  else:
    want = [("all-gather", cols, 4 * cols), ("all-reduce", N, 4 * N)]
  assert sorted(hlo.collectives(text)) == want


@pytest.mark.parametrize("dtype", ("float32", "int8"))
@pytest.mark.parametrize("k", KS)
def test_params_layout_on_a_sharded_flat_vector_sends_only_n(k, dtype):
  """Explicit axes, FSDP-style flat gradient sharded over the mesh."""
  basis = _basis(k, "params", axis_type=AxisType.Explicit, dtype=dtype)
  flat = basis.spec.ravel(_random_tree(3), pad_to=basis.vectors.shape[1])
  flat = jax.device_put(flat, NamedSharding(basis.layout.mesh, P("x")))
  fn = jax.jit(basis.layout.project)
  assert hlo.collectives(
      fn.lower(basis.read_vectors(), flat).compile().as_text()) == [
          ("all-reduce", N, 4 * N)]
  out = fn(basis.read_vectors(), flat)
  assert out.sharding.is_equivalent_to(flat.sharding, 1)
  want = _plain(basis).project(_random_tree(3))
  np.testing.assert_allclose(np.asarray(out)[:D], _flat(want), **TOL)


def test_two_dimensional_mesh_replicates_over_the_other_axis():
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(AxisType.Auto,) * 2)
  snaps = _snapshots("trajectory")
  for layout in LAYOUTS:
    basis = twa.basis_from_snapshots(snaps, mesh=mesh, axis="model",
                                     layout=layout, dtype=jnp.bfloat16)
    assert basis.vectors.dtype == jnp.bfloat16
    assert len(basis.read_vectors().addressable_shards) == 8
    want = (3, D) if layout == "basis" else (N, 16)
    assert {s.data.shape for s in basis.read_vectors().addressable_shards} == {want}
    g = _random_tree(4)
    np.testing.assert_allclose(_flat(basis.project(g)),
                               _flat(_plain(basis).project(g)),
                               rtol=1e-5, atol=1e-5)
  # Default axis on a 2-d mesh: both axes, k = 8.
  basis = twa.basis_from_snapshots(snaps, mesh=mesh)
  assert basis.layout.axis == ("data", "model") and basis.layout.num_shards == 8
  assert {s.data.shape for s in basis.read_vectors().addressable_shards} == {(2, D)}
  np.testing.assert_allclose(_projector(basis), _projector(_basis(8, "basis")),
                             atol=1e-6)


def test_bad_arguments_are_named():
  snaps = _snapshots("trajectory")[:3]
  with pytest.raises(ValueError, match="layout"):
    twa.basis_from_snapshots(snaps, mesh=_mesh(2), layout="rows")
  with pytest.raises(ValueError, match="axis: 'y'"):
    twa.basis_from_snapshots(snaps, mesh=_mesh(2), axis="y")
  with pytest.raises(TypeError, match="mesh"):
    twa.basis_from_snapshots(snaps, mesh=jax.devices()[:2])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  with TrajectoryStore(tmp_path_factory.mktemp("store") / "s") as store:
    for step, w in enumerate(_snapshots("trajectory")):
      store.save(step, w)
    store.wait_until_finished()
    yield store


def test_from_store_builds_the_same_sharded_basis(store):
  """Read through the column view: the same W, so the same basis."""
  for layout in LAYOUTS:
    basis = twa.basis_from_store(store, mesh=_mesh(4), layout=layout)
    assert basis.layout == _basis(4, layout).layout
    np.testing.assert_array_equal(basis.read_vectors(), _basis(4, layout).read_vectors())


def _layer(path: str) -> str:
  return path.split("]")[0] + "]"


def _plain_blocks(basis):
  """The same block bases, unsharded and without padding."""
  return dataclasses.replace(basis, bases=tuple(
      _plain(b) if b.layout else b for b in basis.bases))


_BLOCK_SNAPSHOTS = [{**w, "head": jnp.zeros_like(w["head"])}  # an empty block
                    for w in _snapshots("trajectory")]


@pytest.mark.parametrize("dtype", ("float32", "int4"))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("granularity", ["leaf", _layer])
def test_block_basis_on_a_mesh_equals_unsharded(granularity, layout, dtype):
  """Blocks of 7 to 42 columns on 8 devices (the bias pads to 8); low-bit
  blocks against the same codes on one device."""
  mesh = _mesh(8)
  basis = twa.basis_from_snapshots(_BLOCK_SNAPSHOTS, granularity=granularity,
                                   mesh=mesh, layout=layout, dtype=dtype)
  plain = twa.basis_from_snapshots(_BLOCK_SNAPSHOTS, granularity=granularity)
  assert basis.names == plain.names and basis.dims == plain.dims
  assert plain.dims[plain.names[0]] == 0  # ['head']: zero in every snapshot
  for b in basis.bases[1:]:
    assert b.layout.kind == layout and b.layout.num_shards == 8
    assert isinstance(b.vectors, quantization.QuantizedVectors) == (
        dtype != "float32")
  same = _plain_blocks(basis)
  # float32: any basis of the span projects alike; low-bit: the same codes.
  ref = plain if dtype == "float32" else same
  g = _random_tree(5)
  beta = {name: jnp.asarray(np.random.default_rng(6).normal(size=dim),
                            jnp.float32) for name, dim in basis.dims.items()}
  project = jax.jit(lambda b: b.project(g))
  coordinates = jax.jit(lambda b: b.coordinates(g))
  expand = jax.jit(lambda b: b.from_coordinates(beta))
  for got, want in [(project(basis), project(ref)),
                    (coordinates(basis), coordinates(same)),
                    (expand(basis), expand(same))]:
    np.testing.assert_allclose(_flat(got), _flat(want), **TOL)
  start = _BLOCK_SNAPSHOTS[N // 2]
  tx = lambda b: twa.twa(b, 0.5, weight_decay=1e-3)
  replicated = NamedSharding(mesh, P())
  got, _ = _run(tx(basis), jax.device_put(start, replicated),
                [jax.device_put(b, NamedSharding(mesh, P("x"))) for b in _BATCHES])
  want, _ = _run(tx(ref), start, _BATCHES)
  np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def block_store(tmp_path_factory):
  with TrajectoryStore(tmp_path_factory.mktemp("blocks") / "s") as store:
    for step, w in enumerate(_BLOCK_SNAPSHOTS):
      store.save(step, w)
    store.wait_until_finished()
    yield store


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("granularity", ["leaf", _layer])
def test_block_basis_from_store_on_a_mesh(block_store, granularity, layout):
  """Each block read through its own column view; the zero block found on
  the devices."""
  basis = twa.basis_from_store(block_store, granularity=granularity,
                               mesh=_mesh(8), layout=layout)
  want = twa.basis_from_snapshots(_BLOCK_SNAPSHOTS, granularity=granularity,
                                  mesh=_mesh(8), layout=layout)
  assert basis.names == want.names and basis.dims == want.dims
  assert basis.dims[basis.names[0]] == 0  # ['head']
  for b, w in zip(basis.bases, want.bases):
    assert b.layout == w.layout
    np.testing.assert_array_equal(b.read_vectors(), w.read_vectors())


def test_orthonormalization_only_reduces_grams_and_moves_rows_once():
  """No device ever gathers W or P: n x n psums, then one all-to-all."""
  k, mesh = 8, _mesh(8)
  cols = -(-D // k) * k
  w = sharding.put_columns(np.ones((N, D), np.float32), mesh, "x", cols)
  assert {s.data.shape for s in w.addressable_shards} == {(N, cols // k)}
  passes = sharding.column_passes(mesh, "x")
  with jax.enable_x64(True):
    text = passes.center.lower(w).compile().as_text()
  assert hlo.collectives(text) == [("all-reduce", N * N, 8 * N * N)]
  layout = sharding.BasisLayout(mesh, "x", N, D)
  vectors = jax.device_put(jnp.ones((N, cols)), NamedSharding(mesh, P(None, "x")))
  text = jax.jit(functools.partial(sharding._to_rows, layout)).lower(  # pylint: disable=protected-access
      vectors).compile().as_text()
  rows = layout.shape[0]
  assert [c[0] for c in hlo.collectives(text)] == ["all-to-all"]
  assert hlo.collectives(text)[0][1] <= rows * cols // k
