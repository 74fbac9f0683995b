"""Small pieces several test modules share (`import helpers`): a tiny NNX
model, a fast-compiling jit for property tests, and what the two-process
`jax.distributed` tests need."""

from __future__ import annotations

import functools
import socket

import jax
import pytest
from flax import nnx
from jax._src.lib import xla_client


class NNXMLP(nnx.Module):
  """4 -> 8 -> 2 with a ReLU: the NNX model of the transformation tests."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(4, 8, rngs=rngs)
    self.out = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


# XLA's optimized HLO as `jax.jit` makes it (the same passes, the same ops
# and custom calls), lowered to machine code without LLVM's optimizations:
# for property tests that compile a new program per random shape, about 3x
# faster to compile.
jit_fast_compile = functools.partial(jax.jit, compiler_options={
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True})


def free_port() -> int:
  """A TCP port on localhost that is free now (for the coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def require_cpu_collectives() -> None:
  """Skips the calling test where jaxlib has no CPU collectives (gloo)."""
  if not hasattr(xla_client._xla, "make_gloo_tcp_collectives"):  # pylint: disable=protected-access
    pytest.skip("this jaxlib has no CPU collectives (gloo), so a multi-process "
                "CPU run cannot communicate; the two-process check is skipped.")
