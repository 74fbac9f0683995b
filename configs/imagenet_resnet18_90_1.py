"""ResNet-18 on ImageNet: TWA "90 + 1" (Table 5).

See `configs/common.py` for the settings and the meaning of every field.
"""

from configs import common


def get_config():
  return common.imagenet_90_1("resnet18")
