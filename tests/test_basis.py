"""Basis: orthonormality, reconstruction, projection properties, rank, errors."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import strategies
import twa_jax as twa
from twa_jax import kernels
from twa_jax.orthonormalize import LOCAL_PASSES, REF_PASSES, default_rtol

F32_EPS = float(jnp.finfo(jnp.float32).eps)
BF16_EPS = float(jnp.finfo(jnp.bfloat16).eps)


def _rtol(snaps: strategies.SnapshotSet) -> float:
  return default_rtol(twa.ParamSpec.of(snaps.snapshots[0]), snaps.n)


def _rank_bounds(snaps: strategies.SnapshotSet, svals: np.ndarray,
                 rtol: float) -> tuple[int, int]:
  """Numerical rank at rtol; a range when singular values sit near the cut."""
  cut = rtol * np.linalg.norm(snaps.matrix, axis=1).max()
  return int(np.sum(svals > 2.0 * cut)), int(np.sum(svals > 0.5 * cut))


def _random_like(tree, rng):
  """A float32 tree of the same structure and shapes with random entries."""
  return jax.tree.map(
      lambda l: jnp.asarray(rng.normal(size=l.shape).astype(np.float32)), tree)


@given(strategies.snapshot_sets(strategies.DTYPES))
def test_orthonormal_reconstructs_and_has_numerical_rank(snaps):
  basis = twa.basis_from_snapshots(snaps.snapshots)
  p = strategies.basis_rows(basis)  # k x D rows
  d = snaps.matrix.shape[1]
  assert basis.num_params == d and p.shape == (basis.dim, d)
  assert basis.vectors.dtype == jnp.float32
  np.testing.assert_allclose(p @ p.T, np.eye(basis.dim), atol=1e-5)

  rtol = _rtol(snaps)
  svals = np.linalg.svd(snaps.matrix, compute_uv=False)
  low, high = _rank_bounds(snaps, svals, rtol)
  assert low <= basis.dim <= high, (svals / svals[0], basis.dim)
  if snaps.kind != "deficient":
    # Full-rank by construction (the drift is far above the cut for float32).
    if rtol < 1e-5:
      assert basis.dim == snaps.n

  # ||w_i - P P^T w_i|| is at most the largest dropped singular value of W
  # (below rtol * s_1) plus float32 rounding.
  dropped = svals[basis.dim] if basis.dim < len(svals) else 0.0
  bound = dropped + 20 * F32_EPS * svals[0]
  for row, snapshot in zip(snaps.matrix, snaps.snapshots):
    as_f32 = jax.tree.map(lambda l: l.astype(jnp.float32), snapshot)
    projected = basis.project(as_f32)
    assert jax.tree_util.tree_structure(projected) == jax.tree_util.tree_structure(snapshot)
    err = np.linalg.norm(strategies.flat(projected) - row)
    assert err <= bound, (err, bound)
    # Same through coordinates and back, and the leaf dtypes are kept.
    back = basis.from_coordinates(basis.coordinates(snapshot))
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(snapshot)):
      assert a.dtype == b.dtype and a.shape == b.shape
    scale = np.abs(row).max()
    assert np.abs(strategies.flat(back) - row).max() <= (
        bound + 2 * BF16_EPS * scale if rtol > 1e-5 else bound)


@given(strategies.snapshot_sets(), st.integers(0, 2**32 - 1))
def test_project_idempotent_and_symmetric(snaps, seed):
  basis = twa.basis_from_snapshots(snaps.snapshots)
  rng = np.random.default_rng(seed)
  x = _random_like(snaps.snapshots[0], rng)
  y = _random_like(snaps.snapshots[0], rng)
  px, py = basis.project(x), basis.project(y)
  fx, fy, fpx, fpy = map(strategies.flat, (x, y, px, py))
  nx, ny = np.linalg.norm(fx), np.linalg.norm(fy)
  np.testing.assert_allclose(strategies.flat(basis.project(px)), fpx,
                             atol=1e-5 * nx)
  assert abs(fpx @ fy - fx @ fpy) <= 1e-5 * nx * ny
  assert np.linalg.norm(fpx) <= nx * (1 + 1e-5)  # a contraction
  # P P^T x agrees with the explicit float64 projector.
  p = strategies.basis_rows(basis)
  np.testing.assert_allclose(fpx, p.T @ (p @ fx), atol=1e-5 * nx)
  np.testing.assert_allclose(np.asarray(basis.coordinates(x)), p @ fx,
                             atol=1e-5 * nx)
  # The residual is orthogonal to every snapshot.
  residual = fx - fpx
  np.testing.assert_allclose(snaps.matrix @ residual, 0.0,
                             atol=1e-5 * nx * np.abs(snaps.matrix).max() * np.sqrt(len(fx)))


@given(strategies.snapshot_sets(kinds=("random", "trajectory")))
def test_bfloat16_storage(snaps):
  """bfloat16 P: orthonormal and reconstructing to bfloat16 precision.

  Tolerances: |P^T P - I| <= 0.02 (a few bfloat16 ulps, eps = 2^-7) and
  relative reconstruction error <= 0.02; the products accumulate in float32.
  """
  basis = twa.basis_from_snapshots(snaps.snapshots, dtype=jnp.bfloat16)
  reference = twa.basis_from_snapshots(snaps.snapshots)
  assert basis.vectors.dtype == jnp.bfloat16 and basis.dim == reference.dim
  p = strategies.basis_rows(basis)
  np.testing.assert_allclose(p @ p.T, np.eye(basis.dim), atol=0.02)
  for row, snapshot in zip(snaps.matrix, snaps.snapshots):
    projected = strategies.flat(basis.project(snapshot))
    assert np.linalg.norm(projected - row) <= 0.02 * np.linalg.norm(row)
  coords = basis.coordinates(snaps.snapshots[0])
  assert coords.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(coords),
                             np.asarray(reference.coordinates(snaps.snapshots[0])),
                             atol=0.02 * np.linalg.norm(snaps.matrix[0]))


def test_nearly_collinear_trajectory_stays_orthonormal():
  """Nearly collinear snapshots (cosine 0.99999): orthogonality kept."""
  rng = np.random.default_rng(0)
  d, n = 4096, 30
  w0 = rng.normal(size=d)
  steps = rng.normal(size=(n, d)) * 0.0045 / np.sqrt(d) * np.linalg.norm(w0)
  w = (w0 + np.cumsum(steps, axis=0)).astype(np.float32)
  w64 = w.astype(np.float64)
  cos = np.sum(w64[1:] * w64[:-1], 1) / np.linalg.norm(w64[1:], axis=1) / np.linalg.norm(w64[:-1], axis=1)
  assert cos.min() > 0.99999 - 1e-6
  vectors, spectrum = twa.orthonormalize(w.copy(), rtol=1e-6)
  p = np.asarray(vectors, np.float64)
  assert p.shape == (n, d) and spectrum.dim == n and spectrum.dropped == 0
  assert np.abs(p @ p.T - np.eye(n)).max() < 1e-5
  svals = np.linalg.svd(w64, compute_uv=False)
  np.testing.assert_allclose(spectrum.values, svals, rtol=1e-4)
  np.testing.assert_allclose(spectrum.condition, svals[0] / svals[-1], rtol=1e-3)
  recon = (w64 @ p.T) @ p
  assert np.abs(recon - w64).max() < 1e-5 * np.abs(w64).max()


def test_duplicates_and_combinations_add_no_directions():
  rng = np.random.default_rng(1)
  a, b, c = (rng.normal(size=50).astype(np.float32) for _ in range(3))
  snaps = [{"w": v} for v in (a, b, a, 2 * a - b, c, b, 0.5 * (a + c), a)]
  basis = twa.basis_from_snapshots(snaps)
  assert basis.dim == 3
  # A stacked tree of the same snapshots gives the same subspace.
  stacked = {"w": np.stack([s["w"] for s in snaps])}
  other = twa.basis_from_snapshots(stacked)
  p, q = (strategies.basis_rows(x) for x in (basis, other))
  np.testing.assert_allclose(p.T @ p, q.T @ q, atol=1e-5)
  # A zero snapshot adds nothing either; rtol can drop weak directions.
  assert twa.basis_from_snapshots(snaps + [{"w": np.zeros(50, np.float32)}]).dim == 3
  weak = [{"w": a}, {"w": a + 1e-4 * c}]
  assert twa.basis_from_snapshots(weak).dim == 2
  assert twa.basis_from_snapshots(weak, rtol=1e-3).dim == 1


def test_basis_passes_through_jit():
  rng = np.random.default_rng(2)
  snaps = [{"a": rng.normal(size=(3, 4)).astype(np.float32),
            "b": rng.normal(size=(5,)).astype(np.float32)} for _ in range(3)]
  basis = twa.basis_from_snapshots(snaps)
  leaves, treedef = jax.tree_util.tree_flatten(basis)
  assert len(leaves) == 1 and leaves[0] is basis.vectors
  x = _random_like(snaps[0], rng)

  @jax.jit
  def f(b, t):
    return b.project(t), b.coordinates(t), b.from_coordinates(b.coordinates(t))

  p1, c1, r1 = f(basis, x)
  np.testing.assert_allclose(strategies.flat(p1), strategies.flat(basis.project(x)),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(strategies.flat(r1), strategies.flat(p1), atol=1e-6)
  np.testing.assert_allclose(np.asarray(c1), np.asarray(basis.coordinates(x)),
                             rtol=1e-6, atol=1e-6)
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert rebuilt.spec == basis.spec and rebuilt.dim == basis.dim


def test_zero_snapshots_rejected():
  with pytest.raises(ValueError, match="zero"):
    twa.basis_from_snapshots([{"w": np.zeros(8, np.float32)}] * 2)


@pytest.mark.parametrize("bad, error, pattern", [
    ([], ValueError, "empty"),
    ([{"w": np.ones(4, np.float32)}, {"w": np.ones(5, np.float32)}],
     ValueError, r"snapshot 1: leaf \['w'\]"),
    ([{"w": np.ones(4, np.float32)}, {"v": np.ones(4, np.float32)}],
     ValueError, r"snapshot 1.*\['w'\]"),
    ([{"w": np.ones(4, np.float32)}, {"w": np.ones(4, np.float16)}],
     TypeError, r"snapshot 1: leaf \['w'\]"),
    ([{"w": np.ones(4, np.int32)}], TypeError, r"\['w'\].*int32"),
    ([{"w": np.ones(4, np.float32)}, {"w": np.array([1, np.nan, 1, 1], np.float32)}],
     ValueError, r"snapshot 1: leaf \['w'\].*NaN"),
    ([{"w": np.array([np.inf, 1, 1, 1], np.float32)}],
     ValueError, r"snapshot 0: leaf \['w'\].*Inf"),
])
def test_from_snapshots_bad_input(bad, error, pattern):
  with pytest.raises(error, match=pattern):
    twa.basis_from_snapshots(bad)


def test_mismatched_trees_name_the_leaf():
  snaps = [{"layer": {"w": np.ones((2, 3), np.float32) * i,
                      "b": np.arange(3, dtype=np.float32) * i ** 2}}
           for i in range(1, 3)]
  basis = twa.basis_from_snapshots(snaps)
  wrong_shape = {"layer": {"w": jnp.ones((3, 2)), "b": jnp.ones(3)}}
  missing = {"layer": {"w": jnp.ones((2, 3))}}
  non_float = {"layer": {"w": jnp.ones((2, 3)), "b": jnp.ones(3, jnp.int32)}}
  for method in (basis.project, basis.coordinates):
    with pytest.raises(ValueError, match=r"\['layer'\]\['w'\].*\(3, 2\)"):
      method(wrong_shape)
    with pytest.raises(ValueError, match=r"missing leaf \['layer'\]\['b'\]"):
      method(missing)
    with pytest.raises(TypeError, match=r"\['layer'\]\['b'\].*int32"):
      method(non_float)
  with pytest.raises(ValueError, match=r"beta has shape \(3,\), expected \(2,\)"):
    basis.from_coordinates(jnp.ones(3))
  with pytest.raises(ValueError, match=r"beta has shape \(2, 1\)"):
    basis.from_coordinates(jnp.ones((2, 1)))
  with pytest.raises(TypeError, match="floating point"):
    twa.basis_from_snapshots(snaps, dtype=jnp.int8)


def _big_basis(d: int = 200_000):
  rng = np.random.default_rng(5)
  snaps = [{"w": rng.normal(size=d).astype(np.float32)} for _ in range(4)]
  return snaps, twa.basis_from_snapshots(snaps)


def test_vectors_live_in_refs_read_inside_one_jitted_call():
  snaps, basis = _big_basis()
  assert all(isinstance(x, jax.Ref) for x in jax.tree.leaves(basis.vectors))
  x = {"w": jnp.asarray(snaps[1]["w"])}
  p = strategies.basis_rows(basis)
  for method, arg in ((basis.project, x), (basis.coordinates, x),
                      (basis.from_coordinates, jnp.ones(basis.dim))):
    # Eagerly, each product is one jitted call that reads P in place: no
    # read of the Refs (an eager copy of P) outside it.
    eqns = jax.make_jaxpr(method)(arg).eqns
    assert [e.primitive.name for e in eqns] == ["jit"], eqns
  np.testing.assert_allclose(np.asarray(basis.project(x)["w"]),
                             p.T @ (p @ snaps[1]["w"]), rtol=1e-4, atol=1e-4)
  # The basis is unchanged by its use.
  np.testing.assert_array_equal(strategies.basis_rows(basis), p)


def test_closure_over_the_basis_neither_embeds_nor_changes_p():
  snaps, basis = _big_basis()
  x = {"w": jnp.asarray(snaps[2]["w"])}
  want = basis.project(x)["w"]
  f = jax.jit(lambda t: basis.project(t))
  # P (3.2 MB) is not a constant of the program: it is read from its Refs.
  assert len(f.lower(x).as_text()) < 100_000
  np.testing.assert_allclose(np.asarray(f(x)["w"]), np.asarray(want),
                             rtol=1e-6, atol=1e-6)
  g = nnx.jit(lambda t: basis.from_coordinates(basis.coordinates(t)))
  np.testing.assert_allclose(np.asarray(g(x)["w"]), np.asarray(want),
                             rtol=1e-6, atol=1e-6)


def _drifting(dtype, drift: float, n: int = 10, d: int = 1000):
  """n snapshots w0 + drift * noise (independent), stored in `dtype`."""
  rng = np.random.default_rng(7)
  w0 = rng.normal(size=d)
  return [w0 + drift * rng.normal(size=d) for _ in range(n)]


def test_default_cutoff_keeps_what_low_precision_snapshots_resolve():
  # 10% drift is far above bfloat16's rounding (0.4%): all 10 directions
  # are resolved (the cut-off of 10 eps x the largest singular value kept 1).
  rows = _drifting(jnp.bfloat16, 0.1)
  basis = twa.basis_from_snapshots([{"w": jnp.asarray(r, jnp.bfloat16)} for r in rows])
  assert basis.dim == 10 and basis.dropped == 0
  # One 4-entry float16 leaf in a float32 model: float32's resolution
  # (it kept 1 of 10 at 1% drift).
  rows = _drifting(jnp.float32, 0.01)
  mixed = [{"w": r.astype(np.float32), "s": r[:4].astype(np.float16)} for r in rows]
  assert twa.basis_from_snapshots(mixed).dim == 10
  # What the dtype cannot resolve is still dropped: bfloat16 rounding of
  # nearly equal snapshots adds no directions.
  rows = _drifting(jnp.bfloat16, 1e-4)
  noisy = twa.basis_from_snapshots([{"w": jnp.asarray(r, jnp.bfloat16)} for r in rows])
  assert noisy.dim < 10 and noisy.dim + noisy.dropped == 10


def test_dropped_directions_are_logged_and_counted(caplog):
  rng = np.random.default_rng(8)
  a, b = (rng.normal(size=64).astype(np.float32) for _ in range(2))
  snaps = [{"w": v} for v in (a, b, a + b, a, b + 1e-9 * a)]
  with caplog.at_level(logging.INFO, logger="twa_jax"):
    basis = twa.basis_from_snapshots(snaps)
  assert basis.dim == 2 and basis.dropped == 3
  assert basis.condition == np.inf and basis.spectrum.values[-1] == 0.0
  [record] = [r for r in caplog.records if "orthonormalize" in r.getMessage()]
  assert record.levelno == logging.WARNING
  assert "kept 2 of 5" in record.getMessage()
  assert "dropped 3" in record.getMessage()
  clean = twa.basis_from_snapshots(snaps[:2])
  assert clean.dropped == 0 and 1.0 <= clean.condition < np.inf
  np.testing.assert_allclose(
      clean.condition, np.linalg.cond(np.stack([a, b]).astype(np.float64)),
      rtol=1e-4)


@pytest.mark.parametrize("rtol", [float("nan"), 0.0, -1e-3, 1.0, 2.0])
def test_bad_rtol_is_rejected_before_work(rtol):
  snaps = [{"w": np.arange(4, dtype=np.float32) + i} for i in range(2)]
  spec, matrix = twa.ParamSpec.of(snaps[0]), np.stack([s["w"] for s in snaps])
  for build in (lambda: twa.basis_from_snapshots(snaps, rtol=rtol),
                lambda: twa.basis_from_matrix(spec, matrix, rtol=rtol),
                lambda: twa.orthonormalize(matrix, rtol=rtol)):
    with pytest.raises(ValueError, match="rtol"):
      build()


def test_every_valid_rtol_keeps_the_largest_direction():
  snaps = [{"w": np.arange(4, dtype=np.float32) + i} for i in range(3)]
  assert twa.basis_from_snapshots(snaps, rtol=0.999).dim == 1


def test_huge_finite_snapshots_get_a_clear_error():
  rng = np.random.default_rng(9)
  snaps = [{"w": (3e38 * rng.choice([-1, 1], size=50)).astype(np.float32)}
           for _ in range(4)]
  with pytest.raises(ValueError, match="overflow"):
    twa.basis_from_snapshots(snaps)


def test_from_matrix_names_a_bad_matrix():
  spec = twa.ParamSpec.of({"w": np.zeros(4, np.float32)})
  matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
  with pytest.raises(ValueError, match=r"matrix: expected n x D.*\(4,\)"):
    twa.basis_from_matrix(spec, matrix[0])
  for bad in (np.nan, np.inf):
    w = matrix.copy()
    w[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
      twa.basis_from_matrix(spec, w)


def test_builder_is_the_orthonormalizer_bit_for_bit():
  """The builder adds nothing to the numbers: the same rows as
  `orthonormalize` on the stacked snapshots with the default cut-off."""
  rows = _drifting(jnp.float32, 0.05, n=7, d=300)
  snaps = [{"a": r[:100].reshape(10, 10).astype(np.float32),
            "b": r[100:].astype(np.float32)} for r in rows]
  spec = twa.ParamSpec.of(snaps[0])
  matrix = np.stack([r.astype(np.float32) for r in rows])
  padded = np.pad(matrix, ((0, 0), (0, 512 - 300)))  # the builder's padding
  want, spectrum = twa.orthonormalize(padded, rtol=default_rtol(spec, 7))
  basis = twa.basis_from_snapshots(snaps)
  np.testing.assert_array_equal(np.asarray(basis.read_vectors()),
                                np.asarray(want))
  assert basis.spectrum == spectrum


def test_orthonormalizer_passes_write_over_their_input():
  """W, V, Q and the basis share one buffer: no full-size copy is compiled
  (for D of several column blocks, where the memory matters)."""
  n, cols = 6, 3 * kernels.CHUNK + 1000  # blocks and a tail
  matrix = jax.ShapeDtypeStruct((n, cols), jnp.float32)
  square = jax.ShapeDtypeStruct((n, n), jnp.float64)
  passes = LOCAL_PASSES
  with jax.enable_x64(True):
    compiled = [passes.center.lower(matrix),
                passes.combine_and_gram.lower(square, matrix),
                passes.combine.lower(square, matrix, jnp.dtype(jnp.float32))]
    # The same passes on W in a Ref, run under a jit to see their program.
    ref = jax.new_ref(jnp.zeros((n, cols), jnp.float32))
    c = jnp.eye(n, dtype=jnp.float64)

    def combine(c, r):  # the result is the Ref, written in place
      REF_PASSES.combine(c, r, jnp.dtype(jnp.float32))

    compiled += [
        jax.jit(lambda r: REF_PASSES.center(r)[1]).lower(ref),
        jax.jit(lambda c, r: REF_PASSES.combine_and_gram(c, r)[1]).lower(c, ref),
        jax.jit(combine).lower(c, ref)]
    for lowered in compiled:
      hlo = lowered.compile().as_text()
      assert "may-alias" in hlo.splitlines()[0]  # the donated input or Ref
      assert f"f32[{n},{cols}]{{1,0}} copy(" not in hlo


def test_orthonormalizer_builds_the_basis_in_the_ref_of_w():
  """W in a `jax.Ref`: the basis is written over it (the same Ref and
  buffer, no second Ref filled with a copy), bit for bit the basis of W as
  an array; a dropped direction gives a new array instead."""
  rows = np.stack(_drifting(jnp.float32, 0.05, n=7, d=300)).astype(np.float32)
  rtol = 1e-6
  want, spectrum = twa.orthonormalize(rows.copy(), rtol=rtol)
  ref = jax.new_ref(jnp.asarray(rows))
  buffer = ref.unsafe_buffer_pointer()
  vectors, got = twa.orthonormalize(ref, rtol=rtol)
  assert vectors is ref and ref.unsafe_buffer_pointer() == buffer
  np.testing.assert_array_equal(np.asarray(ref[...]), np.asarray(want))
  assert got == spectrum
  dependent = np.concatenate([rows, rows[:1] + rows[1:2]])  # k = n - 1
  vectors, _ = twa.orthonormalize(jax.new_ref(jnp.asarray(dependent)),
                                  rtol=rtol)
  assert not isinstance(vectors, jax.Ref) and vectors.shape == (7, 300)
