"""Step overhead of TWA over plain SGD, JAX and PyTorch side by side.

Issue 7, items 1-2 (and the step part of item 8). For every model and number
of basis vectors n, one run alternates these sides on the same model, batch
and basis (`common.alternate`: the order rotates each repeat) and keeps the
median seconds per call:

  jax_sgd        `twa_jax.training.steps.make_train_step` (train.py's step:
                 jitted, state donated) with momentum SGD + weight decay
  jax_twa        the same step with `twa_jax.twa(basis, lr)`: projection + SGD
  jax_project    `basis.project(grads)` alone: flatten, P^T g, P beta, unflatten
  jax_project_flat  the same on a one-leaf tree: the two products alone
  copy           in-place `x + 1` on min(|P|, 1 GiB): the device's copy bandwidth
  torch_sgd      PyTorch twin model, `torch.optim.SGD` (momentum, weight decay)
  torch_twa      the paper's reference code: flatten grads, two `torch.mm`,
                 write back into `.grad`, SGD step
  torch_project  that projection alone

Reported: the TWA/SGD step ratio of each framework (the paper's figure is
1.02) as three estimates (see `summarize`), the projection times, and the projection
bandwidth 2 |P| / time against the copy bandwidth (2 |buffer| / time). P is n
random rows (timing does not depend on their values, and a random basis
avoids an orthonormalization per configuration); PyTorch gets a copy of the
same rows (DLPack cannot export a jax.Ref). Combinations whose P exceeds --max-basis-gb are
skipped and listed.

  python benchmarks/step_overhead.py --models small_cnn,resnet20,vgg16 \
      --ns 10,100,300 --batch 32

With --loops, the steps as users write them instead, on an MLP (--widths;
default D = 4.2M), each with SGD and with TWA, all alternating in one run:
`jit` (a plain `jax.jit` step returning params and optimizer state, no
donation), `donated` (the same with both donated), `train_state` (flax
`TrainState.apply_gradients` under `jax.jit`), `nnx` (`nnx.Optimizer` under
`nnx.jit`) and `torch` (the reference style). Each TWA step closes over the
basis; each state starts on the device, as in the README's loops. The report
gives each style's TWA/SGD ratio.

  python benchmarks/step_overhead.py --loops --ns 100 --batch 128
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx
from flax.training import train_state

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import twa_jax  # pylint: disable=wrong-import-position
from twa_jax.training import models  # pylint: disable=wrong-import-position
from twa_jax.training import steps  # pylint: disable=wrong-import-position

PyTree = Any

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
COPY_MAX_ELEMENTS = 1 << 28  # 1 GiB of float32: far beyond any cache


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = common.parser("step_overhead", __doc__.split("\n\n")[0])
  p.add_argument("--models", default="small_cnn,resnet20,vgg16",
                 help="comma-separated names from twa_jax.training.models")
  p.add_argument("--ns", default="10,100,300",
                 help="comma-separated numbers of basis vectors")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--max-basis-gb", type=float, default=12.0,
                 help="skip (model, n) whose P needs more memory than this")
  p.add_argument("--basis-dtype", default="float32",
                 choices=("float32", "bfloat16", "int8", "int4"),
                 help="storage of P on the JAX side (with --loops too; the "
                      "PyTorch reference keeps P in float32)")
  p.add_argument("--torch", default="auto", choices=("auto", "on", "off"),
                 help="the PyTorch side: auto runs it when torch imports")
  p.add_argument("--warmup", type=int, default=3,
                 help="untimed calls of each side before the timed rounds "
                      "(XLA:CPU's first steps run slower)")
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--momentum", type=float, default=0.9)
  p.add_argument("--weight-decay", type=float, default=5e-4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--loops", action="store_true",
                 help="instead of the model rows: the steps as users write "
                      "them (plain jit, donated jit, TrainState, nnx.jit + "
                      "nnx.Optimizer, PyTorch) on an MLP, TWA/SGD of each")
  p.add_argument("--widths", default="1024,2048,1024,10",
                 help="--loops: MLP input, hidden and output widths "
                      "(default D = 4,207,626)")
  args = p.parse_args(argv)
  if args.smoke:  # small_cnn, n = 3, batch 4, 2 repeats
    args.models, args.ns, args.batch, args.repeats = "small_cnn", "3", 4, 2
    args.warmup = 1
    args.widths = "32,64,10"
  args.models = [m for m in args.models.split(",") if m]
  args.widths = [int(w) for w in args.widths.split(",") if w]
  if len(args.widths) < 2 or min(args.widths) < 1:
    p.error(f"--widths: need two or more positive integers, got {args.widths}")
  args.ns = [int(n) for n in args.ns.split(",") if n]
  unknown = [m for m in args.models if m not in models.MODEL_NAMES]
  if unknown:
    p.error(f"--models: unknown {unknown}; known: {', '.join(models.MODEL_NAMES)}")
  if not args.ns or min(args.ns) < 1:
    p.error(f"--ns: need positive integers, got {args.ns}")
  if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
    p.error("--batch and --repeats must be positive, --warmup not negative")
  return args


def num_params(name: str) -> int:
  """Parameter count of a model from `twa_jax.training.models`, not built."""
  model = models.create_model(name, NUM_CLASSES)
  key = jax.random.PRNGKey(0)
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          {"params": key, "dropout": key},
                          jnp.zeros((1,) + IMAGE_SHAPE))
  return sum(leaf.size for leaf in jax.tree.leaves(shapes["params"]))


def on_device(tree: PyTree) -> PyTree:
  """`tree` committed to the default device: a TWA step then compiles once
  (README, "TWA in your own loop")."""
  return jax.device_put(tree, jax.devices()[0])


class Trainer:
  """Steps of `twa_jax.training.steps.make_train_step` (what train.py runs)
  on a private copy of the model state; state and metrics are donated, and
  put on the device first, as train.py does (one compile, README)."""

  def __init__(self, side: JaxSide, tx: optax.GradientTransformation,
               basis: twa_jax.Basis | None = None):
    self.step = steps.make_train_step(side.model, tx, seed=side.args.seed)
    self._basis = basis
    params, batch_stats = jax.tree.map(jnp.copy, (side.params,
                                                  side.batch_stats))
    self.state, self.metrics = on_device(
        (steps.TrainState.create(params, batch_stats, tx), steps.new_metrics()))
    self.batch = side.batch

  def __call__(self) -> steps.TrainState:
    self.state, self.metrics = self.step(self.state, self.metrics, self.batch)
    return self.state

  def basis(self) -> twa_jax.Basis:
    """The basis the TWA step closes over (the optimizer state holds no P)."""
    return self._basis


class JaxSide:
  """One Flax model, its batch, and the SGD / TWA / projection callables."""

  def __init__(self, name: str, batch: int, args: argparse.Namespace):
    self.args = args
    self.model = models.create_model(name, NUM_CLASSES)
    rng = np.random.default_rng(args.seed)
    self.x_np = rng.standard_normal((batch,) + IMAGE_SHAPE).astype(np.float32)
    self.y_np = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
    self.batch = {"image": jnp.asarray(self.x_np),
                  "label": jnp.asarray(self.y_np)}
    key = jax.random.PRNGKey(args.seed)
    variables = jax.jit(functools.partial(self.model.init, train=False))(
        {"params": key, "dropout": key}, self.batch["image"])
    self.params, self.batch_stats = variables["params"], variables["batch_stats"]
    self.spec = twa_jax.ParamSpec.of(self.params)
    self.sgd = steps.base_optimizer("sgd", args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
    self.project = jax.jit(lambda basis, tree: basis.project(tree))

  def twa(self, basis: twa_jax.Basis) -> optax.GradientTransformation:
    return twa_jax.twa(basis, self.args.lr, momentum=self.args.momentum,
                       weight_decay=self.args.weight_decay)

  def loss(self, params: PyTree) -> jax.Array:
    """Training loss on the batch (batch statistics of the batch itself)."""
    logits, _ = self.model.apply(
        {"params": params, "batch_stats": self.batch_stats},
        self.batch["image"], train=True, mutable=["batch_stats"],
        rngs={"dropout": jax.random.PRNGKey(self.args.seed)})
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, self.batch["label"]).mean()

  def grads(self) -> PyTree:
    return jax.jit(jax.grad(self.loss))(self.params)

  def sides(self, basis: twa_jax.Basis
            ) -> tuple[dict[str, Callable[[], object]], Trainer, int]:
    """The JAX sides, the TWA trainer (it owns P) and the copy's bytes."""
    grads = self.grads()
    flat = self.spec.ravel(grads)
    flat_spec = twa_jax.ParamSpec.of(flat)
    sgd, twa = Trainer(self, self.sgd), Trainer(self, self.twa(basis), basis)
    copy_elements = min(basis.nbytes // 4, COPY_MAX_ELEMENTS)
    buffer = [jnp.zeros((copy_elements,), jnp.float32)]
    increment = jax.jit(lambda b: b + 1.0, donate_argnums=0)

    def copy_side():
      buffer[0] = increment(buffer[0])
      return buffer[0]

    def project_flat():
      b = twa.basis()
      return self.project(twa_jax.Basis(b.vectors, flat_spec, b.dim), flat)

    return {
        "jax_sgd": sgd,
        "jax_twa": twa,
        "jax_project": lambda: self.project(twa.basis(), grads),
        "jax_project_flat": project_flat,
        "copy": copy_side,
    }, twa, 4 * copy_elements


class TorchSide:
  """The PyTorch twin of a `JaxSide`: same batch, the reference TWA step."""

  def __init__(self, name: str, jax_side: JaxSide, args: argparse.Namespace,
               device: str):
    import torch  # pylint: disable=g-import-not-at-top
    import torch_reference  # pylint: disable=g-import-not-at-top
    self.torch, self.ref, self.device = torch, torch_reference, device
    torch.manual_seed(args.seed)
    self.model = torch_reference.create_model(name, NUM_CLASSES).to(device)
    self.model.train()
    self.x = torch.from_numpy(jax_side.x_np.transpose(0, 3, 1, 2).copy()).to(device)
    self.y = torch.from_numpy(jax_side.y_np.astype(np.int64)).to(device)
    self.args = args
    torch_reference.train_step(self.model, self.optimizer(self.model),
                               self.x, self.y)  # fills .grad

  def optimizer(self, model):
    return self.torch.optim.SGD(model.parameters(), lr=self.args.lr,
                                momentum=self.args.momentum,
                                weight_decay=self.args.weight_decay)

  def sync(self):
    if self.device == "cuda":
      self.torch.cuda.synchronize()

  def sides(self, trainer: Trainer) -> dict[str, Callable[[], None]]:
    """PyTorch sides with their own copy of the JAX TWA trainer's P (the
    basis keeps P in `jax.Ref`s, which DLPack cannot export)."""
    sgd_model, twa_model = copy.deepcopy(self.model), copy.deepcopy(self.model)
    sgd_opt, twa_opt = self.optimizer(sgd_model), self.optimizer(twa_model)
    p = self.torch.from_dlpack(trainer.basis().read_vectors())
    vectors = lambda: p

    def sgd():
      self.ref.train_step(sgd_model, sgd_opt, self.x, self.y)
      self.sync()

    def twa():
      self.ref.train_step(twa_model, twa_opt, self.x, self.y, vectors())
      self.sync()

    def project():
      self.ref.project_grads(self.model, vectors())
      self.sync()

    return {"torch_sgd": sgd, "torch_twa": twa, "torch_project": project}


def run(args: argparse.Namespace, report: dict) -> None:
  """Fills report["results"] / ["skipped"], saving it after every row."""
  device, torch_note = common.torch_device(args.torch)
  if device and args.basis_dtype != "float32":
    device, torch_note = None, "the reference code stores P in float32"
  report.update(results=[], skipped=[],
                torch={"device": device, "note": torch_note,
                       "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")})
  if torch_note:
    print(f"PyTorch side skipped: {torch_note}", flush=True)
  print("medians; TWA/SGD step (paper: 1.02): ratio = per round, min = of the "
        "fastest steps, parts = 1 + proj/sgd; GB/s = 2 |P| / proj\n" + HEADER,
        flush=True)
  for name in args.models:
    jside = JaxSide(name, args.batch, args)
    tside = TorchSide(name, jside, args, device) if device else None
    d = jside.spec.num_params
    if tside and tside.ref.num_params(tside.model) != d:
      raise RuntimeError(f"{name}: the PyTorch twin has "
                         f"{tside.ref.num_params(tside.model)} parameters, "
                         f"the Flax model {d}")
    for n in args.ns:
      need_gb = common.basis_bytes(n, d, args.basis_dtype) / 1e9
      if need_gb > args.max_basis_gb:
        report["skipped"].append({
            "model": name, "n": n, "basis_gb": round(need_gb, 2),
            "reason": f"P needs {need_gb:.1f} GB > --max-basis-gb "
                      f"{args.max_basis_gb}"})
        print(f"skip {name} n={n}: P needs {need_gb:.1f} GB", flush=True)
        continue
      basis = common.random_basis(jside.spec, n, args.basis_dtype, args.seed)
      basis_gb = basis.nbytes / 1e9
      sides, trainer, copy_bytes = jside.sides(basis)
      del basis  # the TWA trainer's state owns P from here on
      if tside:
        sides.update(tside.sides(trainer))
      times = common.alternate(sides, args.repeats, args.warmup)
      del sides, trainer
      report["results"].append(summarize(name, d, n, basis_gb, copy_bytes,
                                         times))
      print(format_row(report["results"][-1]), flush=True)
      save(report, args.out)


