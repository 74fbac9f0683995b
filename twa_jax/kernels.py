"""Blockwise column kernels: the passes over the D columns of W and of P.

Both the orthonormalizer (float64 Gram matrices and combinations of rows) and
the basis products (P^T g and P beta in float32 whatever the storage) walk
the columns in blocks, so that no full-width float64 or float32 copy of a
matrix is ever made. On CPU, products with bfloat16, int8 or int4 rows run
the compiled kernels of `twa_jax.native` where they are available. Under
`jax.shard_map` the same kernels run on each device's columns; `axis_name`
then sums the n x n Grams with one psum.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from twa_jax import native
from twa_jax import quantization

AxisName = str | tuple[str, ...]
Vectors = jax.Array | quantization.QuantizedVectors  # the stored basis rows
CHUNK = 1 << 15  # columns per orthonormalizer block (4096-32768 alike in time)
# Float32 bytes per converted block of the low-bit products: the block stays
# in the last-level cache. Measured at n = 100, D = 1e6 (BENCHMARKS.md).
BLOCK_BYTES = 1 << 23


def over_columns(cols: int, body: Callable[[Any, Any, int], Any], carry: Any,
                 chunk: int = CHUNK) -> Any:
  """Folds body(carry, start, size) over column blocks of width `chunk`."""
  full = cols // chunk
  if full:
    carry = jax.lax.fori_loop(
        0, full, lambda i, c: body(c, i * chunk, chunk), carry)
  if cols % chunk:
    carry = body(carry, full * chunk, cols % chunk)
  return carry


def columns64(x: jax.Array, start, size: int) -> jax.Array:
  """Columns [start, start + size) of `x` in float64 (call under x64)."""
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1).astype(jnp.float64)


def combines_in_place(c: jax.Array, v: jax.Array, dtype) -> bool:
  """Whether `combine64(c, v, dtype)` writes over v: c square, `dtype` v's."""
  return c.shape[0] == v.shape[0] and jnp.dtype(dtype) == v.dtype


def combine64(c: jax.Array, v: jax.Array, dtype, chunk: int = CHUNK
              ) -> jax.Array:
  """c @ v in float64 over column blocks, rounded once to `dtype`.

  Where c is square and `dtype` is v's (`combines_in_place`), each block of
  the result is written over the same block of v (it depends on no other),
  so no second n x D array is made when v is donated.
  """
  def body(source, out, start, size):
    block = (c @ columns64(source, start, size)).astype(dtype)
    return jax.lax.dynamic_update_slice_in_dim(out, block, start, axis=1)
  if combines_in_place(c, v, dtype):
    return over_columns(v.shape[1], lambda out, *at: body(out, out, *at), v,
                        chunk)
  return over_columns(v.shape[1], lambda out, *at: body(v, out, *at),
                      jnp.zeros((c.shape[0], v.shape[1]), dtype), chunk)


def rewrite_columns(v: jax.Array, fn: Callable[[jax.Array], jax.Array],
                    axis_name: AxisName | None = None,
                    chunk: int = CHUNK) -> tuple[jax.Array, jax.Array]:
  """v with each column block replaced by fn(block), and their float64 Gram.

  One pass over the columns; each new block is written over the block it
  came from, so with v donated no second n x D array is made (call under
  x64). XLA:CPU was seen to copy v anyway for one or two blocks (4096 and
  40000 columns: small matrices), not for three or more. With `axis_name` (inside `jax.shard_map`, columns sharded over that
  mesh axis), the per-device Grams are summed with one psum of n x n floats.
  """
  def body(carry, start, size):
    out, gram = carry
    block = fn(jax.lax.dynamic_slice_in_dim(out, start, size, axis=1))
    out = jax.lax.dynamic_update_slice_in_dim(out, block, start, axis=1)
    block64 = columns64(out, start, size)  # read after the write: in place
    return out, gram + block64 @ block64.T
  out, gram = over_columns(
      v.shape[1], body, (v, jnp.zeros((v.shape[0], v.shape[0]), jnp.float64)),
      chunk)
  return out, gram if axis_name is None else jax.lax.psum(gram, axis_name)


def center(w: jax.Array, axis_name: AxisName | None = None,
           chunk: int = CHUNK) -> tuple[jax.Array, jax.Array]:
  """Rows w_i - w_r (i != r) and w_r itself, r = n // 2; their float64 Gram.

  Written over w (see `rewrite_columns`).
  """
  r = w.shape[0] // 2
  return rewrite_columns(w, lambda b: (b - b[r]).at[r].set(b[r]), axis_name,
                         chunk)


def combine_and_gram(c: jax.Array, v: jax.Array,
                     axis_name: AxisName | None = None, chunk: int = CHUNK
                     ) -> tuple[jax.Array, jax.Array]:
  """Q = c @ v (c n x n) in float64 rounded to v's dtype, and Q Q^T.

  Written over v (see `rewrite_columns`).
  """
  return rewrite_columns(
      v, lambda b: (c @ b.astype(jnp.float64)).astype(v.dtype), axis_name,
      chunk)


