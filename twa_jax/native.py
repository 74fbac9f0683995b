"""Compiled CPU kernels: the low-bit basis products, and a convolution and
its kernel gradient (`products.cc`).

XLA:CPU widens a bfloat16, int8 or int4 block of P to float32 in memory
before it multiplies it, which costs about what reading float32 P does. The
kernels in `products.cc` widen 16 values at a time in registers, so the
products' time follows the bytes of P they read. For a conv's kernel
gradient XLA:CPU transposes the activations and the output gradient into
one large convolution; the kernel reads them in place. The conv itself
keeps blocks of output pixels in registers; for 3x3 kernels at stride 1 it
and its kernel gradient also run by Winograd F(2x2, 3x3), with 16
multiplications per 2x2 output pixels and channel pair where a direct conv
takes 36. A conv's input gradient takes its kernel flipped and transposed
by `flip_kernel`, several times faster than XLA:CPU's fused loop. The
kernels keep their scratch buffers for the next call (as many as were in
use at once; the Winograd kernel gradient's hold at most 8 MB of windows
plus 16 C_in C_out floats). They are XLA FFI handlers,
compiled at first use with the machine's C++ compiler (`$CXX`, else `c++`,
`g++` or `clang++`) for this CPU, cached in `$TWA_JAX_CACHE_DIR` (default
`~/.cache/twa_jax`) and called through `jax.ffi.ffi_call`.

Without a working compiler (a warning says why, once) or with
`TWA_JAX_NATIVE=0`, `library()` is None and `twa_jax.kernels` runs its XLA
blocks instead, and the models use XLA's convs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import custom_partitioning
import numpy as np

from twa_jax import quantization

SOURCE = pathlib.Path(__file__).with_name("products.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-ffp-contract=fast", "-shared",
         "-fPIC", "-pthread", "-w")
# FFI handlers in products.cc: (storage, product) -> symbol.
TARGETS = {(storage, product): f"Twa{product.capitalize()}{suffix}"
           for storage, suffix in (("bfloat16", "Bf16"), ("int8", "Int8"),
                                   ("int4", "Int4"))
           for product in ("matvec", "vecmat")}
CONV = "TwaConvForward"
CONV_KERNEL_GRADIENT = "TwaConvKernelGrad"
FLIP_KERNEL = "TwaFlipKernel"
WINOGRAD_CONV = "TwaWinogradConv"
WINOGRAD_KERNEL_GRADIENT = "TwaWinogradKernelGrad"


def cache_dir() -> pathlib.Path:
  """Where compiled kernels are kept: $TWA_JAX_CACHE_DIR or ~/.cache/twa_jax."""
  default = pathlib.Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "twa_jax"
  return pathlib.Path(os.environ.get("TWA_JAX_CACHE_DIR", default)).expanduser()


def compiler() -> str | None:
  """The C++ compiler to build with: $CXX, else the first found on PATH."""
  return os.environ.get("CXX") or next(
      filter(None, map(shutil.which, ("c++", "g++", "clang++"))), None)


def _cpu() -> str:
  """This CPU's features (the kernels are built with -march=native)."""
  try:
    info = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return platform.processor()
  return next((line for line in info.splitlines()
               if line.startswith(("flags", "Features"))), platform.processor())


def build(cxx: str, directory: pathlib.Path) -> pathlib.Path:
  """Compiles products.cc into `directory` (once per source, flags, jaxlib
  and CPU) and returns the shared library's path.

  The library is written under a temporary name and renamed into place, so
  processes building at once never load a partial file.

  Raises:
    OSError: the directory cannot be written.
    subprocess.CalledProcessError: the compiler failed.
  """
  command = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE)]
  key = hashlib.sha256("\0".join(
      [SOURCE.read_text(), *command, jax.__version__, platform.machine(),
       _cpu()]).encode()).hexdigest()[:16]
  path = directory / f"products-{key}.so"
  if not path.exists():
    directory.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=directory, suffix=".so.partial")
    os.close(fd)
    try:
      subprocess.run([*command, "-o", partial], check=True,
                     capture_output=True, text=True)
      os.replace(partial, path)
    finally:
      if os.path.exists(partial):
        os.remove(partial)
  return path