def save(report: dict, path: str) -> None:
  report["loadavg_end"] = os.getloadavg()
  common.write_json(path, report)


def summarize(name: str, d: int, n: int, basis_gb: float, copy_bytes: int,
              times: dict[str, list[float]]) -> dict:
  """Medians, TWA/SGD ratios (three estimates) and bandwidths of one row.

  Ratios: `*_ratio`, the median of per-round ratios; `*_ratio_of_minima`,
  the fastest TWA step over the fastest SGD step; `*_ratio_from_parts`,
  1 + projection / SGD step (medians): on a loaded machine the step times
  swing by tens of percent, the projection, a small side, much less.
  """
  med = {k: common.median(v) for k, v in times.items()}
  row = {"model": name, "num_params": d, "n": n, "basis_gb": basis_gb,
         "median_s": med, "times_s": times,
         "copy_gbps": 2 * copy_bytes / 1e9 / med["copy"]}
  for fw in ("jax", "torch"):
    if f"{fw}_twa" not in times:
      continue
    twa, sgd = times[f"{fw}_twa"], times[f"{fw}_sgd"]
    row.update({
        f"{fw}_ratio": common.ratio(twa, sgd),
        f"{fw}_ratio_of_minima": min(twa) / min(sgd),
        f"{fw}_ratio_from_parts": 1 + med[f"{fw}_project"] / med[f"{fw}_sgd"],
        f"{fw}_project_gbps": 2 * basis_gb / med[f"{fw}_project"]})
  if "torch_sgd" in times:  # the SGD step, JAX over PyTorch (paired rounds)
    row["sgd_jax_over_torch"] = common.ratio(times["jax_sgd"],
                                             times["torch_sgd"])
  return row


