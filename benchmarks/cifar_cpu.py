"""The paper's accuracy claims at CPU scale (issue 7, items 6 and 7).

Head stage (Table 3's claim): SGD for the full budget E against SWA, EMA and
TWA built from the first E/2 epochs; does TWA reach SGD's full-budget test
accuracy with at most 60% of its epochs, and beat SWA on the same snapshots?
Tail stage (Table 1's claim): SWA against TWA on the same tail snapshots, at
a moderate and a large SWA learning rate.

Each run is `train.py` in a subprocess with its own workdir (rerunning the
script resumes or skips finished runs); the script reads the summaries.

  python benchmarks/cifar_cpu.py --stage head --data cifar10.npz --seeds 0,1
  python benchmarks/cifar_cpu.py --stage tail --data cifar10.npz --swa-lrs 0.05,0.1
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"head": "configs/cifar10_cpu.py", "tail": "configs/cifar10_cpu_tail.py"}
SMOKE = ["--config.data.name=digits", "--config.data.train_size=1000",
         "--config.data.test_size=300", "--config.model.name=mlp",
         "--config.sgd.epochs=4", "--config.sgd.batch_size=64",
         "--config.averaging.end=2", "--config.twa.epochs=1",
         "--config.twa.lr=0.1"]
SMOKE_TAIL = ["--config.sgd.swa_start=2", "--config.averaging.start=2",
              "--config.averaging.end=4"]


def run(stage: str, workdir: str, overrides: list[str], smoke: bool) -> dict:
  """One train.py run (all phases); returns its summary.json."""
  argv = [sys.executable, os.path.join(ROOT, "train.py"),
          f"--config={os.path.join(ROOT, CONFIGS[stage])}",
          f"--workdir={workdir}", *overrides]
  if smoke:
    argv += SMOKE + (SMOKE_TAIL if stage == "tail" else [])
  out = subprocess.run(argv, capture_output=True, text=True, check=False,
                       cwd=ROOT)
  if out.returncode != 0:
    raise RuntimeError(f"{' '.join(argv)} failed:\n{out.stderr[-3000:]}")
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def rows_of(summary: dict, label: str) -> list[dict]:
  rows = []
  for method, r in summary["results"].items():
    rows.append({"run": label, "method": method, "epochs": r["epochs"],
                 "test_acc": 100 * r["test_accuracy"],
                 "train_acc": 100 * r["train_accuracy"],
                 "gap": 100 * r["generalization_gap"]})
  return rows


def head_claims(summary: dict) -> dict:
  res = summary["results"]
  sgd, twa = res["sgd"], res["twa"]
  return {
      "twa_minus_sgd_full": 100 * (twa["test_accuracy"] - sgd["test_accuracy"]),
      "twa_minus_swa": 100 * (twa["test_accuracy"] - res["swa"]["test_accuracy"]),
      "twa_epoch_fraction": twa["epochs"] / sgd["epochs"],
      "claim_matches_full_budget": bool(
          twa["test_accuracy"] >= sgd["test_accuracy"]
          and twa["epochs"] <= 0.6 * sgd["epochs"]),
      "claim_beats_swa": bool(twa["test_accuracy"] > res["swa"]["test_accuracy"]),
      "coefficient_sum": summary["twa"]["coefficient_sum"],
  }


def tail_claims(summary: dict) -> dict:
  res = summary["results"]
  return {
      "twa_minus_swa": 100 * (res["twa"]["test_accuracy"]
                              - res["swa"]["test_accuracy"]),
      "claim_beats_swa": bool(res["twa"]["test_accuracy"]
                              > res["swa"]["test_accuracy"]),
      "coefficient_sum": summary["twa"]["coefficient_sum"],
  }


def main() -> None:
  p = common.parser("cifar_cpu", __doc__)
  p.add_argument("--stage", choices=sorted(CONFIGS), default="head")
  p.add_argument("--data", help="decoded CIFAR-10 .npz (x_train, ...)")
  p.add_argument("--seeds", default="0")
  p.add_argument("--swa-lrs", default="0.05,0.1", help="tail stage only")
  p.add_argument("--workdirs", default=os.path.join(ROOT, "workdir", "bench"))
  args = p.parse_args()
  if not args.smoke and not args.data:
    p.error("--data is required (a decoded CIFAR-10 .npz), or use --smoke")
  data = [] if args.smoke else [f"--config.data.path={args.data}"]
  runs = []
  for seed in args.seeds.split(","):
    lrs = args.swa_lrs.split(",") if args.stage == "tail" else [None]
    for lr in lrs:
      label = f"seed {seed}" + (f", swa_lr {lr}" if lr else "")
      overrides = data + [f"--config.seed={seed}"] + (
          [f"--config.sgd.swa_lr={lr}"] if lr else [])
      workdir = os.path.join(args.workdirs, f"{args.stage}_s{seed}"
                             + (f"_lr{lr}" if lr else ""))
      summary = run(args.stage, workdir, overrides, args.smoke)
      claims = (head_claims if args.stage == "head" else tail_claims)(summary)
      runs.append({"label": label, "workdir": workdir, "claims": claims,
                   "results": summary["results"]})
      print(common.table(rows_of(summary, label),
                         ["run", "method", "epochs", "test_acc", "train_acc",
                          "gap"]))
      print(json.dumps(claims))
  common.write_json(args.out, {"stage": args.stage, "runs": runs})


if __name__ == "__main__":
  main()
