"""Low-bit storage of the basis: int8 and packed int4 codes.

Each basis vector is cut into groups of `group` consecutive entries; each
group keeps a float32 scale and offset (the value of code 0, i.e. the zero
point), so an entry is stored as `code * scale + offset` with an error of at
most scale / 2. int4 codes are packed two per byte, so P takes 1/4 (int8) or
1/8 (int4) of its float32 size, plus 8 bytes per group. In an int4 group,
the low nibbles hold its first half and the high nibbles its second half, so
unpacking is two contiguous slices.

The products (`twa_jax.kernels`) dequantize one column block at a time
inside a loop, so no full-precision copy of P is ever made; they read an
int4 block as its two nibble planes (`parts`), never re-interleaved, and
cut the vector they multiply the same way (`split`, `merge`). A quantized
basis is no longer exactly orthonormal: `project` then computes Q Q^T g with
Q the dequantized vectors, an update that still lies in span(Q), close to
(but not exactly) the orthogonal projection onto the snapshots' span.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

GROUP = 256  # default entries per scale and offset

BITS = {"int8": 8, "int4": 4}


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scale", "offset"],
    meta_fields=["bits", "group"])
@dataclasses.dataclass(frozen=True)
class QuantizedVectors:
  """Quantized k x C basis rows (C a multiple of `group`).

  Attributes:
    codes: uint8, k x C (int8) or k x C/2 (int4, two codes per byte).
    scale: float32, k x C/group.
    offset: float32, k x C/group, the value of code 0 in each group.
    bits: 8 or 4.
    group: entries per scale and offset.
  """

  codes: jax.Array
  scale: jax.Array
  offset: jax.Array
  bits: int
  group: int

  @property
  def shape(self) -> tuple[int, int]:
    """Logical (k, C) shape, including the zero padding up to a group."""
    return (self.scale.shape[0], self.scale.shape[1] * self.group)

  @property
  def dtype(self) -> str:
    return f"int{self.bits}"

  @property
  def nbytes(self) -> int:
    return self.codes.nbytes + self.scale.nbytes + self.offset.nbytes

  @property
  def span(self) -> int:
    """Consecutive columns of a group held by each of `parts`' blocks."""
    return self.group * self.bits // 8

  def parts(self, start, size: int) -> list[jax.Array]:
    """Float32 columns [start, start + size) (multiples of `group`), in parts.

    int8: one k x size block, the columns in order. int4: two k x size/2
    blocks, the low nibbles (the first `span` columns of each group) and
    the high nibbles (the last `span`); `split` and `merge` map vectors of
    the block's columns to and from this order.
    """
    rows = self.shape[0]
    per_byte = 8 // self.bits
    groups = size // self.group
    codes = jax.lax.dynamic_slice_in_dim(
        self.codes, start // per_byte, size // per_byte, axis=1)
    codes = codes.reshape(rows, groups, self.span)
    first = start // self.group
    scale = jax.lax.dynamic_slice_in_dim(self.scale, first, groups, axis=1)
    offset = jax.lax.dynamic_slice_in_dim(self.offset, first, groups, axis=1)
    planes = [codes] if self.bits == 8 else [codes & 0xF, codes >> 4]
    return [(plane.astype(jnp.float32) * scale[..., None]
             + offset[..., None]).reshape(rows, -1) for plane in planes]

  def split(self, x: jax.Array) -> list[jax.Array]:
    """A vector over a block's columns, cut like the blocks of `parts`."""
    count = 8 // self.bits
    if count == 1:
      return [x]
    x = x.reshape(-1, count, self.span)
    return [x[:, j].reshape(-1) for j in range(count)]

  def merge(self, pieces: list[jax.Array]) -> jax.Array:
    """The inverse of `split` (along the last axis)."""
    if len(pieces) == 1:
      return pieces[0]
    lead = pieces[0].shape[:-1]
    pieces = [p.reshape(*lead, -1, 1, self.span) for p in pieces]
    return jnp.concatenate(pieces, axis=-2).reshape(*lead, -1)

  def dequantize(self, start, size: int) -> jax.Array:
    """Float32 columns [start, start + size) (both multiples of `group`)."""
    return self.merge(self.parts(start, size))


@functools.partial(jax.jit, static_argnames=("dtype", "group"))
def quantize(vectors: jax.Array | jax.Ref, dtype: str, group: int = GROUP
             ) -> QuantizedVectors:
  """Quantizes basis rows to "int8" or "int4" with per-group scale/offset.

  Args:
    vectors: k x D float basis rows (an array, or a `jax.Ref` read in place).
    dtype: "int8" or "int4".
    group: entries per scale and offset (even, > 0).

  Returns:
    The quantized rows, zero-padded to a multiple of `group` columns.
  """
  if dtype not in BITS:
    raise ValueError(f"dtype: unknown low-bit storage {dtype!r}; "
                     f"use one of {sorted(BITS)}.")
  if group <= 0 or group % 2:
    raise ValueError(f"group must be a positive even number, got {group}.")
  bits = BITS[dtype]
  rows, cols = vectors.shape
  padded = -(-cols // group) * group
  x = jnp.pad(vectors[...].astype(jnp.float32), ((0, 0), (0, padded - cols)))
  x = x.reshape(rows, padded // group, group)
  low, high = x.min(axis=-1), x.max(axis=-1)
  levels = 2 ** bits - 1
  scale = jnp.where(high > low, (high - low) / levels, 1.0)
  codes = jnp.clip(jnp.round((x - low[..., None]) / scale[..., None]), 0, levels)
  codes = codes.astype(jnp.uint8)
  if bits == 4:
    half = group // 2
    codes = codes[..., :half] | (codes[..., half:] << 4)
  return QuantizedVectors(codes.reshape(rows, -1), scale, low, bits, group)