@functools.cache
def library() -> ctypes.CDLL | None:
  """The compiled kernels, registered with XLA for CPU; None if unavailable."""
  if os.environ.get("TWA_JAX_NATIVE", "1") == "0":
    return None
  cxx = compiler()
  if cxx is None:
    why = "no C++ compiler found (set CXX)"
  else:
    try:
      lib = ctypes.CDLL(str(build(cxx, cache_dir())))
    except subprocess.CalledProcessError as e:
      why = f"{cxx} failed on {SOURCE.name}:\n{e.stderr[-2000:]}"
    except OSError as e:
      why = f"could not build or load it in {cache_dir()}: {e}"
    else:
      for symbol in (*TARGETS.values(), CONV, CONV_KERNEL_GRADIENT,
                     FLIP_KERNEL, WINOGRAD_CONV, WINOGRAD_KERNEL_GRADIENT):
        jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(
            getattr(lib, symbol)), platform="cpu")
      return lib
  warnings.warn(
      f"twa_jax: the compiled CPU kernels are unavailable, {why}. "
      "bfloat16/int8/int4 bases use XLA's slower blocks on CPU, and convs "
      "XLA's kernel gradients.",
      RuntimeWarning, stacklevel=2)
  return None


def supports(vectors: jax.Array | quantization.QuantizedVectors) -> bool:
  """Whether the products with these stored rows run compiled here: a
  bfloat16 or quantized basis on CPU, with the library built."""
  low_bit = (isinstance(vectors, quantization.QuantizedVectors)
             or vectors.dtype == jnp.bfloat16)
  return low_bit and jax.default_backend() == "cpu" and library() is not None


def _operands(vectors) -> tuple[str, tuple[jax.Array, ...]]:
  if isinstance(vectors, quantization.QuantizedVectors):
    return vectors.dtype, (vectors.codes, vectors.scale, vectors.offset)
  return "bfloat16", (vectors,)


def _call(product: str, vectors, vector: jax.Array) -> jax.Array:
  if library() is None:
    raise RuntimeError(f"twa_jax.native.{product}: the compiled kernels are "
                       "unavailable (see the warning); use twa_jax.kernels.")
  storage, operands = _operands(vectors)
  rows, cols = vectors.shape
  call = jax.ffi.ffi_call(
      TARGETS[storage, product],
      jax.ShapeDtypeStruct((rows if product == "matvec" else cols,),
                           jnp.float32),
      vmap_method="sequential")
  if product == "matvec":
    return call(*operands, vector)
  return call(vector, *operands)


@jax.custom_vjp
def _matvec(vectors, flat: jax.Array) -> jax.Array:
  return _call("matvec", vectors, flat)


@jax.custom_vjp
def _vecmat(beta: jax.Array, vectors) -> jax.Array:
  return _call("vecmat", vectors, beta)


def _constant(vectors):
  """A zero cotangent for the stored rows (integer codes: float0)."""
  return jax.tree.map(
      lambda x: np.zeros(x.shape, jax.dtypes.float0)
      if jnp.issubdtype(x.dtype, jnp.integer) else jnp.zeros_like(x), vectors)


# Each product is linear in its vector and the other one is its transpose.
_matvec.defvjp(lambda vectors, flat: (_matvec(vectors, flat), vectors),
               lambda vectors, ct: (_constant(vectors), _vecmat(ct, vectors)))
_vecmat.defvjp(lambda beta, vectors: (_vecmat(beta, vectors), vectors),
               lambda vectors, ct: (_matvec(vectors, ct), _constant(vectors)))


def matvec(vectors, flat: jax.Array) -> jax.Array:
  """P^T g (float32) with the compiled kernel; see `supports`.

  Differentiable in g in reverse mode (P is a constant).
  """
  return _matvec(vectors, flat.astype(jnp.float32))


def vecmat(beta: jax.Array, vectors) -> jax.Array:
  """P beta (float32) with the compiled kernel; see `supports`.

  Differentiable in beta in reverse mode (P is a constant).
  """
  return _vecmat(beta.astype(jnp.float32), vectors)


def _check_conv(name: str, x: jax.Array, out, kernel: tuple[int, int],
                strides: tuple[int, int], padding: tuple[int, int]) -> None:
  """Raises ValueError naming `name` unless x (the conv's input) and out (its
  output, or the output's gradient) fit the compiled kernels."""
  if x.ndim != 4 or out.ndim != 4 or x.shape[0] != out.shape[0]:
    raise ValueError(f"{name}: x {x.shape} and the output {out.shape} are "
                     "not NHWC with one batch")
  if x.dtype != jnp.float32 or out.dtype != jnp.float32:
    raise ValueError(f"{name}: x and the output must be float32, got "
                     f"{x.dtype} and {out.dtype}")
  if out.shape[-1] % 16:
    raise ValueError(f"{name}: the output's {out.shape[-1]} channels are "
                     "not a multiple of 16")
  if (len(kernel) != 2 or min(kernel) < 1 or len(strides) != 2
      or min(strides) < 1 or len(padding) != 2 or min(padding) < 0):
    raise ValueError(f"{name}: kernel {kernel}, strides {strides} and "
                     f"padding {padding} must be pairs of positive (padding: "
                     "non-negative) integers")


