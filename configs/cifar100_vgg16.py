"""VGG16-BN on CIFAR-100: head stage (Table 3).

See `configs/common.py` for the settings and the meaning of every field.
"""

from configs import common


def get_config():
  return common.cifar_head("cifar100", "vgg16")