HEADER = ("model             D    n |  JAX: sgd ms   twa ms  ratio  min  parts"
          "  proj ms  flat  GB/s | torch: sgd ms  twa ms  ratio  min  parts"
          "  proj ms  GB/s | copy GB/s | sgd jax/torch")


def format_row(r: dict) -> str:
  ms = {k: 1e3 * v for k, v in r["median_s"].items()}
  def side(fw: str) -> str:
    return (f"{ms[fw + '_sgd']:12.1f} {ms[fw + '_twa']:8.1f} "
            f"{r[fw + '_ratio']:6.2f} {r[fw + '_ratio_of_minima']:4.2f} "
            f"{r[fw + '_ratio_from_parts']:6.2f} {ms[fw + '_project']:8.1f}")
  line = (f"{r['model']:<12} {r['num_params']:>9} {r['n']:>4} |"
          f"{side('jax')} {ms['jax_project_flat']:5.1f} "
          f"{r['jax_project_gbps']:5.1f} |")
  if "torch_ratio" in r:
    line += f" {side('torch')} {r['torch_project_gbps']:5.1f} |"
  else:
    line += f" {'(no torch)':>60} |"
  line += f" {r['copy_gbps']:9.1f} |"
  if "sgd_jax_over_torch" in r:
    line += f" {r['sgd_jax_over_torch']:13.2f}"
  return line


