"""Where train.py's SGD step spends its time on XLA:CPU, op by op (issue 16).

Runs the gradient of each model's training loss (batch norm in training
mode, compiled with `models.compiler_options()`, as `twa_jax.training.steps`
does) under `jax.profiler`, and sums the time of the compiled program's ops
from the trace, per kind of op (the HLO instruction's name without its
number: `transpose_copy_fusion`, `ynn_fusion`, ...) and per role of the
convolutions: forward, input gradient and kernel gradient (whose output has
the kernel's shape), XLA's or the compiled kernels' (`twa_jax.native`). Times are summed over the threads that ran them, per
step.

  python benchmarks/step_profile.py --models small_cnn,cnn7,resnet20 --batch 128
"""

from __future__ import annotations

import collections
import functools
import glob
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.profiler import ProfileData

import common
from twa_jax import native
from twa_jax.training import models

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
# An HLO instruction defined as a fusion or a convolution: name, shape, body.
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%([\w.-]+) = (\w+\[[\d,]*\])\S* (fusion|convolution)\("
    r"([^)]*)\)(?:.*calls=%([\w.-]+))?")
_COMPUTATION = re.compile(r"^%([\w.-]+) .*\{$")
_NAME = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = ")
_CONV = re.compile(r"(\w+\[[\d,]*\])\S* convolution\(")


def parse_args(argv=None):
  p = common.parser("step_profile", __doc__.splitlines()[0])
  p.add_argument("--models", default="small_cnn,cnn7,resnet20",
                 type=lambda s: s.split(","))
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--top", type=int, default=8, help="op kinds reported")
  args = p.parse_args(argv)
  if args.smoke:
    args.models, args.batch, args.repeats = ["small_cnn"], 8, 2
  return args


def gradient_step(name: str, batch: int):
  """The jitted gradient of the training loss, and its arguments."""
  model = models.create_model(name, NUM_CLASSES)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, *IMAGE_SHAPE)), jnp.float32)
  y = jnp.asarray(rng.integers(0, NUM_CLASSES, batch))
  variables = model.init(jax.random.key(0), x, train=False)

  def loss(params, batch_stats):
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats},
                            x, train=True, mutable=["batch_stats"],
                            rngs={"dropout": jax.random.key(1)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  step = jax.jit(jax.grad(loss), compiler_options=models.compiler_options())
  return step, (variables["params"], variables["batch_stats"]), variables


def conv_roles(hlo_text: str, params) -> dict[str, str]:
  """Role of each instruction that is or calls a convolution: "forward",
  "input_gradient" or "kernel_gradient" (its output shaped as a kernel, in
  the kernel's layout or the convolution's (in, h, w, out), or a compiled
  kernel gradient's custom call, direct or Winograd; the compiled convs'
  calls by their op name, as XLA's convs); and "kernel_gradient_layout" for the transposes feeding a
  kernel gradient."""
  shapes = [p.shape for p in jax.tree.leaves(params) if p.ndim == 4]
  kernels = {"f32[" + ",".join(map(str, s)) + "]" for s in shapes} | {
      "f32[" + ",".join(map(str, (s[2], s[0], s[1], s[3]))) + "]"
      for s in shapes}
  def role(conv_line: str) -> str:
    if _CONV.search(conv_line).group(1) in kernels:
      return "kernel_gradient"
    return "input_gradient" if "transpose(" in conv_line else "forward"
  bodies, current = collections.defaultdict(list), None
  for line in hlo_text.splitlines():
    if match := _COMPUTATION.match(line.strip()):
      current = match.group(1)
    elif current and _CONV.search(line):
      bodies[current].append(line)
  roles = {}
  def calls_one_of(line: str, *names: str) -> bool:
    return any(f'custom_call_target="{n}"' in line for n in names)
  for line in hlo_text.splitlines():
    if calls_one_of(line, native.CONV_KERNEL_GRADIENT,
                    native.WINOGRAD_KERNEL_GRADIENT):
      roles[_NAME.match(line).group(1)] = "kernel_gradient"
    elif calls_one_of(line, native.CONV, native.WINOGRAD_CONV):
      roles[_NAME.match(line).group(1)] = (
          "input_gradient" if "transpose(" in line else "forward")
    elif match := _INSTRUCTION.match(line):
      name, _, op, operands, calls = match.groups()
      convs = [line] if op == "convolution" else bodies.get(calls, [])
      if convs:
        roles[name] = role(convs[0])
        if roles[name] == "kernel_gradient":
          roles.update((operand, "kernel_gradient_layout") for operand in
                       re.findall(r"%(transpose[\w.-]*)", operands))
  return roles


def profile(step, args, repeats: int) -> dict[str, float]:
  """Seconds per step of each compiled op, summed over threads."""
  jax.block_until_ready(step(*args))
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(repeats):
      jax.block_until_ready(step(*args))
    jax.profiler.stop_trace()
    (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    data = ProfileData.from_file(path)
  seconds = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if line.name == "python":
        continue
      for event in line.events:
        if "ThunkExecutor" not in event.name:
          seconds[event.name] += event.duration_ns * 1e-9 / repeats
  return dict(seconds)


def kind(op: str) -> str:
  """`transpose_copy_fusion.12` -> `transpose_copy_fusion`."""
  return re.sub(r"\.\d+$", "", op)


def run_model(name: str, batch: int, repeats: int, top: int) -> dict:
  step, args, variables = gradient_step(name, batch)
  hlo_text = step.lower(*args).compile().as_text()
  roles = conv_roles(hlo_text, variables["params"])
  seconds = profile(step, args, repeats)
  total = sum(seconds.values())
  by_kind, by_role = collections.Counter(), collections.Counter()
  for op, s in seconds.items():
    by_kind[kind(op)] += s
    by_role[roles.get(op, "other")] += s
  return {
      "model": name, "batch": batch,
      "step_s": common.median([common.timed(functools.partial(step, *args))
                               for _ in range(repeats)]),
      "op_seconds": total,
      "by_kind": {k: s / total for k, s in by_kind.most_common(top)},
      "by_role": {k: s / total for k, s in by_role.items()},
  }


def main(argv=None) -> None:
  args = parse_args(argv)
  report = {"benchmark": "step_profile", "args": vars(args), "results": []}
  for name in args.models:
    row = run_model(name, args.batch, args.repeats, args.top)
    report["results"].append(row)
    shares = ", ".join(f"{k} {v:.0%}" for k, v in row["by_kind"].items())
    roles = ", ".join(f"{k} {v:.0%}" for k, v in sorted(row["by_role"].items()))
    print(f"{name} batch {args.batch}: step {row['step_s'] * 1e3:.0f} ms, "
          f"op time {row['op_seconds'] * 1e3:.0f} ms\n  by kind: {shares}\n"
          f"  by role: {roles}", flush=True)
  common.write_json(args.out, report)


if __name__ == "__main__":
  main()
