"""The report of a run: summary.json content, comparison table, plots.

Train accuracy and generalization gap come in two kinds (see
`experiment.summary_row`): the clean ones (`train_accuracy`,
`generalization_gap`: evaluation mode, no augmentation) and the paper's
(`running_train_accuracy`, `running_generalization_gap`: the running
average over the last training epoch's augmented, train-mode batches, hence
its negative ImageNet gaps). Compare the running ones with the paper's
tables; the clean ones measure the final model.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

from matplotlib import figure
from matplotlib.backends import backend_agg
import ml_collections

METHODS = ("sgd", "sgd_head", "swa", "ema", "twa", "twa_v")


def summary(config: ml_collections.ConfigDict, dataset: str,
            parts: dict[str, dict], steps_per_epoch: int) -> dict[str, Any]:
  """Merges the phases' results into the summary.

  Args:
    config: the run's config.
    dataset: the dataset's name.
    parts: the `result.json` of each finished phase (sgd, swa, twa, and
      twa_v: TWA-v, trained on held-out data).
    steps_per_epoch: training steps per epoch.

  Returns:
    {"name", "dataset", "model", "averaging", "steps_per_epoch", "results":
    {method: row}, and "swa" / "twa" / "twa_v" details when those ran}; a
    row has test_accuracy, test_loss, train_accuracy, train_loss,
    generalization_gap, running_train_accuracy, running_generalization_gap
    (None without training epochs of its own; absent from results of runs
    before they were recorded), epochs and wall_time_s (with TWA-v also
    holdout_accuracy and holdout_loss).
  """
  results = {}
  for part in parts.values():
    results.update(part["results"])
  out = {
      "name": config.name,
      "dataset": dataset,
      "model": config.model.name,
      "averaging": config.averaging.to_dict(),
      "steps_per_epoch": steps_per_epoch,
      "results": {m: results[m] for m in METHODS if m in results},
  }
  for phase in ("swa", "twa", "twa_v"):
    if phase in parts:
      out[phase] = parts[phase][phase]
  return out


def _labels(summary_: dict[str, Any]) -> dict[str, str]:
  avg = summary_["averaging"]
  unit = "epochs" if avg["unit"] == "epoch" else "snapshots"
  head = summary_["results"].get("swa", summary_["results"].get("ema", {}))
  head_epoch = head.get("epochs", "?")
  return {"sgd": "SGD (full budget)",
          "sgd_head": f"SGD (epoch {head_epoch})",
          "swa": f"SWA ({unit} {avg['start']}-{avg['end']})",
          "ema": f"EMA (epoch {head_epoch})",
          "twa": f"TWA ({unit} {avg['start']}-{avg['end']})",
          "twa_v": f"TWA-v ({unit} {avg['start']}-{avg['end']}, held-out)"}


def table(summary_: dict[str, Any]) -> str:
  """The comparison table printed at the end of a run."""
  labels = _labels(summary_)
  results = summary_["results"]
  held_out = all("holdout_accuracy" in r for r in results.values())
  header = ("method", "epochs", "test acc", "train acc", "test loss", "gap",
            "run. train acc", "run. gap", "wall time") + (
                ("held-out acc",) if held_out else ())
  rows = []
  for method, r in results.items():
    epochs = r["epochs"]
    if method in ("twa", "twa_v") and method in summary_:
      t = summary_[method]
      epochs = f"{t['head_epochs']}+{t['epochs']}"
    rows.append((labels[method], str(epochs), percent(r["test_accuracy"]),
                 percent(r["train_accuracy"]), f"{r['test_loss']:.4f}",
                 points(r["generalization_gap"]),
                 fraction_text(r.get("running_train_accuracy")),
                 points(r.get("running_generalization_gap")), wall_time(r))
                + ((percent(r["holdout_accuracy"]),) if held_out else ()))
  out = [f"{summary_['name']}: {summary_['model']} on {summary_['dataset']}"]
  out += columns(header, rows)
  for method in ("twa", "twa_v"):
    if method in summary_:
      t = summary_[method]
      out.append(f"{labels[method].split(' (')[0]}: {t['snapshots']} "
                 f"snapshots, {basis_text(t)}, started at the {t['start']}, "
                 f"averaging coefficients sum to {coefficient_sums(t)}")
  out.append("gap = train accuracy - test accuracy (points); epochs = "
             "training epochs spent, TWA: averaged range + its own")
  out.append("train acc: clean (eval mode, no augmentation); run.: the "
             "paper's, the running average over the last epoch's augmented "
             "train-mode batches (compare these with its tables; -: no "
             "training epochs of its own)")
  return "\n".join(out)


def percent(fraction: float) -> str:
  return f"{100 * fraction:.2f}%"


def fraction_text(fraction: float | None) -> str:
  """A percentage, or "-" for None."""
  return "-" if fraction is None else percent(fraction)


def points(fraction: float | None) -> str:
  """A difference of fractions in percentage points, or "-" for None."""
  return "-" if fraction is None else f"{100 * fraction:.2f}"


def wall_time(row: dict[str, Any]) -> str:
  return "-" if row["wall_time_s"] is None else f"{row['wall_time_s']:.1f} s"


def columns(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  """Table lines: the header, a rule, the rows; first column left-aligned."""
  widths = [max(len(x) for x in col) for col in zip(header, *rows)]

  def line(cells: Sequence[str]) -> str:
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths)))

  return [line(header), line(["-" * w for w in widths])] + [
      line(r) for r in rows]


def condition_text(condition: float | None) -> str:
  """W's condition number as `twa_training.basis_record` records it (None:
  infinite)."""
  return "inf" if condition is None else f"{condition:.3g}"


def basis_text(details: dict[str, Any]) -> str:
  """"basis dimension k (d dropped, condition number of W c)" of TWA's
  details (without the last two for results recorded before they were)."""
  text = f"basis dimension {details['basis_dim']}"
  if "basis_dropped" not in details:
    return text
  return (f"{text} ({details['basis_dropped']} dropped, condition number of "
          f"W {condition_text(details['basis_condition'])})")


def coefficient_sums(details: dict[str, Any]) -> str:
  """The coefficient sum, or the range of the per-block sums."""
  sums = details["coefficient_sum"]
  if isinstance(sums, dict):
    return (f"{min(sums.values()):.4f}-{max(sums.values()):.4f} over "
            f"{len(sums)} blocks")
  return f"{sums:.4f}"


def plots(summary_: dict[str, Any], records: Sequence[dict[str, Any]],
          directory: pathlib.Path) -> list[pathlib.Path]:
  """Writes accuracy.png and (after TWA) coefficients.png.

  Args:
    summary_: the summary.
    records: the metrics.jsonl records.
    directory: where the PNG files go.

  Returns:
    The paths written.
  """
  directory.mkdir(parents=True, exist_ok=True)
  labels = _labels(summary_)
  results = summary_["results"]
  paths = []

  fig = figure.Figure(figsize=(7, 4.5))
  backend_agg.FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  sgd = [r for r in records if r["phase"] == "sgd"]
  if sgd:
    ax.plot([r["epoch"] for r in sgd], [100 * r["test_accuracy"] for r in sgd],
            label="SGD", color="tab:blue")
  twa = [r for r in records if r["phase"] == "twa"]
  if twa and "twa" in summary_:
    head = summary_["twa"]["head_epochs"]
    ax.plot([head + r["epoch"] for r in twa],
            [100 * r["test_accuracy"] for r in twa], label="TWA (per epoch)",
            color="tab:red")
  markers = {"sgd_head": ("s", "tab:blue"), "swa": ("o", "tab:green"),
             "ema": ("^", "tab:purple"), "twa": ("*", "tab:red"),
             "twa_v": ("P", "tab:orange")}
  for method, (marker, color) in markers.items():
    if method in results:
      accuracy = 100 * results[method]["test_accuracy"]
      ax.plot([results[method]["epochs"]], [accuracy], marker=marker,
              color=color, linestyle="none",
              markersize=10 if marker == "*" else 7,
              label=f"{labels[method]}: {accuracy:.2f}%")
  if "sgd" in results:
    accuracy = 100 * results["sgd"]["test_accuracy"]
    ax.axhline(accuracy, color="tab:blue", linestyle=":", linewidth=1,
               label=f"{labels['sgd']}: {accuracy:.2f}%")
  ax.set_xlabel("epochs of training")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(
      f"{summary_['name']}: {summary_['model']} on {summary_['dataset']}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  paths.append(directory / "accuracy.png")
  fig.savefig(paths[-1], dpi=120)

  if "twa" in summary_:
    t = summary_["twa"]
    fig = figure.Figure(figsize=(7, 3.5))
    backend_agg.FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if isinstance(t["coefficients"], dict):  # one line per block
      for alpha in t["coefficients"].values():
        ax.plot(alpha, color="tab:red", alpha=0.3, linewidth=1)
    else:
      ax.bar(range(len(t["coefficients"])), t["coefficients"],
             color="tab:red", width=0.8)
    ax.axhline(1.0 / t["snapshots"], color="tab:green", linestyle="--",
               linewidth=1, label=f"SWA: 1/{t['snapshots']}")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xlabel("snapshot index")
    ax.set_ylabel("averaging coefficient")
    ax.set_title(f"TWA averaging coefficients (sum {coefficient_sums(t)})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(directory / "coefficients.png")
    fig.savefig(paths[-1], dpi=120)
  return paths


def sweep_summary(config: ml_collections.ConfigDict, sgd: dict[str, Any],
                  sgd_curve: Sequence[Sequence[float]],
                  heads: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The sweep phase's result.

  Args:
    config: the run's config.
    sgd: the full-budget SGD row.
    sgd_curve: [epoch, test accuracy] of SGD after each epoch.
    heads: per head k: head_epochs, snapshots, sgd_test_accuracy (SGD's
      own curve at k), the swa and twa rows (epochs k and k + TWA's),
      twa_basis, and with budget-matched SGD its row (budget_matched_sgd).

  Returns:
    {"name", "model", "averaging_start", "sgd", "sgd_curve", "heads",
    "smallest_head_reaching_sgd": the smallest k whose TWA test accuracy
    reaches full-budget SGD's (None if none does)}.
  """
  reaching = [h["head_epochs"] for h in heads
              if h["twa"]["test_accuracy"] >= sgd["test_accuracy"]]
  return {"name": config.name, "model": config.model.name,
          "averaging_start": config.averaging.start, "sgd": sgd,
          "sgd_curve": [list(p) for p in sgd_curve], "heads": list(heads),
          "smallest_head_reaching_sgd": min(reaching, default=None)}


