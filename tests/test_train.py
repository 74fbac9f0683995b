"""train.py and its phase loop, end to end on scikit-learn's digits.

The runs are tiny (a 32-unit MLP with batch norm, a few epochs of 22 steps)
so that each takes seconds; the killed-and-resumed runs go through
`train.py` in a subprocess and SIGKILL.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `from configs import ...`
# pylint: disable=g-import-not-at-top,wrong-import-position

from twa_jax.store import TrajectoryStore
from twa_jax.training import configuration
from twa_jax.checkpoints import CheckpointSnapshots
from twa_jax.training import experiment as experiment_lib
from twa_jax.training import init_from
from twa_jax.training import input_pipeline
from twa_jax.training import loop
from twa_jax.training import report
from twa_jax.training import train_lib
from twa_jax.training import workdir as workdir_lib

METHODS = ("sgd", "sgd_head", "swa", "ema", "twa")

TINY = """
from configs import default


def get_config():
  c = default.get_config()
  c.name = "tiny"
  c.model.kwargs.hidden_sizes = (32,)
  c.model.kwargs.batch_norm = True
  c.sgd.epochs = {sgd_epochs}
  c.sgd.batch_size = 64
  c.sgd.lr = 0.1
  c.averaging.end = {head}
  c.twa.epochs = {twa_epochs}
  c.twa.lr = 0.5
  c.eval_batch_size = 360
  c.checkpoint_every_steps = {every}
  return c
