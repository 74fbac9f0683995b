"""Sharded TWA on k = 1, 2, 4, 8 simulated CPU devices: memory, bytes, time.

For each layout ("basis": the paper's scheme, whole basis vectors per
device; "params": a D/k column slice of every vector) and mesh size k:

* memory: elements of P per device, read from the arrays' shard shapes,
  against ceil(n/k) x D (basis) and n x ceil(D/k) (params);
* communication: the collectives of one compiled data-parallel TWA step
  (batch sharded over the mesh, parameters replicated, `twa.twa`) and of
  the projection alone, read from the compiled HLO; per-device wire bytes
  estimated as for ring algorithms (all-reduce 2(k-1)/k S, all-gather and
  all-to-all (k-1)/k S, permute S, for a result of S bytes); the paper's
  scheme is the gradient all-reduce of D floats plus one of D floats;
* time: one jitted projection of a ResNet-like tree, the sides alternated,
  against the unsharded basis. The simulated devices share this machine's
  cores, so this measures overhead, not a speed-up.

  python benchmarks/sharding.py                # D = 1e6, n = 100
  python benchmarks/sharding.py --smoke
"""

from __future__ import annotations

import functools
import itertools
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import hlo  # pylint: disable=g-import-not-at-top,wrong-import-position
import projection  # pylint: disable=g-import-not-at-top,wrong-import-position

import twa_jax as twa  # pylint: disable=g-import-not-at-top,wrong-import-position
from twa_jax import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from twa_jax.tree import ParamSpec  # pylint: disable=g-import-not-at-top,wrong-import-position

KS = (1, 2, 4, 8)
LAYOUTS = ("basis", "params")
BATCH = 16


