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

Several seeds (--seeds) are summarized as mean and standard deviation per
method, apart for each setting (the config's, each swa_lr, each variant).
--sweep-heads adds the sweep phase (Figure 3: SWA and TWA over epochs 0..k
for each head k, and SGD trained for k + twa.epochs epochs with its schedule
compressed). --select-twa chooses TWA's learning rate and epochs on
held-out training data first (never on test): one SGD run of the first seed
with 20% of the training set held out as its test split, --select-sgd-epochs
epochs at the config's initial learning rate (its schedule before the first
decay), then TWA for every LR x EPOCHS pair on its snapshots; the best
held-out accuracy wins and is used by every seed's run (recorded under
"selection").

Each run is `train.py` in a subprocess with its own workdir (rerunning the
script resumes or skips finished runs); the script reads the summaries.

  python benchmarks/cifar_cpu.py --stage head --data cifar10.npz --seeds 0,1,2 \
      --overrides="--config.data.train_size=5000 --config.model.name=small_cnn
                   --config.sgd.epochs=20 --config.averaging.end=10" \
      --select-twa 1,2,4:1,2,4 --select-sgd-epochs 10 --sweep-heads 6,10
  python benchmarks/cifar_cpu.py --stage tail --data cifar10.npz --swa-lrs 0.05,0.1
  python benchmarks/cifar_cpu.py --stage head --data cifar10.npz \
      --variants layer:float32,leaf:float32,global:int8,global:int4,layer:int8,layer:int4
  python benchmarks/cifar_cpu.py --stage head --data cifar10.npz --name sf \
      --overrides="--config.sgd.optimizer=schedule_free_sgd --config.sgd.lr=1.0
                   --config.sgd.decay_at=() --config.phases=sgd,report"
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
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
          f"--workdir={workdir}"]
  if smoke:  # before the overrides, which may change its sizes
    argv += SMOKE + (SMOKE_TAIL if stage == "tail" else [])
  argv += overrides
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
            overrides: list[str], smoke: bool,
            settings: list[str] | None = None) -> dict:
  """TWA again on `head`'s trajectory, in a copy of it without the twa and
  sweep phases (by default with the given granularity and storage;
  `settings`: other config overrides instead)."""
  workdir = f"{head}_{granularity}_{storage}"
  if not os.path.exists(workdir):  # copied whole or not at all
    partial = f"{workdir}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(head, partial,
                    ignore=lambda d, names: {"twa", "sweep", "summary.json",
                                             "plots", "lock"}
                    if d == head else set())
    path = os.path.join(partial, "metrics.jsonl")
    with open(path) as f:
      kept = [r for r in f
              if json.loads(r)["phase"].split("/")[0] not in ("twa", "sweep")]
    with open(path, "w") as f:
      f.writelines(kept)
    os.rename(partial, workdir)
  if settings is None:
    settings = [f"--config.twa.granularity={granularity}",
                f"--config.twa.storage={storage}"]
  return run(stage, workdir, overrides + ["--config.phases=twa,report",
                                          *settings], smoke)


def select_twa(stage: str, sgd: str, base: list[str], seed: str,
               grid: str, sgd_epochs: int, smoke: bool) -> dict:
  """TWA's lr and epochs chosen on held-out training data (see above); the
  SGD run in workdir `sgd`, each TWA in `sgd`_lr<LR>_ep<EPOCHS>."""
  lrs, epochs = (v.split(",") for v in grid.split(":"))
  held_out = base + [f"--config.seed={seed}",
                     "--config.data.holdout_fraction=0.2",
                     f"--config.sgd.epochs={sgd_epochs}",
                     "--config.sgd.decay_at=()"]
  run(stage, sgd, held_out + ["--config.phases=sgd,swa,report"], smoke)
  rows = []
  for lr in lrs:
    for e in epochs:
      overrides = held_out + [f"--config.twa.lr={lr}",
                              f"--config.twa.epochs={e}"]
      summary = variant(stage, sgd, f"lr{lr}", f"ep{e}", overrides, smoke,
                        settings=[])
      rows.append({"lr": float(lr), "epochs": int(e), "held_out_acc": 100 *
                   summary["results"]["twa"]["test_accuracy"]})
  best = max(rows, key=lambda r: r["held_out_acc"])
  print(common.table(rows, ["lr", "epochs", "held_out_acc"]))
  return {"grid": rows, "lr": best["lr"], "epochs": best["epochs"]}


def mean_std(values: list[float]) -> dict:
  return {"mean": statistics.fmean(values),
          "std": statistics.stdev(values) if len(values) > 1 else 0.0,
          "n": len(values)}


