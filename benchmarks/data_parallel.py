"""train.py's data-parallel step: collectives per step, 8 devices against 1.

Compiles train.py's step (`twa_jax.training.steps.make_train_step`) as every
phase runs it (`twa_jax.training.parallel`: the state placed on a mesh of
all devices by `state_sharding`, replicated or split FSDP-style as
`config.parallel.param_sharding` says, the global batch split along "data",
one jitted step) and reads the collectives from the HLO text
(`hlo.collective_arrays`): the all-reduces, reduce-scatters and all-gathers
and the elements each kind carries against the parameter count D, and which
reductions carry the gradient (`classify`: those of the backward pass
holding a kernel's, or with FSDP a kernel shard's, shape; the others
synchronize batch-norm statistics, metrics or activations). Steps: SGD, and
TWA with its basis of n snapshots sharded over the mesh in the "params" and
"basis" layouts (`config.parallel.basis_layout`), whose projection adds its
own collectives. Also times each step on a mesh of 1 device and of all
(simulated devices share this machine's cores: the ratio shows the overhead
of splitting, not a speed-up).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python benchmarks/data_parallel.py --models mlp,cnn7
"""

from __future__ import annotations

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import common
import hlo
import twa_jax
from twa_jax.training import configuration
from twa_jax.training import models
from twa_jax.training import parallel
from twa_jax.training import steps

NUM_CLASSES = 10
SHAPES = {"mlp": (8, 8, 1)}  # digits; the others CIFAR-sized
N = 10  # snapshots spanning the TWA basis


def model_state(name: str, mesh: Mesh, tx_of, param_sharding: str) -> tuple:
  """(model, state, tx, input shape) of a model at its initialization, the
  state placed on `mesh` as train.py places it (`parallel.state_sharding`)."""
  model = models.create_model(name, NUM_CLASSES)
  shape = SHAPES.get(name, (32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)),
                         train=False)
  tx = tx_of(variables["params"])
  state = steps.TrainState.create(variables["params"],
                                  variables.get("batch_stats", {}), tx)
  state = jax.device_put(state, parallel.state_sharding(state, mesh,
                                                        param_sharding))
  return model, state, tx, shape


def snapshots(params, n: int) -> list:
  """n random perturbations of `params` (a basis to project on)."""
  keys = jax.random.split(jax.random.PRNGKey(1), n)
  return [jax.tree.map(lambda p, k=k: p + 0.01 * jax.random.normal(
      k, p.shape, p.dtype), params) for k in keys]


def carried(collectives: list[hlo.Collective]) -> int:
  """The elements `collectives` carry, all together."""
  return int(sum(np.prod(s) for c in collectives for _, s in c.arrays))


def classify(hlo_text: str, params, shardings) -> dict:
  """The collectives of a step by kind, and which carry the gradient.

  A gradient reduction is an all-reduce or reduce-scatter of the backward
  pass (its op_name holds "transpose(jvp(") carrying an array shaped as a
  kernel (a parameter of two or more axes) or as the kernel's shard on
  `shardings`, in any axis order (XLA may reduce a dense kernel's gradient
  transposed).

  Args:
    hlo_text: the compiled step.
    params: the parameters (arrays or shapes).
    shardings: their shardings (`parallel.state_sharding`).

  Returns:
    Per op, its count and the elements it carries ("all_reduces",
    "all_reduced_elements", "all_gathers", ..., "reduce_scatters", ...);
    "gradient_all_reduces" and "gradient_reduce_scatters" (with the
    others: "other_all_reduces"); "kernels", the parameters of two or more
    axes, and "kernel_gradients_reduced", the kernel-shaped arrays the
    gradient reductions carry (the kernels count when each kernel's
    gradient is reduced once); "other_collectives", the further ops and
    how many of each, and "other_collective_elements", what they carry.
  """
  kernels = [(p, s) for p, s in zip(jax.tree.leaves(params),
                                     jax.tree.leaves(shardings)) if p.ndim >= 2]
  shapes = {tuple(sorted(shape)) for p, s in kernels
            for shape in (p.shape, s.shard_shape(p.shape))}
  found = hlo.collective_arrays(hlo_text)
  row = {"kernels": len(kernels), "kernel_gradients_reduced": 0}
  for op, count, elements in (
      ("all-reduce", "all_reduces", "all_reduced_elements"),
      ("all-gather", "all_gathers", "all_gathered_elements"),
      ("reduce-scatter", "reduce_scatters", "reduce_scattered_elements")):
    ops = [c for c in found if c.op == op]
    row[count] = len(ops)
    row[elements] = carried(ops)
    if op != "all-gather":
      gradient = [n for n in (
          sum(tuple(sorted(s)) in shapes for _, s in c.arrays)
          for c in ops if "transpose(jvp(" in c.op_name) if n]
      row[f"gradient_{count}"] = len(gradient)
      row["kernel_gradients_reduced"] += sum(gradient)
  others = [c for c in found if c.op not in (
      "all-reduce", "all-gather", "reduce-scatter")]
  row.update(other_all_reduces=row["all_reduces"]
             - row["gradient_all_reduces"],
             other_collectives=dict(sorted(collections.Counter(
                 c.op for c in others).items())),
             other_collective_elements=carried(others))
  return row


