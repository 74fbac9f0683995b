"""ParamSpec: layout, validation naming the leaf, flatten/unflatten, stacking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import strategies
from twa_jax import tree as tree_lib
from twa_jax.tree import ParamSpec


@given(strategies.layouts(strategies.DTYPES), st.integers(0, 2**32 - 1))
def test_ravel_unravel_roundtrip(layout, seed):
  d = strategies._size(layout)
  tree = strategies.fill(layout, np.random.default_rng(seed).normal(size=d))
  spec = ParamSpec.of(tree)
  assert spec.num_params == d
  vec = spec.ravel(tree)
  assert vec.dtype == jnp.float32 and vec.shape == (d,)
  np.testing.assert_array_equal(np.asarray(vec), strategies.flat(tree))
  back = spec.unravel(vec)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32))
  padded = spec.ravel(tree, pad_to=d + 5)
  assert padded.shape == (d + 5,)
  np.testing.assert_array_equal(np.asarray(padded[d:]), 0.0)
  restored = spec.unravel(padded)  # trailing padding is ignored
  np.testing.assert_array_equal(strategies.flat(restored), strategies.flat(tree))


@given(strategies.layouts(strategies.DTYPES), st.integers(1, 4),
       st.integers(0, 2**32 - 1))
def test_stack_snapshots_list_and_stacked_tree_agree(layout, n, seed):
  d = strategies._size(layout)
  rows = np.random.default_rng(seed).normal(size=(n, d))
  snaps = [strategies.fill(layout, r) for r in rows]
  spec, matrix = tree_lib.stack_snapshots(snaps)
  assert spec == ParamSpec.of(snaps[0])
  assert matrix.dtype == np.float32 and matrix.shape == (n, d)
  np.testing.assert_array_equal(matrix, np.stack([strategies.flat(s) for s in snaps]))
  if isinstance(layout, (list, tuple)):
    return  # a list or tuple root reads as a sequence of snapshots
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *snaps)
  spec2, matrix2 = tree_lib.stack_snapshots(stacked)
  assert spec2 == spec
  np.testing.assert_array_equal(matrix2, matrix)


def test_spec_is_hashable_and_static():
  tree = {"a": jnp.ones((2, 3)), "b": [jnp.zeros(()), jnp.ones((0,), jnp.bfloat16)]}
  spec = ParamSpec.of(tree)
  assert hash(spec) == hash(ParamSpec.of(jax.tree.map(lambda x: x + 1, tree)))
  assert spec.paths == ("['a']", "['b'][0]", "['b'][1]")
  assert spec.num_params == 7
  assert spec.eps == float(jnp.finfo(jnp.bfloat16).eps)


def test_ravel_under_jit_matches_eager():
  tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((3,), jnp.bfloat16)}
  spec = ParamSpec.of(tree)
  f = jax.jit(lambda t: spec.unravel(2.0 * spec.ravel(t)))
  out = f(tree)
  np.testing.assert_array_equal(np.asarray(out["w"]), 2.0 * np.arange(6.0).reshape(2, 3))
  assert out["b"].dtype == jnp.bfloat16


# --- bad input: every error names what is wrong ------------------------------

BASE = {"dense": {"kernel": np.ones((2, 3), np.float32),
                  "bias": np.zeros((3,), np.float32)}}


def _with(path_value):
  tree = jax.tree.map(np.copy, BASE)
  key, value = path_value
  tree["dense"][key] = value
  return tree


def test_non_float_leaf_rejected_by_name():
  with pytest.raises(TypeError, match=r"\['dense'\]\['bias'\].*int32"):
    ParamSpec.of(_with(("bias", np.zeros((3,), np.int32))))


def test_check_names_leaf_on_shape_structure_and_dtype():
  spec = ParamSpec.of(BASE)
  with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\].*\(3, 2\)"):
    spec.check(_with(("kernel", np.ones((3, 2), np.float32))), what="grads")
  missing = {"dense": {"kernel": BASE["dense"]["kernel"]}}
  with pytest.raises(ValueError, match=r"grads: .*missing leaf \['dense'\]\['bias'\]"):
    spec.check(missing, what="grads")
  extra = _with(("scale", np.ones((3,), np.float32)))
  with pytest.raises(ValueError, match=r"unexpected leaf \['dense'\]\['scale'\]"):
    spec.check(extra)
  with pytest.raises(TypeError, match=r"\['dense'\]\['bias'\].*float16.*float32"):
    spec.check(_with(("bias", np.zeros((3,), np.float16))), check_dtypes=True)
  with pytest.raises(TypeError, match=r"\['dense'\]\['bias'\].*int32"):
    spec.check(_with(("bias", np.zeros((3,), np.int32))))


def test_stack_snapshots_errors_name_snapshot_and_leaf():
  with pytest.raises(ValueError, match="empty"):
    tree_lib.stack_snapshots([])
  with pytest.raises(ValueError, match="empty"):
    tree_lib.stack_snapshots(())
  bad_shape = [BASE, _with(("bias", np.zeros((4,), np.float32)))]
  with pytest.raises(ValueError, match=r"snapshot 1: leaf \['dense'\]\['bias'\]"):
    tree_lib.stack_snapshots(bad_shape)
  bad_dtype = [BASE, BASE, _with(("kernel", np.ones((2, 3), np.float16)))]
  with pytest.raises(TypeError, match=r"snapshot 2: leaf \['dense'\]\['kernel'\]"):
    tree_lib.stack_snapshots(bad_dtype)
  bad_structure = [BASE, {"dense": {"kernel": BASE["dense"]["kernel"]}}]
  with pytest.raises(ValueError, match=r"snapshot 1.*missing leaf \['dense'\]\['bias'\]"):
    tree_lib.stack_snapshots(bad_structure)
  for value in (np.nan, np.inf, -np.inf):
    bias = np.zeros((3,), np.float32)
    bias[1] = value
    with pytest.raises(ValueError, match=r"snapshot 1: leaf \['dense'\]\['bias'\].*NaN or Inf"):
      tree_lib.stack_snapshots([BASE, _with(("bias", bias))])
  with pytest.raises(TypeError, match=r"snapshot 0: leaf \['dense'\]\['bias'\]"):
    tree_lib.stack_snapshots([_with(("bias", np.zeros((3,), np.int32)))])


def test_stacked_tree_errors():
  with pytest.raises(ValueError, match="leading axis"):
    tree_lib.stack_snapshots({"a": np.zeros((3, 2), np.float32),
                              "b": np.zeros((4,), np.float32)})
  with pytest.raises(ValueError, match="leading axis"):
    tree_lib.stack_snapshots({"a": np.zeros((3, 2), np.float32),
                              "b": np.float32(1.0)})
  with pytest.raises(ValueError, match="n = 0"):
    tree_lib.stack_snapshots({"a": np.zeros((0, 2), np.float32)})
  with pytest.raises(ValueError, match="no leaves"):
    tree_lib.stack_snapshots({})
  stacked = {"a": np.zeros((2, 3), np.float32)}
  stacked["a"][1, 2] = np.nan
  with pytest.raises(ValueError, match=r"snapshot 1: leaf \['a'\].*NaN"):
    tree_lib.stack_snapshots(stacked)


# --- matching by leaf path; subsets; issue-13 inputs ---------------------------

def test_containers_with_the_same_leaf_paths_agree():
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  spec = ParamSpec.of(pure)
  other = ParamSpec.of(state)
  assert (other.paths, other.shapes, other.dtypes) == (
      spec.paths, spec.shapes, spec.dtypes)
  leaves, place = spec.select(state)
  np.testing.assert_array_equal(leaves[0], pure["bias"])
  back = place([2 * x for x in leaves])  # in the State's own structure
  assert isinstance(back, nnx.State)
  np.testing.assert_array_equal(back["kernel"], 2 * pure["kernel"])


@pytest.mark.parametrize("trainable", [
    {"dense": {"kernel": True, "bias": False, "step": False}},
    lambda path: "kernel" in path])
def test_trainable_subset_records_frozen_leaves(trainable):
  full = _with(("step", np.int32(3)))  # integer leaves may be frozen
  spec = ParamSpec.of(full, trainable=trainable)
  assert spec.paths == ("['dense']['kernel']",)
  assert spec.frozen == ("['dense']['bias']", "['dense']['step']")
  leaves, place = spec.select(full)
  assert len(leaves) == 1 and leaves[0].shape == (2, 3)
  out = place([np.full((2, 3), 5.0, np.float32)])
  np.testing.assert_array_equal(out["dense"]["bias"], 0.0)  # frozen: zero
  np.testing.assert_array_equal(out["dense"]["kernel"], 5.0)
  assert spec.mask(full) == {"dense": {"bias": False, "kernel": True,
                                       "step": False}}
  masked = {"dense": {"kernel": full["dense"]["kernel"]}}  # frozen left out
  assert spec.check(masked)[0] is masked["dense"]["kernel"]
  _, matrix = tree_lib.stack_snapshots([full, full], trainable=trainable)
  assert matrix.shape == (2, 6)
  with pytest.raises(ValueError, match="selects none"):
    ParamSpec.of(full, trainable=lambda p: False)
  with pytest.raises(ValueError, match="mask does not fit"):
    ParamSpec.of(full, trainable={"other": True})


def test_disagreements_name_the_leaf_and_both_sides():
  spec = ParamSpec.of(BASE, trainable={"dense": {"kernel": True,
                                                  "bias": False}})
  extra = {"dense": {**BASE["dense"], "scale": np.ones((3,), np.float32)}}
  with pytest.raises(ValueError, match=r"unexpected leaf \['dense'\]\['scale'\]"
                     r" \(shape \(3,\).*spans 1 leaves \(\['dense'\]\['kernel'\]\)"
                     r" and freezes \['dense'\]\['bias'\]"):
    spec.check(extra, what="grads")
  with pytest.raises(ValueError, match=r"missing leaf \['dense'\]\['kernel'\]: "
                     r"the basis spans it \(shape \(2, 3\), dtype float32\)"):
    spec.check({"dense": {"bias": BASE["dense"]["bias"]}})


def test_snapshot_rows_read_an_iterator_one_snapshot_at_a_time():
  snaps = [_with(("bias", np.full((3,), float(i), np.float32)))
           for i in range(3)] + [_with(("bias", np.zeros((4,), np.float32)))]
  read = []
  def load():
    for i, s in enumerate(snaps):
      read.append(i)
      yield s
  spec, n, rows = tree_lib.snapshot_rows(load())
  assert spec == ParamSpec.of(BASE) and n is None and read == [0]
  expected = tree_lib.stack_snapshots(snaps[:3])[1]
  for i in range(3):
    np.testing.assert_array_equal(next(rows), expected[i])
    assert read == list(range(i + 1))
  with pytest.raises(ValueError, match=r"snapshot 3: leaf \['dense'\]\['bias'\]"):
    next(rows)
  spec, n, _ = tree_lib.snapshot_rows({"a": np.zeros((3, 2), np.float32)})
  assert n == 3 and spec.shapes == ((2,),)


def test_snapshots_from_a_generator_and_mixed_key_errors():
  snaps = [_with(("bias", np.full((3,), float(i), np.float32)))
           for i in range(3)]
  spec, matrix = tree_lib.stack_snapshots(s for s in snaps)
  np.testing.assert_array_equal(matrix, tree_lib.stack_snapshots(snaps)[1])
  assert spec == ParamSpec.of(BASE)
  mixed = {"dense": {0: np.ones(2, np.float32), "b": np.ones(2, np.float32)}}
  with pytest.raises(TypeError, match=r"dict at \['dense'\] mixes key types "
                     r"\(int, str\)"):
    ParamSpec.of(mixed)
  with pytest.raises(TypeError, match="mixes key types"):
    tree_lib.stack_snapshots([mixed])
  with pytest.raises(ValueError, match="expected a list, tuple or iterator"):
    tree_lib.stack_snapshots({"a": np.zeros((3,), np.float32),
                              "b": np.float32(0)})
