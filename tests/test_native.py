"""The compiled CPU kernels (twa_jax/native.py, products.cc): used on CPU,
checked arguments, an atomic build cache, and XLA without them.

The low-bit products' results against the stored values are property-tested
with XLA's in test_quantization.py
(`test_low_bit_products_match_the_stored_values`); the conv kernel gradient is
property-tested here against XLA's, alone and on a batch split over devices,
and through the models' convs in test_models.py.
"""

import os
import subprocess
import sys

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from twa_jax import kernels
from twa_jax import native
from twa_jax import quantization

needs_compiler = pytest.mark.skipif(native.compiler() is None,
                                    reason="no C++ compiler on this machine")


def _rows(storage: str, k: int = 5, d: int = 1000):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(k, d)), jnp.float32)
  if storage in ("float32", "bfloat16"):
    return x.astype(storage)
  return quantization.quantize(x, storage)


@needs_compiler
@pytest.mark.parametrize("storage", ["bfloat16", "int8", "int4"])
def test_low_bit_products_on_cpu_run_the_compiled_kernels(storage):
  vectors = _rows(storage)
  g = jnp.ones(vectors.shape[1], jnp.float32)
  beta = jnp.ones(vectors.shape[0], jnp.float32)
  assert native.supports(vectors)
  for product, args in (("matvec", (vectors, g)), ("vecmat", (beta, vectors))):
    text = jax.jit(getattr(kernels, product)).lower(*args).as_text()
    assert native.TARGETS[storage, product] in text


def test_float32_products_stay_in_xla():
  vectors = _rows("float32")
  assert not native.supports(vectors)
  text = jax.jit(kernels.matvec).lower(
      vectors, jnp.ones(vectors.shape[1])).as_text()
  assert "custom_call" not in text


@needs_compiler
def test_kernels_reject_vectors_that_do_not_fit():
  with pytest.raises(Exception, match="g's length is not P's width"):
    jax.block_until_ready(native.matvec(_rows("bfloat16"), jnp.ones(999)))
  with pytest.raises(Exception, match="beta's length is not P's rows"):
    jax.block_until_ready(native.vecmat(jnp.ones(4), _rows("int8")))
  q = _rows("int4")
  torn = quantization.QuantizedVectors(q.codes[:, :-1], q.scale, q.offset, 4,
                                       q.group)
  with pytest.raises(Exception, match="do not make whole groups"):
    jax.block_until_ready(native.matvec(torn, jnp.ones(q.shape[1])))


@needs_compiler
def test_products_map_over_a_batch_of_vectors():
  vectors = _rows("int8")
  gs = jnp.asarray(np.random.default_rng(1).normal(size=(3, vectors.shape[1])),
                   jnp.float32)
  batched = jax.vmap(lambda g: kernels.matvec(vectors, g))(gs)
  np.testing.assert_array_equal(
      batched, np.stack([kernels.matvec(vectors, g) for g in gs]))


@needs_compiler
@pytest.mark.parametrize("storage", ["bfloat16", "int8", "int4"])
def test_gradients_through_the_kernels_match_xla(storage):
  """Reverse mode in the vector: each product's gradient is the other one."""
  vectors = _rows(storage)
  rng = np.random.default_rng(2)
  k, d = vectors.shape
  beta, c = (jnp.asarray(rng.normal(size=k), jnp.float32) for _ in range(2))
  g, w = (jnp.asarray(rng.normal(size=d), jnp.float32) for _ in range(2))
  np.testing.assert_allclose(
      jax.grad(lambda b: kernels.vecmat(b, vectors) @ w)(beta),
      jax.grad(lambda b: kernels.block_vecmat(b, vectors) @ w)(beta),
      rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      jax.grad(lambda x: kernels.matvec(vectors, x) @ c)(g),
      jax.grad(lambda x: kernels.block_matvec(vectors, x) @ c)(g),
      rtol=1e-5, atol=1e-5)


