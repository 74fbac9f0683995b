"""The collectives of a compiled program, read from its HLO text.

Shared by the benchmarks (communication per step) and the tests (which put
this folder on `sys.path`).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import jax.numpy as jnp

_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT )?\S+ = (.+?) "
    r"(all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)"
    r"(-start)?\((.*)$", re.MULTILINE)
_OP_NAME = re.compile(r'op_name="([^"]*)"')
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
  for op, arrays, _ in collective_arrays(hlo_text):
    sizes = [(math.prod(shape), math.prod(shape) * jnp.dtype(dtype).itemsize)
             for dtype, shape in arrays]
    found.append((op, sum(a for a, _ in sizes), sum(b for _, b in sizes)))
  return found


class Collective(NamedTuple):
  """One collective of a compiled program."""
  op: str  # "all-reduce", "all-gather", "reduce-scatter", ...
  arrays: list[tuple[str, tuple[int, ...]]]  # (dtype, shape) it carries
  op_name: str  # the JAX name stack it came from ("": none), e.g.
  # "jit(step)/transpose(jvp(MLP))/Dense_1/dot_general" in a backward pass


def collective_arrays(hlo_text: str) -> list[Collective]:
  """Each collective of a compiled program's HLO text, with the arrays it
  carries (as `collectives` counts them: of an async start other than
  all-reduce, the largest array) and its metadata's op_name."""
  found = []
  for shapes, op, start, rest in _COLLECTIVE.findall(hlo_text):
    arrays = [(_HLO_DTYPES.get(dtype, dtype),
               tuple(int(d) for d in dims.split(",") if d))
              for dtype, dims in _SHAPE.findall(shapes)]
    if start and op != "all-reduce":
      arrays = [max(arrays, key=lambda a: math.prod(a[1]))]
    name = _OP_NAME.search(rest)
    found.append(Collective(op, arrays, name.group(1) if name else ""))
  return found
