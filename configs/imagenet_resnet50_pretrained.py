"""ResNet-50 fine-tuned from pretrained weights on ImageNet (Table 2).

Pick the fine-tuning epochs (the paper: 1, 2, 5, 10; default 10) after the
file name, and point `sgd.init_from` at the pretrained parameters:

  python train.py --config configs/imagenet_resnet50_pretrained.py:5 \\
      --config.sgd.init_from=resnet50_torchvision.npz

See `configs/common.py` for the settings and the meaning of every field.
"""

from configs import common


def get_config(epochs: str = "10"):
  try:
    budget = int(epochs)
  except ValueError as e:
    raise ValueError(f"imagenet_resnet50_pretrained.py:{epochs}: the "
                     f"fine-tuning epochs must be an integer") from e
  return common.imagenet_pretrained("resnet50", budget)
