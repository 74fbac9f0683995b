"""VGG16-BN on CIFAR-10: Adam as the base optimizer (Table A2).

See `configs/common.py` for the settings and the meaning of every field.
"""

from configs import common


def get_config():
  return common.cifar_adam("cifar10", "vgg16")
