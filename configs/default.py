"""The offline default: scikit-learn's digits and an MLP, all phases.

Needs no download and finishes well within two minutes on 2 CPU cores: SGD for
30 epochs (lr 0.05, decayed by 10 at 50% and 75%), SWA and EMA over the
snapshots of epochs 0-10, TWA from their mean for 5 epochs at lr 0.1 (the
MLP has no batch norm, so the paper's 20x learning rate is too large here);
then the comparison table.
"""

from configs import common


def get_config():
  c = common.base()
  c.name = "default"
  c.data.name = "digits"
  c.model.name = "mlp"
  c.model.kwargs.hidden_sizes = (256, 256)
  c.sgd.epochs = 30
  c.sgd.batch_size = 32
  c.sgd.lr = 0.05
  c.sgd.ema_decay = 0.99
  c.averaging.end = 10
  c.twa.epochs = 5
  c.twa.lr = 0.1
  c.log_every_steps = 10
  return c