class ColumnBlocks(NamedTuple):
  """How the products read stored rows as float32 column blocks.

  Attributes:
    read: read(start, size) -> float32 columns [start, start + size) as a
      list of k x m blocks (one block, or an int4 block's two nibble planes).
    split: cuts a vector over those columns like `read`'s blocks.
    merge: the inverse of `split`.
    width: columns per block; a multiple of every `read` size constraint.
  """

  read: Callable[[Any, int], list[jax.Array]]
  split: Callable[[jax.Array], list[jax.Array]]
  merge: Callable[[list[jax.Array]], jax.Array]
  width: int


def block_width(rows: int, unit: int = 1) -> int:
  """Columns per block: a power of two (aligned rows) of about BLOCK_BYTES
  of float32, and a multiple of `unit` (a quantization group)."""
  width = 1 << (BLOCK_BYTES // (4 * max(rows, 1))).bit_length() - 1
  return max(1, width // unit) * unit


def widen_bfloat16(vectors: jax.Array, start, size: int) -> jax.Array:
  """Columns [start, start + size) of bfloat16 `vectors`, exactly in float32.

  A bfloat16 is the top half of a float32: the bits are shifted into place
  (XLA:CPU's own conversion is about 10x slower). The optimization barrier
  keeps the bit view inside the caller's loop: hoisted out of it, it would
  be a full copy of P (and XLA:CPU widens bfloat16 slices before slicing).
  """
  vectors, start = jax.lax.optimization_barrier(
      (vectors, jnp.asarray(start, jnp.int32)))
  bits = jax.lax.bitcast_convert_type(vectors, jnp.uint16)
  bits = jax.lax.dynamic_slice_in_dim(bits, start, size, axis=1)
  return jax.lax.bitcast_convert_type(bits.astype(jnp.uint32) << 16,
                                      jnp.float32)


def column_blocks(vectors: Vectors) -> ColumnBlocks | None:
  """How to read `vectors` as float32 column blocks, if it needs to be.

  For storage that XLA cannot multiply at full speed (bfloat16 on CPU,
  int8/int4 codes); None for float32, and for any float storage on an
  accelerator, which go to one matrix product.
  """
  if isinstance(vectors, quantization.QuantizedVectors):
    return ColumnBlocks(vectors.parts, vectors.split, vectors.merge,
                        block_width(vectors.shape[0], vectors.group))
  if vectors.dtype == jnp.float32 or jax.default_backend() != "cpu":
    return None  # accelerators multiply bfloat16 natively
  def read(start, size):
    if vectors.dtype == jnp.bfloat16:
      return [widen_bfloat16(vectors, start, size)]
    return [jax.lax.dynamic_slice_in_dim(vectors, start, size, axis=1).astype(
        jnp.float32)]
  return ColumnBlocks(read, lambda x: [x], lambda pieces: pieces[0],
                      block_width(vectors.shape[0]))


def zeros(vectors: Vectors, size: int) -> jax.Array:
  """A float32 (size,) accumulator for products with `vectors`.

  Under `jax.shard_map` it varies over their mesh axes, as the loop's
  results do.
  """
  if isinstance(vectors, quantization.QuantizedVectors):
    vectors = vectors.scale
  return jnp.zeros_like(vectors, jnp.float32, shape=(size,))


def matvec(vectors: Vectors, flat: jax.Array) -> jax.Array:
  """P^T g in float32 whatever the storage; never a float32 copy of P.

  Low-bit rows on CPU go to the compiled kernel where it is built
  (`twa_jax.native`), everything else to `block_matvec`.
  """
  if native.supports(vectors):
    return native.matvec(vectors, flat)
  return block_matvec(vectors, flat)


def block_matvec(vectors: Vectors, flat: jax.Array) -> jax.Array:
  """P^T g in XLA: one product, or a loop over `column_blocks`."""
  blocks = column_blocks(vectors)
  if blocks is None:
    return jnp.dot(vectors, flat.astype(vectors.dtype),
                   preferred_element_type=jnp.float32)
  def body(acc, start, size):
    pieces = blocks.split(jax.lax.dynamic_slice_in_dim(flat, start, size))
    for block, piece in zip(blocks.read(start, size), pieces):
      acc = acc + block @ piece
    return acc
  return over_columns(vectors.shape[1], body,
                      zeros(vectors, vectors.shape[0]), blocks.width)


def vecmat(beta: jax.Array, vectors: Vectors) -> jax.Array:
  """P beta in float32 whatever the storage; never a float32 copy of P.

  Low-bit rows on CPU go to the compiled kernel where it is built
  (`twa_jax.native`), everything else to `block_vecmat`.
  """
  if native.supports(vectors):
    return native.vecmat(beta, vectors)
  return block_vecmat(beta, vectors)


def block_vecmat(beta: jax.Array, vectors: Vectors) -> jax.Array:
  """P beta in XLA: one product, or a loop over `column_blocks`."""
  blocks = column_blocks(vectors)
  if blocks is None:
    return jnp.dot(beta.astype(vectors.dtype), vectors,
                   preferred_element_type=jnp.float32)
  def body(out, start, size):
    part = blocks.merge([beta @ block for block in blocks.read(start, size)])
    return jax.lax.dynamic_update_slice_in_dim(out, part, start, axis=0)
  return over_columns(vectors.shape[1], body,
                      zeros(vectors, vectors.shape[1]), blocks.width)