"""


def tiny_config(sgd_epochs=6, head=3, twa_epochs=2, every=0):
  """The TINY config file's `get_config()` (the subprocess runs the file)."""
  namespace = {}
  exec(TINY.format(sgd_epochs=sgd_epochs, head=head, twa_epochs=twa_epochs,
                   every=every), namespace)  # pylint: disable=exec-used
  return namespace["get_config"]()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A workdir in which all phases of the tiny config ran."""
  workdir = tmp_path_factory.mktemp("finished")
  summary = train_lib.run(tiny_config(), workdir)
  return workdir, summary


def copy_workdir(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  shutil.copytree(src, dst)
  return dst


def without_times(summary):
  out = json.loads(json.dumps(summary))
  for row in out["results"].values():
    row.pop("wall_time_s")
  return out


@pytest.mark.slow
def test_all_phases_end_to_end(finished):
  workdir, summary = finished
  results = summary["results"]
  assert tuple(results) == METHODS
  for method, row in results.items():
    assert set(row) == {"test_accuracy", "test_loss", "train_accuracy",
                        "train_loss", "generalization_gap",
                        "running_train_accuracy",
                        "running_generalization_gap", "epochs",
                        "wall_time_s"}, method
    assert 0.6 < row["test_accuracy"] <= 1.0, (method, row)
    assert row["generalization_gap"] == pytest.approx(
        row["train_accuracy"] - row["test_accuracy"])
    assert row["wall_time_s"] > 0
  assert results["sgd"]["epochs"] == 6
  assert results["sgd_head"]["epochs"] == results["swa"]["epochs"] == 3
  assert results["ema"]["epochs"] == 3 and results["twa"]["epochs"] == 3 + 2
  # TWA trains in the span that contains SWA's solution, starting there.
  assert results["twa"]["train_loss"] < results["swa"]["train_loss"]
  twa = summary["twa"]
  assert twa["snapshots"] == 4 and len(twa["coefficients"]) == 4
  assert twa["snapshot_epochs"] == [0, 1, 2, 3]
  assert 1 <= twa["basis_dim"] <= 4
  # The kept dimension, the dropped directions and W's condition number:
  # in summary.json, the table and the log.
  assert twa["basis_dim"] + twa["basis_dropped"] == 4
  with TrajectoryStore(workdir / "trajectory", read_only=True) as store:
    w = np.asarray(store.read_matrix([0, 22, 44, 66])[1], np.float64)
  singular = np.linalg.svd(w, compute_uv=False)
  assert twa["basis_condition"] == pytest.approx(
      singular[0] / singular[-1], rel=1e-3)
  text = (f"basis dimension {twa['basis_dim']} ({twa['basis_dropped']} "
          f"dropped, condition number of W {twa['basis_condition']:.3g})")
  assert text in report.table(summary)
  assert (f"twa: basis of 4 snapshots has dimension {twa['basis_dim']}, "
          f"{twa['basis_dropped']} dropped, condition number of W "
          f"{twa['basis_condition']:.3g}") in (workdir / "log.txt").read_text()
  assert twa["coefficient_sum"] == pytest.approx(sum(twa["coefficients"]))
  assert 0.5 < twa["coefficient_sum"] < 1.5
  assert json.loads((workdir / "summary.json").read_text()) == summary
  for plot in ("accuracy.png", "coefficients.png"):
    assert (workdir / "plots" / plot).stat().st_size > 1000
  records = workdir_lib.read_metrics(workdir)
  assert [(r["phase"], r["epoch"]) for r in records] == (
      [("sgd", e) for e in range(1, 7)] + [("twa", e) for e in range(1, 3)])
  # The paper's train accuracy: the running average over the last epoch's
  # train-mode batches, next to the clean one.
  running = {(r["phase"], r["epoch"]): r["train_accuracy"] for r in records}
  assert results["sgd"]["running_train_accuracy"] == running["sgd", 6]
  assert results["sgd_head"]["running_train_accuracy"] == running["sgd", 3]
  assert results["twa"]["running_train_accuracy"] == running["twa", 2]
  for method in ("swa", "ema"):  # no training epochs of their own
    assert results[method]["running_train_accuracy"] is None
    assert results[method]["running_generalization_gap"] is None
  for method in ("sgd", "sgd_head", "twa"):
    row = results[method]
    assert row["running_generalization_gap"] == pytest.approx(
        row["running_train_accuracy"] - row["test_accuracy"])
    assert row["running_train_accuracy"] != row["train_accuracy"]
  table = report.table(summary).splitlines()
  assert "run. train acc" in table[1] and "run. gap" in table[1]
  assert f"{100 * running['sgd', 6]:.2f}%" in table[3]
  assert all(r["seconds"] > 0 and r["lr"] > 0 for r in records)
  log = (workdir / "log.txt").read_text()
  assert "sgd epoch 6/6" in log and "twa epoch 2/2" in log
  with TrajectoryStore(workdir / "trajectory", read_only=True) as store:
    assert store.steps() == [22 * e for e in range(7)]  # 1437 // 64 = 22
    assert store.metadata(66) == {"epoch": 3}


def test_rerun_skips_finished_phases(finished, tmp_path, capsys):
  workdir = copy_workdir(finished[0], tmp_path / "w")
  before = (workdir / "metrics.jsonl").read_text()
  summary = train_lib.run(tiny_config(), workdir)
  assert summary == finished[1]
  assert (workdir / "metrics.jsonl").read_text() == before
  assert "TWA (epochs 0-3)" in capsys.readouterr().out


def test_batch_norm_recomputation_is_the_exact_average(finished):
  """Against numpy: the first BN layer sees x @ W of every training batch."""
  workdir, _ = finished
  experiment = experiment_lib.create(tiny_config())
  params, _ = experiment_lib.init_variables(experiment)
  params = jax.tree.map(lambda p: p + 0.1 * np.random.default_rng(0)
                        .standard_normal(p.shape).astype(p.dtype), params)
  stats = experiment_lib.recompute_batch_stats(experiment, params)
  kernel = np.asarray(params["Dense_0"]["kernel"], np.float64)
  means, variances = [], []
  batches = input_pipeline.train_iterator(experiment.dataset, 64, seed=0)
  for _ in range(experiment.steps_per_epoch):
    batch = next(batches)
    h = batch["image"].reshape(64, -1).astype(np.float64) @ kernel
    means.append(h.mean(0))
    variances.append(h.var(0))
  np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], np.mean(means, 0),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["BatchNorm_0"]["var"],
                             np.mean(variances, 0), rtol=1e-4, atol=1e-5)


def test_holdout_replaces_the_test_split(tmp_path):
  config = tiny_config()
  config.data.holdout_fraction = 0.25
  experiment = experiment_lib.create(config)
  assert experiment.dataset.num_test == round(1437 * 0.25)
  assert experiment.dataset.num_train == 1437 - round(1437 * 0.25)
  train = {x.tobytes() for x in np.asarray(experiment.dataset.x_train)}
  assert not any(x.tobytes() in train
                 for x in np.asarray(experiment.dataset.x_test))


def test_twa_v_trains_on_a_part_sgd_never_saw(tmp_path):
  config = tiny_config(sgd_epochs=4, head=3)
  config.twa.holdout_fraction = 0.2
  summary = train_lib.run(config, tmp_path)
  experiment = experiment_lib.create(config)
  held = {x.tobytes() for x in np.asarray(experiment.holdout.x_train)}
  sgd_train = {x.tobytes() for x in np.asarray(experiment.dataset.x_train)}
  assert len(held) == round(1437 * 0.2) and not held & sgd_train
  assert len(held) + len(sgd_train) == 1437
  # SGD's epochs have the steps of the smaller training set; TWA-v's those
  # of the held-out part.
  spe = {r["phase"]: r["step"] // r["epoch"]
         for r in workdir_lib.read_metrics(tmp_path)}
  assert spe == {"sgd": len(sgd_train) // 64, "twa": len(sgd_train) // 64,
                 "twa_v": len(held) // 64}
  results = summary["results"]
  assert {"twa", "twa_v"} <= results.keys()
  assert summary["twa_v"]["trained_on"] == len(held)
  assert summary["twa"]["trained_on"] == len(sgd_train)
  for row in results.values():
    assert 0 <= row["holdout_accuracy"] <= 1
  # Trained on the held-out part, TWA-v fits it better than SWA does.
  assert results["twa_v"]["holdout_loss"] < results["swa"]["holdout_loss"]
  assert "TWA-v" in report.table(summary)
  # The held-out part is missing from the sgd phase's data: changing it
  # later is refused.
  config.twa.holdout_fraction = 0.1
  with pytest.raises(configuration.ConfigError, match=r"twa\.holdout_fraction"):
    train_lib.run(config, tmp_path)


def test_layer_wise_coefficients_and_low_bit_storage(finished, tmp_path):
  workdir = copy_workdir(finished[0], tmp_path / "w")
  shutil.rmtree(workdir / "twa")
  config = tiny_config()
  config.phases = "twa"
  config.twa.granularity = "layer"
  config.twa.storage = "int8"
  train_lib.run(config, workdir)
  twa = json.loads((workdir / "twa" / "result.json").read_text())
  details = twa["twa"]
  # Three layers (Dense_0, BatchNorm_0, Dense_1), each with its own
  # coefficients for the 4 snapshots of epochs 0-3.
  assert sorted(details["coefficients"]) == [
      "['BatchNorm_0']", "['Dense_0']", "['Dense_1']"]
  assert all(len(a) == 4 for a in details["coefficients"].values())
  assert details["basis_dim"] == 12
  assert details["storage"] == "int8"
  assert twa["results"]["twa"]["test_accuracy"] > 0.6
  config.twa.storage = "int3"
  with pytest.raises(configuration.ConfigError, match=r"twa\.storage='int3'"):
    train_lib.run(config, workdir)


def test_surface_phase_maps_the_plane_through_sgd_swa_twa(finished, tmp_path):
  workdir = copy_workdir(finished[0], tmp_path / "w")
  config = tiny_config()
  config.phases = "surface,report"
  config.surface.steps = 3
  config.surface.margin = 0.0
  train_lib.run(config, workdir)
  result = json.loads((workdir / "surface" / "result.json").read_text())
  assert result["labels"] == ["SGD", "SWA", "TWA"]
  (x0, y0), (x1, y1), (x2, y2) = result["coordinates"]
  assert (x0, y0, y1) == (0, 0, 0) and x1 > 0 and y2 > 0
  # margin 0: the grid spans exactly the three points.
  assert result["xs"][0] == min(0, x2) and result["xs"][-1] == max(x1, x2)
  assert result["ys"] == [0, y2 / 2, y2]
  for name in ("train_loss", "test_loss", "train_error", "test_error"):
    z = np.asarray(result["metrics"][name], np.float64)
    assert z.shape == (3, 3) and np.isfinite(z).all()
  assert (workdir / "plots" / "surface.png").stat().st_size > 10_000
  # The grid's SGD corner is SGD's solution (batch norm recomputed): its
  # train error is that of a trained network, not of a random one.
  assert result["metrics"]["train_error"][0][0] < 0.3


def test_config_mismatch_with_a_started_phase_is_refused(finished, tmp_path):
  workdir = copy_workdir(finished[0], tmp_path / "w")
  config = tiny_config()
  config.sgd.lr = 0.2
  with pytest.raises(configuration.ConfigError,
                     match=r"sgd\.lr: 0\.1 in the workdir; 0\.2 in this "
                     r"config"):
    train_lib.run(config, workdir)
  config = tiny_config()
  config.twa.lr = 0.25
  with pytest.raises(configuration.ConfigError, match=r"twa\.lr"):
    train_lib.run(config, workdir)
  # After deleting the TWA phase's folder, its settings may change.
  shutil.rmtree(workdir / "twa")
  config.phases = "twa"
  config.twa.optimizer = "adam"  # TWA with Adam on the coefficients
  config.twa.lr = 0.01
  assert train_lib.run(config, workdir) is None
  result = json.loads((workdir / "twa" / "result.json").read_text())
  assert result["results"]["twa"]["test_accuracy"] > 0.6
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["twa"]["optimizer"] == "adam"


def test_workdir_from_before_a_field_existed_resumes(finished, tmp_path):
  workdir = copy_workdir(finished[0], tmp_path / "w")
  saved = json.loads((workdir / "config.json").read_text())
  del saved["twa"]["holdout_fraction"], saved["data"]["holdout_seed"]
  (workdir / "config.json").write_text(json.dumps(saved))
  train_lib.run(tiny_config(), workdir)  # the value it had: accepted
  (workdir / "config.json").write_text(json.dumps(saved))
  config = tiny_config()
  config.twa.holdout_fraction = 0.1
  with pytest.raises(configuration.ConfigError,
                     match=r"twa\.holdout_fraction: 0\.0 in the workdir; "
                     r"0\.1 in this config"):
    train_lib.run(config, workdir)


def test_errors_before_training(finished, tmp_path):
  def fails(config, match, workdir=None):
    workdir = workdir or tmp_path / f"w{len(list(tmp_path.iterdir()))}"
    with pytest.raises(configuration.ConfigError, match=match):
      train_lib.run(config, workdir)
    assert not (pathlib.Path(workdir) / "metrics.jsonl").exists()
    assert not (pathlib.Path(workdir) / "config.json").exists()

  config = tiny_config()
  config.data.name = "no_such_dataset"
  fails(config, r"config\.data \(name='no_such_dataset'\)")
  config = tiny_config()
  config.model.name = "transformer"
  fails(config, r"config\.model: unknown model 'transformer'")
  config = tiny_config()
  config.sgd.lr = -0.1
  fails(config, r"config\.sgd\.lr=-0\.1")
  config = tiny_config()
  config.twa.epochs = 0
  fails(config, r"config\.twa\.epochs=0")
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  fails(tiny_config(), "is not writable", workdir=blocker / "workdir")
  config = tiny_config()
  config.phases = "twa"
  fails(config, "no trajectory store")


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sgd_starts_from_a_checkpoint_or_an_npz(finished, tmp_path):
  # Epochs 5 and 6 kept, labelled by step (22 per epoch).
  checkpoints = finished[0] / "sgd" / "checkpoints"
  with CheckpointSnapshots(checkpoints, key=("params",)) as ckpt:
    assert ckpt.steps() == [110, 132]
    at_5, at_6 = ckpt.load(110), ckpt.load(132)
  with CheckpointSnapshots(checkpoints, key=("batch_stats",)) as ckpt:
    stats_5 = ckpt.load(110)
  config = tiny_config(sgd_epochs=1, head=1, twa_epochs=1)
  config.phases = "sgd"
  seed_params, seed_stats = experiment_lib.init_variables(
      experiment_lib.create(config))
  # A checkpoint directory: its latest step, or the one after ":".
  config.sgd.init_from = str(checkpoints)
  assert_trees_equal(experiment_lib.initial_variables(
      experiment_lib.create(config))[0], at_6)
  config.sgd.init_from = f"{checkpoints}:110"
  params, stats = experiment_lib.initial_variables(
      experiment_lib.create(config))
  assert_trees_equal(params, at_5)
  assert_trees_equal(stats, stats_5)
  # An .npz: with batch_stats, or without (the seed's are kept).
  shifted = jax.tree.map(lambda p: np.asarray(p) + 1.0, at_5)
  init_from.save_npz(tmp_path / "both.npz", shifted, stats_5)
  init_from.save_npz(tmp_path / "params.npz", shifted)
  with np.load(tmp_path / "both.npz") as f:
    assert sorted(f.files) == [
        "batch_stats/BatchNorm_0/mean", "batch_stats/BatchNorm_0/var",
        "params/BatchNorm_0/bias", "params/BatchNorm_0/scale",
        "params/Dense_0/kernel", "params/Dense_1/bias",
        "params/Dense_1/kernel"]
  config.sgd.init_from = str(tmp_path / "params.npz")
  params, stats = experiment_lib.initial_variables(
      experiment_lib.create(config))
  assert_trees_equal(params, shifted)
  assert_trees_equal(stats, seed_stats)
  # The sgd phase's first snapshot is the loaded parameters.
  config.sgd.init_from = str(tmp_path / "both.npz")
  workdir = tmp_path / "w"
  train_lib.run(config, workdir)
  with TrajectoryStore(workdir / "trajectory", read_only=True) as store:
    assert_trees_equal(store.load(0), shifted)
    trained = store.load(22)
  assert not np.array_equal(trained["Dense_0"]["kernel"],
                            shifted["Dense_0"]["kernel"])
  assert "sgd starts from config.sgd.init_from=" in (
      workdir / "log.txt").read_text()
  # A started workdir refuses another start.
  config.sgd.init_from = ""
  with pytest.raises(configuration.ConfigError, match=r"sgd\.init_from: "):
    train_lib.run(config, workdir)
  # Without init_from, the seed's initialization (as before).
  assert_trees_equal(experiment_lib.initial_variables(
      experiment_lib.create(config))[0], seed_params)


def test_a_mismatched_init_from_is_refused_naming_the_leaf(finished,
                                                          tmp_path):
  config = tiny_config(sgd_epochs=1, head=1, twa_epochs=1)
  params, stats = experiment_lib.init_variables(experiment_lib.create(config))
  params = jax.tree.map(np.asarray, params)

  def fails(tree, match, batch_stats=None):
    path = tmp_path / f"{len(list(tmp_path.iterdir()))}.npz"
    init_from.save_npz(path, tree, batch_stats)
    config.sgd.init_from = str(path)
    workdir = tmp_path / f"w{len(list(tmp_path.iterdir()))}"
    with pytest.raises(configuration.ConfigError, match=match):
      train_lib.run(config, workdir)
    assert not (workdir / "metrics.jsonl").exists()
    assert not (workdir / "trajectory").exists()

  missing = {k: dict(v) for k, v in params.items()}
  del missing["Dense_1"]["bias"]
  fails(missing, r"init_from=.*: params: missing leaf \['Dense_1'\]\['bias'\]")
  extra = {**params, "Dense_2": {"kernel": np.zeros((2, 2), np.float32)}}
  fails(extra, r"params: unexpected leaf \['Dense_2'\]\['kernel'\]")
  wide = {**params, "Dense_0": {"kernel": np.zeros((64, 48), np.float32)}}
  fails(wide, r"leaf \['Dense_0'\]\['kernel'\] has shape \(64, 48\), "
        r"expected \(64, 32\)")
  half = jax.tree.map(lambda p: p.astype(np.float16), params)
  fails(half, r"leaf \['BatchNorm_0'\]\['bias'\] has dtype float16")
  fails(params, r"batch_stats: leaf \['BatchNorm_0'\]\['mean'\] has shape",
        batch_stats={"BatchNorm_0": {"mean": np.zeros(3, np.float32),
                                     "var": np.zeros(32, np.float32)}})
  np.savez(tmp_path / "bad.npz", weights=np.zeros(3))
  config.sgd.init_from = str(tmp_path / "bad.npz")
  with pytest.raises(configuration.ConfigError,
                     match=r"entry 'weights' is neither params/"):
    train_lib.run(config, tmp_path / "w_bad")
  config.sgd.init_from = str(tmp_path / "no_such_checkpoints")
  with pytest.raises(configuration.ConfigError,
                     match=r"init_from=.*no_such_checkpoints.*does not exist"):
    train_lib.run(config, tmp_path / "w_none")
  config.sgd.init_from = f"{finished[0] / 'sgd' / 'checkpoints'}:3"
  with pytest.raises(configuration.ConfigError,
                     match=r"step 3 is not in .*steps found: \[110, 132\]"):
    train_lib.run(config, tmp_path / "w_step")


def test_schedule_free_sgd_evaluates_its_averaged_params(tmp_path):
  config = tiny_config(sgd_epochs=3, head=3, twa_epochs=1)
  config.phases = "sgd"
  config.sgd.optimizer = "schedule_free_sgd"
  config.sgd.decay_at = ()  # a constant learning rate
  train_lib.run(config, tmp_path)
  row = json.loads((tmp_path / "sgd" / "result.json").read_text())[
      "results"]["sgd"]
  assert row["test_accuracy"] > 0.6  # it trains
  # x = (y - (1 - b1) z) / b1 from the final state: y the gradient points
  # (the state's params), z the SGD sequence.
  with ocp.CheckpointManager(
      loop.checkpoint_dir(tmp_path, "sgd"),
      options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    state = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
  b1, y = float(state["opt_state"]["b1"]), state["params"]
  x = jax.tree.map(lambda yi, zi: (yi - (1 - b1) * zi) / b1, y,
                   state["opt_state"]["z"])
  assert not np.allclose(x["Dense_0"]["kernel"], y["Dense_0"]["kernel"])
  with TrajectoryStore(tmp_path / "trajectory", read_only=True) as store:
    last = store.load(store.steps()[-1])
  for a, b in zip(jax.tree.leaves(last), jax.tree.leaves(x)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  exp = experiment_lib.create(config)
  splits = experiment_lib.row_splits(exp)
  at_x = experiment_lib.evaluate_averaged(exp, x, splits)[0]
  at_y = experiment_lib.evaluate_averaged(exp, y, splits)[0]
  assert row["test_loss"] == pytest.approx(at_x["test"]["loss"], rel=1e-5)
  assert row["test_loss"] != pytest.approx(at_y["test"]["loss"], rel=1e-3)
  assert row["train_accuracy"] == pytest.approx(at_x["train"]["accuracy"])
  assert workdir_lib.last_metrics(tmp_path, "sgd")["test_loss"] == (
      pytest.approx(at_x["test"]["loss"], rel=1e-5))
  # Only the sgd phase takes it, and it needs its interpolation b1.
  config.twa.optimizer = "schedule_free_sgd"
  config.sgd.momentum = 0.0
  with pytest.raises(configuration.ConfigError,
                     match=r"(?s)config\.twa\.optimizer='schedule_free_sgd': "
                     r"choose from \('sgd', 'adam'\).*config\.sgd\.momentum"
                     r"=0\.0: schedule_free_sgd's interpolation b1"):
    configuration.validate_config(config)


def test_sweep_phase_over_head_lengths_resumes_and_grows(finished, tmp_path,
                                                         capsys):
  workdir = copy_workdir(finished[0], tmp_path / "w")
  config = tiny_config()
  config.phases = "sweep"
  config.sweep.heads = (1,)
  config.sweep.budget_matched_sgd = True
  train_lib.run(config, workdir)
  first = workdir_lib.read_json(workdir / "sweep" / "result.json")
  assert [h["head_epochs"] for h in first["heads"]] == [1]
  # A later invocation adds heads and keeps the finished one.
  config.sweep.heads = (3, 1)
  train_lib.run(config, workdir)
  result = workdir_lib.read_json(workdir / "sweep" / "result.json")
  one, three = result["heads"]
  assert one == first["heads"][0]
  records = workdir_lib.read_metrics(workdir)
  assert [r["epoch"] for r in records if r["phase"] == "sweep/twa_1"] == [1, 2]
  assert [r["epoch"] for r in records if r["phase"] == "sweep/sgd_3"] == [
      1, 2, 3]
  assert [r["epoch"] for r in records if r["phase"] == "sweep/sgd_5"] == [
      1, 2, 3, 4, 5]
  assert (one["snapshots"], three["snapshots"]) == (2, 4)
  assert (one["twa"]["epochs"], three["twa"]["epochs"]) == (3, 5)
  # Head 3 is the averaging range of the twa and swa phases: same results.
  summary = finished[1]["results"]
  for method in ("swa", "twa"):
    assert three[method]["test_accuracy"] == pytest.approx(
        summary[method]["test_accuracy"])
  assert three["twa_basis"]["basis_dim"] == finished[1]["twa"]["basis_dim"]
  curve = {r["epoch"]: r["test_accuracy"] for r in records
           if r["phase"] == "sgd"}
  assert result["sgd_curve"] == [[e, curve[e]] for e in range(1, 7)]
  assert one["sgd_test_accuracy"] == curve[1]
  assert result["sgd"] == summary["sgd"]
  reaching = [h["head_epochs"] for h in (one, three)
              if h["twa"]["test_accuracy"] >= summary["sgd"]["test_accuracy"]]
  assert result["smallest_head_reaching_sgd"] == min(reaching, default=None)
  # Budget-matched SGD: the whole schedule compressed to k + TWA's epochs.
  sgd_5 = [r for r in records if r["phase"] == "sweep/sgd_5"]
  assert [r["lr"] for r in sgd_5] == pytest.approx([0.1, 0.1, 0.01, 0.01,
                                                    0.001])
  assert three["budget_matched_sgd"]["epochs"] == 5
  assert 0.6 < three["budget_matched_sgd"]["test_accuracy"] <= 1
  out = capsys.readouterr().out
  assert "head-length sweep" in out and "SGD, same epochs" in out
  assert (workdir / "plots" / "sweep.png").stat().st_size > 1000
  config.sweep.heads = (7,)
  with pytest.raises(configuration.ConfigError,
                     match=r"config\.sweep\.heads=\(7,\): distinct epochs"):
    train_lib.run(config, workdir)


def test_nan_loss_stops_naming_epoch_and_step(tmp_path):
  config = tiny_config()
  config.sgd.lr = 1e30
  with pytest.raises(loop.TrainingDiverged,
                     match=r"sgd: the training loss is NaN or infinite at "
                     r"step \d+ \(epoch 1, step \d+ of 22\)"):
    train_lib.run(config, tmp_path)
  assert not (tmp_path / "sgd" / "result.json").exists()
  with TrajectoryStore(tmp_path / "trajectory", read_only=True) as store:
    assert store.steps() == [0]  # the initial weights were kept


def _start(config_file, workdir, env):
  return subprocess.Popen(
      [sys.executable, str(ROOT / "train.py"), f"--config={config_file}",
       f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def _kill_when(proc, ready, timeout=300):
  """SIGKILLs `proc` once `ready()` holds."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if ready() or proc.poll() is not None:
      break
    time.sleep(0.02)
  assert proc.poll() is None, f"finished before the kill:\n{proc.stdout.read()}"
  proc.send_signal(signal.SIGKILL)
  proc.wait()


