"""Models: parameter counts (shapes only), output shapes, batch norm, errors."""

import functools
import math

import flax
import flax.linen as nn
import flax.traverse_util
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from twa_jax import native
from twa_jax.training import models

# (name, num_classes, input shape, nominal parameter count from the papers)
NOMINAL = [
    ("small_cnn", 10, (32, 32, 3), 34e3),
    ("cnn7", 10, (32, 32, 3), 0.29e6),
    ("resnet20", 10, (32, 32, 3), 0.27e6),
    ("vgg16", 10, (32, 32, 3), 15.2e6),
    ("preresnet164", 10, (32, 32, 3), 1.7e6),
    ("resnet18", 1000, (224, 224, 3), 11.7e6),
    ("resnet50", 1000, (224, 224, 3), 25.6e6),
]
# Exact counts of the reference PyTorch implementations (torchvision ResNets,
# the SWA/TWA repositories' VGG16BN, PreResNet164 and the CIFAR ResNet-20).
EXACT = {"resnet18": 11_689_512, "resnet50": 25_557_032, "resnet20": 269_722,
         "vgg16": 15_253_578}


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _abstract_init(model: nn.Module, shape: tuple[int, ...]):
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((2, *shape)),
                         train=False))


@pytest.mark.parametrize("name,num_classes,shape,nominal", NOMINAL,
                         ids=[n[0] for n in NOMINAL])
def test_parameter_count_and_output_shape(name, num_classes, shape, nominal):
  model = models.create_model(name, num_classes)
  variables = _abstract_init(model, shape)
  count = _count(variables["params"])
  assert abs(count - nominal) / nominal < 0.02, count
  if name in EXACT:
    assert count == EXACT[name]
  # Batch statistics exist and stay out of the trainable parameters.
  assert set(variables) == {"params", "batch_stats"}
  assert _count(variables["batch_stats"]) > 0
  param_paths = [jax.tree_util.keystr(p)
                 for p, _ in jax.tree_util.tree_leaves_with_path(
                     variables["params"])]
  assert not [p for p in param_paths if "mean" in p or "var" in p]
  out = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False), variables,
      jax.ShapeDtypeStruct((2, *shape), jnp.float32))
  assert out.shape == (2, num_classes)
  assert out.dtype == jnp.float32


def test_vgg16_and_preresnet164_classifier_for_100_classes():
  vgg = _count(_abstract_init(models.create_model("vgg16", 100),
                              (32, 32, 3))["params"])
  assert vgg - EXACT["vgg16"] == 90 * (512 + 1)
  pre = _count(_abstract_init(models.create_model("preresnet164", 100),
                              (32, 32, 3))["params"])
  assert abs(pre - 1.73e6) / 1.73e6 < 0.02


@pytest.mark.parametrize("name,kwargs,shape", [
    ("mlp", {"hidden_sizes": (16, 8)}, (8, 8, 1)),
    ("mlp", {"hidden_sizes": (16,), "batch_norm": True}, (12,)),
    ("small_cnn", {}, (8, 8, 3)),
    ("resnet20", {}, (8, 8, 3)),
])
def test_small_models_run_in_both_modes(name, kwargs, shape):
  model = models.create_model(name, 7, **kwargs)
  x = jax.random.normal(jax.random.key(1), (4, *shape))
  variables = model.init(jax.random.key(0), x, train=False)
  eval_out = model.apply(variables, x, train=False)
  assert eval_out.shape == (4, 7)
  assert np.isfinite(np.asarray(eval_out)).all()
  has_bn = "batch_stats" in variables
  assert has_bn == (name != "mlp" or kwargs.get("batch_norm", False))
  if has_bn:
    train_out, updates = model.apply(variables, x, train=True,
                                     mutable=["batch_stats"])
    assert train_out.shape == (4, 7)
    # Training mode normalizes with batch statistics and updates the
    # running averages; evaluation mode uses the stored ones.
    assert not np.allclose(train_out, eval_out)
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b),
                           updates["batch_stats"], variables["batch_stats"])
    assert all(jax.tree.leaves(changed))
  else:
    assert model.apply(variables, x, train=True).shape == (4, 7)