LOOP_STYLES = ("jit", "donated", "train_state", "nnx")


class LinenMLP(nn.Module):
  """Dense layers with ReLU between them (the --loops model)."""

  widths: tuple[int, ...]

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(self.widths[1:]):
      x = nn.Dense(width)(x if i == 0 else nn.relu(x))
    return x


class NNXMLP(nnx.Module):
  """The NNX twin of `LinenMLP`."""

  def __init__(self, widths: Sequence[int], rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                            for a, b in zip(widths[:-1], widths[1:])])

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x if i == 0 else nnx.relu(x))
    return x


def _xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def jit_side(loss, tx, params, donate: bool) -> Callable[[], PyTree]:
  """A plain jitted step as users write it, returning params and optimizer
  state (optionally donating both); each call runs one step."""
  @functools.partial(jax.jit, donate_argnums=(0, 1) if donate else ())
  def step(params, opt_state):
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  state = list(on_device((jax.tree.map(jnp.copy, params), tx.init(params))))
  def call():
    state[:] = step(*state)
    return state[0]
  return call


def _train_state_side(model, loss, tx, params) -> Callable[[], PyTree]:
  ts = [on_device(train_state.TrainState.create(
      apply_fn=model.apply, params=jax.tree.map(jnp.copy, params), tx=tx))]
  step = jax.jit(lambda s: s.apply_gradients(grads=jax.grad(loss)(s.params)))
  def call():
    ts[0] = step(ts[0])
    return ts[0].params
  return call