def _mid_epoch_checkpoint(workdir, phase, epochs, steps_per_epoch):
  """Whether the phase has `epochs` epoch records and its latest checkpoint
  lies inside an epoch."""
  def ready():
    records = [r for r in workdir_lib.read_metrics(workdir)
               if r["phase"] == phase]
    steps = [int(p.name) for p in (workdir / phase / "checkpoints").glob("*")
             if p.name.isdigit()]
    return (len(records) >= epochs and bool(steps)
            and max(steps) % steps_per_epoch != 0)
  return ready


@pytest.mark.slow
def test_killed_runs_resume_mid_epoch_to_the_uninterrupted_result(tmp_path):
  sizes = dict(sgd_epochs=12, head=8, twa_epochs=4, every=10)
  reference = train_lib.run(tiny_config(**sizes), tmp_path / "reference")
  spe = experiment_lib.create(tiny_config(**sizes)).steps_per_epoch
  config_file = tmp_path / "tiny.py"
  config_file.write_text(TINY.format(**sizes))
  workdir = tmp_path / "killed"
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  _kill_when(_start(config_file, workdir, env),
             _mid_epoch_checkpoint(workdir, "sgd", 2, spe))
  assert not (workdir / "sgd" / "result.json").exists()
  # The killed run's store lacks the end of the averaging range (epoch 8).
  config = tiny_config(**sizes)
  config.phases = "swa,twa"
  with pytest.raises(configuration.ConfigError,
                     match=r"average the snapshots of epochs 0-8 \(9 "
                     r"snapshots, steps 0-176\); the store .* lacks \d+ of"):
    train_lib.run(config, workdir)
  config.phases = "sgd"
  train_lib.run(config, workdir)  # resumes inside an epoch, finishes SGD
  proc = _start(config_file, workdir, env)
  _kill_when(proc, _mid_epoch_checkpoint(workdir, "twa", 1, spe))
  assert not (workdir / "twa" / "result.json").exists()
  summary = train_lib.run(tiny_config(**sizes), workdir)
  assert without_times(summary) == without_times(reference)
  records = workdir_lib.read_metrics(workdir)
  assert [(r["phase"], r["epoch"]) for r in records] == (
      [("sgd", e) for e in range(1, 13)] + [("twa", e) for e in range(1, 5)])
  ref_records = workdir_lib.read_metrics(tmp_path / "reference")
  for r, ref in zip(records, ref_records):
    assert r["test_loss"] == ref["test_loss"] and r["lr"] == ref["lr"]
    # The resumed epochs' metrics include the steps before the kill.
    assert r["train_loss"] == ref["train_loss"]