def aggregate(runs: list[dict]) -> dict:
  """Mean and standard deviation over the runs (seeds) of each method's
  test accuracy (%), and of the sweep's accuracies per head."""
  methods = {}
  for r in runs:
    for method, row in r["results"].items():
      methods.setdefault(method, {"epochs": row["epochs"], "acc": []})
      methods[method]["acc"].append(100 * row["test_accuracy"])
  out = {"methods": {m: {"epochs": v["epochs"], **mean_std(v["acc"])}
                     for m, v in methods.items()}}
  sweeps = [r["sweep"] for r in runs if r.get("sweep")]
  if sweeps:
    heads = {}
    for sweep in sweeps:
      for h in sweep["heads"]:
        entry = heads.setdefault(h["head_epochs"], {})
        for name, acc in (("sgd_curve", h["sgd_test_accuracy"]),
                          ("swa", h["swa"]["test_accuracy"]),
                          ("twa", h["twa"]["test_accuracy"]),
                          ("budget_matched_sgd",
                           (h.get("budget_matched_sgd") or {}).get(
                               "test_accuracy"))):
          if acc is not None:
            entry.setdefault(name, []).append(100 * acc)
    out["sweep"] = {k: {name: mean_std(v) for name, v in entry.items()}
                    for k, entry in sorted(heads.items())}
  return out


def aggregate_table(agg: dict) -> str:
  rows = [{"method": m, "epochs": v["epochs"],
           "test_acc": f"{v['mean']:.2f} +- {v['std']:.2f} (n={v['n']})"}
          for m, v in agg["methods"].items()]
  text = common.table(rows, ["method", "epochs", "test_acc"])
  for k, entry in agg.get("sweep", {}).items():
    text += f"\nhead {k}: " + ", ".join(
        f"{name} {v['mean']:.2f} +- {v['std']:.2f}"
        for name, v in entry.items())
  return text


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
                 help="train.py config overrides for every run, separated "
                 "by whitespace")
  p.add_argument("--variants", default="",
                 help="GRANULARITY:STORAGE,... TWA variants on each run")
  p.add_argument("--sweep-heads", default="",
                 help="K,K,...: also the sweep phase over these heads, with "
                 "budget-matched SGD")
  p.add_argument("--select-twa", default="",
                 help="LR,LR,...:EPOCHS,EPOCHS,...: choose TWA's lr and "
                 "epochs on held-out data first")
  p.add_argument("--select-sgd-epochs", type=int, default=0,
                 help="the selection's SGD epochs (the head's end)")
  args = p.parse_args()
  if not args.smoke and not args.data:
    p.error("--data is required (a decoded CIFAR-10 .npz), or use --smoke")
  if args.select_twa and args.select_sgd_epochs < 1:
    p.error("--select-twa needs --select-sgd-epochs")
  data = [] if args.smoke else [f"--config.data.path={args.data}"]
  data += shlex.split(args.overrides)
  name = args.name or args.stage
  seeds = args.seeds.split(",")
  report = {"stage": args.stage, "runs": []}
  if args.select_twa:
    report["selection"] = select_twa(
        args.stage, os.path.join(args.workdirs, f"{name}_select"), data,
        seeds[0], args.select_twa, args.select_sgd_epochs, args.smoke)
    data += [f"--config.twa.lr={report['selection']['lr']}",
             f"--config.twa.epochs={report['selection']['epochs']}"]
  if args.sweep_heads:
    data += ["--config.phases=sgd,swa,twa,sweep,report",
             f"--config.sweep.heads=({args.sweep_heads},)",
             "--config.sweep.budget_matched_sgd=True"]
  variants = [v.split(":") for v in args.variants.split(",") if v]
  runs = report["runs"]
  for seed in seeds:
    lrs = args.swa_lrs.split(",") if args.stage == "tail" else [None]
    for lr in lrs:
      setting = f"swa_lr {lr}" if lr else ""
      overrides = data + [f"--config.seed={seed}"] + (
          [f"--config.sgd.swa_lr={lr}"] if lr else [])
      workdir = os.path.join(args.workdirs, f"{name}_s{seed}"
                             + (f"_lr{lr}" if lr else ""))
      summaries = [(setting, workdir, run(args.stage, workdir, overrides,
                                          args.smoke))]
      for granularity, storage in variants:
        summaries.append((", ".join(filter(None, [
                              setting, f"{granularity} {storage}"])),
                          f"{workdir}_{granularity}_{storage}",
                          variant(args.stage, workdir, granularity, storage,
                                  overrides, args.smoke)))
      for setting, path, summary in summaries:
        label = ", ".join(filter(None, [f"seed {seed}", setting]))
        claims = (head_claims if args.stage == "head" else tail_claims)(
            summary) if "twa" in summary["results"] else {}
        sweep = os.path.join(path, "sweep", "result.json")
        runs.append({"label": label, "setting": setting or "config",
                     "workdir": path, "claims": claims,
                     "results": summary["results"],
                     "twa": summary.get("twa"),
                     "sweep": (json.load(open(sweep))
                               if os.path.exists(sweep) else None)})
        print(common.table(rows_of(summary, label),
                           ["run", "method", "epochs", "test_acc", "train_acc",
                            "gap"]))
        print(json.dumps(claims))
  # Over the seeds, apart for each setting (swa_lr, variant).
  report["aggregates"] = {
      setting: aggregate([r for r in runs if r["setting"] == setting])
      for setting in dict.fromkeys(r["setting"] for r in runs)}
  for setting, agg in report["aggregates"].items():
    print(f"{setting}:\n{aggregate_table(agg)}")
  common.write_json(args.out, report)


if __name__ == "__main__":
  main()
