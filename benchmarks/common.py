"""Shared helpers for the benchmarks: side-by-side timing, the PyTorch device,
peak memory, JSON, random bases.

Machines are noisy, so every comparison is made inside one run: the sides
are called in alternating order, each repeat times every side once, and the
report is the median of the repeats and the median of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from twa_jax import basis as basis_lib
from twa_jax import quantization
from twa_jax.basis import Basis
from twa_jax.tree import ParamSpec


def parser(name: str, description: str) -> argparse.ArgumentParser:
  """An argument parser with the flags every benchmark has.

  --out (default benchmarks/results/<name>.json), --smoke (tiny sizes, for
  the smoke tests) and --repeats.
  """
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--out", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results", f"{name}.json"))
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes and few repeats: checks that it runs")
  p.add_argument("--repeats", type=int, default=7)
  return p


def torch_device(mode: str) -> tuple[str | None, str]:
  """The PyTorch device matching JAX's, or None and the reason to skip."""
  if mode == "off":
    return None, "--torch off"
  # libgomp's spinning barriers make PyTorch 10-50x slower on a loaded or
  # shared CPU (measured here: 2.6 s against 40 ms per small_cnn step) and
  # steal cores from the next side; XLA's pool sleeps when idle. Set before
  # torch starts its OpenMP runtime; an explicit setting wins.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    if mode == "on":
      raise
    return None, "torch is not installed (pip install -e '.[bench]')"
  platform_name = jax.devices()[0].platform
  if platform_name == "cpu":
    torch.set_num_threads(os.cpu_count() or 1)  # XLA's CPU pool: one per core
    return "cpu", ""
  if platform_name == "gpu" and torch.cuda.is_available():
    return "cuda", ""
  reason = f"JAX runs on {platform_name} and torch has no matching device"
  if mode == "on":
    raise RuntimeError(reason)
  return None, reason


def timed(fn: Callable[[], Any]) -> float:
  """Seconds of one call of `fn`, waiting for its (JAX) result."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def alternate(sides: dict[str, Callable[[], Any]], repeats: int,
              warmup: int = 1) -> dict[str, list[float]]:
  """Times each side `repeats` times, rotating the order every repeat.

  Args:
    sides: name -> a function doing the work once (its result is waited for).
    repeats: timed rounds; each round calls every side once.
    warmup: untimed calls of each side first (compilation, caches).

  Returns:
    name -> list of seconds, one per round.
  """
  names = list(sides)
  for name in names:
    for _ in range(warmup):
      timed(sides[name])
  times = {name: [] for name in names}
  for r in range(repeats):
    k = r % len(names)
    for name in names[k:] + names[:k]:
      times[name].append(timed(sides[name]))
  return times


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


def ratio(num: Sequence[float], den: Sequence[float]) -> float:
  """Median of the per-round ratios num / den (paired: same round)."""
  return median([a / b for a, b in zip(num, den)])


def peak_rss_bytes() -> int:
  """Peak resident memory of this process so far.

  Linux: VmHWM from /proc/self/status. Not ru_maxrss, which a child started
  by a large parent inherits across fork+exec (it would read the parent's
  size).
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(argv: Sequence[str], timeout: float = 1800) -> dict:
  """Runs `python argv...` in a fresh process; returns the JSON it prints last.

  For peak-memory measurements: the child reports its own `peak_rss_bytes`
  (before and after the work) so that nothing in this process counts.
  """
  out = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                       timeout=timeout, check=False)
  if out.returncode != 0:
    raise RuntimeError(f"child {argv} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def environment() -> dict:
  """Date, command, machine and versions, for the JSON report."""
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
      "machine": platform.machine(),
      "cpus": os.cpu_count(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
  }


def write_json(path: str, report: dict) -> None:
  """Writes `report` (with `environment()` added) to `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"environment": environment(), **report}, f, indent=2)
  print(f"wrote {path}")


def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
  """A plain-text table of `rows` (dicts) with the given columns."""
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.3g}"
    return str(v)
  cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells))
            for i, c in enumerate(columns)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
  lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
  return "\n".join(lines)


def random_basis(spec: ParamSpec, n: int, dtype: str, seed: int) -> Basis:
  """A basis of n random (not orthonormal) rows of unit expected norm in
  storage `dtype`, for timing.

  Built row by row in place; "int8" / "int4" rows are quantized one at a
  time with `twa_jax.quantization.quantize`, so the process never holds a
  float32 P next to the low-bit one (a 6 GB one for VGG16 with n = 100
  left the int8 runs' steps 1.4x slower, SGD's included).
  """
  d = spec.num_params

  def row(key, i):
    return (jax.random.normal(jax.random.fold_in(key, i), (d,), jnp.float32)
            / np.sqrt(d))

  if dtype in quantization.BITS:
    store = lambda r: quantization.quantize(r[None], dtype)
  else:
    store = lambda r: r[None].astype(dtype)
  shapes = jax.eval_shape(store, jax.ShapeDtypeStruct((d,), jnp.float32))

  @jax.jit
  def rows(key):
    def body(i, p):
      return jax.tree.map(lambda a, r: a.at[i].set(r[0]), p, store(row(key, i)))
    zeros = jax.tree.map(lambda s: jnp.zeros((n, *s.shape[1:]), s.dtype),
                         shapes)
    return jax.lax.fori_loop(0, n, body, zeros)

  return Basis(basis_lib.to_refs(rows(jax.random.PRNGKey(seed))), spec, n)


def basis_bytes(n: int, d: int, dtype: str) -> int:
  """Bytes of `random_basis`'s P (codes, scales and offsets for low-bit)."""
  if dtype in quantization.BITS:
    groups = -(-d // quantization.GROUP)
    return n * groups * (quantization.GROUP * quantization.BITS[dtype] // 8 + 8)
  return n * d * jnp.dtype(dtype).itemsize
