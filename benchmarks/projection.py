"""Projection P P^T g against the memory floor (two passes over P).

One jitted `Basis.project` reads P twice (P^T g, then P beta); its floor is
2 * bytes(P) / bandwidth, the bandwidth measured in the same rounds on an
array of float32 P's size (n x D floats): an XLA reduction (`jnp.sum`, one
read), an XLA copy (one read plus one write) and a numpy reduction; the best
of them is the floor used.

Sides, all storage dtypes (float32, bfloat16, int8, int4) alternated in the
same rounds for each n, so each dtype's time is also a paired ratio to the
first dtype's (``x_float32``, with the range over rounds; ``cpu_x_float32``:
the same ratio of the process' CPU time, steadier on a loaded machine):

* ``project_flat``: `basis.project` of a one-leaf tree (a flat vector);
* ``project_tree``: `basis.project` of a ~60-leaf ResNet-like tree of the
  same D (flatten and unflatten included);
* ``xla_flat`` (bfloat16, int8, int4): the flat product with XLA's blocks
  (`kernels.block_matvec`, `block_vecmat`), which run where the compiled
  kernels of `twa_jax.native` do not (no C++ compiler, TWA_JAX_NATIVE=0, or
  not on CPU); on CPU ``project_flat`` and ``project_tree`` use the kernels;
* the bandwidth probes ``reduce``, ``copy``, ``numpy_reduce``.

  python benchmarks/projection.py                  # D = 1e6, n in 10,100,300
  python benchmarks/projection.py --ns 100 --dtypes float32,bfloat16,int8,int4
  python benchmarks/projection.py --smoke
"""

from __future__ import annotations

import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from twa_jax import basis as basis_lib  # pylint: disable=wrong-import-position
from twa_jax import kernels  # pylint: disable=wrong-import-position
from twa_jax import quantization  # pylint: disable=wrong-import-position
from twa_jax.basis import Basis  # pylint: disable=wrong-import-position
from twa_jax.tree import ParamSpec  # pylint: disable=wrong-import-position


def resnet_like_tree(d: int, seed: int = 0) -> dict:
  """About 60 conv/bn/dense leaves whose sizes add up to exactly d."""
  rng = np.random.default_rng(seed)
  tree, used, i = {}, 0, 0
  while True:
    c = int(rng.choice([16, 32, 64]))
    kernel = (3, 3, c, c)
    size = 9 * c * c + 2 * c
    if used + size + 10 * 64 + 10 > d or i >= 19:
      break
    tree[f"block{i}"] = {
        "conv": {"kernel": np.zeros(kernel, np.float32)},
        "bn": {"scale": np.zeros((c,), np.float32),
               "bias": np.zeros((c,), np.float32)}}
    used += size
    i += 1
  rest = d - used - 10
  tree["head"] = {"kernel": np.zeros((rest,), np.float32),
                  "bias": np.zeros((10,), np.float32)}
  return jax.tree.map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32)), tree)


@jax.jit
def _project(basis: Basis, tree):
  return basis.project(tree)


@jax.jit
def _block_project(basis: Basis, flat: jax.Array) -> jax.Array:
  vectors = basis_lib.read(basis.vectors)
  flat = jnp.pad(flat, (0, vectors.shape[1] - flat.size))
  return kernels.block_vecmat(kernels.block_matvec(vectors, flat), vectors)


_reduce = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
_copy = jax.jit(lambda x: x + 1)  # a fused read-and-write pass