def _nnx_side(widths, x, y, tx, seed: int) -> Callable[[], PyTree]:
  model = NNXMLP(widths, nnx.Rngs(seed))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  nnx.update((model, opt), on_device(nnx.state((model, opt))))
  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(lambda m: _xent(m(x), y))(model)
    opt.update(model, grads)
    return loss
  return lambda: step(model, opt)


def loop_sides(args: argparse.Namespace, n: int
               ) -> tuple[dict[str, Callable[[], object]], int, float]:
  """Every --loops side (SGD and TWA per style), D and the basis' GB."""
  widths = args.widths
  rng = np.random.default_rng(args.seed)
  x_np = rng.standard_normal((args.batch, widths[0])).astype(np.float32)
  y_np = rng.integers(0, widths[-1], args.batch).astype(np.int32)
  x, y = jnp.asarray(x_np), jnp.asarray(y_np)
  model = LinenMLP(tuple(widths))
  params = jax.jit(model.init)(jax.random.PRNGKey(args.seed), x)["params"]
  loss = lambda p: _xent(model.apply({"params": p}, x), y)
  spec = twa_jax.ParamSpec.of(params)
  basis = common.random_basis(spec, n, args.basis_dtype, args.seed)
  nnx_spec = twa_jax.ParamSpec.of(nnx.to_pure_dict(nnx.state(
      NNXMLP(widths, nnx.Rngs(args.seed)), nnx.Param)))
  nnx_basis = twa_jax.Basis(basis.vectors, nnx_spec, n)  # the same P
  def tx(kind, b):
    if kind == "twa":
      return twa_jax.twa(b, args.lr, momentum=args.momentum,
                         weight_decay=args.weight_decay)
    return optax.chain(optax.add_decayed_weights(args.weight_decay),
                       optax.sgd(args.lr, momentum=args.momentum))
  sides = {}
  for kind in ("sgd", "twa"):
    sides[f"jit_{kind}"] = jit_side(loss, tx(kind, basis), params, False)
    sides[f"donated_{kind}"] = jit_side(loss, tx(kind, basis), params, True)
    sides[f"train_state_{kind}"] = _train_state_side(
        model, loss, tx(kind, basis), params)
    sides[f"nnx_{kind}"] = _nnx_side(widths, x, y, tx(kind, nnx_basis),
                                     args.seed)
  device, _ = common.torch_device(args.torch)
  if device:
    import torch  # pylint: disable=g-import-not-at-top
    import torch_reference  # pylint: disable=g-import-not-at-top
    torch.manual_seed(args.seed)
    tx_, ty = (torch.from_numpy(x_np).to(device),
               torch.from_numpy(y_np.astype(np.int64)).to(device))
    vectors = torch.randn(n, spec.num_params, device=device) / np.sqrt(
        spec.num_params)
    for kind in ("sgd", "twa"):
      net = torch_reference.MLP(widths).to(device)
      if torch_reference.num_params(net) != spec.num_params:
        raise RuntimeError("the PyTorch MLP has "
                           f"{torch_reference.num_params(net)} parameters, "
                           f"the Flax one {spec.num_params}")
      opt = torch.optim.SGD(net.parameters(), lr=args.lr,
                            momentum=args.momentum,
                            weight_decay=args.weight_decay)
      p = vectors if kind == "twa" else None
      sides[f"torch_{kind}"] = functools.partial(
          torch_reference.train_step, net, opt, tx_, ty, p)
  return sides, spec.num_params, basis.nbytes / 1e9