SWEEP = """
_tiny = get_config


def get_config():
  c = _tiny()
  c.phases = "sweep"
  c.sweep.heads = (1,)
  c.sweep.budget_matched_sgd = True
  return c
"""


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_uninterrupted_result(finished, tmp_path):
  config_file = tmp_path / "sweep.py"
  config_file.write_text(TINY.format(sgd_epochs=6, head=3, twa_epochs=2,
                                     every=0) + SWEEP)
  workdir = copy_workdir(finished[0], tmp_path / "killed")
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  # Killed while training budget-matched SGD (3 epochs), after head 1's TWA.
  _kill_when(_start(config_file, workdir, env), lambda: any(
      r["phase"] == "sweep/sgd_3" for r in workdir_lib.read_metrics(workdir)))
  assert not (workdir / "sweep" / "result.json").exists()
  config = tiny_config()
  config.phases, config.sweep.heads = "sweep", (1,)
  config.sweep.budget_matched_sgd = True
  train_lib.run(config, workdir)
  reference = copy_workdir(finished[0], tmp_path / "reference")
  train_lib.run(config, reference)
  results = [workdir_lib.read_json(w / "sweep" / "result.json")
             for w in (workdir, reference)]
  for result in results:
    for head in result["heads"]:
      for row in ("swa", "twa", "budget_matched_sgd"):
        head[row].pop("wall_time_s")
  assert results[0] == results[1]
  records = [(r["phase"], r["epoch"]) for r in workdir_lib.read_metrics(workdir)
             if r["phase"].startswith("sweep/")]
  assert records == [("sweep/twa_1", 1), ("sweep/twa_1", 2),
                     ("sweep/sgd_3", 1), ("sweep/sgd_3", 2),
                     ("sweep/sgd_3", 3)]