def test_zero_momentum_clone_writes_raw_batch_statistics():
  model = models.create_model("mlp", 3, hidden_sizes=(5,), batch_norm=True)
  x = jax.random.normal(jax.random.key(1), (32, 6)) * 3.0 + 1.0
  variables = model.init(jax.random.key(0), x, train=False)
  _, updates = model.clone(bn_momentum=0.0).apply(
      variables, x, train=True, mutable=["batch_stats"])
  pre_bn = np.asarray(x @ variables["params"]["Dense_0"]["kernel"], np.float64)
  stats = updates["batch_stats"]["BatchNorm_0"]
  np.testing.assert_allclose(stats["mean"], pre_bn.mean(0), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(stats["var"], pre_bn.var(0), rtol=1e-4)
  # The default momentum moves only 10% of the way from the initial (0, 1).
  _, default = model.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(default["batch_stats"]["BatchNorm_0"]["mean"],
                             0.1 * pre_bn.mean(0), rtol=1e-4, atol=1e-6)


def test_every_batch_norm_model_has_bn_momentum():
  for name in models.MODEL_NAMES:
    model = models.create_model(name, 10)
    assert model.bn_momentum == 0.9
    assert model.clone(bn_momentum=0.0).bn_momentum == 0.0


def test_vgg_dropout_only_in_training():
  # A narrow VGG exercises the same module as vgg16 at a fraction of the cost.
  model = models.create_model("vgg16", 10, layers=(8, 0))
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  np.testing.assert_array_equal(model.apply(variables, x, train=False),
                                model.apply(variables, x, train=False))

  def train(key):
    out, _ = model.apply(variables, x, train=True, rngs={"dropout": key},
                         mutable=["batch_stats"])
    return np.asarray(out)

  first = train(jax.random.key(3))
  np.testing.assert_array_equal(first, train(jax.random.key(3)))
  assert not np.allclose(first, train(jax.random.key(4)))
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(lambda v: model.apply(v, x, train=True,
                                         mutable=["batch_stats"]), variables)


def test_resnet20_pads_its_shortcuts():
  params = _abstract_init(models.create_model("resnet20", 10),
                          (32, 32, 3))["params"]
  paths = jax.tree_util.tree_leaves_with_path(params)
  assert not [p for p, _ in paths if "shortcut" in jax.tree_util.keystr(p)]
  resnet18 = _abstract_init(models.create_model("resnet18", 10),
                            (32, 32, 3))["params"]
  assert sum("shortcut_conv" in jax.tree_util.keystr(p)
             for p, _ in jax.tree_util.tree_leaves_with_path(resnet18)) == 3


def test_unknown_model_and_bad_arguments():
  with pytest.raises(ValueError, match=r"unknown model 'resnet9'.*vgg16"):
    models.create_model("resnet9", 10)
  with pytest.raises(ValueError, match="num_classes"):
    models.create_model("mlp", 0)
  with pytest.raises(ValueError, match="widht"):
    models.create_model("small_cnn", 10, widht=3)
  with pytest.raises(ValueError, match="9n\\+2"):
    model = models.create_model("preresnet164", 10, depth=50)
    _abstract_init(model, (8, 8, 3))


def _equations(jaxpr):
  """The equations of a jaxpr and of the jaxprs inside them (custom VJPs)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      if hasattr(value, "eqns"):
        yield from _equations(value)


def _conv_paddings(name: str, shape: tuple[int, ...], **kwargs):
  """(kernel size, strides, padding) of every convolution in a forward pass."""
  model = models.create_model(name, 10, **kwargs)
  variables = _abstract_init(model, shape)
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(
      variables, jax.ShapeDtypeStruct((2, *shape), jnp.float32))
  return [(eqn.invars[1].aval.shape[0], eqn.params["window_strides"],
           eqn.params["padding"])
          for eqn in _equations(jaxpr)
          if eqn.primitive.name == "conv_general_dilated"]


@pytest.mark.parametrize("name,kwargs,shape", [
    ("resnet18", {"width": 8}, (32, 32, 3)),
    ("resnet50", {"width": 4}, (32, 32, 3)),
    ("preresnet164", {"depth": 20}, (16, 16, 3)),
    ("resnet20", {}, (16, 16, 3)),
    ("vgg16", {"layers": (8, 0, 8)}, (8, 8, 3)),
    ("cnn7", {}, (16, 16, 3)),
])
def test_every_conv_pads_as_pytorch(name, kwargs, shape):
  convs = _conv_paddings(name, shape, **kwargs)
  assert any(strides == (2, 2) for _, strides, _ in convs) == (
      name.startswith(("resnet", "preresnet")))
  for kernel, _, padding in convs:
    # PyTorch's padding=k // 2 on both sides ("SAME" pads (0, 1) at stride 2).
    assert padding == ((kernel // 2, kernel // 2),) * 2, (kernel, padding)


@pytest.mark.parametrize("block", ["basic", "bottleneck", "preact"])
def test_strided_conv_matches_pytorch_padding(block):
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4))
  module = {"basic": models.BasicBlock(8, strides=2),
            "bottleneck": models.Bottleneck(2, strides=2),
            "preact": models.PreActBottleneck(2, strides=2)}[block]
  variables = jax.jit(functools.partial(module.init, train=False))(
      jax.random.key(0), x)
  _, state = jax.jit(functools.partial(
      module.apply, train=False, capture_intermediates=True))(variables, x)
  inter = state["intermediates"]
  # The input of the strided 3x3 conv: the block's input, or the ReLU of the
  # batch norm before it.
  strided, before = {"basic": ("Conv_0", None),
                     "bottleneck": ("Conv_1", "BatchNorm_0"),
                     "preact": ("Conv_1", "BatchNorm_1")}[block]
  inputs = x if before is None else nn.relu(inter[before]["__call__"][0])
  kernel = variables["params"][strided]["kernel"]
  assert kernel.shape[:2] == (3, 3)

  def conv(padding):
    return jax.lax.conv_general_dilated(
        inputs, kernel, (2, 2), padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  out = inter[strided]["__call__"][0]
  assert out.shape == (2, 3, 3, kernel.shape[-1])
  np.testing.assert_allclose(out, conv([(1, 1), (1, 1)]), rtol=1e-5,
                             atol=1e-5)
  assert not np.allclose(out, conv([(0, 1), (0, 1)]), atol=1e-3)


def _init_params(module: nn.Module, shape: tuple[int, ...]):
  return module.init(jax.random.key(0), jnp.zeros((2, *shape)),
                     train=False)["params"]


def _layers(params, kind: str):
  """{path: {leaf: array}} of the layers of a kind: "dense", "conv", "bn"."""
  layers = {}
  for path, value in flax.traverse_util.flatten_dict(params).items():
    layers.setdefault(path[:-1], {})[path[-1]] = np.asarray(value)

  def kind_of(leaves):
    if "scale" in leaves:
      return "bn"
    return {2: "dense", 4: "conv"}[leaves["kernel"].ndim]
  return {p: l for p, l in layers.items() if kind_of(l) == kind}


# Every layer type (linear, conv with and without bias, strided shortcut conv,
# batch norm); all models build them with the same helpers.
INIT_CASES = [
    ("vgg16", models.create_model("vgg16", 10, layers=(16, 0, 32, 0)),
     (8, 8, 3)),
    ("basic_block", models.BasicBlock(32, strides=2), (8, 8, 16)),
]


@pytest.mark.parametrize("name,module,shape", INIT_CASES,
                         ids=[c[0] for c in INIT_CASES])
def test_initializers_match_the_reference_models(name, module, shape):
  params = _init_params(module, shape)
  # Linear layers: PyTorch's default, weight and bias uniform in
  # +-1/sqrt(fan_in), so they fill that range with std bound / sqrt(3).
  assert bool(_layers(params, "dense")) == (name == "vgg16")
  for path, leaves in _layers(params, "dense").items():
    bound = 1 / np.sqrt(leaves["kernel"].shape[0])
    for leaf, value in leaves.items():
      assert np.abs(value).max() <= bound, (path, leaf)
      if value.size >= 500:
        assert np.abs(value).max() > 0.95 * bound, (path, leaf)
        assert value.std() == pytest.approx(bound / np.sqrt(3), rel=0.1)
    assert np.abs(leaves["bias"]).min() > 0, path  # not zeros
  # Convolutions: He normal on fan_out = k * k * out (the reference init
  # loops and torchvision), biases (VGG) zero.
  for path, leaves in _layers(params, "conv").items():
    kernel = leaves["kernel"]
    std = np.sqrt(2 / (kernel.shape[0] * kernel.shape[1] * kernel.shape[3]))
    if kernel.size >= 500:
      assert kernel.std() == pytest.approx(std, rel=0.1), path
      assert abs(kernel.mean()) < 0.1 * std, path
      # Normal, not truncated: some weights beyond two standard deviations.
      assert np.abs(kernel).max() > 2.5 * std, path
    if "bias" in leaves:
      np.testing.assert_array_equal(leaves["bias"], 0)
  assert any("shortcut_conv" in p for p in _layers(params, "conv")) == (
      name == "basic_block")
  # Batch norm: scale 1, offset 0.
  assert _layers(params, "bn")
  for leaves in _layers(params, "bn").values():
    np.testing.assert_array_equal(leaves["scale"], 1)
    np.testing.assert_array_equal(leaves["bias"], 0)


# The CPU paths of the models' ops (issue 16): the same values and gradients
# as flax's ops, and the compiled step free of the slow XLA:CPU forms.
@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(size=st.integers(1, 4), kernel=st.sampled_from([1, 3]),
                  stride=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_conv_on_small_maps_matches_lax(size, kernel, stride, seed):
  _assert_conv_matches_lax(seed, (2, size, size + 1, 3), (kernel, kernel, 3, 4),
                           stride, tolerance=1e-5)


def _assert_conv_matches_lax(seed: int, lhs: tuple[int, ...],
                             kernel: tuple[int, ...], stride: int,
                             tolerance: float) -> None:
  """`models.conv_general_dilated`'s value and gradients are lax's, to
  `tolerance` relative and `tolerance` times a sum's spread (the square
  root of its terms) absolute: float32 errors of y pass through the sine to
  the gradients' sums."""
  # Random operands from numpy: jax.random would compile anew per shape.
  rng = np.random.default_rng(seed)
  x, w = (rng.normal(size=shape).astype(np.float32) for shape in (lhs, kernel))
  pad = ((kernel[0] // 2,) * 2,) * 2
  numbers = ("NHWC", "HWIO", "NHWC")
  y_shape = jax.eval_shape(functools.partial(
      jax.lax.conv_general_dilated, window_strides=(stride, stride),
      padding=pad, dimension_numbers=numbers), x, w).shape
  c = rng.normal(size=y_shape).astype(np.float32)
  def loss(conv, x, w):
    y = conv(x, w, (stride, stride), pad, dimension_numbers=numbers)
    return jnp.sum(jnp.sin(y) * c)
  want, got = (helpers.jit_fast_compile(jax.value_and_grad(
      functools.partial(loss, conv), (0, 1)))(x, w)
               for conv in (jax.lax.conv_general_dilated,
                            models.conv_general_dilated))
  spread = math.sqrt(kernel[0] * kernel[1] * max(kernel[2:]))
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=tolerance,
                                 atol=tolerance * spread), got, want)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU path")