def _check_winograd(name: str, x: jax.Array, kernel: tuple[int, int],
                    strides: tuple[int, int]) -> None:
  """Raises ValueError naming `name` unless Winograd F(2x2, 3x3) takes the
  conv."""
  if tuple(kernel) != (3, 3) or tuple(strides) != (1, 1) or x.shape[-1] % 16:
    raise ValueError(f"{name}: winograd needs a 3x3 kernel, stride 1 and "
                     f"input channels a multiple of 16, got kernel {kernel}, "
                     f"strides {strides} and x {x.shape}")


def _kernel_gradient(x, dy, kernel, strides, padding, winograd):
  """The FFI call on this device's arrays."""
  if library() is None:
    raise RuntimeError("twa_jax.native.conv_kernel_gradient: the compiled "
                       "kernels are unavailable (see the warning).")
  out = jax.ShapeDtypeStruct((*kernel, x.shape[-1], dy.shape[-1]), jnp.float32)
  pads = {"pad_h": np.int64(padding[0]), "pad_w": np.int64(padding[1])}
  if winograd:
    return jax.ffi.ffi_call(WINOGRAD_KERNEL_GRADIENT, out)(x, dy, **pads)
  return jax.ffi.ffi_call(CONV_KERNEL_GRADIENT, out)(
      x, dy, stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
      **pads)


def _batch_spec(mesh, arg_shapes):
  """x's and dy's sharding: the batch split as x's is, all else whole."""
  spec = arg_shapes[0].sharding.spec
  return jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(spec[0] if spec else None))


def _partition(kernel, strides, padding, winograd, mesh, arg_shapes,
               result_shape):
  """Each device sums its images; a psum over the batch's axes adds them."""
  del result_shape
  operands = _batch_spec(mesh, arg_shapes)
  axes = operands.spec[0]

  def lower(x, dy):
    dw = _kernel_gradient(x, dy, kernel, strides, padding, winograd)
    return jax.lax.psum(dw, axes) if axes else dw
  return (mesh, lower, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()), (operands, operands))


def _replicated(kernel, strides, padding, winograd, mesh, arg_shapes,
                result_shape):
  del kernel, strides, padding, winograd, arg_shapes, result_shape
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


_partitioned_kernel_gradient = custom_partitioning.custom_partitioning(
    _kernel_gradient, static_argnums=(2, 3, 4, 5))
_partitioned_kernel_gradient.def_partition(
    partition=_partition, infer_sharding_from_operands=_replicated,
    sharding_rule="n h w c, n i j o -> k l c o")


def conv_kernel_gradient(x: jax.Array, dy: jax.Array,
                         kernel: tuple[int, int], strides: tuple[int, int],
                         padding: tuple[int, int], *,
                         winograd: bool = False) -> jax.Array:
  """The gradient of an NHWC conv's HWIO kernel, with the compiled kernel.

  dw[i, j, c, o] = sum over n, h, w of
  x[n, h s_0 + i - p_0, w s_1 + j - p_1, c] dy[n, h, w, o], x being zero
  outside its image (no dilation, no groups). Under a jit that splits the
  batch over devices, each device sums its own images and a psum over the
  batch's mesh axes adds them.

  Args:
    x: the conv's input, float32 (N, H, W, C_in).
    dy: the gradient of its output, float32 (N, H_out, W_out, C_out), C_out a
      multiple of 16.
    kernel: the kernel's height and width.
    strides: the conv's strides.
    padding: the zeros before the first row and column (those after follow
      from dy's size).
    winograd: compute it as the gradient of `conv(..., winograd=True)`'s
      transformed kernel, transformed back: 16 multiplications per tile of
      2x2 output pixels and channel pair against 36. Same requirements.

  Returns:
    float32 (kernel[0], kernel[1], C_in, C_out).

  Raises:
    ValueError: shapes, dtypes or geometry the kernel does not take.
  """
  kernel, strides, padding = tuple(kernel), tuple(strides), tuple(padding)
  _check_conv("conv_kernel_gradient", x, dy, kernel, strides, padding)
  if winograd:
    _check_winograd("conv_kernel_gradient", x, kernel, strides)
  return _partitioned_kernel_gradient(x, dy, kernel, strides, padding,
                                      winograd)