@pytest.mark.slow
def test_a_second_train_py_in_a_running_workdir_is_refused(tmp_path):
  config_file = tmp_path / "tiny.py"
  config_file.write_text(TINY.format(sgd_epochs=12, head=8, twa_epochs=4,
                                     every=0))
  workdir = tmp_path / "shared"
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  first = _start(config_file, workdir, env)
  try:
    deadline = time.monotonic() + 300
    while not workdir_lib.read_metrics(workdir) and first.poll() is None:
      assert time.monotonic() < deadline
      time.sleep(0.05)
    assert first.poll() is None, first.stdout.read()
    second = _start(config_file, workdir, env)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 1
    assert (f"error: workdir {workdir}: in use by process {first.pid}"
            in out.splitlines()[-1])
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  config = tiny_config(sgd_epochs=12, head=8, twa_epochs=4)
  config.phases = "sgd"
  train_lib.run(config, workdir)  # the kill -9 left no stale lock


def test_help_explains_phases_and_workdir():
  out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"],
                       cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT))).stdout
  for text in ("sgd", "swa", "twa", "report", "metrics.jsonl", "summary.json",
               "--config.phases", "trajectory/"):
    assert text in out, text


def test_phases_table_runs_the_named_phases_in_order(finished, tmp_path):
  assert list(train_lib.PHASES) == ["sgd", "swa", "twa", "surface", "sweep",
                                    "report"]
  assert train_lib.parse_phases("report, swa,sgd") == ["sgd", "swa", "report"]
  with pytest.raises(configuration.ConfigError,
                     match=r"config\.phases='sgd,fine-tune': unknown or no "
                     r"phase \['fine-tune'\]"):
    train_lib.parse_phases("sgd,fine-tune")
  with pytest.raises(configuration.ConfigError, match="unknown or no phase"):
    train_lib.parse_phases(" , ")
  # Finished phases are skipped; report runs every time and returns the
  # summary.
  workdir = copy_workdir(finished[0], tmp_path / "w")
  config = tiny_config()
  config.phases = "report,swa"
  assert train_lib.run(config, workdir) == finished[1]
  assert "swa: finished earlier" in (workdir / "log.txt").read_text()
  config.phases = "swa"
  assert train_lib.run(config, workdir) is None


