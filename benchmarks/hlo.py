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
  for op, arrays in collective_arrays(hlo_text):
    sizes = [(math.prod(shape), math.prod(shape) * jnp.dtype(dtype).itemsize)
             for dtype, shape in arrays]
    found.append((op, sum(a for a, _ in sizes), sum(b for _, b in sizes)))
  return found


def collective_arrays(hlo_text: str
                      ) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
  """(op, [(dtype, shape) of each array it carries]) of each collective
  (as `collectives` counts them: of an async start other than all-reduce,
  the largest array)."""
  found = []
  for shapes, op, start in _COLLECTIVE.findall(hlo_text):
    arrays = [(_HLO_DTYPES.get(dtype, dtype),
               tuple(int(d) for d in dims.split(",") if d))
              for dtype, dims in _SHAPE.findall(shapes)]
    if start and op != "all-reduce":
      arrays = [max(arrays, key=lambda a: math.prod(a[1]))]
    found.append((op, arrays))
  return found
