"""The collectives of a compiled program, read from its HLO text.

Shared by the benchmarks (communication per step) and the tests (which put
this folder on `sys.path`).
"""

from __future__ import annotations

import math
import re

import jax.numpy as jnp

_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT )?\S+ = (.+?) "
    r"(all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)"
    r"(-start)?\(", re.MULTILINE)
_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_HLO_DTYPES = {"f32": "float32", "f64": "float64", "bf16": "bfloat16",
               "f16": "float16", "s32": "int32", "u32": "uint32",
               "s8": "int8", "u8": "uint8", "pred": "bool"}


def collectives(hlo_text: str) -> list[tuple[str, int, int]]:
  """The collectives of a compiled program's HLO text.

  Args:
    hlo_text: e.g. `jax.jit(f).lower(*args).compile().as_text()`.

  Returns:
    (op, elements, bytes) of each collective's result, e.g.
    ("all-reduce", D, 4 D) for the basis layout's projection; a tuple
    all-reduce (several arrays combined) counts all of them; of the async
    "-start" forms of the others, whose result tuple also holds the
    operand, the largest array is counted.
  """
  found = []
  for shapes, op, start in _COLLECTIVE.findall(hlo_text):
    arrays = []
    for dtype, dims in _SHAPE.findall(shapes):
      size = math.prod(int(d) for d in dims.split(",") if d)
      itemsize = jnp.dtype(_HLO_DTYPES.get(dtype, dtype)).itemsize
      arrays.append((size, size * itemsize))
    if start and op != "all-reduce":
      arrays = [max(arrays)]
    found.append((op, sum(a for a, _ in arrays), sum(b for _, b in arrays)))
  return found
