"""swa and averaging_coefficients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import strategies
import twa_jax as twa


@given(strategies.snapshot_sets(strategies.DTYPES), st.booleans())
def test_swa_is_the_mean_in_the_snapshot_dtypes(snaps, stream):
  # A generator (e.g. loading from a store) gives the list's mean.
  mean = twa.swa(iter(snaps.snapshots) if stream else snaps.snapshots)
  first = snaps.snapshots[0]
  assert jax.tree_util.tree_structure(mean) == jax.tree_util.tree_structure(first)
  for a, b in zip(jax.tree_util.tree_leaves(mean), jax.tree_util.tree_leaves(first)):
    assert a.dtype == b.dtype and a.shape == b.shape
  expected = snaps.matrix.mean(axis=0)
  got = strategies.flat(mean)
  # One rounding to the leaf dtype (bfloat16 leaves: 2^-8 relative).
  bf16 = any(l.dtype == jnp.bfloat16 for l in jax.tree_util.tree_leaves(first))
  rel = 2.0 ** -8 if bf16 else 2.0 ** -23
  np.testing.assert_allclose(got, expected, rtol=rel, atol=1e-30)


@given(strategies.snapshot_sets(kinds=("random", "trajectory", "deficient")),
       st.integers(0, 2**32 - 1), st.booleans())
def test_averaging_coefficients_recover_known_coefficients(snaps, seed, reuse):
  rng = np.random.default_rng(seed)
  alpha = rng.dirichlet(np.ones(snaps.n)) * rng.uniform(0.5, 1.5)
  target = alpha @ snaps.matrix
  params = strategies.fill(snaps.layout, target)
  # With a basis, the snapshots may come one at a time (a generator).
  basis = twa.basis_from_snapshots(snaps.snapshots) if reuse else None
  got = twa.averaging_coefficients(
      params, iter(snaps.snapshots) if reuse else snaps.snapshots, basis)
  assert got.shape == (snaps.n,) and got.dtype == jnp.float32
  got = np.asarray(got, np.float64)
  scale = np.linalg.norm(target)
  # The coefficients reproduce params in every case ...
  assert np.linalg.norm(got @ snaps.matrix - target) <= 1e-4 * scale
  if snaps.kind == "random":
    # ... and are the known ones when the snapshots are well conditioned;
    np.testing.assert_allclose(got, alpha, atol=1e-4)
    assert abs(got.sum() - alpha.sum()) < 1e-4
  elif snaps.kind == "trajectory":
    # ill-conditioned (cosine > 0.999): accuracy ~ condition number x eps.
    svals = np.linalg.svd(snaps.matrix, compute_uv=False)
    cond = svals[0] / svals[-1]
    np.testing.assert_allclose(got, alpha, atol=max(1e-4, 1e-5 * cond))
  else:
    # with dependent snapshots, the minimum-norm solution.
    assert np.linalg.norm(got) <= np.linalg.norm(alpha) * (1 + 1e-4) + 1e-6


def test_averaging_coefficients_of_swa_are_uniform_and_sum_to_one():
  rng = np.random.default_rng(0)
  snaps = [{"w": rng.normal(size=(6, 5)).astype(np.float32),
            "b": rng.normal(size=(5,)).astype(np.float32)} for _ in range(4)]
  alpha = np.asarray(twa.averaging_coefficients(twa.swa(snaps), snaps))
  np.testing.assert_allclose(alpha, 0.25, atol=1e-5)
  # Duplicated snapshots share their weight (minimum-norm solution).
  alpha = np.asarray(twa.averaging_coefficients(snaps[0], snaps + [snaps[0]]))
  np.testing.assert_allclose(alpha, [0.5, 0, 0, 0, 0.5], atol=1e-5)


def test_averaging_coefficients_reject_mismatched_params():
  snaps = [{"w": np.full((3,), i, np.float32)} for i in (1.0, 2.0)]
  with pytest.raises(ValueError, match=r"averaging_coefficients: params: leaf \['w'\]"):
    twa.averaging_coefficients({"w": jnp.ones(4)}, snaps)
  with pytest.raises(ValueError, match="empty"):
    twa.averaging_coefficients({"w": jnp.ones(3)}, [])


def test_greedy_soup_names_the_bad_candidate_before_scoring():
  good = [{"w": np.full(3, float(i), np.float32)} for i in range(1, 4)]
  bad = {"w": np.array([1.0, np.nan, 1.0], np.float32)}
  scored = []
  def score(tree):
    scored.append(tree)
    return float(np.sum(tree["w"]))
  with pytest.raises(ValueError, match=r"candidate 3: leaf \['w'\].*NaN"):
    twa.greedy_soup(good + [bad], score, scores=[1.0, 3.0, 2.0, 0.5])
  with pytest.raises(ValueError, match=r"candidate 1: leaf \['w'\]"):
    twa.greedy_soup([good[0], {"w": np.ones(4, np.float32)}], score)
  assert not scored  # found before any work
