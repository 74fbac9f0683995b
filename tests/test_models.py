"""Models: parameter counts (shapes only), output shapes, batch norm, errors."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
