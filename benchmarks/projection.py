"""Projection P P^T g against the memory floor (two passes over P).

One jitted `Basis.project` reads P twice (P^T g, then P beta); its floor is
2 * bytes(P) / bandwidth, the bandwidth measured in the same run on arrays of
P's size: an XLA reduction (`jnp.sum`, one read), an XLA copy (one read plus
one write) and a numpy reduction; the best of them is the floor used.

Sides, alternated, for each storage dtype (float32, bfloat16, int8, int4)
and n:

* ``project_flat``: `basis.project` of a one-leaf tree (a flat vector);
* ``project_tree``: `basis.project` of a ~60-leaf ResNet-like tree of the
  same D (flatten and unflatten included);
* ``mulsum_flat``: the two products written as multiply-and-reduce
  (`sum(P * g, axis=1)`, `sum(beta[:, None] * P, axis=0)`), a candidate
  formulation for storage dtypes the CPU dot handles slowly (float dtypes
  only);
* the bandwidth probes ``reduce``, ``copy``, ``numpy_reduce``.

  python benchmarks/projection.py                  # D = 1e6, n in 10,100,300
  python benchmarks/projection.py --ns 100 --dtypes float32,bfloat16,int8,int4
  python benchmarks/projection.py --smoke
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from twa_jax import quantization  # pylint: disable=wrong-import-position
from twa_jax import basis as basis_lib  # pylint: disable=wrong-import-position
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


def random_basis(tree, n: int, dtype) -> Basis:
  """A basis with random (not orthonormal) rows: timing only."""
  spec = ParamSpec.of(tree)
  key = jax.random.key(n)
  vectors = jax.random.normal(key, (n, spec.num_params), jnp.float32)
  vectors = vectors / np.sqrt(spec.num_params)
  if dtype in quantization.BITS:
    return Basis(basis_lib.to_refs(quantization.quantize(vectors, dtype)),
                 spec, n)
  return Basis(basis_lib.to_refs(vectors.astype(dtype)), spec, n)


@jax.jit
def _project(basis: Basis, tree):
  return basis.project(tree)


@jax.jit
def _mulsum(ref: jax.Ref, flat: jax.Array) -> jax.Array:
  vectors = ref[...]
  beta = jnp.sum(vectors * flat.astype(vectors.dtype)[None, :], axis=1,
                 dtype=jnp.float32)
  return jnp.sum(beta.astype(vectors.dtype)[:, None] * vectors, axis=0,
                 dtype=jnp.float32)


_reduce = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
_copy = jax.jit(lambda x: x + 1)  # a fused read-and-write pass


def measure(d: int, n: int, dtype, repeats: int) -> dict:
  tree = resnet_like_tree(d)
  flat_tree = {"w": jnp.concatenate([jnp.ravel(x) for x in
                                     jax.tree_util.tree_leaves(tree)])}
  tree_basis = random_basis(tree, n, dtype)
  flat_basis = Basis(tree_basis.vectors, ParamSpec.of(flat_tree), n)
  p_bytes = tree_basis.nbytes
  probe = jnp.ones((p_bytes // 4,), jnp.float32)  # P's bytes, as float32
  probe_np = np.ones((p_bytes // 4,), np.float32)
  low_bit = dtype in quantization.BITS
  sides = {
      "project_flat": lambda: _project(flat_basis, flat_tree),
      "project_tree": lambda: _project(tree_basis, tree),
      "reduce": lambda: _reduce(probe),
      "copy": lambda: _copy(probe),
      "numpy_reduce": lambda: probe_np.sum(),
  }
  if not low_bit:
    sides["mulsum_flat"] = lambda: _mulsum(flat_basis.vectors, flat_tree["w"])
  times = common.alternate(sides, repeats)
  # Bandwidths in bytes/s per round; the floor takes the best probe.
  bw = {"reduce": [p_bytes / t for t in times["reduce"]],
        "copy": [2 * p_bytes / t for t in times["copy"]],
        "numpy_reduce": [p_bytes / t for t in times["numpy_reduce"]]}
  floor = [2 * p_bytes / max(b[r] for b in bw.values())
           for r in range(repeats)]
  if not low_bit:  # the candidate computes the same thing
    np.testing.assert_allclose(
        np.asarray(_mulsum(flat_basis.vectors, flat_tree["w"])),
        np.asarray(_project(flat_basis, flat_tree)["w"]),
        rtol=2e-2 if dtype == jnp.bfloat16 else 1e-4, atol=1e-3)
  row = {"dtype": dtype if low_bit else jnp.dtype(dtype).name, "n": n,
         "D": d, "P_MB": p_bytes / 2**20,
         "floor_ms": 1e3 * common.median(floor),
         **{f"bw_{k}_GBs": common.median(v) / 1e9 for k, v in bw.items()}}
  for s in ("project_flat", "project_tree", "mulsum_flat")[:3 - low_bit]:
    row[f"{s}_ms"] = 1e3 * common.median(times[s])
    row[f"{s}_x_floor"] = common.ratio(times[s], floor)
  return row


def main(argv=None) -> None:
  p = common.parser("projection", __doc__.split("\n")[0])
  p.add_argument("--d", type=int, default=1_000_000)
  p.add_argument("--ns", default="10,100,300")
  p.add_argument("--dtypes", default="float32,bfloat16,int8,int4")
  args = p.parse_args(argv)
  if args.smoke:
    args.d, args.ns, args.repeats = 50_000, "4", 2
  rows = []
  for dtype in args.dtypes.split(","):
    for n in map(int, args.ns.split(",")):
      rows.append(measure(args.d, n, dtype if dtype in quantization.BITS
                          else jnp.dtype(dtype), args.repeats))
      print(f"{dtype} n={n}: project {rows[-1]['project_flat_x_floor']:.2f}x "
            "floor", flush=True)
  print(common.table(rows, [
      "dtype", "n", "P_MB", "floor_ms", "project_flat_ms",
      "project_flat_x_floor", "project_tree_ms", "project_tree_x_floor",
      "mulsum_flat_ms", "mulsum_flat_x_floor", "bw_reduce_GBs", "bw_copy_GBs",
      "bw_numpy_reduce_GBs"]))
  common.write_json(args.out, {"D": args.d, "repeats": args.repeats,
                               "rows": rows})


if __name__ == "__main__":
  main()