def run_model(name: str, batch: int, repeats: int,
              param_shardings: list[str]) -> list[dict]:
  """The rows of model `name`: each step with each parameter sharding."""
  devices = jax.devices()
  meshes = {1: parallel.data_mesh(devices[:1]),
            len(devices): parallel.data_mesh()}
  rows = []
  for kind in ("sgd", "twa_params", "twa_basis"):
    for param_sharding in param_shardings:
      rows.append(run_step(name, kind, param_sharding, meshes, batch,
                           repeats))
  return rows


def run_step(name: str, kind: str, param_sharding: str, meshes: dict,
             batch: int, repeats: int) -> dict:
  """One row: a step's collectives on the largest mesh, its times on each."""
  sides, row = {}, {"model": name, "step": kind,
                    "param_sharding": param_sharding}
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
    model, state, tx, shape = model_state(name, mesh, tx_of, param_sharding)
    step = steps.make_train_step(model, tx)
    rng = np.random.default_rng(0)
    data = parallel.global_batch({
        "image": rng.normal(size=(batch, *shape)).astype(np.float32),
        "label": rng.integers(0, NUM_CLASSES, batch).astype(np.int32)},
                                 mesh)
    metrics = parallel.replicate(steps.new_metrics(), mesh)
    text = step.lower(state, metrics, data).compile().as_text()
    if k > 1:
      row.update(classify(text, state.params, jax.tree.map(
          lambda p: p.sharding, state.params)), devices=k,
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
             ratio=common.ratio(times[max(meshes)], times[1]))
  return row


def main(argv=None) -> None:
  p = common.parser("data_parallel", __doc__.split("\n")[0])
  p.add_argument("--models", default="mlp,cnn7")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--param-shardings", default="replicated,fsdp",
                 help="comma-separated config.parallel.param_sharding values")
  args = p.parse_args(argv)
  if args.smoke:
    args.models, args.batch, args.repeats = "mlp", 16, 2
  param_shardings = args.param_shardings.split(",")
  for ps in param_shardings:
    if ps not in configuration.PARAM_SHARDINGS:
      raise SystemExit(f"--param-shardings: {ps!r} is not one of "
                       f"{configuration.PARAM_SHARDINGS}")
  if jax.device_count() < 2:
    raise SystemExit("needs several devices, e.g. XLA_FLAGS="
                     "--xla_force_host_platform_device_count=8; XLA_FLAGS="
                     f"{os.environ.get('XLA_FLAGS')!r}")
  rows = [r for name in args.models.split(",")
          for r in run_model(name, args.batch, args.repeats, param_shardings)]
  cols = ["model", "step", "param_sharding", "D", "devices", "all_reduces",
          "gradient_all_reduces", "other_all_reduces", "all_reduced_elements",
          "reduce_scatters", "gradient_reduce_scatters",
          "reduce_scattered_elements", "all_gathers", "all_gathered_elements",
          "kernels", "kernel_gradients_reduced", "other_collectives",
          "other_collective_elements",
          "ms_1_devices", f"ms_{jax.device_count()}_devices", "ratio"]
  print(common.table(rows, cols))
  common.write_json(args.out, {"environment": common.environment(),
                               "batch": args.batch, "rows": rows})


if __name__ == "__main__":
  main()
