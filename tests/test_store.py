"""Tests for twa_jax.store.TrajectoryStore."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
from hypothesis import given, settings
from hypothesis import strategies as st

import strategies
import twa_jax as twa
from flax import nnx
from twa_jax import column_reader
from twa_jax.checksums import ChecksumError
from twa_jax.lock import LockedError
from twa_jax.store import INFO_FILE, TrajectoryStore

# Deterministic snapshot of a step, shared with the writer subprocesses.
PARAMS_SRC = textwrap.dedent("""
    import hashlib
    import jax
    import ml_dtypes
    import numpy as np

    def params(step, rows=512):
      rng = np.random.default_rng(step)
      bias = rng.standard_normal(77).astype(ml_dtypes.bfloat16)
      return {"dense": {"kernel": rng.standard_normal((rows, 1024), np.float32),
                        "bias": bias},
              "scales": [np.float32(step) * np.ones(3, np.float32)]}

    def fingerprint(tree):
      leaves, treedef = jax.tree_util.tree_flatten(tree)
      return str(treedef) + "".join(
          f"|{x.dtype}{x.shape}" + hashlib.sha256(x.tobytes()).hexdigest()
          for x in map(np.asarray, leaves))
    """)
_ns = {}
exec(PARAMS_SRC, _ns)  # pylint: disable=exec-used
params, fingerprint = _ns["params"], _ns["fingerprint"]


def _run(script, *args, **kwargs):
  return subprocess.Popen(
      [sys.executable, "-c", PARAMS_SRC + textwrap.dedent(script), *args],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _partial_saves(directory):
  return [n for n in os.listdir(directory) if "orbax-checkpoint-tmp" in n]


def _random_bits(layout, seed):
  """A tree of `layout` with random bit patterns (NaN payloads included)."""
  rng = np.random.default_rng(seed)
  def fill(leaf):
    dtype = np.dtype(leaf.dtype)
    bits = rng.integers(0, 256, size=int(np.prod(leaf.shape)) * dtype.itemsize,
                        dtype=np.uint8)
    return bits.view(dtype).reshape(leaf.shape)
  return jax.tree_util.tree_map(
      fill, layout, is_leaf=lambda x: isinstance(x, strategies.Leaf))


@settings(max_examples=8)
@given(layout=strategies.layouts(
    dtypes=(jnp.float32, jnp.bfloat16, jnp.float16)),
       seed=st.integers(0, 2**31), as_jax=st.booleans())
def test_round_trip_random_trees(layout, seed, as_jax):
  tree = _random_bits(layout, seed)
  if as_jax:
    tree = jax.tree_util.tree_map(jnp.asarray, tree)
  other = _random_bits(layout, seed + 1)
  with tempfile.TemporaryDirectory() as directory:
    with TrajectoryStore(directory) as store:
      assert store.save(3, tree, metadata={"epoch": 1, "lr": 0.5})
      assert store.save(1, other)
    with TrajectoryStore(directory, read_only=True) as store:
      assert store.steps() == [1, 3]
      assert fingerprint(store.load(3)) == fingerprint(jax.device_get(tree))
      assert fingerprint(store.load(1)) == fingerprint(other)
      assert store.metadata(3) == {"epoch": 1, "lr": 0.5}
      assert store.metadata(1) == {}
      assert store.spec == twa.ParamSpec.of(tree)


def test_reopen_in_fresh_process(tmp_path):
  with TrajectoryStore(tmp_path / "s") as store:
    for step in (0, 5, 10):
      store.save(step, params(step, rows=8), metadata={"step": step})
  reader = _run("""
      import sys
      from twa_jax.store import TrajectoryStore
      with TrajectoryStore(sys.argv[1], read_only=True) as store:
        for step in store.steps():
          meta, tree = store.metadata(step), store.load(step)
          print(step, meta["step"], fingerprint(tree))
      """, str(tmp_path / "s"))
  out, err = reader.communicate(timeout=120)
  assert reader.returncode == 0, err
  assert out.splitlines() == [f"{s} {s} {fingerprint(params(s, rows=8))}"
                              for s in (0, 5, 10)]


def test_sigkill_during_save_keeps_complete_snapshots(tmp_path):
  directory = tmp_path / "s"
  writer = _run("""
      import sys
      from twa_jax.store import TrajectoryStore
      store = TrajectoryStore(sys.argv[1])
      for step in range(10_000):
        store.save(step, params(step), metadata={"step": step})
        print(step, flush=True)
      """, str(directory))
  try:
    started = -1
    while started < 3:  # steps 0..2 are complete once step 3 started
      line = writer.stdout.readline()
      assert line, writer.stderr.read()
      started = int(line)
    deadline = time.monotonic() + 60
    while not _partial_saves(directory):
      assert time.monotonic() < deadline, "no save ever in flight"
    writer.send_signal(signal.SIGKILL)
  finally:
    writer.kill()
    writer.communicate()
  assert writer.returncode == -signal.SIGKILL
  partial = _partial_saves(directory)
  assert partial, "the kill did not land during a save"
  in_flight = int(partial[0].split(".")[0])
  with TrajectoryStore(directory, read_only=True) as store:
    steps = store.steps()
    assert steps == list(range(len(steps))) and len(steps) >= 3
    assert in_flight not in steps
    for step in steps:
      assert fingerprint(store.load(step)) == fingerprint(params(step)), step
      assert store.metadata(step) == {"step": step}
  with TrajectoryStore(directory) as store:  # reopen and continue
    assert store.save(in_flight, params(in_flight))
    assert store.save(in_flight + 1, params(in_flight + 1))
  with TrajectoryStore(directory, read_only=True) as store:
    assert store.steps()[-2:] == [in_flight, in_flight + 1]
    assert fingerprint(store.load(in_flight)) == fingerprint(params(in_flight))
  assert not _partial_saves(directory)


def test_save_copies_before_returning(tmp_path):
  """The caller may delete (donate) or overwrite its arrays after save."""
  tree = {"w": jnp.arange(4096, dtype=jnp.float32), "b": np.ones(5, np.float32)}
  expected = jax.tree_util.tree_map(np.array, tree)
  with TrajectoryStore(tmp_path / "s") as store:
    store.save(0, tree)
    tree["w"].delete()
    tree["b"][:] = 7.0
    store.wait_until_finished()
    assert fingerprint(store.load(0)) == fingerprint(expected)


def test_duplicate_step(tmp_path):
  with TrajectoryStore(tmp_path / "s") as store:
    assert store.save(2, params(2, rows=4), metadata={"a": 1})
    assert not store.save(2, params(2, rows=4), metadata={"a": 2})  # no-op
    with pytest.raises(ValueError, match="step 2 already holds a different"):
      store.save(2, params(3, rows=4))
    assert store.steps() == [2]
    assert store.metadata(2) == {"a": 1}
    assert fingerprint(store.load(2)) == fingerprint(params(2, rows=4))


def test_spec_mismatch_names_the_leaf(tmp_path):
  good = params(0, rows=4)
  with TrajectoryStore(tmp_path / "s") as store:
    store.save(0, good)
    shape = params(1, rows=5)
    with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\] has shape"):
      store.save(1, shape)
    dtype = params(1, rows=4)
    dtype["scales"][0] = dtype["scales"][0].astype(np.float16)
    with pytest.raises(TypeError,
                       match=r"\['scales'\]\[0\] has dtype float16"):
      store.save(1, dtype)
    missing = params(1, rows=4)
    del missing["dense"]["bias"]
    with pytest.raises(ValueError, match=r"missing leaf \['dense'\]\['bias'\]"):
      store.save(1, missing)
    with pytest.raises(TypeError,
                       match=r"\['dense'\]\['kernel'\] has non-float dtype"):
      store.save(1, {**good, "dense": {**good["dense"],
                                       "kernel": np.ones((4, 1024), np.int32)}})
    store.wait_until_finished()
    assert store.steps() == [0]
  with TrajectoryStore(tmp_path / "s") as store:  # the spec is kept on disk
    with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\] has shape"):
      store.save(1, shape)


def test_bad_save_arguments(tmp_path):
  with TrajectoryStore(tmp_path / "s") as store:
    tree = {"w": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match="non-negative integer"):
      store.save(-1, tree)
    with pytest.raises(ValueError, match="non-negative integer"):
      store.save(1.0, tree)
    with pytest.raises(TypeError, match="JSON-serializable"):
      store.save(0, tree, metadata={"x": np.ones(2)})
    with pytest.raises(TypeError, match="metadata must be a dict"):
      store.save(0, tree, metadata=[1, 2])
    with pytest.raises(TypeError, match=r"node at \['w'\] is a FrozenDict"):
      from flax.core import FrozenDict  # pylint: disable=g-import-not-at-top
      store.save(0, {"w": FrozenDict({"a": np.ones(2)})})
    with pytest.raises(ValueError, match="no entries"):
      store.save(0, {"w": None})
    assert store.steps() == []
    assert store.save(0, tree)  # nothing above was recorded


def test_missing_step_names_existing_ones(tmp_path):
  with TrajectoryStore(tmp_path / "s") as store:
    for step in (0, 4):
      store.save(step, {"w": np.ones(2, np.float32)})
    missing = r"step 7 is not in the store.*stored steps: \[0, 4\]"
    for method in (store.load, store.metadata):
      with pytest.raises(ValueError, match=missing):
        method(7)
    with pytest.raises(ValueError, match=missing):
      store.read_matrix([0, 7])


def test_not_a_store(tmp_path):
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("hi")
  with pytest.raises(ValueError, match=r"not a trajectory store.*notes\.txt"):
    TrajectoryStore(tmp_path / "other")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    TrajectoryStore(tmp_path / "absent", create=False)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    TrajectoryStore(tmp_path / "absent", read_only=True)
  assert not (tmp_path / "absent").exists()
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="create=True"):
    TrajectoryStore(tmp_path / "empty", read_only=True)
  (tmp_path / "json").mkdir()
  (tmp_path / "json" / INFO_FILE).write_text('{"format": "something else"}')
  for _ in range(2):  # the failed writable open released its lock
    with pytest.raises(ValueError, match="not a trajectory store file"):
      TrajectoryStore(tmp_path / "json")


def test_incompatible_version(tmp_path):
  with TrajectoryStore(tmp_path / "s") as store:
    store.save(0, {"w": np.ones(2, np.float32)})
  info_path = tmp_path / "s" / INFO_FILE
  info = json.loads(info_path.read_text())
  info["version"] = 99
  info_path.write_text(json.dumps(info))
  with pytest.raises(ValueError, match=r"format version 99.*reads versions \[1, 2\]"):
    TrajectoryStore(tmp_path / "s", read_only=True)


def test_version_1_store_is_read_unverified(tmp_path):
  """Stores written before checksums (format version 1) stay readable."""
  with TrajectoryStore(tmp_path / "s") as store:
    store.save(0, params(0, rows=4))
  info_path = tmp_path / "s" / INFO_FILE
  info = json.loads(info_path.read_text())
  info["version"], info["layout"] = 1, info.pop("params")
  info_path.write_text(json.dumps(info))
  with TrajectoryStore(tmp_path / "s", read_only=True) as store:
    assert store.spec == twa.ParamSpec.of(params(0, rows=4))
    assert fingerprint(store.load(0)) == fingerprint(params(0, rows=4))
    np.testing.assert_array_equal(store.columns()[1][:, 5:900],
                                  store.read_matrix()[1][:, 5:900])


def test_snapshot_differing_from_recorded_spec(tmp_path):
  """Reads check every snapshot against the spec and name the step."""
  with TrajectoryStore(tmp_path / "s") as store:
    store.save(0, {"w": np.ones(3, np.float32), "v": np.ones(2, np.float32)})
  info_path = tmp_path / "s" / INFO_FILE
  info = json.loads(info_path.read_text())
  info["params"]["dtypes"][1] = "float16"
  info_path.write_text(json.dumps(info))
  with TrajectoryStore(tmp_path / "s", read_only=True) as store:
    with pytest.raises(TypeError, match=r"step=0.*\['w'\] has dtype float32"):
      store.load(0)
    with pytest.raises(TypeError, match=r"step=0.*\['w'\] has dtype float32"):
      store.read_matrix()


def _listing(root):
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in [""] + dirnames + filenames:
      path = os.path.join(dirpath, name)
      stat = os.stat(path)
      out[path] = (stat.st_mtime_ns, stat.st_size)
  return out


def test_read_only_never_writes(tmp_path):
  directory = tmp_path / "s"
  with TrajectoryStore(directory) as store:
    store.save(0, params(0, rows=4), metadata={"e": 0})
    store.save(1, params(1, rows=4))
  os.mkdir(directory / "7.orbax-checkpoint-tmp-123")  # a killed save's leftover
  before = _listing(directory)
  time.sleep(0.01)
  with TrajectoryStore(directory, read_only=True) as store:
    assert store.steps() == [0, 1]
    store.load(1)
    store.metadata(0)
    store.read_matrix()
    twa.basis_from_store(store)
    with pytest.raises(ValueError, match="read-only"):
      store.save(2, params(2, rows=4))
  assert _listing(directory) == before


def test_from_store_equals_from_snapshots(tmp_path):
  rng = np.random.default_rng(0)
  start = {"a": {"kernel": rng.standard_normal((30, 20), np.float32)},
           "b": [rng.standard_normal(17).astype(jnp.bfloat16)]}
  snapshots = [start]
  for _ in range(7):
    snapshots.append(jax.tree_util.tree_map(
        lambda x: (x + rng.standard_normal(x.shape)).astype(x.dtype),
        snapshots[-1]))
  with TrajectoryStore(tmp_path / "s") as store:
    for step, snapshot in enumerate(snapshots):
      store.save(10 * step, snapshot)
    store.wait_until_finished()
    basis = twa.basis_from_store(store)
    expected = twa.basis_from_snapshots(snapshots)
    assert basis.spec == expected.spec and basis.dim == expected.dim == 8
    np.testing.assert_array_equal(basis.read_vectors(), expected.read_vectors())
    subset = twa.basis_from_store(store, steps=[70, 0, 30])
    expected = twa.basis_from_snapshots([snapshots[i] for i in (7, 0, 3)])
    np.testing.assert_array_equal(subset.read_vectors(), expected.read_vectors())


def test_read_matrix_errors(tmp_path):
  with TrajectoryStore(tmp_path / "s") as store:
    with pytest.raises(ValueError, match="no snapshots"):
      store.read_matrix()
    store.save(0, {"w": np.ones(3, np.float32)})
    store.save(1, {"w": np.array([1.0, np.nan, 0.0], np.float32)})
    with pytest.raises(ValueError, match=r"twice"):
      store.read_matrix([0, 0])
    with pytest.raises(ValueError,
                       match=r"step=1\): leaf \['w'\] contains NaN"):
      store.read_matrix()
    spec, matrix = store.read_matrix([0])
    assert matrix.shape == (1, 3) and matrix.dtype == np.float32
    assert spec == twa.ParamSpec.of({"w": np.ones(3, np.float32)})


def test_closed_store(tmp_path):
  store = TrajectoryStore(tmp_path / "s")
  store.close()
  store.close()
  with pytest.raises(ValueError, match="closed"):
    store.steps()


def test_keys_orbax_would_confuse(tmp_path):
  """Dotted keys (orbax joins names with '.'), int keys, tuples, None."""
  tree = {"a.b": np.ones(2, np.float32), "a": {"b": np.zeros(2, np.float32)},
          "a%2Eb": np.full(1, 5.0, np.float32), "": np.full(1, 4.0, np.float32),
          "layers": {0: (np.ones(1, np.float32), None), 10: [np.ones(3)]}}
  with TrajectoryStore(tmp_path / "s") as store:
    store.save(0, tree)
  with TrajectoryStore(tmp_path / "s", read_only=True) as store:
    assert fingerprint(store.load(0)) == fingerprint(tree)


@settings(max_examples=60)
@given(shape=st.lists(st.integers(0, 5), max_size=4).map(tuple),
       data=st.data())
def test_flat_boxes_hold_exactly_the_range(shape, data):
  size = int(np.prod(shape))
  start = data.draw(st.integers(0, size))
  stop = data.draw(st.integers(start, size))
  boxes = column_reader.flat_boxes(shape, start, stop)
  flat = np.arange(size).reshape(shape)
  got = [flat[box].reshape(-1) for box in boxes]
  np.testing.assert_array_equal(np.concatenate([np.zeros(0, int)] + got),
                                np.arange(start, stop))
  assert len(boxes) <= max(2 * len(shape) - 1, 1)
  assert all(part.size for part in got)  # no empty reads


# Leaves split across slice boundaries, bfloat16 / float16 leaves, an empty
# leaf, a scalar and a None node.
_VIEW_TREE = {"a": {"kernel": (6, 7), "empty": (0, 3)}, "b": (5,),
              "c": [(2, 3, 4), None], "s": ()}
_VIEW_DTYPES = {"b": ml_dtypes.bfloat16, "c": np.float16}


def _view_snapshot(rng):
  def leaf(path, shape):
    dtype = _VIEW_DTYPES.get(path[0].key, np.float32)
    return rng.standard_normal(shape).astype(dtype)
  return jax.tree_util.tree_map_with_path(
      leaf, _VIEW_TREE, is_leaf=lambda x: isinstance(x, tuple))


@pytest.fixture(scope="module")
def view_store(tmp_path_factory):
  directory = tmp_path_factory.mktemp("view") / "s"
  rng = np.random.default_rng(0)
  with TrajectoryStore(directory) as store:
    for step in (0, 3, 5, 9):
      store.save(step, _view_snapshot(rng))
  store = TrajectoryStore(directory, read_only=True)
  yield store
  store.close()


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_column_view_equals_read_matrix(view_store, data):
  steps = data.draw(st.permutations([0, 3, 5, 9]).flatmap(
      lambda p: st.integers(1, 4).map(lambda n: p[:n])))
  spec, matrix = view_store.read_matrix(steps)
  view_spec, view = view_store.columns(steps)
  assert view_spec == spec and view.shape == matrix.shape
  assert view.steps == steps and view.dtype == np.float32
  d = matrix.shape[1]
  for _ in range(3):
    start = data.draw(st.integers(0, d))
    stop = data.draw(st.integers(start, d + 2))
    rows = slice(data.draw(st.integers(0, len(steps))), None)
    got = view[rows, start:stop]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, matrix[rows, start:stop])
  # A block of leaves (in any order): their columns side by side.
  offsets = np.cumsum((0,) + spec.sizes)
  idx = data.draw(st.permutations(range(len(spec.sizes))).flatmap(
      lambda p: st.integers(1, len(p)).map(lambda n: p[:n])))
  block = np.concatenate([matrix[:, offsets[i]:offsets[i + 1]] for i in idx],
                         axis=1)
  sub = view.leaves(idx)
  assert sub.shape == block.shape and sub.steps == steps
  start = data.draw(st.integers(0, block.shape[1]))
  stop = data.draw(st.integers(start, block.shape[1]))
  np.testing.assert_array_equal(sub[:, start:stop], block[:, start:stop])


def _bytes_read() -> int:
  """Bytes TensorStore has read from local files in this process."""
  return sum(value["value"] for metric in ts.experimental_collect_matching_metrics(
      "/tensorstore/kvstore/file/bytes_read") for value in metric["values"])


def test_column_view_reads_only_the_chunks_of_its_slice(tmp_path):
  rng = np.random.default_rng(0)
  with TrajectoryStore(tmp_path / "s", chunk_bytes=32 << 10) as store:
    for step in range(2):
      store.save(step, {"a": rng.standard_normal((1024, 64), np.float32),
                        "b": rng.standard_normal((1024, 64), np.float32)})
  d = 2 * 1024 * 64
  read = {}

  def measure(name, index, leaves=None):
    """view[index] of a fresh view (an empty chunk cache); bytes read."""
    _, view = store.columns()
    if leaves is not None:
      view = view.leaves(leaves)
    before = _bytes_read()
    got = view[index]
    read[name] = (_bytes_read() - before) / (2 * d * 4)
    return got

  with TrajectoryStore(tmp_path / "s", read_only=True) as store:
    whole = measure("all", np.s_[:, :])
    for name, cols in {"across": np.s_[48496:79953], "b": np.s_[d // 2:],
                       "head": np.s_[0:100]}.items():
      np.testing.assert_array_equal(measure(name, np.s_[:, cols]),
                                    whole[:, cols])
    # Views of leaves: ["b"] alone, and ["b"] then ["a"] (columns of b first).
    np.testing.assert_array_equal(
        measure("leaf b", np.s_[:, :], leaves=[1]), whole[:, d // 2:])
    np.testing.assert_array_equal(
        measure("head of b, a", np.s_[:, 0:100], leaves=[1, 0]),
        whole[:, d // 2:d // 2 + 100])
  # Random float32 barely compresses; a slice reads its chunks (each 1/8 of
  # a leaf, fetched once) and the leaves' metadata, not whole leaves.
  assert 0.85 < read["all"] < 1.0, read
  assert 0.24 < read["across"] < 0.4, read  # 24% of the columns
  assert 0.4 < read["b"] < 0.55, read
  assert 0.4 < read["leaf b"] < 0.55, read
  assert read["head"] < 0.07 and read["head of b, a"] < 0.07, read


def test_column_view_errors(tmp_path):
  with TrajectoryStore(tmp_path / "s") as store:
    with pytest.raises(ValueError, match="columns: no snapshots"):
      store.columns()
    store.save(0, {"v": np.ones(2, np.float32), "w": np.ones(3, np.float32)})
    store.save(1, {"v": np.ones(2, np.float32),
                   "w": np.array([1.0, np.inf, 0.0], np.float32)})
    with pytest.raises(ValueError, match=r"columns: steps \[1\] are requested"):
      store.columns([1, 0, 1])
    with pytest.raises(ValueError, match=r"step 4 is not in the store"):
      store.columns([0, 4])
    _, view = store.columns()
    np.testing.assert_array_equal(view[:, 0:2], np.ones((2, 2)))  # v: finite
    with pytest.raises(ValueError,
                       match=r"columns\(step=1\): leaf \['w'\] contains NaN"):
      view[:, 1:4]
    with pytest.raises(ValueError,
                       match=r"columns\(step=1\): leaf \['w'\] contains NaN"):
      view.leaves([1, 0])[:, 0:3]
    for index in (np.s_[:, 0:4:2], np.s_[0:1], np.s_[0, 0:2]):
      with pytest.raises(TypeError, match="index with"):
        view[index]  # pylint: disable=pointless-statement
  info_path = tmp_path / "s" / INFO_FILE
  info = json.loads(info_path.read_text())
  info["params"]["shapes"][1] = [1, 3]
  info_path.write_text(json.dumps(info))
  with TrajectoryStore(tmp_path / "s", read_only=True) as store:
    with pytest.raises(ValueError,
                       match=r"columns\(step=1\): leaf \['w'\] has shape \(3,\)"):
      store.columns([1, 0])


def test_relative_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with TrajectoryStore("runs/a/trajectory") as store:
    store.save(3, {"w": np.arange(4, dtype=np.float32)})
  with TrajectoryStore("runs/a/trajectory", read_only=True) as store:
    assert store.steps() == [3]
    np.testing.assert_array_equal(store.read_matrix()[1], [[0, 1, 2, 3]])
  assert (tmp_path / "runs" / "a" / "trajectory" / "3").is_dir()


def test_second_writer_gets_a_clear_error(tmp_path):
  directory = tmp_path / "s"
  with TrajectoryStore(directory) as store:
    store.save(0, params(0, rows=4))
    store.wait_until_finished()
    with pytest.raises(LockedError,
                       match=rf"in use by process {os.getpid()} "):
      TrajectoryStore(directory)
    with TrajectoryStore(directory, read_only=True) as reader:
      assert reader.steps() == [0]
    store.save(1, params(1, rows=4))
  with TrajectoryStore(directory) as store:  # released by close
    assert store.steps() == [0, 1]


def test_writer_and_second_writable_open_race(tmp_path):
  """Issue 13 item 1: a writer saves in a loop while another process opens
  the store writable (refused, naming the writer) and read-only (works)."""
  directory = tmp_path / "s"
  writer = _run("""
      import os, sys
      from twa_jax.store import TrajectoryStore
      with TrajectoryStore(sys.argv[1]) as store:
        print(os.getpid(), flush=True)
        for step in range(40):
          store.save(step, params(step, rows=244))  # 250k parameters
        sys.stdin.readline()  # holds the store until the test has tried
      print("done", flush=True)
      """, str(directory), stdin=subprocess.PIPE)
  try:
    pid = int(writer.stdout.readline())
    refused = 0
    for _ in range(8):
      with pytest.raises(LockedError, match=rf"in use by process {pid} "):
        TrajectoryStore(directory)
      refused += 1
      with TrajectoryStore(directory, read_only=True) as reader:
        for step in reader.steps()[-2:]:
          assert fingerprint(reader.load(step)) == fingerprint(
              params(step, rows=244))
      time.sleep(0.2)
    out, err = writer.communicate("\n", timeout=300)
  finally:
    writer.kill()
  assert writer.returncode == 0 and out.strip() == "done", err
  assert refused == 8
  with TrajectoryStore(directory, read_only=True) as store:
    assert store.steps() == list(range(40))
    for step in store.steps():
      assert fingerprint(store.load(step)) == fingerprint(
          params(step, rows=244)), step


def _flip_one_bit(step_dir):
  """Flips a bit in the middle of the largest data file of `step_dir`."""
  files = [os.path.join(d, f) for d, _, names in os.walk(step_dir / "params")
           for f in names if os.sep + "d" + os.sep in os.path.join(d, f)]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x10]))


def test_flipped_bit_is_found_by_every_read(tmp_path):
  directory = tmp_path / "s"
  with TrajectoryStore(directory, chunk_bytes=64 << 10) as store:
    for step in range(3):
      store.save(step, params(step, rows=64))
  _flip_one_bit(directory / "1")
  corrupt = r"step=1\): leaf \['dense'\]\['kernel'\]: the stored bytes differ"
  with TrajectoryStore(directory, read_only=True) as store:
    assert fingerprint(store.load(0)) == fingerprint(params(0, rows=64))
    with pytest.raises(ChecksumError, match=r"load\(" + corrupt):
      store.load(1)
    with pytest.raises(ChecksumError, match=r"read_matrix\(" + corrupt):
      store.read_matrix()
    _, view = store.columns([1])
    with pytest.raises(ChecksumError, match=r"columns\(" + corrupt):
      view[:, :]
    with pytest.raises(ChecksumError, match=r"columns\(" + corrupt):
      view.leaves([1])[:, :]
    # Other leaves of the corrupted step are still readable.
    np.testing.assert_array_equal(
        view.leaves([0])[:, :][0],
        params(1, rows=64)["dense"]["bias"].astype(np.float32))


def test_checksum_blocks_verify_partial_reads(tmp_path):
  """A column slice verifies the whole blocks around it, and only those."""
  rng = np.random.default_rng(0)
  tree = {"w": rng.standard_normal((64, 64), np.float32)}
  with TrajectoryStore(tmp_path / "s", chunk_bytes=1024) as store:
    store.save(0, tree)
    _, view = store.columns()
    for start, stop in [(0, 1), (255, 257), (1000, 4096), (4095, 4096)]:
      np.testing.assert_array_equal(view[:, start:stop],
                                    tree["w"].reshape(1, -1)[:, start:stop])


def test_truncated_metadata_names_the_step(tmp_path):
  directory = tmp_path / "s"
  with TrajectoryStore(directory) as store:
    for step in range(3):
      store.save(step, params(step, rows=4), metadata={"step": step})
  for item, name in (("params", "_METADATA"), ("metadata", "metadata"),
                     ("checksums", "metadata")):
    path = directory / "2" / item / name
    text = path.read_text()
    path.write_text(text[:len(text) // 2])
    with TrajectoryStore(directory, read_only=True) as store:
      assert store.metadata(1) == {"step": 1}
      reads = [store.load, store.read_matrix, store.columns]
      if item == "metadata":
        reads = [store.metadata]
      for read in reads:
        arg = 2 if read in (store.load, store.metadata) else None
        with pytest.raises(ValueError, match=r"step=2\): cannot read"):
          read(arg)
    path.write_text(text)


def test_failed_write_names_step_and_directory(tmp_path):
  """Issue 13 item 8, with a real write failure: a file size limit
  (RLIMIT_FSIZE) makes the writes of step 1 fail as a full disk would."""
  directory = tmp_path / "s"
  script = _run("""
      import resource, signal, sys
      import numpy as np
      from twa_jax.store import StoreWriteError, TrajectoryStore
      def snapshot(step):  # 256 KiB of incompressible data
        rng = np.random.default_rng(step)
        return {"w": rng.standard_normal(1 << 16).astype(np.float32)}
      store = TrajectoryStore(sys.argv[1])
      store.save(0, snapshot(0))
      store.wait_until_finished()
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
      store.save(1, snapshot(1))
      try:
        store.wait_until_finished()
      except StoreWriteError as e:
        print(e)
      print(store.steps())
      store.close()
      """, str(directory))
  out, err = script.communicate(timeout=120)
  assert script.returncode == 0, err
  error, steps = out.strip().splitlines()
  assert error.startswith(
      f"save(step=1): writing the snapshot to {str(directory)!r} failed: ")
  assert "too large" in error and "intact" in error, error
  assert steps == "[0]"
  with TrajectoryStore(directory) as store:  # nothing lost; saves go on
    assert store.steps() == [0]
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(
        store.load(0)["w"], rng.standard_normal(1 << 16).astype(np.float32))
    assert store.save(1, {"w": np.zeros(1 << 16, np.float32)})
    store.wait_until_finished()
    assert store.steps() == [0, 1]
    assert not _partial_saves(directory)


def test_nnx_state(tmp_path):
  """An nnx.State is stored as its pure dict; the basis has its leaf paths."""
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
                         nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
  snapshots = []
  with TrajectoryStore(tmp_path / "s") as store:
    for step in range(3):
      state = nnx.state(model, nnx.Param)
      snapshots.append(nnx.to_pure_dict(state))
      store.save(step, state)
      nnx.update(model, jax.tree.map(
          lambda x: x + jax.random.normal(jax.random.key(step), x.shape),
          state))
  with TrajectoryStore(tmp_path / "s", read_only=True) as store:
    for step, snapshot in enumerate(snapshots):
      assert fingerprint(store.load(step)) == fingerprint(snapshot)
    basis = twa.basis_from_store(store)
  assert basis.spec.paths == twa.ParamSpec.of(nnx.state(model, nnx.Param)).paths
  assert basis.dim == 3