def test_conv_takes_the_patches_path_only_for_maps_up_to_the_kernel():
  numbers = ("NHWC", "HWIO", "NHWC")
  def ops(size):
    x, w = jnp.zeros((2, size, size, 8)), jnp.zeros((3, 3, 8, 8))
    text = jax.jit(lambda x, w: models.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=numbers)).lower(
            x, w).as_text()
    return "convolution" in text, "dot_general" in text
  assert ops(2) == (False, True) and ops(3) == (False, True)
  assert ops(4) == (True, False)


@hypothesis.settings(max_examples=8, deadline=None)  # each compiles anew
@hypothesis.given(size=st.integers(4, 9), c_in=st.integers(1, 20),
                  c_out=st.sampled_from([8, 16, 48, 64, 80]),
                  kernel=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]),
                  seed=st.integers(0, 2**16))
@hypothesis.example(size=16, c_in=16, c_out=16, kernel=3, stride=1, seed=0)
@hypothesis.example(size=15, c_in=3, c_out=64, kernel=3, stride=1, seed=1)
@hypothesis.example(size=17, c_in=20, c_out=48, kernel=1, stride=1, seed=2)
@hypothesis.example(size=9, c_in=32, c_out=48, kernel=3, stride=1, seed=3)
@hypothesis.example(size=6, c_in=64, c_out=80, kernel=3, stride=1, seed=4)
def test_conv_with_compiled_kernel_gradient_matches_lax(size, c_in, c_out,
                                                        kernel, stride, seed):
  """The models' convs on larger maps: lax's values and gradients up to
  float32 rounding, whichever paths compute the conv, its input
  gradient and its kernel gradient (the compiled conv from 16 wide, by
  Winograd from 32 input channels and its kernel gradient from 64: the
  explicit examples)."""
  _assert_conv_matches_lax(seed, (3, size, size + 1, c_in),
                           (kernel, kernel, c_in, c_out), stride,
                           tolerance=1e-4)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU path")
