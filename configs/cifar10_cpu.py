"""CPU-scale head-stage experiment on real CIFAR-10 (under an hour, 2 cores).

The paper's head-stage protocol (Table 3) shrunk to a CPU: SGD for the full
budget E = 40 epochs, SWA and EMA over the snapshots of epochs 0-20, TWA from
their mean for 4 more epochs, each compared at its test accuracy and epochs.

Choices (see issue 7, item 6: small schedules on an underfitting network
leave TWA nothing to regularize):
- model "cnn7": 7 conv layers with batch norm, 16-128 channels (0.29M
  parameters), deep and wide enough to overfit a 16k-image training subset
  (the first 16,000 images of the shuffled copy; the test split keeps the
  first 5,000 test images to keep per-epoch evaluation cheap);
- the paper's sampling: one snapshot per epoch plus the initial weights
  (21 snapshots over epochs 0-20), and its schedules: lr 0.1 divided by 10
  at 50% and 75% of the epochs; TWA at 20x that lr (2.0), divided by 10 at
  50% and 75% of its epochs, lambda 1e-5;
- weight decay 5e-4 (the tail-stage value; 1e-4 under-regularizes a short
  run), batch 128, pad-4 crop and flip augmentation.
Tune TWA's lr and epochs on held-out training data, not on test:
--config.data.holdout_fraction=0.1 makes a held-out tenth of the training
subset the "test" split.

Data: point --config.data.path at a decoded CIFAR-10 .npz with arrays
x_train, y_train, x_test, y_test (uint8 NHWC), e.g. the output of
`python ../shared/data/cifar10/decode.py cifar10.npz`.
"""

from configs import common


def get_config():
  c = common.base()
  c.name = "cifar10_cpu"
  c.data.name = "npz"
  c.data.train_size = 16_000
  c.data.test_size = 5_000
  c.model.name = "cnn7"
  c.sgd.epochs = 40
  c.sgd.weight_decay = 5e-4
  c.averaging.end = 20
  c.twa.epochs = 4
  c.eval_batch_size = 1024
  c.train_eval_size = 5_000
  return c
