"""Trains with SGD while recording snapshots, then compares SGD, SWA, EMA, TWA.

  python train.py                      # configs/default.py: digits, ~2 min
  python train.py --config configs/cifar10_vgg16.py --workdir runs/vgg \\
      --config.data.data_dir ~/tensorflow_datasets --config.twa.lr 1.0
  python train.py --config configs/cifar10_cpu.py \\
      --config.data.path cifar10.npz --config.phases twa,report

Phases (--config.phases, comma-separated; default sgd,swa,twa,report; always in
this order; each resumes where an earlier invocation stopped and is skipped
when finished):
  sgd     regular training with the trajectory recorded into the workdir's
          snapshot store (config.sgd), an EMA of the parameters tracked
  swa     uniform average of the snapshots in config.averaging
  twa     TWA training in their span (config.twa), from their mean (head
          stage) or the last one (tail stage); with config.twa.holdout_fraction
          also TWA-v, trained on a held-out part SGD never saw
  surface train loss and test error over the plane through SGD, SWA and TWA
          (config.surface)
  sweep   the head-length sweep (config.sweep.heads, e.g.
          --config.sweep.heads="(5,10,15)"): SWA and TWA over the snapshots of
          epochs averaging.start..k for each head k, against SGD's own curve,
          full-budget SGD and (sweep.budget_matched_sgd) SGD run for the same
          total epochs; plots/sweep.png; finished heads are kept
  report  summary.json, the comparison table and plots/
SWA, EMA and TWA get batch-norm statistics recomputed over the training data.

Averaging across runs (--soup): instead of the phases, compare the final (or
chosen) snapshots of several workdirs trained with one model and dataset and
a held-out part (--config.data.holdout_fraction), their uniform and greedy
soups, and TWA from their mean in their span:
  python train.py --config.data.holdout_fraction=0.1 --config.seed=1 \\
      --workdir runs/a        # and runs/b, runs/c with other seeds or lr
  python train.py --config.data.holdout_fraction=0.1 --workdir runs/soup \\
      --soup=runs/a,runs/b,runs/c:440
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from twa_jax.checksums import ChecksumError
from twa_jax.training import configuration
from twa_jax.training import loop
from twa_jax.training import parallel
from twa_jax.training import soups
from twa_jax.training import train_lib
from twa_jax.training import workdir as workdir_lib

# shown by --help
__doc__ += "\n".join(("", workdir_lib.LAYOUT, soups.WORKDIR_LAYOUT))
_HERE = os.path.dirname(os.path.abspath(__file__))
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (default: ./workdir/<config name>); "
    "see the layout above.")
_SOUP = flags.DEFINE_list(
    "soup", None, "WORKDIR[:STEP],WORKDIR[:STEP],...: run the soup comparison "
    "of those workdirs' final snapshots (or the ones at STEP) in --workdir "
    "(default: ./workdir/<config name>_soup) instead of the phases; --config "
    "must match their data and model.")


def define_config_flag() -> None:
  """--config; its --config.FIELD overrides are applied here, so an unknown
  field is reported here (one line, exit status 1)."""
  try:
    config_flags.DEFINE_config_file(
        "config", os.path.join(_HERE, "configs", "default.py"),
        "Experiment config file (a configs/*.py); override fields with "
        "--config.FIELD=VALUE, e.g. --config.sgd.epochs=100.")
  except (KeyError, AttributeError) as e:
    sys.exit(f"error: {configuration.override_error(e, sys.argv)}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = flags.FLAGS.config
  default = config.name + ("_soup" if _SOUP.value else "")
  workdir = _WORKDIR.value or os.path.join("workdir", default)
  parallel.initialize(config.parallel)
  try:
    if _SOUP.value:
      soups.run(config, workdir, _SOUP.value)
    else:
      train_lib.run(config, workdir)
  except (configuration.ConfigError, loop.TrainingDiverged, ChecksumError,
          OSError) as e:
    lines = (line.strip() for line in str(e).splitlines())
    sys.exit("error: " + " ".join(line for line in lines if line))


if __name__ == "__main__":
  define_config_flag()
  app.run(main)
