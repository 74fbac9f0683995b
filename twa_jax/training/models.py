"""Flax linen models of the paper's experiments and small CPU-scale networks.

Every model is called as `model.apply(variables, x, train=...)` on NHWC images
(the MLP also takes flat features). Models with batch norm keep its running
statistics in the `batch_stats` collection (recomputed exactly after
averaging by `twa_jax.batch_norm.update_bn`) and expose a `bn_momentum` field.
Only the `params` collection enters the TWA subspace.
VGG16 uses dropout in training: pass `rngs={"dropout": key}` to `apply` when
`train=True` (other models ignore that rng). Layers pad and initialize as the
PyTorch reference models: convs pad `kernel // 2` on both sides and start He
normal (fan_out), linear layers start uniform in +-1/sqrt(fan_in) (weight
and bias, PyTorch's default), batch norm at scale 1, offset 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import itertools
import math

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from twa_jax import native

# He initialization (fan_out), as in the PyTorch reference models' init
# loops (VGG16BN, PreResNet) and torchvision's ResNets.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, strides: int = 1, *,
          use_bias: bool = False, name: str | None = None) -> nn.Conv:
  """A square conv padded as PyTorch's `padding=kernel // 2`, He-initialized.

  Explicit padding, not "SAME": with stride 2 on an even size, "SAME" pads
  (0, 1) and shifts the output a pixel against PyTorch's (1, 1) (and against
  a strided 1x1 shortcut).
  """
  return nn.Conv(features, (kernel, kernel), strides, padding=kernel // 2,
                 use_bias=use_bias, kernel_init=_conv_init, name=name,
                 conv_general_dilated=conv_general_dilated)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides,
                         padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1,
                         precision=None, **kwargs) -> jax.Array:
  """`jax.lax.conv_general_dilated`, or on CPU the same conv in a form
  XLA:CPU runs faster.

  Only NHWC/HWIO convs without dilation or groups change, and the parameters
  are the same either way (BENCHMARKS.md, "The training step on CPU"):
  - a map no larger than the kernel (VGG16's last block on CIFAR): patches
    times kernel, about 60x faster than XLA:CPU's conv;
  - float32, where the compiled kernels are built (`_compiled_conv`): the
    conv is `twa_jax.native.conv`'s, by Winograd F(2x2, 3x3) for 3x3
    kernels at stride 1 with at least `WINOGRAD_MIN_CHANNELS` input
    channels (`winograd`), else directly at stride 1 on output maps at
    least `COMPILED_MIN_WIDTH` wide with at most `COMPILED_MAX_CHANNELS`
    channels; at stride 1 the input gradient is such a conv of the output
    gradient with the kernel flipped by `twa_jax.native.flip_kernel`; the
    kernel gradient is `twa_jax.native.conv_kernel_gradient`'s, by Winograd
    for those convs with at least `WINOGRAD_KERNEL_GRADIENT_MIN_CHANNELS`
    input channels, else directly with 16 to `COMPILED_MAX_CHANNELS` output
    channels (a multiple of 16).
  """
  args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
          dimension_numbers, feature_group_count)
  kernel = rhs.shape[:-2]
  if (jax.default_backend() != "cpu" or feature_group_count != 1
      or not _is_nhwc(dimension_numbers, lhs.ndim)
      or any(d not in (None, 1) for d in (*(lhs_dilation or ()),
                                          *(rhs_dilation or ())))):
    return jax.lax.conv_general_dilated(*args, precision=precision, **kwargs)
  if all(size <= k for size, k in zip(lhs.shape[1:-1], kernel)):
    return _patches_conv(lhs, rhs, window_strides, padding, precision)
  pads = _pads(lhs, kernel, window_strides, padding)
  if (lhs.ndim == 4 and lhs.dtype == rhs.dtype == jnp.float32 and not kwargs
      and min(pads[0] + pads[1]) >= 0 and native.library() is not None):
    return _compiled_conv(lhs, rhs, tuple(window_strides), pads)
  return jax.lax.conv_general_dilated(*args, precision=precision, **kwargs)


# Channels up to which the compiled kernels beat XLA:CPU's convs
# (BENCHMARKS.md, "The training step on CPU").
COMPILED_MAX_CHANNELS = 64
_NHWC = ("NHWC", "HWIO", "NHWC")


def compiled_kernel_gradient(channels: int) -> bool:
  """Whether float32 convs with this many output channels take their kernel
  gradient from `twa_jax.native.conv_kernel_gradient` here: on CPU, a
  multiple of 16 up to `COMPILED_MAX_CHANNELS`, with the kernels built."""
  return (jax.default_backend() == "cpu" and channels % 16 == 0
          and channels <= COMPILED_MAX_CHANNELS
          and native.library() is not None)


def _pads(lhs: jax.Array, kernel, strides, padding
          ) -> tuple[tuple[int, int], ...]:
  """The conv's padding as (before, after) per spatial dimension."""
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:-1], kernel, strides,
                                      padding)
  return tuple((int(lo), int(hi)) for lo, hi in padding)


