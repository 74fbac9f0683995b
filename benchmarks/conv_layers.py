"""Each conv layer's forward pass, input gradient and kernel gradient, JAX
against PyTorch (issue 16: where the training step loses).

For each model, the distinct convolutions of its forward pass are read from
the jaxpr of `model.apply` (input and kernel shapes, strides, padding) and
counted. Each runs alone in its three roles, on the same random values:

  jax_*    `models.conv_general_dilated` (the models' convs: on CPU the
           compiled kernels of `twa_jax.native`, direct or by Winograd,
           where that function takes them), jitted with
           `models.compiler_options()` as train.py's step is; the gradients
           from `jax.vjp`, as `jax.grad` builds them
  torch_*  `F.conv2d`, `torch.nn.grad.conv2d_input` and `conv2d_weight`
           (autograd's `convolution_backward`) in NCHW

with * = forward, input_gradient, kernel_gradient. The sides alternate in
each round (`common.alternate`). Reported per layer: median ms per side,
JAX / PyTorch per role (median of the per-round ratios) and the largest
difference between the two results relative to their largest entry (a check
that both compute the same convolution); per model, the totals over its
layers (each times its count) without the input gradient of the layer that
reads the image, which the step does not compute. Convs on maps no larger
than their kernel run as patches @ kernel (`models.conv_general_dilated`)
and are not listed.

  python benchmarks/conv_layers.py --models small_cnn,cnn7,resnet20 --batch 128
  python benchmarks/conv_layers.py --models vgg16 --batch 32
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from twa_jax import native  # pylint: disable=wrong-import-position
from twa_jax.training import models  # pylint: disable=wrong-import-position

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
ROLES = ("forward", "input_gradient", "kernel_gradient")
NHWC = ("NHWC", "HWIO", "NHWC")


class Layer(NamedTuple):
  """A convolution of the model: NHWC input, HWIO kernel."""
  lhs: tuple[int, ...]
  kernel: tuple[int, ...]
  strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = common.parser("conv_layers", __doc__.split("\n\n")[0])
  p.add_argument("--models", default="small_cnn,cnn7,resnet20",
                 type=lambda s: [m for m in s.split(",") if m])
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--torch", default="auto", choices=("auto", "on", "off"),
                 help="the PyTorch side: auto runs it when torch imports")
  args = p.parse_args(argv)
  if args.smoke:
    args.models, args.batch, args.repeats, args.warmup = ["small_cnn"], 2, 1, 1
  unknown = [m for m in args.models if m not in models.MODEL_NAMES]
  if unknown:
    p.error(f"--models: unknown {unknown}; known: {', '.join(models.MODEL_NAMES)}")
  if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
    p.error("--batch and --repeats must be positive, --warmup not negative")
  return args


def _equations(jaxpr: core.Jaxpr):
  """The equations of `jaxpr` and of the jaxprs inside it, in order."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, core.ClosedJaxpr):
          yield from _equations(sub.jaxpr)
        elif isinstance(sub, core.Jaxpr):
          yield from _equations(sub)


def model_layers(name: str, batch: int) -> list[tuple[Layer, int]]:
  """The model's distinct NHWC/HWIO convolutions in order of first use, with
  their counts in one forward pass."""
  model = models.create_model(name, NUM_CLASSES)
  x = jnp.zeros((batch, *IMAGE_SHAPE), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             jax.random.key(0), x)
  jaxpr = jax.make_jaxpr(
      lambda v: model.apply(v, x, train=False))(variables).jaxpr
  counts = collections.Counter()
  nhwc = jax.lax.conv_dimension_numbers(
      (1, 1, 1, 1), (1, 1, 1, 1), NHWC)
  for eqn in _equations(jaxpr):
    if (eqn.primitive.name == "ffi_call"
        and eqn.params["target_name"] in (native.CONV, native.WINOGRAD_CONV)):
      counts[_compiled_layer(eqn)] += 1
      continue
    if eqn.primitive.name != "conv_general_dilated":
      continue
    p = eqn.params
    if (p["dimension_numbers"] != nhwc or p["feature_group_count"] != 1
        or set(p["lhs_dilation"] + p["rhs_dilation"]) != {1}):
      raise ValueError(f"{name}: conv {p} is not a plain NHWC/HWIO conv")
    counts[Layer(tuple(eqn.invars[0].aval.shape),
                 tuple(eqn.invars[1].aval.shape), tuple(p["window_strides"]),
                 tuple(map(tuple, p["padding"])))] += 1
  return list(counts.items())