# A stand-in compiler that records its command lines and writes its output
# file: the cache's logic without half a minute of compiling (every test that
# runs a kernel builds and loads the real library).
_RECORDING_CXX = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/calls"
while [ "$#" -gt 2 ]; do shift; done
echo built > "$2"
"""


def test_build_is_cached_and_leaves_no_partial_file(tmp_path):
  cxx = tmp_path / "bin" / "cxx"
  cxx.parent.mkdir()
  cxx.write_text(_RECORDING_CXX)
  cxx.chmod(0o755)
  cache = tmp_path / "cache"
  path = native.build(str(cxx), cache)
  assert native.build(str(cxx), cache) == path
  calls = (cxx.parent / "calls").read_text().splitlines()
  assert len(calls) == 1 and calls[0].endswith(".so.partial")  # compiled once
  assert str(native.SOURCE) in calls[0] and path.read_text() == "built\n"
  with pytest.raises(subprocess.CalledProcessError):
    native.build("false", cache / "failed")
  assert {p.name for p in cache.rglob("*")} == {path.name, "failed"}


_FALLBACK = """
import warnings
import jax, jax.numpy as jnp, numpy as np
from twa_jax import kernels, native, quantization
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 1000)), jnp.float32)
  q = quantization.quantize(x, "int4")
  g = jnp.asarray(np.random.default_rng(1).normal(size=q.shape[1]), jnp.float32)
  assert not native.supports(q)
  assert "custom_call" not in jax.jit(kernels.matvec).lower(q, g).as_text()
  np.testing.assert_allclose(kernels.matvec(q, g), kernels.block_matvec(q, g))
  from twa_jax.training import models
  conv = lambda x, w: models.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  grad = jax.grad(lambda w, x: jnp.sum(conv(x, w) ** 2))
  x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 16))
  assert "custom_call" not in jax.jit(grad).lower(w, x).as_text()
  # Without the compiled kernel gradient, block outputs are materialized.
  y = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 3, 16)) * 1e3,
                  jnp.float32)
  assert "dot_general" in jax.jit(models.materialize).lower(y).as_text()
  np.testing.assert_array_equal(models.materialize(y), y)
print([str(w.message) for w in caught])
"""


@pytest.mark.parametrize("env,warning", [
    ({"TWA_JAX_NATIVE": "0"}, None),
    ({"CXX": "false"}, "false failed on products.cc"),
    ({"CXX": "", "PATH": ""}, "no C++ compiler found")])
def test_without_the_kernels_products_run_in_xla(tmp_path, env, warning):
  """Switched off, not compiling or without a compiler: XLA's blocks and
  XLA's conv gradients, and a warning that says why (none when switched
  off)."""
  env = {**os.environ, "TWA_JAX_CACHE_DIR": str(tmp_path), **env}
  out = subprocess.run([sys.executable, "-c", _FALLBACK], env=env, check=True,
                       capture_output=True, text=True).stdout
  if warning is None:
    assert "unavailable" not in out
  else:
    assert "compiled CPU kernels are unavailable" in out and warning in out


def _xla_conv(x, w, stride, pad):
  return jax.lax.conv_general_dilated(
      x, w, (stride, stride), ((pad, pad),) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_operands(seed, n, size, c_in, c_out, kernel, stride, pad):
  """x, dy and XLA's kernel gradient of a random NHWC/HWIO conv."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, size, size + 1, c_in)), jnp.float32)
  w = jnp.zeros((kernel, kernel, c_in, c_out))
  conv = lambda x, w: _xla_conv(x, w, stride, pad)
  dy = jnp.asarray(rng.normal(size=jax.eval_shape(conv, x, w).shape),
                   jnp.float32)
  gradient = lambda x, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]
  return x, dy, helpers.jit_fast_compile(gradient)(x, dy)


# Random conv geometries the compiled kernels take (and the map size apart).
_CONVS = dict(
    seed=st.integers(0, 2**16), n=st.integers(1, 3), c_in=st.integers(1, 40),
    c_out=st.sampled_from([16, 32, 48, 64, 80, 128]),
    kernel=st.sampled_from([1, 3, 5]), stride=st.sampled_from([1, 2]),
    pad=st.integers(0, 2))


def _assert_kernel_gradient_matches_xla(seed, n, size, c_in, c_out, kernel,
                                        stride, pad, **options):
  hypothesis.assume(size + 2 * pad >= kernel)
  x, dy, want = _conv_operands(seed, n, size, c_in, c_out, kernel, stride, pad)
  got = helpers.jit_fast_compile(lambda x, dy: native.conv_kernel_gradient(
      x, dy, (kernel, kernel), (stride, stride), (pad, pad), **options))(x, dy)
  scale = float(jnp.sqrt(n * dy.shape[1] * dy.shape[2]))  # a sum's spread
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


def _assert_conv_matches_xla(seed, n, size, c_in, c_out, kernel, stride, pad,
                             **options):
  hypothesis.assume(size + 2 * pad >= kernel)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, size, size + 1, c_in)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, c_in, c_out)), jnp.float32)
  want = helpers.jit_fast_compile(_xla_conv, static_argnums=(2, 3))(
      x, w, stride, pad)
  got = helpers.jit_fast_compile(lambda x, w: native.conv(
      x, w, (stride, stride), (pad, pad), want.shape[1:3], **options))(x, w)
  scale = float(np.sqrt(kernel * kernel * c_in))  # a sum's spread
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