@pytest.mark.parametrize("field,value", [
    ("sgd.lr", float("inf")), ("twa.lr", float("nan")),
    ("sgd.momentum", float("-inf")), ("surface.margin", float("inf"))])
def test_non_finite_fields_fail_validation(field, value):
  config = tiny_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(configuration.ConfigError,
                     match=rf"config\.{field}={value!r}: must be finite"):
    configuration.validate_config(config)


def test_validation_names_every_bad_field():
  config = tiny_config()
  config.sgd.lr = 0.0
  config.twa.granularity = "row"
  config.eval_batch_size = 0
  with pytest.raises(configuration.ConfigError) as e:
    configuration.validate_config(config)
  lines = str(e.value).splitlines()
  assert lines[0] == "invalid config:" and len(lines) == 4
  assert "config.sgd.lr=0.0: the learning rate must be positive" in lines[1]
  assert "config.twa.granularity='row'" in lines[2]
  assert "config.eval_batch_size=0" in lines[3]
  configuration.validate_config(tiny_config())  # the valid one passes


def test_differences_name_each_field_and_where():
  configs = {"a": {"seed": 0, "sgd": {"lr": 0.1, "epochs": 2}},
             "b": {"seed": 1, "sgd": {"lr": 0.1, "epochs": 3}},
             "c": {"seed": 0, "sgd": {"lr": 0.1}}}
  assert configuration.differences(configs) == [
      "seed: 0 in a, c; 1 in b",
      "sgd.epochs: 2 in a; 3 in b; <missing> in c"]
  assert configuration.differences(configs, ["sgd.lr", "model"]) == []
  assert configuration.differences(configs, ["sgd"]) == [
      "sgd.epochs: 2 in a; 3 in b; <missing> in c"]