def _compiled_layer(eqn: core.JaxprEqn) -> Layer:
  """The conv of a call of the compiled conv (`twa_jax.native.conv`, direct
  or by Winograd, which is at stride 1)."""
  attributes = dict(eqn.params["attributes"])
  lhs, kernel = (tuple(v.aval.shape) for v in eqn.invars)
  out = eqn.params["result_avals"][0].shape
  strides = (int(attributes.get("stride_h", 1)),
             int(attributes.get("stride_w", 1)))
  lows = (int(attributes["pad_h"]), int(attributes["pad_w"]))
  padding = tuple((lo, (o - 1) * s + k - lo - size) for lo, o, s, k, size in
                  zip(lows, out[1:3], strides, kernel[:2], lhs[1:3]))
  return Layer(lhs, kernel, strides, padding)


def jax_sides(layer: Layer, x, w, dy) -> dict[str, Callable[[], jax.Array]]:
  """The three roles of the conv in JAX, jitted as train.py's step is."""
  conv = functools.partial(models.conv_general_dilated,
                           window_strides=layer.strides, padding=layer.padding,
                           dimension_numbers=NHWC)
  jit = functools.partial(jax.jit, compiler_options=models.compiler_options())
  forward = jit(conv)
  input_gradient = jit(lambda x, w, dy: jax.vjp(
      lambda x: conv(x, w), x)[1](dy)[0])
  kernel_gradient = jit(lambda x, w, dy: jax.vjp(
      lambda w: conv(x, w), w)[1](dy)[0])
  return {"jax_forward": lambda: forward(x, w),
          "jax_input_gradient": lambda: input_gradient(x, w, dy),
          "jax_kernel_gradient": lambda: kernel_gradient(x, w, dy)}


def torch_sides(layer: Layer, x, w, dy, device: str
                ) -> dict[str, Callable[..., np.ndarray | None]]:
  """The three roles of the conv in PyTorch (NCHW, OIHW); called with
  `numpy=True`, a side returns its result in the JAX layout.

  torch is imported here, after `common.torch_device` has set its OpenMP
  policy."""
  if any(low != high for low, high in layer.padding):
    raise ValueError(f"asymmetric padding {layer.padding}: no PyTorch twin")
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  def tensor(a, perm):
    return torch.from_numpy(np.ascontiguousarray(
        np.asarray(a).transpose(perm))).to(device)

  tx, tw, tdy = tensor(x, (0, 3, 1, 2)), tensor(w, (3, 2, 0, 1)), tensor(
      dy, (0, 3, 1, 2))
  kwargs = {"stride": layer.strides,
            "padding": tuple(low for low, _ in layer.padding)}
  ops = {
      "forward": (lambda: F.conv2d(tx, tw, **kwargs), (0, 2, 3, 1)),
      "input_gradient": (lambda: torch.nn.grad.conv2d_input(
          tx.shape, tw, tdy, **kwargs), (0, 2, 3, 1)),
      "kernel_gradient": (lambda: torch.nn.grad.conv2d_weight(
          tx, tw.shape, tdy, **kwargs), (2, 3, 1, 0)),
  }

  def side(op, perm, numpy=False):
    out = op()
    if device == "cuda":
      torch.cuda.synchronize()
    return out.cpu().numpy().transpose(perm) if numpy else None
  return {f"torch_{role}": functools.partial(side, op, perm)
          for role, (op, perm) in ops.items()}