# Output widths from which the compiled conv beats XLA:CPU's (stride 1; on
# 8x8 maps and at stride 2 XLA's is faster).
COMPILED_MIN_WIDTH = 16
# Input channels from which a 3x3 stride-1 conv is fastest by Winograd
# (`twa_jax.native.conv(..., winograd=True)`), on every map size measured
# (with 16 the direct compiled conv is), and from which its kernel gradient
# is (with 32 the direct compiled one is).
WINOGRAD_MIN_CHANNELS = 32
WINOGRAD_KERNEL_GRADIENT_MIN_CHANNELS = 64


def winograd(kernel: tuple[int, ...], strides, channels: tuple[int, int]
             ) -> bool:
  """Whether a float32 conv with this kernel (KH, KW), strides and (input,
  output) channels runs by Winograd F(2x2, 3x3) here: on CPU with the
  kernels built, 3x3 at stride 1, at least `WINOGRAD_MIN_CHANNELS` input
  channels, both channel counts multiples of 16."""
  return (tuple(kernel) == (3, 3) and tuple(strides) == (1, 1)
          and channels[0] >= WINOGRAD_MIN_CHANNELS
          and channels[0] % 16 == 0 and channels[1] % 16 == 0
          and jax.default_backend() == "cpu" and native.library() is not None)


def _cpu_conv(lhs: jax.Array, rhs: jax.Array, strides, pads) -> jax.Array:
  """An NHWC/HWIO float32 conv: compiled (`twa_jax.native.conv`) where it
  beats XLA:CPU's, else XLA's. Compiled: by Winograd where `winograd` says
  so; directly at stride 1 with 16-64 output channels, at most 64 input
  channels and output maps at least `COMPILED_MIN_WIDTH` wide."""
  out = tuple(size + lo + hi - k + 1 for size, (lo, hi), k in
              zip(lhs.shape[1:-1], pads, rhs.shape[:2]))
  padding = tuple(lo for lo, _ in pads)
  if min(padding) < 0:
    return _xla_conv(lhs, rhs, strides, pads)
  if winograd(rhs.shape[:2], strides, rhs.shape[2:]):
    return native.conv(lhs, rhs, strides, padding, out, winograd=True)
  if (tuple(strides) == (1, 1) and compiled_kernel_gradient(rhs.shape[-1])
      and rhs.shape[-2] <= COMPILED_MAX_CHANNELS
      and out[1] >= COMPILED_MIN_WIDTH):
    return native.conv(lhs, rhs, strides, padding, out)
  return _xla_conv(lhs, rhs, strides, pads)