def test_json_files_are_strict(tmp_path):
  path = tmp_path / "summary.json"
  workdir_lib.write_json(path, {"loss": float("nan"), "rows": [float("inf"),
                                                                 1.5]})

  def refuse(constant):
    raise AssertionError(f"non-standard JSON constant {constant}")

  assert json.loads(path.read_text(), parse_constant=refuse) == {
      "loss": None, "rows": [None, 1.5]}
  workdir_lib.append_metrics(tmp_path, {"phase": "sgd", "epoch": 1,
                                        "test_loss": float("nan")})
  text = (tmp_path / "metrics.jsonl").read_text()
  assert json.loads(text, parse_constant=refuse)["test_loss"] is None


def test_train_py_reports_bad_configs_in_one_line(tmp_path):
  def fails(*args):
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"),
         f"--workdir={tmp_path / 'w'}", *args], cwd=ROOT, capture_output=True,
        text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    return out.stderr.strip().splitlines()[-1]

  assert fails("--config.sdg.lr=0.1") == (
      "error: --config.sdg.lr: the config has no field 'sdg'")
  assert fails("--config.sgd.lrr=0.1").startswith(
      "error: --config.sgd.lrr: the config has no field 'lrr' (Did you mean")
  assert fails("--config.sgd.lr=inf") == (
      "error: invalid config: config.sgd.lr=inf: must be finite")
  assert not (tmp_path / "w").exists()
