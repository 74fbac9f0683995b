"""CPU-scale tail-stage experiment on real CIFAR-10 (SWA against TWA, Table 1).

The SWA setting shrunk to a CPU: "small_cnn" (34k parameters) on the first
5,000 training images, 24 epochs of SGD with the SWA paper's schedule (lr 0.1
for the first half of `swa_start`, linear decay to `swa_lr` by 90% of it,
then constant), snapshots after every epoch; SWA and TWA average epochs
13-24 (12 snapshots). TWA: 3 epochs at lr 2 divided by 10 at 50% and 75%,
lambda 5e-5, started from the last snapshot. The paper's question is how
both fare as `swa_lr` grows: run it with --config.sgd.swa_lr=0.05 and 0.10.

Data: point --config.data.path at a decoded CIFAR-10 .npz (see
configs/cifar10_cpu.py).
"""

from configs import common


def get_config():
  c = common.base()
  c.name = "cifar10_cpu_tail"
  c.data.name = "npz"
  c.data.train_size = 5_000
  c.data.test_size = 5_000
  c.model.name = "small_cnn"
  c.sgd.epochs = 24
  c.sgd.weight_decay = 5e-4
  c.sgd.schedule = "swa"
  c.sgd.swa_start = 13
  c.sgd.swa_lr = 0.05
  c.averaging.start = 13
  c.averaging.end = 24
  c.twa.epochs = 3
  c.twa.weight_decay = 5e-5
  c.twa.start = "last"
  c.eval_batch_size = 1024
  return c
