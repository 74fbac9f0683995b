"""VGG16-BN on CIFAR-10: tail stage, the SWA setting (Table 1).

See `configs/common.py` for the settings and the meaning of every field.
"""

from configs import common


def get_config():
  return common.cifar_tail("cifar10", "vgg16")
