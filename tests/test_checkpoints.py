"""Tests for twa_jax.checkpoints.CheckpointSnapshots (existing orbax runs)."""

import os

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.training import train_state

import twa_jax as twa
from twa_jax.checkpoints import CheckpointSnapshots

STEPS = (0, 10, 20, 30)


def _params(step):
  rng = np.random.default_rng(step)
  return {"Dense_0": {"kernel": rng.standard_normal((5, 7), np.float32),
                      "bias": rng.standard_normal(7).astype(np.float32)},
          "Dense_1": {"kernel": rng.standard_normal((7, 3), np.float32)}}


def _listing(root):
  return {os.path.join(d, n): os.stat(os.path.join(d, n)).st_mtime_ns
          for d, dirs, files in os.walk(root) for n in [""] + dirs + files}


@pytest.fixture(scope="module")
def dict_run(tmp_path_factory):
  """A run that saved {"params", "opt_state"} with StandardSave."""
  directory = tmp_path_factory.mktemp("run") / "checkpoints"
  tx = optax.adam(1e-3)
  with ocp.CheckpointManager(directory) as manager:
    for step in STEPS:
      params = _params(step)
      manager.save(step, args=ocp.args.StandardSave(
          {"params": params, "opt_state": tx.init(params)}))
  return directory


def test_reads_the_params_of_a_dict_checkpoint(dict_run):
  before = _listing(dict_run)
  snapshots = [_params(s) for s in STEPS]
  with CheckpointSnapshots(dict_run, key=("params",)) as ckpt:
    assert ckpt.steps() == list(STEPS)
    assert ckpt.spec == twa.ParamSpec.of(snapshots[0])
    for step, expected in zip(STEPS, snapshots):
      got = ckpt.load(step)
      assert jax.tree.structure(got) == jax.tree.structure(expected)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
    spec, matrix = ckpt.read_matrix([30, 0])
    np.testing.assert_array_equal(
        matrix, twa.tree.stack_snapshots([snapshots[3], snapshots[0]])[1])
    _, view = ckpt.columns()
    np.testing.assert_array_equal(view[:, 3:50], ckpt.read_matrix()[1][:, 3:50])
    basis = twa.basis_from_store(ckpt, steps=[0, 20, 30])
    expected = twa.basis_from_snapshots([snapshots[i] for i in (0, 2, 3)])
    assert basis.spec == expected.spec and basis.dim == 3
    np.testing.assert_array_equal(basis.read_vectors(), expected.read_vectors())
  assert _listing(dict_run) == before  # nothing written


def test_reads_a_train_state_item(tmp_path):
  tx = optax.sgd(0.1, momentum=0.9)
  with ocp.CheckpointManager(tmp_path / "c",
                             item_names=("state", "extra")) as manager:
    for step in STEPS[:3]:
      state = train_state.TrainState.create(
          apply_fn=None, params={"params": _params(step)}, tx=tx)
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          extra=ocp.args.JsonSave({"epoch": step})))
  # The JSON item is no parameter item: "state" is the only candidate.
  with CheckpointSnapshots(tmp_path / "c", key=("params", "params")) as ckpt:
    np.testing.assert_array_equal(ckpt.load(10)["Dense_1"]["kernel"],
                                  _params(10)["Dense_1"]["kernel"])
  with CheckpointSnapshots(tmp_path / "c", item="state",
                           key=("params", "params")) as ckpt:
    assert ckpt.steps() == [0, 10, 20]
    spec, matrix = ckpt.read_matrix()
    assert spec == twa.ParamSpec.of(_params(0))
    np.testing.assert_array_equal(
        matrix, twa.tree.stack_snapshots([_params(s) for s in STEPS[:3]])[1])


def test_errors_name_what_was_found(dict_run, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    CheckpointSnapshots(tmp_path / "absent")
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("hi")
  with pytest.raises(ValueError, match=r"not an orbax CheckpointManager "
                     r"directory.*\['notes\.txt'\]"):
    CheckpointSnapshots(tmp_path / "other")
  with pytest.raises(ValueError, match=r"no item 'state'.*found items "
                     r"\['default'\]"):
    CheckpointSnapshots(dict_run, item="state")
  with pytest.raises(ValueError, match=r"no key 'parms' at <root>; found "
                     r"\['opt_state', 'params'\]"):
    CheckpointSnapshots(dict_run, key=("parms",))
  with pytest.raises(ValueError, match=r"no key 'w' at \['params'\]\['Dense_1'\]"
                     r"; found \['kernel'\]"):
    CheckpointSnapshots(dict_run, key=("params", "Dense_1", "w"))
  with pytest.raises(TypeError, match=r"\['count'\] has dtype int32"):
    CheckpointSnapshots(dict_run)  # the whole item: integer leaves
  with ocp.CheckpointManager(tmp_path / "two", item_names=("a", "b")) as m:
    m.save(0, args=ocp.args.Composite(a=ocp.args.StandardSave(_params(0)),
                                      b=ocp.args.StandardSave(_params(1))))
  with pytest.raises(ValueError, match=r"hold the items \['a', 'b'\]; "
                     "choose one with item="):
    CheckpointSnapshots(tmp_path / "two")
  with CheckpointSnapshots(dict_run, key=("params",)) as ckpt:
    missing = r"step 5 is not in .*steps found: \[0, 10, 20, 30\]"
    with pytest.raises(ValueError, match=r"load\(step=5\): " + missing):
      ckpt.load(5)
    with pytest.raises(ValueError, match=r"read_matrix: " + missing):
      ckpt.read_matrix([0, 5])
    with pytest.raises(ValueError, match="twice"):
      ckpt.columns([0, 0])