def sweep_table(result: dict[str, Any]) -> str:
  """The sweep's table: per head, SGD's curve, SWA, TWA (and budget SGD)."""
  budget = any("budget_matched_sgd" in h for h in result["heads"])
  header = ("head k", "SGD at k", "SWA(start..k)", "TWA epochs",
            "TWA(start..k)", "basis") + (
                ("SGD, same epochs",) if budget else ())
  rows = []
  for h in result["heads"]:
    twa = h["twa"]
    rows.append((str(h["head_epochs"]), percent(h["sgd_test_accuracy"]),
                 percent(h["swa"]["test_accuracy"]), str(twa["epochs"]),
                 percent(twa["test_accuracy"]),
                 f"{h['twa_basis']['basis_dim']}/{h['snapshots']}")
                + ((percent(h["budget_matched_sgd"]["test_accuracy"])
                    if "budget_matched_sgd" in h else "-",) if budget else ()))
  sgd = result["sgd"]
  k = result["smallest_head_reaching_sgd"]
  return "\n".join(
      [f"{result['name']}: head-length sweep (snapshots of epochs "
       f"{result['averaging_start']}..k), test accuracy"]
      + columns(header, rows)
      + [f"full-budget SGD: {percent(sgd['test_accuracy'])} at "
         f"{sgd['epochs']} epochs; "
         + ("no head reaches it" if k is None else
            f"TWA reaches it from head {k}"),
         "basis = kept dimension / snapshots; SGD, same epochs: trained from "
         "the start for TWA's total epochs, its schedule compressed"])