def run_layer(layer: Layer, args: argparse.Namespace, device: str | None,
              seed: int) -> dict:
  """Times one conv in every role and side; compares the results."""
  rng = np.random.default_rng(seed)
  out_shape = jax.eval_shape(
      lambda x, w: jax.lax.conv_general_dilated(
          x, w, layer.strides, layer.padding, dimension_numbers=NHWC),
      jax.ShapeDtypeStruct(layer.lhs, jnp.float32),
      jax.ShapeDtypeStruct(layer.kernel, jnp.float32)).shape
  x, w, dy = (jnp.asarray(rng.standard_normal(s), jnp.float32)
              for s in (layer.lhs, layer.kernel, out_shape))
  sides = jax_sides(layer, x, w, dy)
  row = {"lhs": layer.lhs, "kernel": layer.kernel, "strides": layer.strides,
         "padding": layer.padding}
  if device:
    twins = torch_sides(layer, x, w, dy, device)
    row["max_rel_diff"] = {}
    for role in ROLES:
      ours = np.asarray(sides[f"jax_{role}"]())
      theirs = twins[f"torch_{role}"](numpy=True)
      row["max_rel_diff"][role] = float(
          np.abs(ours - theirs).max() / np.abs(theirs).max())
    sides.update(twins)
  times = common.alternate(sides, args.repeats, args.warmup)
  row["median_ms"] = {k: 1e3 * common.median(v) for k, v in times.items()}
  row["times_s"] = times
  if device:
    row["ratio"] = {role: common.ratio(times[f"jax_{role}"],
                                       times[f"torch_{role}"])
                    for role in ROLES}
  return row


def totals(rows: list[dict], sides: tuple[str, ...]) -> dict[str, float]:
  """ms per forward and backward pass summed over the layers (each times its
  count), per side and role; the first layer's input gradient left out."""
  out = collections.Counter()
  for i, r in enumerate(rows):
    for side in sides:
      for role in ROLES:
        if not (i == 0 and role == "input_gradient"):
          out[f"{side}_{role}"] += r["count"] * r["median_ms"][f"{side}_{role}"]
  return dict(out)


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  device, torch_note = common.torch_device(args.torch)
  report = {"benchmark": "conv_layers", "args": vars(args),
            "torch": {"device": device, "note": torch_note}, "results": []}
  sides = ("jax", "torch") if device else ("jax",)
  for name in args.models:
    rows = []
    for i, (layer, count) in enumerate(model_layers(name, args.batch)):
      row = {"count": count, **run_layer(layer, args, device, seed=i)}
      rows.append(row)
      line = " ".join(f"{role} {row['median_ms']['jax_' + role]:.2f}"
                      for role in ROLES)
      if device:
        line += " | torch " + " ".join(
            f"{row['median_ms']['torch_' + role]:.2f} (x{row['ratio'][role]:.2f})"
            for role in ROLES)
      print(f"{name} {layer.lhs} -> {layer.kernel[-1]} stride "
            f"{layer.strides[0]} x{count}: jax ms {line}", flush=True)
    total = totals(rows, sides)
    result = {"model": name, "batch": args.batch, "layers": rows,
              "total_ms": total}
    if device:
      result["total_ratio"] = {
          role: total[f"jax_{role}"] / total[f"torch_{role}"]
          for role in ROLES}
      result["total_ratio"]["all"] = (
          sum(total[f"jax_{role}"] for role in ROLES)
          / sum(total[f"torch_{role}"] for role in ROLES))
    report["results"].append(result)
    print(f"{name} total ms: " + ", ".join(
        f"{k} {v:.1f}" for k, v in sorted(total.items())), flush=True)
    if device:
      print("  JAX / torch: " + ", ".join(
          f"{k} {v:.2f}" for k, v in result["total_ratio"].items()),
            flush=True)
  common.write_json(args.out, report)
  return report


if __name__ == "__main__":
  main()
