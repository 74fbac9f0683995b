"""Every config file builds and matches the paper's settings; validation."""

import bisect
import importlib.util
import pathlib
import sys

import ml_collections
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `from configs import common` in the files
# pylint: disable=g-import-not-at-top,wrong-import-position

from twa_jax.training import configuration
from twa_jax.training import experiment as experiment_lib
from twa_jax.training import models
from twa_jax.training import steps as steps_lib
from twa_jax.training import train_lib

CONFIG_FILES = sorted(p for p in (ROOT / "configs").glob("*.py")
                      if p.stem not in ("__init__", "common"))


def _module(name: str):
  path = ROOT / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(name: str) -> ml_collections.ConfigDict:
  return _module(name).get_config()


def load_with_arg(name: str, arg: str) -> ml_collections.ConfigDict:
  """The config of `--config configs/<name>.py:<arg>`."""
  return _module(name).get_config(arg)


def snapshot_plan(config, steps_per_epoch):
  planned = experiment_lib.planned_snapshot_steps(config.sgd, steps_per_epoch)
  return planned, experiment_lib.select_snapshot_steps(
      config.averaging, planned, steps_per_epoch)


def lr_per_epoch(section, epochs, spe=10):
  schedule = steps_lib.learning_rate_schedule(section, epochs, spe)
  return [float(schedule(e * spe)) for e in range(epochs)]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_config_builds_and_validates(path):
  config = load(path.stem)
  assert isinstance(config, ml_collections.ConfigDict)
  configuration.validate_config(config)
  # Every phase but the optional loss surface and head-length sweep.
  assert train_lib.parse_phases(config.phases) == [
      p for p in train_lib.PHASES if p not in ("surface", "sweep")]
  assert config.model.name in models.MODEL_NAMES
  planned, selected = snapshot_plan(config, steps_per_epoch=20)
  assert selected[-1] <= config.sgd.epochs * 20
  assert config.name.startswith(path.stem)


def test_expected_config_files_exist():
  names = {p.stem for p in CONFIG_FILES}
  assert {"default", "cifar10_vgg16", "cifar100_vgg16", "cifar10_preresnet164",
          "cifar100_preresnet164", "cifar10_vgg16_tail",
          "cifar100_preresnet164_tail", "imagenet_resnet18",
          "imagenet_resnet50", "cifar10_vgg16_adam", "cifar10_cpu"} <= names