def test_convs_take_the_compiled_kernels_where_they_are_faster():
  """At stride 1 a 3x3 conv from 32 input channels runs by Winograd, else
  directly with at most 64 channels on maps from 16 wide; the input
  gradient is such a conv of the output gradient with the compiled flip of
  the kernel. The kernel gradient is by Winograd from 64 input channels,
  else compiled directly for 16-64 output channels."""
  if native.library() is None:
    pytest.skip("the compiled kernels are unavailable here")
  numbers = ("NHWC", "HWIO", "NHWC")
  def targets(c_out, size=8, stride=1, c_in=16, dtype=jnp.float32):
    x = jnp.zeros((2, size, size, c_in), dtype)
    w = jnp.zeros((3, 3, c_in, c_out), dtype)
    grad = jax.grad(lambda x, w: jnp.sum(jnp.sin(models.conv_general_dilated(
        x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=numbers))),
                    (0, 1))
    text = jax.jit(grad).lower(x, w).as_text()
    return (text.count(native.CONV), text.count(native.WINOGRAD_CONV),
            native.CONV_KERNEL_GRADIENT in text,
            native.WINOGRAD_KERNEL_GRADIENT in text, native.FLIP_KERNEL in text)
  assert targets(16) == (0, 0, True, False, True)
  # The input gradient by Winograd: 32 or more input channels (its c_out).
  assert targets(64) == (0, 1, True, False, True)
  assert targets(8) == targets(24) == (0, 0, False, False, True)
  assert targets(128) == (0, 1, False, False, True)
  assert targets(16, dtype=jnp.bfloat16) == (0, 0, False, False, False)
  # The conv directly (16 input channels), its input gradient by Winograd.
  assert targets(32, size=16) == (1, 1, True, False, True)
  assert targets(32, size=16, c_in=3) == (1, 0, True, False, True)
  assert targets(32, size=32, stride=2) == (0, 0, True, False, False)
  # Both by Winograd; from 64 input channels the kernel gradient too.
  assert targets(64, c_in=32) == (0, 2, True, False, True)
  assert targets(128, c_in=64) == (0, 2, False, True, True)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(h=st.integers(2, 7), w=st.integers(2, 7),
                  seed=st.integers(0, 2**16))