def measure(d: int, n: int, dtypes: list, repeats: int) -> list[dict]:
  """One row per storage dtype; all dtypes alternate in the same rounds."""
  tree = resnet_like_tree(d)
  flat_tree = {"w": jnp.concatenate([jnp.ravel(x) for x in
                                     jax.tree_util.tree_leaves(tree)])}
  bases, sides = {}, {}
  for dtype in dtypes:
    name = dtype if dtype in quantization.BITS else jnp.dtype(dtype).name
    tree_basis = common.random_basis(ParamSpec.of(tree), n, dtype, seed=n)
    flat_basis = Basis(tree_basis.vectors, ParamSpec.of(flat_tree), n)
    bases[name] = tree_basis
    sides[f"{name}/project_flat"] = functools.partial(
        _project, flat_basis, flat_tree)
    sides[f"{name}/project_tree"] = functools.partial(
        _project, tree_basis, tree)
    if name != "float32":
      sides[f"{name}/xla_flat"] = functools.partial(
          _block_project, flat_basis, flat_tree["w"])
      np.testing.assert_allclose(
          np.asarray(sides[f"{name}/xla_flat"]())[:d],
          np.asarray(sides[f"{name}/project_flat"]()["w"]), rtol=1e-4,
          atol=1e-4)
  # Bandwidth probes on an array of float32 P's size (n x D floats).
  probe_bytes = 4 * n * d
  probe = jnp.ones((probe_bytes // 4,), jnp.float32)
  probe_np = np.ones((probe_bytes // 4,), np.float32)
  sides.update({"reduce": lambda: _reduce(probe),
                "copy": lambda: _copy(probe),
                "numpy_reduce": lambda: probe_np.sum()})
  cpu = {name: [] for name in sides}
  def with_cpu(name, fn):
    def run():
      start = time.process_time()
      out = jax.block_until_ready(fn())
      cpu[name].append(time.process_time() - start)
      return out
    return run
  times = common.alternate(
      {name: with_cpu(name, fn) for name, fn in sides.items()}, repeats)
  cpu = {name: c[-repeats:] for name, c in cpu.items()}  # without the warmup
  # Bandwidths in bytes/s per round; each floor takes the round's best probe.
  bw = {"reduce": [probe_bytes / t for t in times["reduce"]],
        "copy": [2 * probe_bytes / t for t in times["copy"]],
        "numpy_reduce": [probe_bytes / t for t in times["numpy_reduce"]]}
  best = [max(b[r] for b in bw.values()) for r in range(repeats)]
  base = next(iter(bases))
  rows = []
  for name, basis in bases.items():
    floor = [2 * basis.nbytes / b for b in best]
    row = {"dtype": name, "n": n, "D": d, "P_MB": basis.nbytes / 2**20,
           "floor_ms": 1e3 * common.median(floor),
           **{f"bw_{k}_GBs": common.median(v) / 1e9 for k, v in bw.items()}}
    for s in ("project_flat", "project_tree", "xla_flat"):
      if f"{name}/{s}" in times:
        row[f"{s}_ms"] = 1e3 * common.median(times[f"{name}/{s}"])
        row[f"{s}_x_floor"] = common.ratio(times[f"{name}/{s}"], floor)
    for s in ("project_flat", "project_tree"):
      row[f"{s}_x_{base}"] = common.ratio(times[f"{name}/{s}"],
                                          times[f"{base}/{s}"])
      row[f"{s}_cpu_x_{base}"] = common.ratio(cpu[f"{name}/{s}"],
                                              cpu[f"{base}/{s}"])
      ratios = [a / b for a, b in zip(times[f"{name}/{s}"],
                                      times[f"{base}/{s}"])]
      row[f"{s}_x_{base}_range"] = [min(ratios), max(ratios)]
    if f"{name}/xla_flat" in times:
      row[f"xla_flat_x_{base}"] = common.ratio(times[f"{name}/xla_flat"],
                                               times[f"{base}/project_flat"])
    rows.append(row)
  return rows


def main(argv=None) -> None:
  p = common.parser("projection", __doc__.split("\n")[0])
  p.add_argument("--d", type=int, default=1_000_000)
  p.add_argument("--ns", default="10,100,300")
  p.add_argument("--dtypes", default="float32,bfloat16,int8,int4")
  args = p.parse_args(argv)
  if args.smoke:
    args.d, args.ns, args.repeats = 50_000, "4", 2
  dtypes = [dtype if dtype in quantization.BITS else jnp.dtype(dtype)
            for dtype in args.dtypes.split(",")]
  rows = []
  for n in map(int, args.ns.split(",")):
    rows += measure(args.d, n, dtypes, args.repeats)
    for row in rows[-len(dtypes):]:
      print(f"{row['dtype']} n={n}: project {row['project_flat_x_floor']:.2f}x"
            " floor", flush=True)
  base = rows[0]["dtype"]
  print(common.table(rows, [
      "dtype", "n", "P_MB", "floor_ms", "project_flat_ms",
      "project_flat_x_floor", f"project_flat_x_{base}",
      f"project_flat_cpu_x_{base}", "project_tree_ms", "project_tree_x_floor",
      f"project_tree_x_{base}", f"project_tree_cpu_x_{base}", "xla_flat_ms",
      f"xla_flat_x_{base}", "bw_reduce_GBs", "bw_copy_GBs",
      "bw_numpy_reduce_GBs"]))
  common.write_json(args.out, {"D": args.d, "repeats": args.repeats,
                               "rows": rows})


if __name__ == "__main__":
  main()