def run_loops(args: argparse.Namespace, report: dict) -> None:
  """Fills report["loops"]: per n, the median step of every side and the
  TWA/SGD ratio (median of per-round ratios) of every style."""
  report["loops"] = []
  for n in args.ns:
    sides, d, basis_gb = loop_sides(args, n)
    times = common.alternate(sides, args.repeats, args.warmup)
    styles = [s for s in LOOP_STYLES + ("torch",) if f"{s}_twa" in times]
    row = {"widths": args.widths, "num_params": d, "n": n,
           "basis_gb": basis_gb,
           "median_s": {k: common.median(v) for k, v in times.items()},
           "times_s": times,
           "ratio": {s: common.ratio(times[f"{s}_twa"], times[f"{s}_sgd"])
                     for s in styles}}
    report["loops"].append(row)
    print(f"MLP D={d} n={n}: " + "  ".join(
        f"{s} sgd {1e3 * row['median_s'][s + '_sgd']:.1f} ms twa "
        f"{1e3 * row['median_s'][s + '_twa']:.1f} ms x{row['ratio'][s]:.2f}"
        for s in styles), flush=True)
    save(report, args.out)


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  report = {"benchmark": "step_overhead", "args": vars(args),
            "loadavg_start": os.getloadavg()}
  if args.loops:
    run_loops(args, report)
    save(report, args.out)
    return report
  run(args, report)
  save(report, args.out)
  return report


if __name__ == "__main__":
  main()
