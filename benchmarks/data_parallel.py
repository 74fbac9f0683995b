"""train.py's data-parallel step: collectives per step, 8 devices against 1.

Compiles train.py's step (`twa_jax.training.steps.make_train_step`) as every
phase runs it (`twa_jax.training.parallel`: state replicated over a mesh of
all devices, the global batch split along "data", one jitted step) and reads
the collectives from the HLO text (`hlo.collective_arrays`): how many
all-reduces carry the gradient (those holding a parameter's shape of two or
more axes, i.e. a kernel's gradient), how many synchronize batch-norm
statistics or metrics, and the elements all of them carry against the
parameter count D. Steps: SGD, and TWA with its basis of n snapshots
sharded over the mesh in the "params" and "basis" layouts
(`config.parallel.basis_layout`), whose projection adds its own collectives.
Also times each step on a mesh of 1 device and of all (simulated devices
share this machine's cores: the ratio shows the overhead of splitting, not
a speed-up).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python benchmarks/data_parallel.py --models mlp,cnn7
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import common
import hlo
import twa_jax
from twa_jax.training import models
from twa_jax.training import parallel
from twa_jax.training import steps

NUM_CLASSES = 10
SHAPES = {"mlp": (8, 8, 1)}  # digits; the others CIFAR-sized
N = 10  # snapshots spanning the TWA basis


def model_state(name: str, mesh: Mesh, tx_of) -> tuple:
  """(model, replicated state, tx) of a model at its initialization."""
  model = models.create_model(name, NUM_CLASSES)
  shape = SHAPES.get(name, (32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)),
                         train=False)
  tx = tx_of(variables["params"])
  state = steps.TrainState.create(variables["params"],
                                  variables.get("batch_stats", {}), tx)
  return model, parallel.replicate(state, mesh), tx, shape


def snapshots(params, n: int) -> list:
  """n random perturbations of `params` (a basis to project on)."""
  keys = jax.random.split(jax.random.PRNGKey(1), n)
  return [jax.tree.map(lambda p, k=k: p + 0.01 * jax.random.normal(
      k, p.shape, p.dtype), params) for k in keys]


def classify(hlo_text: str, params) -> dict:
  """All-reduces of a step: gradient ones, the others, elements carried."""
  kernels = {tuple(p.shape) for p in jax.tree.leaves(params) if p.ndim >= 2}
  found = hlo.collective_arrays(hlo_text)
  reduces = [arrays for op, arrays in found if op == "all-reduce"]
  gradient = [a for a in reduces if any(s in kernels for _, s in a)]
  return {
      "all_reduces": len(reduces),
      "gradient_all_reduces": len(gradient),
      "other_all_reduces": len(reduces) - len(gradient),
      "all_reduced_elements": int(sum(np.prod(s) for a in reduces
                                      for _, s in a)),
      "other_collectives": sorted({op for op, _ in found
                                   if op != "all-reduce"}),
  }


def run_model(name: str, batch: int, repeats: int) -> list[dict]:
  devices = jax.devices()
  meshes = {1: parallel.data_mesh(devices[:1]),
            len(devices): parallel.data_mesh()}
  rows = []
  for kind in ("sgd", "twa_params", "twa_basis"):
    sides, row = {}, {"model": name, "step": kind}
    for k, mesh in meshes.items():
      def tx_of(params, mesh=mesh):
        if kind == "sgd":
          return steps.base_optimizer("sgd", 0.1, momentum=0.9,
                                      weight_decay=1e-4)
        layout = kind.split("_")[1]
        basis = twa_jax.basis_from_snapshots(
            snapshots(params, N), mesh=mesh if mesh.size > 1 else None,
            layout=layout if mesh.size > 1 else "basis")
        return twa_jax.twa(basis, 0.1, momentum=0.9, weight_decay=1e-5)
      model, state, tx, shape = model_state(name, mesh, tx_of)
      step = steps.make_train_step(model, tx)
      rng = np.random.default_rng(0)
      data = parallel.global_batch({
          "image": rng.normal(size=(batch, *shape)).astype(np.float32),
          "label": rng.integers(0, NUM_CLASSES, batch).astype(np.int32)},
                                   mesh)
      metrics = parallel.replicate(steps.new_metrics(), mesh)
      text = step.lower(state, metrics, data).compile().as_text()
      if k > 1:
        row.update(classify(text, state.params), devices=k,
                   D=int(sum(p.size for p in jax.tree.leaves(state.params))))
      holder = {"state": state, "metrics": metrics}

      def one(step=step, holder=holder, data=data):
        holder["state"], holder["metrics"] = step(
            holder["state"], holder["metrics"], data)
        return holder["metrics"]["loss"]
      sides[k] = one
    times = common.alternate(sides, repeats)
    row.update({f"ms_{k}_devices": 1e3 * common.median(t)
                for k, t in times.items()},
               ratio=common.ratio(times[len(devices)], times[1]))
    rows.append(row)
  return rows


def main(argv=None) -> None:
  p = common.parser("data_parallel", __doc__.split("\n")[0])
  p.add_argument("--models", default="mlp,cnn7")
  p.add_argument("--batch", type=int, default=128)
  args = p.parse_args(argv)
  if args.smoke:
    args.models, args.batch, args.repeats = "mlp", 16, 2
  if jax.device_count() < 2:
    raise SystemExit("needs several devices, e.g. XLA_FLAGS="
                     "--xla_force_host_platform_device_count=8; XLA_FLAGS="
                     f"{os.environ.get('XLA_FLAGS')!r}")
  rows = [r for name in args.models.split(",")
          for r in run_model(name, args.batch, args.repeats)]
  cols = ["model", "step", "D", "devices", "all_reduces",
          "gradient_all_reduces", "other_all_reduces", "all_reduced_elements",
          "other_collectives", "ms_1_devices",
          f"ms_{jax.device_count()}_devices", "ratio"]
  print(common.table(rows, cols))
  common.write_json(args.out, {"environment": common.environment(),
                               "batch": args.batch, "rows": rows})


if __name__ == "__main__":
  main()