def test_max_pool_matches_flax_values_and_gradients(h, w, seed):
  x = np.random.default_rng(seed).normal(size=(2, h, w, 3)).astype(
      np.float32)  # no ties
  def loss(pool, x):
    return jnp.sum(pool(x) * jnp.arange(1.0, 1 + pool(x).size).reshape(
        pool(x).shape))
  flax_pool = functools.partial(nn.max_pool, window_shape=(2, 2),
                                strides=(2, 2))
  gradient = lambda pool: jax.grad(functools.partial(loss, pool))
  for of in (lambda pool: pool, gradient):  # jitted: one compile per shape
    np.testing.assert_array_equal(
        helpers.jit_fast_compile(of(models.max_pool_2x2))(x),
        helpers.jit_fast_compile(of(flax_pool))(x))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU path")
@pytest.mark.parametrize("name,batch", [("cnn7", 4), ("vgg16", 2)])
def test_training_step_avoids_the_slow_cpu_forms(name, batch):
  """No select-and-scatter (max pool's gradient) and no convolution on a 2x2
  map in the compiled gradient of the CIFAR nets."""
  model = models.create_model(name, 10)
  x = jnp.zeros((batch, 32, 32, 3))
  variables = _abstract_init(model, (32, 32, 3))
  def loss(params, batch_stats):
    out, _ = model.apply({"params": params, "batch_stats": batch_stats}, x,
                         train=True, mutable=["batch_stats"],
                         rngs={"dropout": jax.random.key(0)})
    return jnp.sum(out)
  text = jax.jit(jax.grad(loss)).lower(variables["params"],
                                       variables["batch_stats"]).as_text()
  assert "select_and_scatter" not in text and "reduce_window" not in text
  assert not [line for line in text.splitlines() if "convolution" in line
              and f"tensor<{batch}x2x2x" in line]


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(channels=st.sampled_from([1, 16, 64, 65]),
                  seed=st.integers(0, 2**16))
def test_materialize_is_the_identity_with_its_gradient(channels, seed):
  x = jax.random.normal(jax.random.key(seed), (2, 3, 3, channels)) * 1e3
  np.testing.assert_array_equal(models.materialize(x), x)
  weights = jax.random.normal(jax.random.key(seed + 1), x.shape)
  np.testing.assert_array_equal(
      jax.grad(lambda x: jnp.sum(models.materialize(x) * weights))(x),
      weights)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU options")
def test_cpu_compiler_options_keep_the_step_s_results():
  """train.py's steps compile with `models.compiler_options()`: the same
  gradient as XLA's defaults, up to float32 summation order."""
  assert models.compiler_options() == models.CPU_COMPILER_OPTIONS
  model = models.create_model("cnn7", 10)
  x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  def grad(params):
    return jax.grad(lambda p: jnp.sum(model.apply(
        {"params": p, "batch_stats": variables["batch_stats"]}, x,
        train=True, mutable=["batch_stats"])[0] ** 2))(params)
  want = jax.jit(grad)(variables["params"])
  got = jax.jit(grad, compiler_options=models.compiler_options())(
      variables["params"])
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4,
                                 atol=1e-5), got, want)
