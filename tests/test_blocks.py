"""Layer-wise (block) bases: granularity "leaf" and callables."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import strategies
import twa_jax as twa
from twa_jax.blocks import BlockBasis


def _first_key(path: str) -> str:
  return path.split("]")[0] + "]"


@settings(max_examples=12)
@given(strategies.snapshot_sets(kinds=("random", "trajectory")),
       st.sampled_from(["leaf", "callable"]))
def test_block_projection_is_blockwise_orthogonal_projection(data, gran):
  granularity = _first_key if gran == "callable" else gran
  basis = twa.basis_from_snapshots(data.snapshots, granularity=granularity)
  assert isinstance(basis, BlockBasis)
  spec = basis.spec
  offsets = np.cumsum((0,) + spec.sizes)
  rng = np.random.default_rng(0)
  g = strategies.fill(data.layout, rng.normal(size=spec.num_params))
  out = strategies.flat(basis.project(g))
  g_flat = strategies.flat(g)
  for b, idx in zip(basis.bases, basis.members):
    cols = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx])
    w_block = data.matrix[:, cols]
    # Expected: orthogonal projection onto the row space of the block's W.
    u, s, vt = np.linalg.svd(w_block, full_matrices=False)
    rank = int((s > 1e-5 * s.max()).sum()) if s.size and s.max() > 0 else 0
    assert b.dim == rank
    q = vt[:rank]
    np.testing.assert_allclose(out[cols], q.T @ (q @ g_flat[cols]),
                               atol=2e-4 * (1 + np.abs(g_flat[cols]).max(initial=0)))
  # Every snapshot is reproduced, block by block.
  for i, snap in enumerate(data.snapshots):
    np.testing.assert_allclose(strategies.flat(basis.project(snap)),
                               data.matrix[i], atol=2e-4, rtol=1e-4)


def test_leaf_coordinates_shape_and_roundtrip():
  rng = np.random.default_rng(1)
  snaps = [{"a": rng.normal(size=(3, 4)).astype(np.float32),
            "b": rng.normal(size=7).astype(np.float32)} for _ in range(4)]
  basis = twa.basis_from_snapshots(snaps, granularity="leaf")
  assert basis.names == ("['a']", "['b']")
  assert basis.dims == {"['a']": 4, "['b']": 4} and basis.dim == 8
  beta = basis.coordinates(snaps[2])
  assert {k: v.shape for k, v in beta.items()} == {"['a']": (4,), "['b']": (4,)}
  back = basis.from_coordinates(beta)
  for k in snaps[2]:
    np.testing.assert_allclose(back[k], snaps[2][k], atol=1e-5)
  with pytest.raises(ValueError, match="expected blocks"):
    basis.from_coordinates({"['a']": beta["['a']"]})


def test_layerwise_twa_and_adam_stay_in_span_and_beat_global_fit():
  rng = np.random.default_rng(2)
  snaps = [{"l1": rng.normal(size=20).astype(np.float32),
            "l2": rng.normal(size=30).astype(np.float32)} for _ in range(3)]
  basis = twa.basis_from_snapshots(snaps, granularity=lambda p: p)
  target = {"l1": 2.0 * snaps[0]["l1"], "l2": -snaps[1]["l2"]}  # not in the global span
  loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)
  for tx in (twa.twa(basis, 0.05, weight_decay=0.0),
             twa.scale_by_subspace(basis, optax.adam(0.05))):
    params = twa.swa(snaps)
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    for _ in range(300):
      updates, state = step(params, state)
      params = optax.apply_updates(params, updates)
      proj = basis.project(params)
      for k in params:
        np.testing.assert_allclose(proj[k], params[k], atol=1e-4)
    assert float(loss(params)) < 1e-2  # per-layer coefficients reach it
  global_basis = twa.basis_from_snapshots(snaps)
  best_global = global_basis.project(target)
  assert float(loss(best_global)) > 1.0  # one coefficient per snapshot cannot


def test_granularity_errors_name_the_problem():
  snaps = [{"a": np.ones(3, np.float32) * i, "z": np.zeros(2, np.float32)}
           for i in range(1, 3)]
  with pytest.raises(ValueError, match="granularity"):
    twa.basis_from_snapshots(snaps, granularity="layer")
  with pytest.raises(TypeError, match=r"leaf \['a'\]"):
    twa.basis_from_snapshots(snaps, granularity=lambda p: 3)
  frozen = twa.basis_from_snapshots(snaps, granularity="leaf")
  assert frozen.dims == {"['a']": 1, "['z']": 0}  # an all-zero leaf: empty block
  g = {"a": jnp.ones(3), "z": jnp.ones(2)}
  np.testing.assert_array_equal(frozen.project(g)["z"], 0.0)
