"""Checksums of stored leaves: one 64-bit value per fixed-size block of bytes.

A leaf's C-order bytes are cut into blocks of `block_bytes` (the last one
shorter); a block's checksum is sum_j (2 j + 1) w_j mod 2^64 over its
little-endian 64-bit words w_j (zero-padded). The odd weights make every
error confined to one word (any flipped bits in 8 bytes) change the sum, and
a moved word change it too. Blocks let a reader verify just the part of a
leaf it reads.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np


class ChecksumError(ValueError):
  """Stored bytes differ from what was saved (the step and leaf named)."""


def block_checksums(values: np.ndarray, block_bytes: int) -> list[int]:
  """The checksum of each `block_bytes` block of `values`' C-order bytes."""
  data = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
  return [_checksum(data[i:i + block_bytes])
          for i in range(0, data.size, block_bytes)]


def verify(values: np.ndarray, block_bytes: int, expected: Sequence[int],
           first_block: int, what: str) -> None:
  """Checks the blocks of `values`, blocks `first_block`, ... of a leaf.

  Args:
    values: entries of the leaf from the start of block `first_block` to
      the end of a block or of the leaf.
    block_bytes: the block size the checksums were recorded with.
    expected: the leaf's recorded checksums, one per block.
    first_block: the index of the block `values` starts with.
    what: names the step and leaf in the error.

  Raises:
    ChecksumError: a block's checksum differs.
  """
  got = block_checksums(values, block_bytes)
  bad = [first_block + i for i, (g, e) in enumerate(
      zip(got, expected[first_block:first_block + len(got)])) if g != e]
  if bad or len(got) > len(expected) - first_block:
    raise ChecksumError(
        f"{what}: the stored bytes differ from the saved ones (checksum "
        f"mismatch in block {bad[0] if bad else len(expected)} of "
        f"{len(expected)}, {block_bytes} bytes each); the snapshot is "
        "corrupted on disk.")


def _checksum(block: np.ndarray) -> int:
  pad = -block.size % 8
  if pad:
    block = np.concatenate([block, np.zeros(pad, np.uint8)])
  words = block.view("<u8")
  return int(np.dot(words, _weights(words.size)))


@functools.lru_cache(maxsize=32)
def _weights(size: int) -> np.ndarray:
  return np.arange(1, 2 * size, 2, dtype="<u8")
