"""Soups across runs: `twa_jax.greedy_soup` and train.py --soup on digits.

Three tiny digits runs (a 32-unit MLP with batch norm, 2 epochs of 17 steps,
three seeds and learning rates, one fifth of the training set held out) are
the sources of one soup run.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `from configs import ...`
# pylint: disable=g-import-not-at-top,wrong-import-position

import twa_jax as twa
from twa_jax.training import configuration
from twa_jax.training import experiment as experiment_lib
from twa_jax.training import soups
from twa_jax.training import train_lib
from twa_jax.training import workdir as workdir_lib

CONFIG = """
from configs import default


def get_config():
  c = default.get_config()
  c.name = "soup"
  c.phases = "sgd"
  c.data.holdout_fraction = 0.2
  c.model.kwargs.hidden_sizes = (32,)
  c.model.kwargs.batch_norm = True
  c.sgd.epochs = 2
  c.sgd.batch_size = 64
  c.averaging.end = 2
  c.twa.epochs = 2
  c.twa.lr = 0.5
  c.eval_batch_size = 300
  return c
"""
LRS = (0.05, 0.1, 0.2)
SPE = 1150 // 64  # 1437 examples, a fifth held out


def config(seed=0, **sgd):
  namespace = {}
  exec(CONFIG, namespace)  # pylint: disable=exec-used
  c = namespace["get_config"]()
  c.seed = seed
  c.sgd.update(sgd)
  return c


def flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def without_times(summary):
  out = json.loads(json.dumps(summary))
  for row in out["results"].values():
    row.pop("wall_time_s")
  return out


@pytest.fixture(scope="module")
def soup(tmp_path_factory):
  """Three source runs and the finished soup of their final (two) and epoch-1
  (one) snapshots."""
  root = tmp_path_factory.mktemp("soup")
  for i, lr in enumerate(LRS):
    train_lib.run(config(seed=i, lr=lr), root / f"run{i}")
  sources = [str(root / "run0"), str(root / "run1"), f"{root / 'run2'}:{SPE}"]
  summary = soups.run(config(), root / "soup", sources)
  return root, sources, summary


def test_greedy_soup_adds_by_rank_while_the_score_does_not_drop():
  target = np.zeros(2)
  candidates = [{"w": np.array(v, np.float32)} for v in
                ([0.0, 3.0], [-1.0, 0.0], [5.0, 5.0], [1.0, 0.0], [0.0, 0.0])]
  calls = []

  def score(params):
    calls.append(flat(params))
    return -float(np.linalg.norm(flat(params) - target))

  soup, kept = twa.greedy_soup(candidates, score)
  # Ranked 4 (0), 1 and 3 (-1, in their order), 0 (-3), 2; the mean of 4
  # and 1 scores -0.5 < 0: dropped; 4 and 3 likewise; 0 and 2 lower it too.
  assert kept == [4]
  np.testing.assert_array_equal(soup["w"], [0.0, 0.0])
  del candidates[4]  # now 1 (-1) starts; with 3 the mean is the target
  calls.clear()
  soup, kept = twa.greedy_soup(candidates, score)
  assert kept == [1, 3]
  np.testing.assert_allclose(soup["w"], [0.0, 0.0])
  assert len(calls) == 4 + 3  # own scores, then one per later candidate
  # An equal score does not drop (a copy is kept); known scores are reused.
  calls.clear()
  _, kept = twa.greedy_soup(candidates[3:] * 2, score, scores=[-1.0, -1.0])
  assert kept == [0, 1] and len(calls) == 1
  with pytest.raises(ValueError, match="no candidates"):
    twa.greedy_soup([], score)
  with pytest.raises(ValueError, match="2 scores for 4 candidates"):
    twa.greedy_soup(candidates, score, scores=[0.0, 1.0])


def test_soup_of_three_runs(soup, capsys):
  root, sources, summary = soup
  results = summary["results"]
  assert list(results) == ["ingredient_0", "ingredient_1", "ingredient_2",
                           "uniform_soup", "greedy_soup", "twa"]
  assert [i["step"] for i in summary["ingredients"]] == [2 * SPE, 2 * SPE, SPE]
  assert [results[f"ingredient_{i}"]["epochs"] for i in range(3)] == [2, 2, 1]
  assert results["uniform_soup"]["epochs"] == 5
  assert results["twa"]["epochs"] == 5 + 2
  held = [results[f"ingredient_{i}"]["holdout_accuracy"] for i in range(3)]
  assert summary["holdout_split"] == "test"  # data.holdout_fraction
  for row in results.values():
    assert row["holdout_accuracy"] == row["test_accuracy"] > 0.5
  # Greedy soup starts from the best ingredient and never scores below it.
  kept = summary["greedy_soup"]["kept"]
  assert kept[0] == int(np.argmax(held))
  assert sorted(kept) == sorted(set(kept)) and set(kept) <= {0, 1, 2}
  assert results["greedy_soup"]["holdout_accuracy"] >= max(held)
  twa_details = summary["twa"]
  assert twa_details["basis_dim"] == 3 and len(twa_details["coefficients"]) == 3
  assert twa_details["coefficient_sum"] == pytest.approx(
      sum(twa_details["coefficients"]))
  assert json.loads((root / "soup" / "soup" / "summary.json").read_text()) \
      == summary
  records = workdir_lib.read_metrics(root / "soup")
  assert [(r["phase"], r["epoch"]) for r in records] == [("soup", 1),
                                                         ("soup", 2)]
  # A rerun returns the finished summary and prints the table.
  capsys.readouterr()
  assert soups.run(config(), root / "soup", sources) == summary
  out = capsys.readouterr().out
  assert "held-out data: the test split" in out
  assert (out.index("ingredient 0") < out.index("ingredient 2")
          < out.index("uniform soup (3)") < out.index("greedy soup (")
          < out.index("TWA (basis dimension 3 (0 dropped, condition number "
                      "of W "))


def test_uniform_soup_is_the_mean_and_twa_lies_in_the_span(soup):
  root, sources, summary = soup
  ingredients = soups.load_ingredients(soups.parse_sources(sources))
  models = [i.params for i in ingredients]
  experiment = experiment_lib.create(config())
  mean = twa.swa(models)
  row = experiment_lib.evaluate(
      experiment, mean, experiment_lib.recompute_batch_stats(experiment, mean),
      {"test": None})["test"]
  uniform = summary["results"]["uniform_soup"]
  assert row == {"loss": uniform["test_loss"],
                 "accuracy": uniform["test_accuracy"]}
  np.testing.assert_allclose(flat(mean), np.mean([flat(m) for m in models], 0),
                             rtol=1e-6, atol=1e-7)
  # TWA's final parameters: a combination of the three models.
  with ocp.CheckpointManager(root / "soup" / "soup" / "checkpoints") as m:
    state = m.restore(m.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
  params = flat(state["params"])
  w = np.stack([flat(m) for m in models])
  alpha, *_ = np.linalg.lstsq(w.T, params, rcond=None)
  assert np.abs(alpha @ w - params).max() < 1e-4 * np.abs(params).max()
  np.testing.assert_allclose(alpha, summary["twa"]["coefficients"], atol=1e-3)
  assert np.abs(params - flat(mean)).max() > 1e-3  # TWA trained


def test_soup_resumes_twa_to_the_same_result(soup, tmp_path):
  root, sources, summary = soup
  workdir = shutil.copytree(root / "soup", tmp_path / "soup")
  os.remove(workdir / "soup" / "summary.json")
  checkpoints = workdir / "soup" / "checkpoints"  # labelled by step
  shutil.rmtree(checkpoints / str(max(int(p.name) for p in checkpoints.iterdir()
                                      if p.name.isdigit())))  # killed in epoch 2
  resumed = soups.run(config(), workdir, sources)
  assert without_times(resumed) == without_times(summary)
  assert "soup: resuming after epoch 1" in (workdir / "log.txt").read_text()
  assert [r["epoch"] for r in workdir_lib.read_metrics(workdir)] == [1, 2]


def test_bad_sources_are_refused_naming_them(soup, tmp_path):
  root, sources, _ = soup

  def fails(match, srcs, cfg=None):
    with pytest.raises(configuration.ConfigError, match=match):
      soups.run(cfg or config(), tmp_path / "out", srcs)

  def copy(name, edit=None):
    path = shutil.copytree(root / "run1", tmp_path / name)
    if edit:
      saved = json.loads((path / "config.json").read_text())
      edit(saved)
      (path / "config.json").write_text(json.dumps(saved))
    return str(path)

  wide = copy("wide", lambda c: c["model"]["kwargs"].update(hidden_sizes=[64]))
  fails(r"model\.kwargs\.hidden_sizes: \[32\] in .*run0.*; \[64\] in .*wide",
        [sources[0], wide])
  other_part = copy("other_part",
                    lambda c: c["data"].update(holdout_seed=1))
  fails(r"one held-out part.*\n  data\.holdout_seed: 0 in .*run0.*; 1 in "
        r".*other_part", [sources[0], other_part])
  cfg = config()
  cfg.model.kwargs.hidden_sizes = (16,)
  fails(r"\[16\] in the soup run's config", sources[:2], cfg)
  fails(rf"run1:5: load: step 5 is not in the store .*run1.*; stored steps: "
        rf"\[0, {SPE}, {2 * SPE}\]", [sources[0], sources[1] + ":5"])
  unfinished = copy("unfinished")
  os.remove(pathlib.Path(unfinished) / "sgd" / "result.json")
  fails(r"unfinished: its sgd phase has not finished.*unfinished:STEP",
        [sources[0], unfinished])
  fails(r"run0:x': STEP in WORKDIR:STEP", [sources[0] + ":x", sources[1]])
  fails(r"1 source; a soup needs at least two", sources[:1])
  fails(r"run1 given twice", [sources[1], sources[0], sources[1]])
  no_holdout = [copy(f"nh{i}", lambda c: c["data"].update(holdout_fraction=0.0))
                for i in range(2)]
  cfg = config()
  cfg.data.holdout_fraction = 0.0
  fails(r"held-out data.*--config\.data\.holdout_fraction=0\.1", no_holdout,
        cfg)
  assert not (tmp_path / "out").exists()  # refused before any output
  # A started soup refuses other sources or TWA settings.
  cfg = config()
  cfg.twa.lr = 0.25
  with pytest.raises(configuration.ConfigError,
                     match=r"twa\.lr: 0\.5 in the soup workdir; 0\.25 in "
                     r"this config"):
    soups.run(cfg, root / "soup", sources)
  with pytest.raises(configuration.ConfigError,
                     match="started from other sources"):
    soups.run(config(), root / "soup", sources[:2])


def test_twa_v_holdout_ranks_the_greedy_soup(tmp_path):
  """Sources trained with twa.holdout_fraction: the real test split stays."""
  def twa_v(**sgd):
    c = config(epochs=1, **sgd)
    c.data.holdout_fraction = 0.0
    c.twa.holdout_fraction = 0.2
    c.averaging.end = 1
    c.twa.epochs = 1
    return c

  sources = []
  for i, lr in enumerate(LRS[:2]):
    train_lib.run(twa_v(lr=lr), tmp_path / f"run{i}")
    sources.append(str(tmp_path / f"run{i}"))
  summary = soups.run(twa_v(), tmp_path / "soup", sources)
  assert summary["holdout_split"] == "holdout"
  results = summary["results"]
  assert any(r["holdout_accuracy"] != r["test_accuracy"]
             for r in results.values())
  assert results["greedy_soup"]["holdout_accuracy"] >= max(
      results[f"ingredient_{i}"]["holdout_accuracy"] for i in range(2))
  assert summary["twa"]["basis_dim"] == 2


def test_train_py_soup_flag(soup, tmp_path):
  root, sources, summary = soup
  config_file = tmp_path / "soup_config.py"
  config_file.write_text(CONFIG)
  out = subprocess.run(
      [sys.executable, str(ROOT / "train.py"), f"--config={config_file}",
       f"--workdir={root / 'soup'}", f"--soup={','.join(sources)}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert out.returncode == 0, out.stderr
  assert f"ingredient 2 (run2:{SPE})" in out.stdout
  kept = len(summary["greedy_soup"]["kept"])
  assert f"greedy soup ({kept} of 3)" in out.stdout
