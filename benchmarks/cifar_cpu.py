"""The paper's accuracy claims at CPU scale (issue 7, items 6 and 7).

Head stage (Table 3's claim): SGD for the full budget E against SWA, EMA and
TWA built from the first E/2 epochs; does TWA reach SGD's full-budget test
accuracy with at most 60% of its epochs, and beat SWA on the same snapshots?
Tail stage (Table 1's claim): SWA against TWA on the same tail snapshots, at
a moderate and a large SWA learning rate.

Variants (issue 6): TWA again on a finished run's trajectory with other
coefficient granularities and basis storage dtypes (--variants), each in a
copy of the run's workdir without its twa phase. --overrides passes config
overrides to every run, e.g. TWA-v (config.twa.holdout_fraction).

Each run is `train.py` in a subprocess with its own workdir (rerunning the
script resumes or skips finished runs); the script reads the summaries.

  python benchmarks/cifar_cpu.py --stage head --data cifar10.npz --seeds 0,1
  python benchmarks/cifar_cpu.py --stage tail --data cifar10.npz --swa-lrs 0.05,0.1
  python benchmarks/cifar_cpu.py --stage head --data cifar10.npz \\
      --variants layer:float32,leaf:float32,global:int8,global:int4,layer:int8,layer:int4
  python benchmarks/cifar_cpu.py --stage head --data cifar10.npz --name twa_v \\
      --overrides=--config.sgd.epochs=20,--config.sgd.decay_at="(1.0,)",--config.twa.holdout_fraction=0.1
"""

from __future__ import annotations

import json
import os
import shutil
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
  """One train.py run (its config's phases); returns its summary.json."""
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


def variant(stage: str, head: str, granularity: str, storage: str,
            overrides: list[str], smoke: bool) -> dict:
  """TWA again on `head`'s trajectory, in a copy of it without the twa phase."""
  workdir = f"{head}_{granularity}_{storage}"
  if not os.path.exists(workdir):
    shutil.copytree(head, workdir,
                    ignore=lambda d, names: {"twa", "summary.json", "plots"}
                    if d == head else set())
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path) as f:
      kept = [r for r in f if json.loads(r)["phase"] != "twa"]
    with open(path, "w") as f:
      f.writelines(kept)
  return run(stage, workdir, overrides + [
      "--config.phases=twa,report", f"--config.twa.granularity={granularity}",
      f"--config.twa.storage={storage}"], smoke)


def main() -> None:
  p = common.parser("cifar_cpu", __doc__)
  p.add_argument("--stage", choices=sorted(CONFIGS), default="head")
  p.add_argument("--data", help="decoded CIFAR-10 .npz (x_train, ...)")
  p.add_argument("--seeds", default="0")
  p.add_argument("--swa-lrs", default="0.05,0.1", help="tail stage only")
  p.add_argument("--workdirs", default=os.path.join(ROOT, "workdir", "bench"))
  p.add_argument("--name", default=None,
                 help="workdir name prefix (default: the stage)")
  p.add_argument("--overrides", default="",
                 help="comma-separated train.py config overrides for every run")
  p.add_argument("--variants", default="",
                 help="GRANULARITY:STORAGE,... TWA variants on each run")
  args = p.parse_args()
  if not args.smoke and not args.data:
    p.error("--data is required (a decoded CIFAR-10 .npz), or use --smoke")
  data = [] if args.smoke else [f"--config.data.path={args.data}"]
  data += [o for o in args.overrides.split(",") if o]
  runs = []
  for seed in args.seeds.split(","):
    lrs = args.swa_lrs.split(",") if args.stage == "tail" else [None]
    for lr in lrs:
      label = f"seed {seed}" + (f", swa_lr {lr}" if lr else "")
      overrides = data + [f"--config.seed={seed}"] + (
          [f"--config.sgd.swa_lr={lr}"] if lr else [])
      workdir = os.path.join(args.workdirs, f"{args.name or args.stage}_s{seed}"
                             + (f"_lr{lr}" if lr else ""))
      summaries = [(label, workdir, run(args.stage, workdir, overrides,
                                        args.smoke))]
      for v in (v for v in args.variants.split(",") if v):
        granularity, storage = v.split(":")
        summaries.append((f"{label}, {granularity} {storage}",
                          f"{workdir}_{granularity}_{storage}",
                          variant(args.stage, workdir, granularity, storage,
                                  overrides, args.smoke)))
      for label, path, summary in summaries:
        claims = (head_claims if args.stage == "head" else tail_claims)(summary)
        runs.append({"label": label, "workdir": path, "claims": claims,
                     "results": summary["results"], "twa": summary["twa"]})
        print(common.table(rows_of(summary, label),
                           ["run", "method", "epochs", "test_acc", "train_acc",
                            "gap"]))
        print(json.dumps(claims))
  common.write_json(args.out, {"stage": args.stage, "runs": runs})


if __name__ == "__main__":
  main()
