"""Peak resident memory of a TWA phase against an SGD phase (issue 7, item 5).

Each configuration runs in its own process, so one peak never hides another:
the model is built, then (TWA only) a host snapshot matrix W (n x D float32,
what `TrajectoryStore.read_matrix` hands to `basis_from_store`) is filled and
orthonormalized with `basis_from_matrix`, then a few jitted training steps
run. The peak resident set (`common.peak_rss_bytes`, i.e. ru_maxrss, whose
high-water mark Linux resets through /proc/self/clear_refs between the two
stages; elsewhere the second figure includes the first) is read after each
stage:

  setup    building W and the basis (TWA only: the orthonormalization peak)
  compile  the first training step (XLA compilation included)
  steps    further training steps: the phase's steady-state peak

TWA runs with two steps: "donated" (train.py's step, state donated) and
"plain" (a `jax.jit` step as users write it, returning params and optimizer
state without donation). The TWA transformations close over the basis and
their state holds no P, so both hold one copy of P.

  python benchmarks/memory.py --models small_cnn,resnet20,vgg16 --ns 10,30,100,300
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

_MB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = common.parser("memory", __doc__.split("\n\n")[0])
  p.add_argument("--models", default="small_cnn,resnet20,vgg16")
  p.add_argument("--ns", default="10,30,100,300")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--max-gb", type=float, default=8.0,
                 help="skip TWA configurations whose estimated setup peak "
                      "(4 n D float32) exceeds this")
  p.add_argument("--child", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.smoke:  # small_cnn, n = 2, batch 4, 1 step
    args.models, args.ns, args.batch, args.steps = "small_cnn", "2", 4, 1
  args.models = [m for m in args.models.split(",") if m]
  args.ns = [int(n) for n in args.ns.split(",") if n]
  if not args.ns or min(args.ns) < 1 or args.batch < 1 or args.steps < 1:
    p.error("--ns, --batch and --steps need positive integers")
  if not args.child:
    from twa_jax.training import models  # pylint: disable=g-import-not-at-top
    unknown = [m for m in args.models if m not in models.MODEL_NAMES]
    if unknown:
      p.error(f"--models: unknown {unknown}; known: "
              f"{', '.join(models.MODEL_NAMES)}")
  return args


def peak_mb() -> float:
  """Peak resident set of this process since the last `reset_peak`."""
  return common.peak_rss_bytes() / _MB


def rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def reset_peak() -> bool:
  """Resets the peak RSS to the current RSS (Linux >= 4.0); False if not.

  Memory that the allocator holds but no longer uses (XLA's compilation
  scratch) is handed back to the system first (glibc `malloc_trim`), so
  that the next peak measures live memory, not the compiler's leftovers.
  """
  try:
    ctypes.CDLL(None).malloc_trim(0)
  except (OSError, AttributeError):
    pass
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def child(config: dict) -> dict:
  """One phase in this process; returns its memory figures."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import twa_jax  # pylint: disable=g-import-not-at-top
  import step_overhead  # pylint: disable=g-import-not-at-top

  args = step_overhead.parse_args(["--batch", str(config["batch"]),
                                   "--models", config["model"], "--ns", "1"])
  side = step_overhead.JaxSide(config["model"], config["batch"], args)
  d = side.spec.num_params
  out = {**config, "num_params": d, "rss_init_mb": rss_mb()}
  resettable = reset_peak()
  if config["phase"] == "twa":
    n = config["n"]
    rng = np.random.default_rng(0)
    w0 = np.asarray(side.spec.ravel(side.params))
    matrix = np.empty((n, d), np.float32)
    for i in range(n):  # perturbed copies of the weights, one row each
      matrix[i] = w0 + 0.01 * rng.standard_normal(d, dtype=np.float32)
    basis = twa_jax.basis_from_matrix(side.spec, matrix)
    del matrix
    out.update(basis_dim=basis.dim, basis_mb=basis.nbytes / _MB,
               peak_setup_mb=peak_mb(), rss_after_setup_mb=rss_mb())
    tx = side.twa(basis)
    del basis  # the transformation's closure holds P
  else:
    tx = side.sgd
  if config["step"] == "plain":
    run = step_overhead.jit_side(side.loss, tx, side.params, donate=False)
  else:
    run = step_overhead.Trainer(side, tx)
  if resettable:
    reset_peak()
  run()  # compiles the step
  out.update(peak_compile_mb=peak_mb())
  if resettable:
    reset_peak()
  for _ in range(config["steps"]):
    run()
  out.update(peak_steps_mb=peak_mb(), rss_end_mb=rss_mb(),
             peak_is_stagewise=resettable)
  return out


def configurations(args: argparse.Namespace) -> list[dict]:
  configs = []
  for model in args.models:
    base = {"model": model, "batch": args.batch, "steps": args.steps}
    configs.append({**base, "phase": "sgd", "n": 0, "step": "donated"})
    configs += [{**base, "phase": "twa", "n": n, "step": step}
                for n in args.ns for step in ("donated", "plain")]
  return configs


HEADER = ("model        phase step       n         D   |P| MB  init MB  peak MB: "
          "setup  compile  steps  steps vs SGD")


def format_row(r: dict, sgd_peak: float) -> str:
  setup = f"{r['peak_setup_mb']:13.0f}" if "peak_setup_mb" in r else f"{'-':>13}"
  basis = f"{r['basis_mb']:7.1f}" if "basis_mb" in r else f"{'-':>7}"
  return (f"{r['model']:<12} {r['phase']:<5} {r['step']:<7} {r['n']:>4} "
          f"{r['num_params']:>9}"
          f" {basis} {r['rss_init_mb']:8.0f} {setup} "
          f"{r['peak_compile_mb']:8.0f} {r['peak_steps_mb']:6.0f} "
          f"{r['peak_steps_mb'] / sgd_peak:13.3f}")


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  if args.child:
    print(json.dumps(child(json.loads(args.child))))
    return {}
  import step_overhead  # pylint: disable=g-import-not-at-top
  results, skipped, sgd_peak = [], [], {}
  print(HEADER, flush=True)
  for config in configurations(args):
    if config["phase"] == "twa":
      d = step_overhead.num_params(config["model"])
      estimate_gb = 4 * config["n"] * d * 4 / 1e9
      if estimate_gb > args.max_gb:
        skipped.append({**config, "reason": f"estimated setup peak "
                        f"{estimate_gb:.1f} GB > --max-gb {args.max_gb}"})
        print(f"skip {config['model']} n={config['n']}: {skipped[-1]['reason']}")
        continue
    r = common.run_child([os.path.abspath(__file__), "--child",
                          json.dumps(config)])
    sgd_peak.setdefault(r["model"], r["peak_steps_mb"])
    r["steps_peak_vs_sgd"] = r["peak_steps_mb"] / sgd_peak[r["model"]]
    results.append(r)
    print(format_row(r, sgd_peak[r["model"]]), flush=True)
  report = {"benchmark": "memory", "args": vars(args), "results": results,
            "skipped": skipped}
  common.write_json(args.out, report)
  return report


if __name__ == "__main__":
  main()
