"""Low-bit (int8 / int4, bfloat16) basis storage: memory, error bounds, products,
optax use."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import strategies
import twa_jax as twa
from twa_jax import kernels
from twa_jax import quantization


@settings(max_examples=15)
@given(st.sampled_from([1, 5]), st.sampled_from([2, 300, 700]),
       st.sampled_from(["int8", "int4"]), st.sampled_from([2, 8, 256]),
       st.integers(0, 2**31))
def test_dequantized_entries_within_half_a_step(k, d, dtype, group, seed):
  x = np.random.default_rng(seed).normal(size=(k, d)).astype(np.float32)
  q = quantization.quantize(jnp.asarray(x), dtype, group=group)
  assert q.shape[1] % group == 0 and q.shape[1] - d < group
  deq = np.asarray(q.dequantize(0, q.shape[1]))
  step = np.repeat(np.asarray(q.scale), group, axis=1)
  x = np.pad(x, ((0, 0), (0, q.shape[1] - d)))  # padding is quantized zeros
  # Half a step, up to float32 rounding of code * scale + offset.
  assert np.all(np.abs(deq - x) <= 0.5 * step + 4e-7 * (1 + np.abs(x)))


@given(strategies.snapshot_sets(kinds=("random", "trajectory")),
       st.sampled_from(["int8", "int4"]))
def test_quantized_products_obey_the_stated_bound(data, dtype):
  """|Q g - P g|_j <= sum_groups scale/2 * |g_group|_1 for coordinates, and
  the projection is exactly Q^T (Q g) for the dequantized Q (stays in span Q)."""
  exact = twa.basis_from_snapshots(data.snapshots)
  quant = twa.basis_from_snapshots(data.snapshots, dtype=dtype)
  assert quant.dim == exact.dim
  rng = np.random.default_rng(0)
  g = strategies.fill(data.layout, rng.normal(size=exact.num_params))
  g_flat = strategies.flat(g)
  q = quant.read_vectors()
  padded = np.pad(np.abs(g_flat), (0, q.shape[1] - g_flat.size))
  group_l1 = padded.reshape(-1, q.group).sum(axis=1)
  bound = 0.5 * np.asarray(q.scale) @ group_l1
  err = np.abs(np.asarray(quant.coordinates(g)) - np.asarray(exact.coordinates(g)))
  # Both bases come from the same orthonormalization, so the rows match.
  assert np.all(err <= bound * (1 + 1e-4) + 1e-5)
  deq = np.asarray(q.dequantize(0, q.shape[1]), np.float64)[:, :g_flat.size]
  np.testing.assert_allclose(strategies.flat(quant.project(g)),
                             deq.T @ (deq @ g_flat), atol=1e-4)


def test_memory_is_a_quarter_and_an_eighth():
  rng = np.random.default_rng(3)
  snaps = [{"w": rng.normal(size=100_000).astype(np.float32)} for _ in range(8)]
  sizes = {dt: twa.basis_from_snapshots(snaps, dtype=dt).nbytes
           for dt in ("float32", "int8", "int4")}
  overhead = 8 / 256  # scale and offset per group of 256
  assert sizes["int8"] <= sizes["float32"] * (0.25 + overhead / 4 + 1e-3)
  assert sizes["int4"] <= sizes["float32"] * (0.125 + overhead / 4 + 1e-3)


def test_quantized_twa_steps_stay_in_quantized_span():
  rng = np.random.default_rng(4)
  snaps = [{"w": rng.normal(size=(30, 10)).astype(np.float32)} for _ in range(5)]
  basis = twa.basis_from_snapshots(snaps, dtype="int4")
  params = basis.project(twa.swa(snaps))  # start inside span(Q)
  tx = twa.twa(basis, 0.1)
  state = tx.init(params)
  q = basis.read_vectors()
  q = np.asarray(q.dequantize(0, q.shape[1]))[:, :300]
  span = np.linalg.qr(q.T)[0]
  step = jax.jit(tx.update)
  for _ in range(5):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    w = np.asarray(params["w"]).ravel()
    np.testing.assert_allclose(span @ (span.T @ w), w, atol=1e-4)


def test_bad_low_bit_arguments():
  snaps = [{"w": np.arange(4, dtype=np.float32) + i} for i in range(2)]
  with pytest.raises(TypeError, match="int8"):
    twa.basis_from_snapshots(snaps, dtype="int2")
  with pytest.raises(ValueError, match="group"):
    quantization.quantize(jnp.ones((2, 4)), "int8", group=3)


@pytest.mark.parametrize("products", [
    (kernels.matvec, kernels.vecmat),  # compiled on CPU (twa_jax.native)
    (kernels.block_matvec, kernels.block_vecmat)], ids=["default", "xla"])
@settings(max_examples=8, deadline=None)
@given(st.sampled_from(["bfloat16", "int8", "int4"]),
       st.sampled_from([(3, 900), (13, 4_130), (64, 70_001)]),
       st.sampled_from([256, 250, 2]), st.integers(0, 2**31))
def test_low_bit_products_match_the_stored_values(products, dtype, shape,
                                                  group, seed):
  """P^T g and P beta equal float64 products of the stored values: bfloat16
  widened exactly, int8/int4 entries code * scale + offset read from the raw
  codes. Both the default products and XLA's blocks (k = 64, D = 70001 runs
  the loop over blocks; k = 13 leaves rows after whole sets of 4 and 8)."""
  k, d = shape
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(k, d)).astype(np.float32))
  if dtype == "bfloat16":
    vectors = x.astype(jnp.bfloat16)
    stored = np.asarray(vectors).astype(np.float64)  # numpy's own widening
    size = np.abs(stored)
  else:
    vectors = quantization.quantize(x, dtype, group=group)
    codes = np.asarray(vectors.codes)
    if dtype == "int4":  # low nibbles: first half of each group
      halves = codes.reshape(k, -1, group // 2)
      codes = np.concatenate([halves & 0xF, halves >> 4], axis=-1)
    steps = codes.reshape(k, -1, group) * np.asarray(vectors.scale)[..., None]
    offset = np.asarray(vectors.offset)[..., None]
    stored = (steps + offset).reshape(k, -1)
    size = (steps + np.abs(offset)).reshape(k, -1)  # float32 rounds both
    np.testing.assert_allclose(
        np.asarray(vectors.dequantize(0, stored.shape[1])), stored, rtol=1e-6,
        atol=1e-6)
  g = rng.normal(size=stored.shape[1]).astype(np.float32)
  beta = rng.normal(size=k).astype(np.float32)
  # float32 rounding and accumulation: well under 1e-5 of the sum of the
  # terms' magnitudes.
  matvec, vecmat = products
  err = np.abs(np.asarray(jax.jit(matvec)(vectors, g)) - stored @ g)
  assert np.all(err <= 1e-5 * (size @ np.abs(g)))
  err = np.abs(np.asarray(jax.jit(vecmat)(beta, vectors)) - beta @ stored)
  assert np.all(err <= 1e-5 * (np.abs(beta) @ size))
