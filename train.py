"""Trains with SGD while recording snapshots, then compares SGD, SWA, EMA, TWA.

  python train.py                      # configs/default.py: digits, ~2 min
  python train.py --config configs/cifar10_vgg16.py --workdir runs/vgg \\
      --config.data.data_dir ~/tensorflow_datasets --config.twa.lr 1.0
  python train.py --config configs/cifar10_cpu.py \\
      --config.data.path cifar10.npz --config.phases twa,report

Phases (--config.phases, comma-separated; default all, always in this order;
each resumes where an earlier invocation stopped and is skipped when finished):
  sgd     regular training with the trajectory recorded into the workdir's
          snapshot store (config.sgd), an EMA of the parameters tracked
  swa     uniform average of the snapshots in config.averaging
  twa     TWA training in their span (config.twa), from their mean (head
          stage) or the last one (tail stage)
  report  summary.json, the comparison table and plots/
SWA, EMA and TWA get batch-norm statistics recomputed over the training data.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from twa_jax.training import train_lib

__doc__ += "\n" + train_lib.WORKDIR_LAYOUT  # shown by --help
_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "default.py"),
    "Experiment config file (a configs/*.py); override fields with "
    "--config.FIELD=VALUE, e.g. --config.sgd.epochs=100.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (default: ./workdir/<config name>); "
    "see the layout above.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = flags.FLAGS.config
  workdir = _WORKDIR.value or os.path.join("workdir", config.name)
  try:
    train_lib.run(config, workdir)
  except (train_lib.ConfigError, train_lib.TrainingDiverged) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