def _conv(x, w, strides, padding, out_size, winograd):
  """The FFI call on this device's arrays."""
  if library() is None:
    raise RuntimeError("twa_jax.native.conv: the compiled kernels are "
                       "unavailable (see the warning).")
  out = jax.ShapeDtypeStruct((x.shape[0], *out_size, w.shape[-1]),
                             jnp.float32)
  pads = {"pad_h": np.int64(padding[0]), "pad_w": np.int64(padding[1])}
  if winograd:
    return jax.ffi.ffi_call(WINOGRAD_CONV, out)(x, w, **pads)
  return jax.ffi.ffi_call(CONV, out)(
      x, w, stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
      **pads)


def _conv_partition(strides, padding, out_size, winograd, mesh, arg_shapes,
                    result_shape):
  """Each device convolves its own images."""
  del result_shape
  images = _batch_spec(mesh, arg_shapes)
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def lower(x, w):
    return _conv(x, w, strides, padding, out_size, winograd)
  return mesh, lower, images, (images, whole)


def _split_like_x(strides, padding, out_size, winograd, mesh, arg_shapes,
                  result_shape):
  del strides, padding, out_size, winograd, result_shape
  return _batch_spec(mesh, arg_shapes)


_partitioned_conv = custom_partitioning.custom_partitioning(
    _conv, static_argnums=(2, 3, 4, 5))
_partitioned_conv.def_partition(
    partition=_conv_partition, infer_sharding_from_operands=_split_like_x,
    sharding_rule="n h w c, k l c o -> n i j o")


def conv(x: jax.Array, w: jax.Array, strides: tuple[int, int],
         padding: tuple[int, int], out_size: tuple[int, int], *,
         winograd: bool = False) -> jax.Array:
  """An NHWC conv with an HWIO kernel, with the compiled kernel.

  y[n, h, w, o] = sum over i, j, c of
  x[n, h s_0 + i - p_0, w s_1 + j - p_1, c] w[i, j, c, o], x being zero
  outside its image (no dilation, no groups). Under a jit that splits the
  batch over devices, each device convolves its own images.

  Args:
    x: float32 (N, H, W, C_in).
    w: float32 (KH, KW, C_in, C_out), C_out a multiple of 16.
    strides: the conv's strides.
    padding: the zeros before the first row and column.
    out_size: (H_out, W_out); the zeros after the last row and column
      follow from it.
    winograd: compute it by Winograd F(2x2, 3x3) (Lavin and Gray, 2016):
      16 multiplications per 2x2 output pixels and channel pair where a
      direct conv takes 36, with rounding errors the size of XLA's direct
      conv's (measured). Needs a 3x3 kernel, stride 1 and C_in a multiple
      of 16.

  Returns:
    float32 (N, H_out, W_out, C_out).

  Raises:
    ValueError: shapes, dtypes or geometry the kernel does not take.

  References:
    Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks",
    CVPR 2016.
  """
  strides, padding, out_size = tuple(strides), tuple(padding), tuple(out_size)
  _check_conv("conv", x, jax.ShapeDtypeStruct(
      (x.shape[0], *out_size, w.shape[-1]), w.dtype), w.shape[:2], strides,
              padding)
  if w.ndim != 4 or w.shape[2] != x.shape[-1] or min(out_size) < 1:
    raise ValueError(f"conv: kernel {w.shape} does not take x {x.shape}, or "
                     f"output size {out_size} is empty")
  if winograd:
    _check_winograd("conv", x, w.shape[:2], strides)
  return _partitioned_conv(x, w, strides, padding, out_size, winograd)


def flip_kernel(w: jax.Array) -> jax.Array:
  """`jnp.flip(w, (0, 1)).swapaxes(2, 3)` with the compiled kernel: the
  kernel whose stride-1 conv of a conv's output gradient is its input
  gradient.

  XLA:CPU fuses the flip and the transpose into one loop that took about 8x
  as long on a 3x3x512x512 kernel; this transposes 16 x 16 tiles in
  registers. Under a jit over several devices it runs on the whole kernel on
  each.

  Args:
    w: float32 (KH, KW, C_in, C_out).

  Returns:
    float32 (KH, KW, C_out, C_in).

  Raises:
    ValueError: w is not a float32 kernel of rank 4.
  """
  if w.ndim != 4 or w.dtype != jnp.float32:
    raise ValueError(f"flip_kernel: w must be a float32 HWIO kernel, got "
                     f"{w.dtype} {w.shape}")
  if library() is None:
    raise RuntimeError("twa_jax.native.flip_kernel: the compiled kernels are "
                       "unavailable (see the warning).")
  return jax.ffi.ffi_call(FLIP_KERNEL, jax.ShapeDtypeStruct(
      (*w.shape[:2], w.shape[3], w.shape[2]), jnp.float32))(w)