def _xla_conv(lhs: jax.Array, rhs: jax.Array, strides, pads) -> jax.Array:
  """XLA's NHWC/HWIO conv."""
  return jax.lax.conv_general_dilated(lhs, rhs, strides, pads,
                                      dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _compiled_conv(lhs: jax.Array, rhs: jax.Array, strides, pads
                   ) -> jax.Array:
  """An NHWC/HWIO float32 conv (`_cpu_conv`) whose gradients take the
  compiled kernels where they beat XLA:CPU's: the kernel gradient by
  Winograd for `winograd` convs with at least
  `WINOGRAD_KERNEL_GRADIENT_MIN_CHANNELS` input channels, else directly
  with `compiled_kernel_gradient` output channels; and at stride 1 the input
  gradient as `_cpu_conv` of dy with `twa_jax.native.flip_kernel` of the
  kernel (XLA:CPU's fused flip and transpose of a 3x3x512x512 kernel takes
  about 8x as long). Elsewhere the gradients are XLA's."""
  return _cpu_conv(lhs, rhs, strides, pads)


def _conv_forward(lhs, rhs, strides, pads):
  return _compiled_conv(lhs, rhs, strides, pads), (lhs, rhs)


def _conv_backward(strides, pads, residuals, dy):
  lhs, rhs = residuals
  # Only the gradients used are traced: under sharding in types XLA's conv
  # transposes need output shardings that the compiled kernels do not.
  if tuple(strides) == (1, 1):
    kernel = rhs.shape[:2]
    input_gradient = _cpu_conv(
        dy, native.flip_kernel(rhs), strides,
        tuple((k - 1 - lo, size - out + lo) for k, (lo, _), size, out in
              zip(kernel, pads, lhs.shape[1:-1], dy.shape[1:-1])))
  else:
    input_gradient = jax.vjp(lambda x: _xla_conv(x, rhs, strides, pads),
                             lhs)[1](dy)[0]
  padding = tuple(lo for lo, _ in pads)
  if (winograd(rhs.shape[:2], strides, rhs.shape[2:])
      and rhs.shape[2] >= WINOGRAD_KERNEL_GRADIENT_MIN_CHANNELS):
    kernel_gradient = native.conv_kernel_gradient(
        lhs, dy, rhs.shape[:2], strides, padding, winograd=True)
  elif compiled_kernel_gradient(rhs.shape[-1]):
    kernel_gradient = native.conv_kernel_gradient(
        lhs, dy, rhs.shape[:2], strides, padding)
  else:
    kernel_gradient = jax.vjp(lambda w: _xla_conv(lhs, w, strides, pads),
                              rhs)[1](dy)[0]
  return input_gradient, kernel_gradient


_compiled_conv.defvjp(_conv_forward, _conv_backward)


def _is_nhwc(dimension_numbers, ndim: int) -> bool:
  """Whether the conv is channels-last on both sides (flax's convention)."""
  numbers = jax.lax.conv_dimension_numbers(
      (1,) * ndim, (1,) * ndim, dimension_numbers)
  spatial = tuple(range(1, ndim - 1))
  return (numbers.lhs_spec == (0, ndim - 1, *spatial)
          and numbers.rhs_spec == (ndim - 1, ndim - 2, *range(ndim - 2))
          and numbers.out_spec == numbers.lhs_spec)


def _patches_conv(lhs: jax.Array, rhs: jax.Array, strides, padding,
                  precision) -> jax.Array:
  """An NHWC/HWIO conv as (patches of lhs) @ (rhs as a matrix)."""
  kernel = rhs.shape[:-2]
  lhs = jnp.pad(lhs, ((0, 0), *_pads(lhs, kernel, strides, padding), (0, 0)))
  out = [(size - k) // s + 1
         for size, k, s in zip(lhs.shape[1:-1], kernel, strides)]
  patches = jnp.concatenate([
      jax.lax.slice(lhs, (0, *offset, 0),
                    (lhs.shape[0], *(o + (n - 1) * s + 1 for o, n, s in
                                     zip(offset, out, strides)),
                     lhs.shape[-1]),
                    (1, *strides, 1))
      for offset in itertools.product(*map(range, kernel))], axis=-1)
  return jnp.dot(patches, rhs.reshape(-1, rhs.shape[-1]), precision=precision)


# XLA:CPU's default sends convolutions to YNNPACK; its own (Eigen) kernels run
# the models' convolutions faster (BENCHMARKS.md, "The training step on
# CPU"). YNNPACK keeps the reductions, where it is the faster one.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def compiler_options() -> dict[str, str] | None:
  """XLA options for jitting the models' steps on this backend (`jax.jit`'s
  `compiler_options`): `CPU_COMPILER_OPTIONS` on CPU where this XLA knows
  them, else None (XLA's defaults)."""
  if jax.default_backend() != "cpu":
    return None
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(
        1.0).compile()
  except jax.errors.JaxRuntimeError as e:  # an XLA without these options
    logging.warning("XLA:CPU options %s not applied: %s",
                    CPU_COMPILER_OPTIONS, e)
    return None
  return CPU_COMPILER_OPTIONS


# Channels up to which `materialize` pays for its product (2 C flops an entry).
MATERIALIZE_MAX_CHANNELS = 64


def materialize(x: jax.Array) -> jax.Array:
  """`x`; on CPU, with at most `MATERIALIZE_MAX_CHANNELS` channels, as the
  product of x with the identity (exact for finite x).

  A residual block's output feeds the next convs, whose kernel gradients
  read it transposed. XLA:CPU fuses the elementwise ops that make `x` (batch
  norm, residual add, ReLU, block after block) into those transposes and
  recomputes them there: about 40% of ResNet-20's step (BENCHMARKS.md,
  "The training step on CPU"). A matrix product is not fused into its
  consumers, so the transposes read `x` from memory. Where the compiled
  kernel gradient runs (`compiled_kernel_gradient`) nothing is transposed
  and `x` is returned as it is (the next convs have the same or twice its
  channels).
  """
  if (jax.default_backend() != "cpu"
      or x.shape[-1] > MATERIALIZE_MAX_CHANNELS
      or compiled_kernel_gradient(x.shape[-1])):
    return x
  return jnp.einsum("...c,cd->...d", x, jnp.eye(x.shape[-1], dtype=x.dtype))


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """A 2x2 max pool of stride 2 (NHWC), as `nn.max_pool(x, (2, 2), (2, 2))`.

  A reshape and a max: its gradient is elementwise, where `nn.max_pool`'s
  (select-and-scatter, with an index array per dimension) is most of a
  small conv net's step on XLA:CPU. Ties share the gradient instead of the
  first maximum taking it: after a ReLU the only ties are at zero, where the
  ReLU's gradient is zero either way.
  """
  n, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2]
  return jnp.max(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def _linear_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's `nn.Linear` default: uniform(+-1/sqrt(fan_in)), weight and bias."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: Sequence[int],
           dtype: jnp.dtype = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _dense(features: int, x: jax.Array, use_bias: bool = True) -> jax.Array:
  """A fully connected layer initialized as PyTorch's `nn.Linear`."""
  init = _linear_init(x.shape[-1])
  return nn.Dense(features, use_bias=use_bias, kernel_init=init,
                  bias_init=init)(x)


def _batch_norm(train: bool, momentum: float, **kwargs) -> nn.BatchNorm:
  """PyTorch-equivalent batch norm (its momentum 0.1 is flax's 0.9)."""
  return nn.BatchNorm(use_running_average=not train, momentum=momentum,
                      epsilon=1e-5, **kwargs)


class MLP(nn.Module):
  """Fully connected ReLU network on flattened inputs.

  Attributes:
    num_classes: output logits.
    hidden_sizes: widths of the hidden layers.
    batch_norm: batch norm after each hidden layer (before the ReLU).
    bn_momentum: running-average momentum of the batch norm.
  """
  num_classes: int
  hidden_sizes: Sequence[int] = (256, 256)
  batch_norm: bool = False
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden_sizes:
      x = _dense(width, x, use_bias=not self.batch_norm)
      if self.batch_norm:
        x = _batch_norm(train, self.bn_momentum)(x)
      x = nn.relu(x)
    return _dense(self.num_classes, x)


class ConvNet(nn.Module):
  """Plain 3x3-conv / batch-norm / ReLU network with max pooling.

  Attributes:
    num_classes: output logits.
    channels: output channels of each conv layer.
    pool_after: indices of the conv layers followed by a 2x2 max pool; the
      last feature map is averaged globally before the linear classifier.
    bn_momentum: running-average momentum of the batch norm.
  """
  num_classes: int
  channels: Sequence[int] = (16, 32, 32, 64)
  pool_after: Sequence[int] = (0, 1, 3)
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i, width in enumerate(self.channels):
      x = _conv(width, 3)(x)
      x = nn.relu(_batch_norm(train, self.bn_momentum)(x))
      if i in self.pool_after:
        x = max_pool_2x2(x)
    return _dense(self.num_classes, jnp.mean(x, axis=(1, 2)))


class VGG(nn.Module):
  """CIFAR VGG with batch norm (the SWA/TWA reference `VGG16BN`).

  Conv layers carry biases; the classifier is dropout, 512, ReLU, dropout,
  512, ReLU, num_classes, as in the reference code.

  Attributes:
    num_classes: output logits.
    layers: conv widths, 0 standing for a 2x2 max pool.
    dropout_rate: classifier dropout in training.
    bn_momentum: running-average momentum of the batch norm.
  """
  num_classes: int
  layers: Sequence[int] = (64, 64, 0, 128, 128, 0, 256, 256, 256, 0,
                           512, 512, 512, 0, 512, 512, 512, 0)
  dropout_rate: float = 0.5
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for width in self.layers:
      if width == 0:
        x = max_pool_2x2(x)
      else:
        x = _conv(width, 3, use_bias=True)(x)
        x = nn.relu(_batch_norm(train, self.bn_momentum)(x))
    x = x.reshape((x.shape[0], -1))
    for _ in range(2):
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      x = nn.relu(_dense(512, x))
    return _dense(self.num_classes, x)


class BasicBlock(nn.Module):
  """Two 3x3 convs with a residual connection (ResNet-18/20).

  Attributes:
    features: output channels.
    strides: stride of the first conv (and of the shortcut).
    shortcut: "conv" (1x1 conv + BN projection when the shape changes, the
      ImageNet ResNets) or "pad" (subsample and zero-pad channels, option A of
      the CIFAR ResNets).
    bn_momentum: running-average momentum of the batch norm.
  """
  features: int
  strides: int = 1
  shortcut: str = "conv"
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(_batch_norm, train, self.bn_momentum)
    y = nn.relu(bn()(_conv(self.features, 3, self.strides)(x)))
    y = _conv(self.features, 3)(y)
    y = bn()(y)
    return materialize(nn.relu(y + _shortcut(self, x, y.shape[-1], bn)))


class Bottleneck(nn.Module):
  """1x1, 3x3 (strided, as in ResNet v1.5), 1x1 convs; 4x expansion."""
  features: int
  strides: int = 1
  shortcut: str = "conv"
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(_batch_norm, train, self.bn_momentum)
    y = nn.relu(bn()(_conv(self.features, 1)(x)))
    y = nn.relu(bn()(_conv(self.features, 3, self.strides)(y)))
    y = _conv(4 * self.features, 1)(y)
    y = bn()(y)
    return materialize(nn.relu(y + _shortcut(self, x, y.shape[-1], bn)))


def _shortcut(block: nn.Module, x: jax.Array, features: int,
              bn: Callable[[], nn.BatchNorm]) -> jax.Array:
  """The residual branch of a post-activation block (inside its compact scope)."""
  if block.strides == 1 and x.shape[-1] == features:
    return x
  if block.shortcut == "pad":
    x = x[:, ::block.strides, ::block.strides, :]
    extra = features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  x = _conv(features, 1, block.strides, name="shortcut_conv")(x)
  return bn(name="shortcut_bn")(x)


class ResNet(nn.Module):
  """Post-activation ResNet: ImageNet (7x7 stem + max pool) or CIFAR stem.

  Attributes:
    num_classes: output logits.
    stage_sizes: blocks per stage.
    block: `BasicBlock` or `Bottleneck`.
    width: channels of the first stage (doubled at each later stage).
    stem: "imagenet" or "cifar" (one 3x3 conv, no pooling).
    shortcut: the blocks' shortcut type ("conv" or "pad").
    bn_momentum: running-average momentum of the batch norm.
  """
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: type[nn.Module] = BasicBlock
  width: int = 64
  stem: str = "imagenet"
  shortcut: str = "conv"
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.stem == "imagenet":
      x = _conv(self.width, 7, 2)(x)
      x = nn.relu(_batch_norm(train, self.bn_momentum)(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x = _conv(self.width, 3)(x)
      x = nn.relu(_batch_norm(train, self.bn_momentum)(x))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for i in range(num_blocks):
        x = self.block(self.width * 2**stage,
                       strides=2 if stage > 0 and i == 0 else 1,
                       shortcut=self.shortcut,
                       bn_momentum=self.bn_momentum)(x, train)
    return _dense(self.num_classes, jnp.mean(x, axis=(1, 2)))


class PreActBottleneck(nn.Module):
  """Pre-activation bottleneck (BN, ReLU, conv) x 3; 4x expansion.

  The projection shortcut (a 1x1 conv, when the shape changes) reads the
  block's raw input, as in the reference PreResNet.
  """
  features: int
  strides: int = 1
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = functools.partial(_batch_norm, train, self.bn_momentum)
    y = _conv(self.features, 1)(nn.relu(bn()(x)))
    y = _conv(self.features, 3, self.strides)(nn.relu(bn()(y)))
    y = _conv(4 * self.features, 1)(nn.relu(bn()(y)))
    if self.strides != 1 or x.shape[-1] != y.shape[-1]:
      x = _conv(y.shape[-1], 1, self.strides, name="shortcut_conv")(x)
    return materialize(x + y)


class PreResNet(nn.Module):
  """CIFAR PreAct ResNet with bottlenecks: depth = 9 n + 2 (164: n = 18).

  Attributes:
    num_classes: output logits.
    depth: 9 n + 2 layers.
    bn_momentum: running-average momentum of the batch norm.
  """
  num_classes: int
  depth: int = 164
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if (self.depth - 2) % 9:
      raise ValueError(f"PreResNet depth must be 9n+2, got {self.depth}")
    num_blocks = (self.depth - 2) // 9
    x = _conv(16, 3)(x)
    for stage in range(3):
      for i in range(num_blocks):
        x = PreActBottleneck(16 * 2**stage,
                             strides=2 if stage > 0 and i == 0 else 1,
                             bn_momentum=self.bn_momentum)(x, train)
    x = nn.relu(_batch_norm(train, self.bn_momentum)(x))
    return _dense(self.num_classes, jnp.mean(x, axis=(1, 2)))


_MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "small_cnn": functools.partial(ConvNet, channels=(16, 32, 32, 64),
                                   pool_after=(0, 1, 3)),
    "cnn7": functools.partial(ConvNet, channels=(16, 32, 32, 64, 64, 128, 128),
                              pool_after=(1, 3, 5)),
    "resnet20": functools.partial(ResNet, stage_sizes=(3, 3, 3), width=16,
                                  stem="cifar", shortcut="pad"),
    "vgg16": VGG,
    "preresnet164": functools.partial(PreResNet, depth=164),
    "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2),
                                  block=BasicBlock),
    "resnet50": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3),
                                  block=Bottleneck),
}

MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds a model by name.

  Args:
    name: one of `MODEL_NAMES`: "mlp", "small_cnn" (~34k parameters),
      "cnn7" (~0.29M), "resnet20" (~0.27M), "vgg16" (~15.2M), "preresnet164"
      (~1.7M), "resnet18" (11.7M at 1000 classes), "resnet50" (25.6M).
    num_classes: number of output logits.
    **kwargs: fields of the model's module (e.g. `hidden_sizes` of the MLP,
      `bn_momentum`, `dropout_rate` of VGG16).

  Returns:
    The flax module.

  Raises:
    ValueError: unknown name, non-positive num_classes or unknown field.
  """
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; known models: "
                     f"{', '.join(MODEL_NAMES)}")
  if num_classes < 1:
    raise ValueError(f"num_classes must be positive, got {num_classes}")
  try:
    return _MODELS[name](num_classes=num_classes, **kwargs)
  except TypeError as e:
    raise ValueError(f"model {name!r}: bad arguments {sorted(kwargs)}: {e}") from e
