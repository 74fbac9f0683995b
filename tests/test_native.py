"""The compiled low-bit products (twa_jax/native.py, products.cc): used on CPU,
checked arguments, an atomic build cache, and XLA's blocks without them.

Their results against the stored values are property-tested with XLA's in
test_quantization.py (`test_low_bit_products_match_the_stored_values`).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


@needs_compiler
def test_build_is_cached_and_leaves_no_partial_file(tmp_path):
  path = native.build(native.compiler(), tmp_path)
  built = path.stat().st_mtime_ns
  assert native.build(native.compiler(), tmp_path) == path
  assert path.stat().st_mtime_ns == built  # not compiled again
  with pytest.raises(subprocess.CalledProcessError):
    native.build("false", tmp_path / "failed")
  assert {p.name for p in tmp_path.rglob("*")} == {path.name, "failed"}


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
print([str(w.message) for w in caught])
"""


@pytest.mark.parametrize("env,warning", [
    ({"TWA_JAX_NATIVE": "0"}, None),
    ({"CXX": "false"}, "false failed on products.cc"),
    ({"CXX": "", "PATH": ""}, "no C++ compiler found")])
def test_without_the_kernels_products_run_in_xla(tmp_path, env, warning):
  """Switched off, not compiling or without a compiler: XLA's blocks, and a
  warning that says why (none when switched off)."""
  env = {**os.environ, "TWA_JAX_CACHE_DIR": str(tmp_path), **env}
  out = subprocess.run([sys.executable, "-c", _FALLBACK], env=env, check=True,
                       capture_output=True, text=True).stdout
  if warning is None:
    assert "unavailable" not in out
  else:
    assert "compiled low-bit products are unavailable" in out and warning in out