def trajectory(n: int, d: int, seed: int = 0) -> np.ndarray:
  """n x D float32 snapshots along a random-walk trajectory."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(d, dtype=np.float32)
  out = np.empty((n, d), np.float32)
  for i in range(n):
    w += rng.standard_normal(d, dtype=np.float32) * np.float32(0.02)
    out[i] = w
  return out


def mesh_of(k: int) -> jax.sharding.Mesh:
  return jax.make_mesh((k,), ("x",), devices=jax.devices()[:k],
                       axis_types=(jax.sharding.AxisType.Auto,))


def wire_bytes(op: str, nbytes: int, k: int) -> float:
  """Per-device bytes sent by a ring implementation of `op` (result S)."""
  if k == 1:
    return 0.0
  return {"all-reduce": 2 * (k - 1) / k, "all-gather": (k - 1) / k,
          "all-to-all": (k - 1) / k, "reduce-scatter": k - 1,
          "collective-permute": 1.0}[op] * nbytes


def _loss(params, batch):
  """Least squares on per-leaf features: the gradient needs every example."""
  x, y = batch
  pred = sum(jnp.tensordot(xl, leaf, axes=leaf.ndim)
             for xl, leaf in zip(jax.tree.leaves(x), jax.tree.leaves(params)))
  return jnp.mean((pred - y) ** 2)


@functools.partial(jax.jit, static_argnums=0)
def _step(tx, params, opt_state, batch):
  grads = jax.grad(_loss)(params, batch)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def communication(basis: twa.Basis, tree, k: int) -> dict:
  """Collectives of one compiled DP TWA step and of the projection alone."""
  mesh = basis.layout.mesh
  tx = twa.twa(basis, 0.1)
  params = jax.device_put(tree, NamedSharding(mesh, P()))
  opt_state = tx.init(params)
  def examples(shape, dtype):
    return jax.ShapeDtypeStruct((BATCH, *shape), dtype,
                                sharding=NamedSharding(mesh, P("x")))
  batch = (jax.tree.map(lambda l: examples(l.shape, l.dtype), tree),
           examples((), jnp.float32))
  out = {}
  for name, fn, args in (
      ("step", _step, (tx, params, opt_state, batch)),
      ("project", jax.jit(lambda b, g: b.project(g)), (basis, params))):
    found = hlo.collectives(fn.lower(*args).compile().as_text())
    out[name] = {
        "collectives": [list(c) for c in found],
        "payload_bytes": sum(b for _, _, b in found),
        "wire_bytes": sum(wire_bytes(op, b, k) for op, _, b in found),
    }
  return out


def main(argv=None) -> None:
  p = common.parser("sharding", __doc__.split("\n")[0])
  p.add_argument("--d", type=int, default=1_000_000)
  p.add_argument("--n", type=int, default=100)
  p.add_argument("--storage", default="float32",
                 help="comma-separated basis storage: float32, bfloat16, "
                 "int8, int4")
  args = p.parse_args(argv)
  if args.smoke:
    args.d, args.n, args.repeats = 1003, 7, 2
  if jax.device_count() < max(KS):
    raise SystemExit(f"needs {max(KS)} devices; XLA_FLAGS={os.environ['XLA_FLAGS']!r}")
  tree = projection.resnet_like_tree(args.d)
  spec = ParamSpec.of(tree)
  d, n = spec.num_params, args.n
  w = trajectory(n, d)
  g = jax.tree.map(lambda l: jnp.asarray(np.random.default_rng(1).standard_normal(
      l.shape, dtype=np.float32)), tree)
  plain = twa.basis_from_matrix(spec, w.copy())
  paper_wire = {k: 2 * wire_bytes("all-reduce", 4 * d, k) for k in KS}

  rows, sides = [], {"unsharded": lambda: _project(plain, g)}
  for storage, layout, k in itertools.product(args.storage.split(","),
                                              LAYOUTS, KS):
    basis = twa.basis_from_matrix(
        spec, w.copy(), mesh=mesh_of(k), layout=layout,
        dtype=storage if storage in ("int8", "int4") else jnp.dtype(storage))
    # A quantized basis: codes, scales and offsets (shard shape: codes').
    shards = [x.addressable_shards[0].data
              for x in jax.tree.leaves(basis.read_vectors())]
    promised = ((-(-basis.dim // k), d) if layout == "basis"
                else (basis.dim, -(-d // k)))
    comm = communication(basis, tree, k)
    rows.append({
        "storage": storage, "layout": layout, "k": k, "n": basis.dim,
        "D": d, "shard_shape": list(shards[0].shape),
        "promised_shape": list(promised),
        "P_MB_per_device": sum(x.nbytes for x in shards) / 1e6,
        "step_payload_MB": comm["step"]["payload_bytes"] / 1e6,
        "step_wire_MB": comm["step"]["wire_bytes"] / 1e6,
        "paper_wire_MB": paper_wire[k] / 1e6,
        "project_wire_MB": comm["project"]["wire_bytes"] / 1e6,
        "step_collectives": comm["step"]["collectives"],
        "project_collectives": comm["project"]["collectives"],
    })
    g_k = jax.device_put(g, NamedSharding(basis.layout.mesh, P()))
    sides[f"{storage}_{layout}_k{k}"] = (
        lambda b=basis, x=g_k: _project(b, x))
  times = common.alternate(sides, args.repeats)
  for row in rows:
    name = f"{row['storage']}_{row['layout']}_k{row['k']}"
    row["project_ms"] = 1e3 * common.median(times[name])
    row["project_x_unsharded"] = common.ratio(times[name], times["unsharded"])
  print(f"D = {d}, n = {n}; unsharded projection "
        f"{1e3 * common.median(times['unsharded']):.3g} ms")
  print(common.table(rows, [
      "storage", "layout", "k", "shard_shape", "promised_shape", "P_MB_per_device",
      "step_wire_MB", "paper_wire_MB", "project_wire_MB", "project_ms",
      "project_x_unsharded"]))
  common.write_json(args.out, {
      "D": d, "n": n, "repeats": args.repeats,
      "unsharded_project_ms": 1e3 * common.median(times["unsharded"]),
      "rows": rows})


_project = jax.jit(lambda basis, tree: basis.project(tree))


if __name__ == "__main__":
  main()
