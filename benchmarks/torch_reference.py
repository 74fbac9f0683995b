"""The PyTorch side of the step-overhead benchmark (issue 7, item 2).

PyTorch twins of `twa_jax.training.models` ("small_cnn", "cnn7", "resnet20",
"vgg16", "preresnet164": same layers, widths and parameter counts, NCHW instead of
NHWC) and the TWA step the way the paper's reference code (github.com/nblt/TWA,
`train_twa.py`) does it: flatten the gradients into one vector, P (P^T g) with
two `torch.mm` calls on P stored n x D, write the result back into each
`.grad` (a clone per leaf), then a `torch.optim.SGD` step with momentum and
coupled weight decay.

A benchmark-only dependency (`pip install -e '.[bench]'`); nothing in
`twa_jax` imports this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
import torch.nn.functional as F


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1,
          bias: bool = False) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=bias)


class ConvNet(nn.Module):
  """3x3 conv / BN / ReLU layers, 2x2 max pools, global mean, linear."""

  def __init__(self, num_classes: int, channels: Sequence[int],
               pool_after: Sequence[int]):
    super().__init__()
    layers, cin = [], 3
    for i, width in enumerate(channels):
      layers += [_conv(cin, width), nn.BatchNorm2d(width), nn.ReLU()]
      if i in pool_after:
        layers.append(nn.MaxPool2d(2))
      cin = width
    self.features = nn.Sequential(*layers)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc(self.features(x).mean(dim=(2, 3)))


class VGG16(nn.Module):
  """The reference `VGG16BN`: biased convs with BN, dropout-512-512 head."""

  LAYERS = (64, 64, 0, 128, 128, 0, 256, 256, 256, 0,
            512, 512, 512, 0, 512, 512, 512, 0)

  def __init__(self, num_classes: int):
    super().__init__()
    layers, cin = [], 3
    for width in self.LAYERS:
      if width == 0:
        layers.append(nn.MaxPool2d(2))
      else:
        layers += [_conv(cin, width, bias=True), nn.BatchNorm2d(width),
                   nn.ReLU()]
        cin = width
    self.features = nn.Sequential(*layers)
    self.classifier = nn.Sequential(
        nn.Dropout(), nn.Linear(512, 512), nn.ReLU(),
        nn.Dropout(), nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, num_classes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
  """Post-activation block with the CIFAR option-A (zero-pad) shortcut."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1, self.bn1 = _conv(cin, cout, stride=stride), nn.BatchNorm2d(cout)
    self.conv2, self.bn2 = _conv(cout, cout), nn.BatchNorm2d(cout)
    self.stride, self.extra = stride, cout - cin

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    if self.stride != 1 or self.extra:
      x = x[:, :, ::self.stride, ::self.stride]
      x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
    return F.relu(y + x)


class ResNet20(nn.Module):
  """CIFAR ResNet-20: 3 stages of 3 basic blocks, 16/32/64 channels."""

  def __init__(self, num_classes: int):
    super().__init__()
    self.stem = nn.Sequential(_conv(3, 16), nn.BatchNorm2d(16), nn.ReLU())
    blocks, cin = [], 16
    for stage in range(3):
      for i in range(3):
        cout = 16 * 2**stage
        blocks.append(BasicBlock(cin, cout, 2 if stage and not i else 1))
        cin = cout
    self.blocks = nn.Sequential(*blocks)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class PreActBottleneck(nn.Module):
  """(BN, ReLU, conv) x 3 with 4x expansion; 1x1 conv shortcut on raw input."""

  def __init__(self, cin: int, features: int, stride: int):
    super().__init__()
    cout = 4 * features
    self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv(cin, features, 1)
    self.bn2 = nn.BatchNorm2d(features)
    self.conv2 = _conv(features, features, 3, stride)
    self.bn3, self.conv3 = nn.BatchNorm2d(features), _conv(features, cout, 1)
    self.shortcut = (_conv(cin, cout, 1, stride)
                     if stride != 1 or cin != cout else nn.Identity())

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.conv1(F.relu(self.bn1(x)))
    y = self.conv2(F.relu(self.bn2(y)))
    y = self.conv3(F.relu(self.bn3(y)))
    return self.shortcut(x) + y


class PreResNet(nn.Module):
  """CIFAR PreAct ResNet with bottlenecks, depth 9 n + 2 (164: n = 18)."""

  def __init__(self, num_classes: int, depth: int = 164):
    super().__init__()
    if (depth - 2) % 9:
      raise ValueError(f"PreResNet depth must be 9n+2, got {depth}")
    blocks, cin = [], 16
    for stage in range(3):
      for i in range((depth - 2) // 9):
        features = 16 * 2**stage
        blocks.append(PreActBottleneck(cin, features,
                                       2 if stage and not i else 1))
        cin = 4 * features
    self.stem = _conv(3, 16)
    self.blocks = nn.Sequential(*blocks)
    self.bn = nn.BatchNorm2d(cin)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.bn(self.blocks(self.stem(x))))
    return self.fc(x.mean(dim=(2, 3)))


_MODELS: dict[str, Callable[[int], nn.Module]] = {
    "small_cnn": lambda k: ConvNet(k, (16, 32, 32, 64), (0, 1, 3)),
    "cnn7": lambda k: ConvNet(k, (16, 32, 32, 64, 64, 128, 128), (1, 3, 5)),
    "resnet20": ResNet20,
    "vgg16": VGG16,
    "preresnet164": PreResNet,
}
MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)


class MLP(nn.Module):
  """Linear layers with ReLU between them: the twin of step_overhead.py's
  `LinenMLP` (same widths, same parameter count)."""

  def __init__(self, widths: Sequence[int]):
    super().__init__()
    self.layers = nn.ModuleList(
        nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

  def forward(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x if i == 0 else F.relu(x))
    return x


def create_model(name: str, num_classes: int) -> nn.Module:
  """The PyTorch twin of `twa_jax.training.models.create_model(name, ...)`."""
  if name not in _MODELS:
    raise ValueError(f"no PyTorch twin of model {name!r}; "
                     f"have {', '.join(MODEL_NAMES)}")
  return _MODELS[name](num_classes)


def num_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def grad_vector(model: nn.Module) -> torch.Tensor:
  """All gradients as one vector (the reference `get_model_grad_vec`)."""
  return torch.cat([p.grad.detach().reshape(-1) for p in model.parameters()])


def set_grads(model: nn.Module, vector: torch.Tensor) -> None:
  """Writes a flat vector back into `.grad` (the reference `update_grad`)."""
  offset = 0
  for p in model.parameters():
    size = p.grad.numel()
    p.grad.data = vector[offset:offset + size].reshape(p.grad.shape).clone()
    offset += size


def project_grads(model: nn.Module, basis: torch.Tensor) -> None:
  """g <- P P^T g on the model's gradients; `basis` is P^T, n x D (reference
  `P_SGD` before its optimizer step)."""
  g = grad_vector(model)
  coords = torch.mm(basis, g.reshape(-1, 1))
  set_grads(model, torch.mm(basis.transpose(0, 1), coords).reshape(-1))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               x: torch.Tensor, y: torch.Tensor,
               basis: torch.Tensor | None = None) -> torch.Tensor:
  """One SGD step, or one TWA step when `basis` (P^T, n x D) is given."""
  optimizer.zero_grad()
  loss = F.cross_entropy(model(x), y)
  loss.backward()
  if basis is not None:
    project_grads(model, basis)
  optimizer.step()
  return loss.detach()
