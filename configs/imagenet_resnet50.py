"""ResNet-50 on ImageNet: ImageNet (Table 4).

See `configs/common.py` for the settings and the meaning of every field.
"""

from configs import common


def get_config():
  return common.imagenet("resnet50")
