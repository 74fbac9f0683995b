"""Low-bit (int8 / int4) basis storage: memory, error bounds, optax use."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import strategies
import twa_jax as twa
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