def test_head_stage_is_the_papers_table_3_setting():
  c = load("cifar100_preresnet164")
  assert (c.data.name, c.model.name) == ("cifar100", "preresnet164")
  assert (c.sgd.epochs, c.sgd.batch_size, c.sgd.momentum, c.sgd.weight_decay,
          c.sgd.optimizer) == (200, 128, 0.9, 1e-4, "sgd")
  lrs = lr_per_epoch(c.sgd, 200)
  np.testing.assert_allclose([lrs[0], lrs[99], lrs[100], lrs[149], lrs[150],
                              lrs[199]],
                             [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
  planned, selected = snapshot_plan(c, 391)
  assert len(planned) == 201 and len(selected) == 101  # epochs 0..100
  assert selected[0] == 0 and selected[-1] == 100 * 391
  assert (c.twa.epochs, c.twa.lr, c.twa.weight_decay, c.twa.start) == (
      10, 2.0, 1e-5, "mean")
  # lr 2 divided by 10 at 50% and 75% of the TWA epochs (epochs 5 and 8).
  np.testing.assert_allclose(lr_per_epoch(c.twa, 10),
                             [2.0] * 5 + [0.2] * 3 + [0.02] * 2, rtol=1e-6)


@pytest.mark.parametrize("name,wd,epochs,start", [
    ("cifar10_vgg16_tail", 5e-4, 300, 161),
    ("cifar100_preresnet164_tail", 3e-4, 225, 126),
])
def test_tail_stage_is_the_swa_setting_of_table_1(name, wd, epochs, start):
  c = load(name)
  assert (c.sgd.weight_decay, c.sgd.epochs, c.sgd.schedule) == (wd, epochs,
                                                                "swa")
  assert c.sgd.swa_lr == 0.05 and c.sgd.swa_start == start
  planned, selected = snapshot_plan(c, 10)
  assert len(selected) == epochs - start + 1  # epochs start..end inclusive
  assert selected[0] == start * 10 and selected[-1] == epochs * 10
  assert (c.twa.epochs, c.twa.lr, c.twa.weight_decay, c.twa.start) == (
      10, 2.0, 5e-5, "last")
  lrs = lr_per_epoch(c.sgd, epochs)
  # SWA's schedule, t = epoch / swa_start: 0.1 up to t = 0.5, linear down to
  # swa_lr at t = 0.9, then constant.
  half, late = start // 2, int(np.ceil(0.9 * start)) + 1
  mid = int(0.7 * start)
  assert lrs[0] == pytest.approx(0.1) and lrs[half] == pytest.approx(0.1)
  assert lrs[late] == pytest.approx(0.05) and lrs[-1] == pytest.approx(0.05)
  t = mid / start
  assert lrs[mid] == pytest.approx(0.1 * (1 - 0.5 * (t - 0.5) / 0.4))


def reference_milestones(epochs):
  """The reference TWA script's MultiStepLR milestones, as written there."""
  return [int(epochs * 0.5), int(epochs * 0.75 + 0.9)]


def multistep_lr(lr, milestones, epoch, gamma=0.1):
  """PyTorch MultiStepLR's learning rate in `epoch` (its closed form)."""
  return lr * gamma ** bisect.bisect_right(sorted(milestones), epoch)


@pytest.mark.parametrize("epochs", range(1, 13))
def test_twa_milestones_follow_the_reference_formula(epochs):
  twa = load("default").twa
  twa.epochs = epochs
  assert steps_lib.milestone_epochs(twa.decay_at, epochs) == (
      reference_milestones(epochs))
  np.testing.assert_allclose(
      lr_per_epoch(twa, epochs),
      [multistep_lr(twa.lr, reference_milestones(epochs), e)
       for e in range(epochs)], rtol=1e-6)


def test_sgd_milestones_of_the_paper():
  assert steps_lib.milestone_epochs((0.5, 0.75), 200) == [100, 150]
  assert steps_lib.milestone_epochs((1 / 3, 2 / 3), 90) == [30, 60]


def test_imagenet_is_the_papers_table_4_setting():
  c = load("imagenet_resnet50")
  assert (c.data.name, c.model.name, c.sgd.epochs, c.sgd.batch_size) == (
      "imagenet2012", "resnet50", 90, 256)
  assert c.sgd.init_from == ""  # trained from scratch
  lrs = lr_per_epoch(c.sgd, 90)
  np.testing.assert_allclose([lrs[29], lrs[30], lrs[59], lrs[60], lrs[89]],
                             [0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
  planned, selected = snapshot_plan(c, 5004)
  assert len(planned) == 90 * 5 + 1
  # 5 per epoch over epochs 0-60 plus the initial weights: indices 0-300.
  assert len(selected) == 301
  assert selected == planned[:301] and selected[-1] == 60 * 5004
  # TWA "60 + 2": one epoch at 0.3, one at 0.03, nothing more.
  assert (c.twa.epochs, c.twa.linear_epochs, c.twa.start) == (2, 0, "mean")
  assert c.twa.weight_decay == 1e-5
  twa = steps_lib.learning_rate_schedule(c.twa, c.twa.epochs, 100)
  np.testing.assert_allclose(
      [float(twa(s)) for s in (0, 99, 100, 199)], [0.3, 0.3, 0.03, 0.03],
      rtol=1e-6)


@pytest.mark.parametrize("model", ["resnet18", "resnet50"])
def test_imagenet_90_1_is_the_reference_tail_run(model):
  c = load(f"imagenet_{model}_90_1")
  head = load(f"imagenet_{model}")
  assert c.model.name == model
  assert c.sgd == head.sgd  # the same SGD run records the snapshots
  planned, selected = snapshot_plan(c, 5004)
  # The reference's params 301-451: the 150 snapshots taken during epochs
  # 61-90, not the end-of-epoch-60 one.
  assert len(selected) == 150
  assert selected == planned[301:451]
  assert 60 * 5004 < selected[0] < 61 * 5004 and selected[-1] == 90 * 5004
  assert (c.twa.epochs, c.twa.lr, c.twa.start) == (1, 0.03, "mean")
  twa = steps_lib.learning_rate_schedule(c.twa, c.twa.epochs, 100)
  np.testing.assert_allclose([float(twa(s)) for s in (0, 50, 99, 100)],
                             [0.03, 0.015, 0.0003, 0.0], rtol=1e-5,
                             atol=1e-9)
  # Total epochs: 90 of SGD and one of TWA.
  assert c.sgd.epochs + c.twa.epochs == 91


@pytest.mark.parametrize("epochs", [1, 2, 5, 10])
def test_pretrained_imagenet_is_the_papers_table_2_setting(epochs):
  c = load_with_arg("imagenet_resnet50_pretrained", str(epochs))
  configuration.validate_config(c)
  assert c.name == f"imagenet_resnet50_pretrained_{epochs}ep"
  assert (c.data.name, c.model.name, c.sgd.batch_size) == (
      "imagenet2012", "resnet50", 256)
  assert c.sgd.init_from == ""  # the user points it at the weights
  assert c.sgd.epochs == epochs
  np.testing.assert_allclose(lr_per_epoch(c.sgd, epochs), [0.005] * epochs)
  planned, selected = snapshot_plan(c, 5004)
  # 5 snapshots per epoch, the pretrained start not among them; SWA and TWA
  # average all of them.
  assert 0 not in planned
  assert len(selected) == len(planned) == 5 * epochs
  assert selected[-1] == epochs * 5004
  assert (c.twa.epochs, c.twa.lr, c.twa.linear_epochs, c.twa.start) == (
      1, 0.03, 1, "mean")


def test_pretrained_imagenet_budget_errors():
  assert load("imagenet_resnet50_pretrained").sgd.epochs == 10
  with pytest.raises(ValueError, match="must be an integer"):
    load_with_arg("imagenet_resnet50_pretrained", "ten")
  with pytest.raises(ValueError, match="positive integer, got 0"):
    load_with_arg("imagenet_resnet50_pretrained", "0")


def test_adam_config_table_a2():
  c = load("cifar10_vgg16_adam")
  assert (c.sgd.optimizer, c.twa.epochs, c.twa.lr, c.twa.optimizer) == (
      "adam", 5, 3.0, "sgd")
  # The reference's milestones at E = 5 are epochs 2 and 4.
  np.testing.assert_allclose(lr_per_epoch(c.twa, 5),
                             [3.0, 3.0, 0.3, 0.3, 0.03], rtol=1e-6)


def test_cpu_config_points_at_npz_data():
  c = load("cifar10_cpu")
  assert c.data.name == "npz"
  assert c.data.path is None  # the user points it at a decoded CIFAR-10 file
  assert models.create_model(c.model.name, 10, **c.model.kwargs.to_dict())


@pytest.mark.parametrize("field,value,message", [
    ("sgd.lr", 0.0, "learning rate must be positive"),
    ("twa.lr", -1.0, "learning rate must be positive"),
    ("sgd.epochs", 0, "positive integer"),
    ("twa.epochs", -2, "positive integer"),
    ("sgd.batch_size", 0, "must be positive"),
    ("sgd.optimizer", "lion", "choose from"),
    ("twa.start", "middle", "mean"),
    ("averaging.end", 500, "averaging.end=500"),
    ("averaging.unit", "hour", "averaging.unit"),
    ("sgd.ema_decay", 1.0, "[0, 1)"),
    ("parallel.param_sharding", "zero3", "('replicated', 'fsdp')"),
])
def test_validation_names_the_bad_field(field, value, message):
  c = load("default")
  section, key = field.split(".")
  c[section][key] = value
  with pytest.raises(configuration.ConfigError, match=rf"config\.{field}") as e:
    configuration.validate_config(c)
  assert message in str(e.value)


def test_unknown_phase_is_rejected():
  with pytest.raises(configuration.ConfigError, match="unknown or no phase"):
    train_lib.parse_phases("sgd,fine-tune")
  assert train_lib.parse_phases("report, twa") == ["twa", "report"]


def test_averaging_index_range_beyond_the_plan_is_rejected():
  c = load("default")
  c.averaging.unit = "index"
  c.averaging.end = 10_000
  planned = experiment_lib.planned_snapshot_steps(c.sgd, 5)
  with pytest.raises(configuration.ConfigError, match="records 31 snapshots"):
    experiment_lib.select_snapshot_steps(c.averaging, planned, 5)
  c.averaging.end = 0
  with pytest.raises(configuration.ConfigError,
                     match="only the initial weights"):
    experiment_lib.select_snapshot_steps(c.averaging, planned, 5)