def sweep_plot(result: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
  """Test accuracy against total epochs: SGD's curve, SWA(start..k),
  TWA(start..k), budget-matched SGD and the full-budget SGD line."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fig = figure.Figure(figsize=(7, 4.5))
  backend_agg.FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  curve = result["sgd_curve"]
  ax.plot([e for e, _ in curve], [100 * a for _, a in curve],
          color="tab:blue", label="SGD (its own curve)")
  heads = result["heads"]
  series = [("swa", "SWA(start..k)", "o", "tab:green"),
            ("twa", "TWA(start..k)", "*", "tab:red"),
            ("budget_matched_sgd", "SGD, same epochs (compressed schedule)",
             "s", "tab:purple")]
  for key, label, marker, color in series:
    points_ = [(h[key]["epochs"], 100 * h[key]["test_accuracy"])
               for h in heads if key in h]
    if points_:
      ax.plot(*zip(*points_), marker=marker, color=color, label=label,
               markersize=10 if marker == "*" else 6)
  accuracy = 100 * result["sgd"]["test_accuracy"]
  ax.axhline(accuracy, color="tab:blue", linestyle=":", linewidth=1,
             label=f"SGD full budget ({result['sgd']['epochs']} epochs): "
             f"{accuracy:.2f}%")
  ax.set_xlabel("total epochs of training")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(f"{result['name']}: head-length sweep")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path