@needs_compiler
@hypothesis.given(size=st.integers(3, 9), **_CONVS)
def test_conv_kernel_gradient_matches_xla(seed, n, size, c_in, c_out, kernel,
                                          stride, pad):
  _assert_kernel_gradient_matches_xla(seed, n, size, c_in, c_out, kernel,
                                      stride, pad)


@needs_compiler
@hypothesis.given(size=st.integers(3, 20), **_CONVS)
def test_conv_matches_xla(seed, n, size, c_in, c_out, kernel, stride, pad):
  _assert_conv_matches_xla(seed, n, size, c_in, c_out, kernel, stride, pad)


# Random geometries of 3x3 stride-1 convs that Winograd F(2x2, 3x3) takes:
# odd sizes (tiles cut at the edge), every padding.
_WINOGRAD_CONVS = dict(
    seed=st.integers(0, 2**16), n=st.integers(1, 3), size=st.integers(1, 12),
    c_in=st.sampled_from([16, 32, 48]), c_out=st.sampled_from([16, 32, 80]),
    pad=st.integers(0, 2))


@needs_compiler
@hypothesis.given(**_WINOGRAD_CONVS)
@hypothesis.example(seed=0, n=3, size=12, c_in=16, c_out=16, pad=1)
def test_winograd_conv_matches_xla(seed, n, size, c_in, c_out, pad):
  """XLA's direct conv's values, also on batches of more tiles than one
  slot holds (the explicit example: 126 tiles)."""
  _assert_conv_matches_xla(seed, n, size, c_in, c_out, 3, 1, pad,
                           winograd=True)


@needs_compiler
@hypothesis.given(**_WINOGRAD_CONVS)
@hypothesis.example(seed=0, n=3, size=12, c_in=16, c_out=80, pad=1)
@hypothesis.example(seed=1, n=1, size=24, c_in=512, c_out=512, pad=1)
def test_winograd_kernel_gradient_matches_xla(seed, n, size, c_in, c_out,
                                              pad):
  """XLA's kernel gradient, also with more tiles than one slot transforms
  (126) and in several passes (156 tiles, in passes of 128 with 512
  channels)."""
  _assert_kernel_gradient_matches_xla(seed, n, size, c_in, c_out, 3, 1, pad,
                                      winograd=True)


@needs_compiler
@hypothesis.given(seed=st.integers(0, 2**16), kh=st.integers(1, 5),
                  kw=st.integers(1, 5), c_in=st.integers(1, 40),
                  c_out=st.sampled_from([1, 7, 16, 17, 32, 48]))
def test_flip_kernel_is_the_flipped_transposed_kernel(seed, kh, kw, c_in,
                                                      c_out):
  """Exactly `jnp.flip(w, (0, 1)).swapaxes(2, 3)`, whole 16 x 16 tiles and
  the partial ones at the edges."""
  w = jnp.asarray(np.random.default_rng(seed).normal(
      size=(kh, kw, c_in, c_out)), jnp.float32)
  np.testing.assert_array_equal(native.flip_kernel(w),
                                jnp.flip(w, (0, 1)).swapaxes(2, 3))


@needs_compiler
def test_conv_and_kernel_gradient_reject_what_they_do_not_take():
  x, dy = jnp.ones((2, 8, 8, 3)), jnp.ones((2, 8, 8, 16))
  with pytest.raises(ValueError, match="not a multiple of 16"):
    native.conv_kernel_gradient(x, dy[..., :8], (3, 3), (1, 1), (1, 1))
  with pytest.raises(ValueError, match="one batch"):
    native.conv_kernel_gradient(x[:1], dy, (3, 3), (1, 1), (1, 1))
  with pytest.raises(ValueError, match="float32"):
    native.conv_kernel_gradient(x.astype(jnp.bfloat16), dy, (3, 3), (1, 1),
                                (1, 1))
  with pytest.raises(ValueError, match="non-negative"):
    native.conv_kernel_gradient(x, dy, (3, 3), (1, 1), (-1, 1))
  w = jnp.ones((3, 3, 3, 16))
  with pytest.raises(ValueError, match="does not take x"):
    native.conv(x, w[:, :, :2], (1, 1), (1, 1), (8, 8))
  with pytest.raises(ValueError, match="not a multiple of 16"):
    native.conv(x, w[..., :8], (1, 1), (1, 1), (8, 8))
  x16, w16 = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 16))
  for args in ((x, w, (1, 1), (1, 1), (8, 8)),  # 3 input channels
               (x16, w16[:1], (1, 1), (1, 1), (10, 8)),
               (x16, w16, (2, 2), (1, 1), (4, 4))):
    with pytest.raises(ValueError, match="conv: winograd needs a 3x3 kernel"):
      native.conv(*args, winograd=True)
    lhs, kernel, strides, padding, out = args
    with pytest.raises(ValueError,
                       match="conv_kernel_gradient: winograd needs a 3x3"):
      native.conv_kernel_gradient(
          lhs, jnp.ones((2, *out, 16)), kernel.shape[:2], strides, padding,
          winograd=True)
  with pytest.raises(ValueError, match="float32 HWIO kernel"):
    native.flip_kernel(w[0])
  with pytest.raises(ValueError, match="float32 HWIO kernel"):
    native.flip_kernel(w.astype(jnp.bfloat16))


_SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from twa_jax import native
from twa_jax.training import models
assert jax.device_count() == 4
mesh = jax.make_mesh((2, 2), ("data", "model"))
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(8, 10, 10, 5)), jnp.float32)
dy = jnp.asarray(rng.normal(size=(8, 5, 5, 32)), jnp.float32)
split = NamedSharding(mesh, P(("data", "model")))
gradient = jax.jit(lambda x, dy: native.conv_kernel_gradient(
    x, dy, (3, 3), (2, 2), (1, 1)))
text = gradient.lower(jax.device_put(x, split), jax.device_put(dy, split)
                      ).compile().as_text()
assert "all-gather" not in text and "all-reduce" in text, text
np.testing.assert_allclose(
    gradient(jax.device_put(x, split), jax.device_put(dy, split)),
    native.conv_kernel_gradient(x, dy, (3, 3), (2, 2), (1, 1)),
    rtol=1e-5, atol=1e-5)
# The conv: each device its own images, no collective, split as x is.
w = jnp.asarray(rng.normal(size=(3, 3, 5, 32)), jnp.float32)
conv = jax.jit(lambda x, w: native.conv(x, w, (1, 1), (1, 1), (10, 10)))
text = conv.lower(jax.device_put(x, split), w).compile().as_text()
assert "all-" not in text and "collective" not in text, text
y = conv(jax.device_put(x, split), w)
assert y.sharding.spec[0] == ("data", "model"), y.sharding
np.testing.assert_allclose(y, native.conv(x, w, (1, 1), (1, 1), (10, 10)),
                           rtol=1e-6, atol=1e-6)
x16 = jnp.asarray(rng.normal(size=(8, 10, 10, 16)), jnp.float32)
w16 = jnp.asarray(rng.normal(size=(3, 3, 16, 32)), jnp.float32)
dy16 = jnp.asarray(rng.normal(size=(8, 10, 10, 32)), jnp.float32)
gradient = jax.jit(lambda x, dy: native.conv_kernel_gradient(
    x, dy, (3, 3), (1, 1), (1, 1), winograd=True))
text = gradient.lower(jax.device_put(x16, split), jax.device_put(dy16, split)
                      ).compile().as_text()
assert "all-gather" not in text and "all-reduce" in text, text
np.testing.assert_allclose(
    gradient(jax.device_put(x16, split), jax.device_put(dy16, split)),
    native.conv_kernel_gradient(x16, dy16, (3, 3), (1, 1), (1, 1),
                                winograd=True), rtol=1e-5, atol=1e-4)
winograd = jax.jit(lambda x, w: native.conv(x, w, (1, 1), (1, 1), (10, 10),
                                            winograd=True))
text = winograd.lower(jax.device_put(x16, split), w16).compile().as_text()
assert "all-" not in text and "collective" not in text, text
np.testing.assert_allclose(
    winograd(jax.device_put(x16, split), w16),
    native.conv(x16, w16, (1, 1), (1, 1), (10, 10), winograd=True),
    rtol=1e-6, atol=1e-6)
# A model conv's gradients on a batch split over "data" only.
def loss(w, x):
  y = models.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.sum(jnp.sin(y))
x = jnp.asarray(rng.normal(size=(8, 16, 16, 16)), jnp.float32)
w = jnp.asarray(rng.normal(size=(3, 3, 16, 32)), jnp.float32)
step = jax.jit(jax.grad(loss, (0, 1)))
split = NamedSharding(mesh, P("data"))
text = step.lower(w, jax.device_put(x, split)).compile().as_text()
assert all(target in text for target in (
    "TwaConvKernelGrad", "TwaConvForward", "TwaWinogradConv")), text
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
             step(w, jax.device_put(x, split)), jax.grad(loss, (0, 1))(w, x))
print("ok")
"""


@needs_compiler
def test_convs_on_a_split_batch_keep_each_device_s_images():
  """4 simulated devices: for the kernel gradient each sums its own images
  and one all-reduce adds them, x never gathered; the conv (direct and by
  Winograd) runs on each device's images with no collective. Same values as
  on one device."""
  env = {**os.environ,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", _SHARDED], env=env,
                       check=True, capture_output=True, text=True)
  assert out.stdout.strip().endswith("ok"), out.stderr[-3000:]
