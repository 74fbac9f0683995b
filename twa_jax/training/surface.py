"""Loss surface on the plane through three solutions (Figure 7 of the paper).

As in Garipov et al. (2018): the plane through w1, w2, w3 (e.g. SGD, SWA and
TWA) gets the orthonormal frame origin w1, u along w2 - w1 and v along the
part of w3 - w1 orthogonal to u. Each point (x, y) of a grid covering the
three solutions is the network origin + x u + y v, evaluated by the caller
(who recomputes the batch-norm statistics there).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
from matplotlib import figure
from matplotlib.backends import backend_agg
import numpy as np
from tqdm import auto as tqdm

from twa_jax import tree as tree_lib

PyTree = Any
LABELS = ("SGD", "SWA", "TWA")


@dataclasses.dataclass(frozen=True, eq=False)
class Plane:
  """An orthonormal frame of the plane through three parameter trees.

  Attributes:
    spec: the layout of the trees.
    origin: the first point, flattened (float64).
    u: unit vector along the second point minus the first (float64).
    v: unit vector orthogonal to `u` in the plane (float64).
    coordinates: 3 x 2, the points' (x, y) in the frame: (0, 0), (x2, 0) and
      (x3, y3) with x2 > 0 and y3 > 0.
    labels: the points' names.
  """

  spec: tree_lib.ParamSpec
  origin: np.ndarray
  u: np.ndarray
  v: np.ndarray
  coordinates: np.ndarray
  labels: tuple[str, str, str]

  def params(self, x: float, y: float) -> PyTree:
    """The parameter tree at origin + x u + y v, in the points' dtypes."""
    vector = self.origin + x * self.u + y * self.v
    return self.spec.unravel(jnp.asarray(vector, jnp.float32))


class Surface(NamedTuple):
  """Metrics over a grid of the plane.

  Attributes:
    xs: the grid's x coordinates (along u), increasing.
    ys: the grid's y coordinates (along v), increasing.
    metrics: name -> len(ys) x len(xs) array; [j, i] is the value at
      (xs[i], ys[j]).
    coordinates: 3 x 2, the three points' (x, y).
    labels: the three points' names.
  """

  xs: np.ndarray
  ys: np.ndarray
  metrics: dict[str, np.ndarray]
  coordinates: np.ndarray
  labels: tuple[str, str, str]


def plane(points: Sequence[PyTree], labels: Sequence[str] = LABELS, *,
          rtol: float = 1e-5) -> Plane:
  """The orthonormal frame of the plane through three parameter trees.

  Args:
    points: three trees of identical structure, shapes and dtypes.
    labels: the points' names, used in errors and plots.
    rtol: two points closer than `rtol` times the larger norm coincide; the
      points are collinear when w3 lies within `rtol` |w3 - w1| of the line
      through w1 and w2.

  Returns:
    The frame with origin w1.

  Raises:
    ValueError: not three points or labels, layouts differ, a value is not
      finite, two points coincide or the three are collinear.
  """
  labels = tuple(labels)
  if len(points) != 3 or len(labels) != 3:
    raise ValueError(f"plane: needs 3 points and 3 labels; got {len(points)} "
                     f"points and labels {labels}.")
  spec, matrix = tree_lib.stack_snapshots(list(points))
  w = matrix.astype(np.float64)
  del matrix
  norms = np.linalg.norm(w, axis=1)
  for i, j in itertools.combinations(range(3), 2):
    distance = np.linalg.norm(w[j] - w[i])
    if distance <= rtol * max(norms[i], norms[j]):
      raise ValueError(
          f"plane: points {labels[i]} and {labels[j]} coincide (distance "
          f"{distance:.3g}, norms {norms[i]:.3g} and {norms[j]:.3g}); a plane "
          "needs three distinct points.")
  d2, d3 = w[1] - w[0], w[2] - w[0]
  x2 = np.linalg.norm(d2)
  u = d2 / x2
  x3 = float(u @ d3)
  v = d3 - x3 * u
  y3 = np.linalg.norm(v)
  if y3 <= rtol * np.linalg.norm(d3):
    raise ValueError(
        f"plane: points {', '.join(labels)} are collinear: {labels[2]} lies "
        f"{y3:.3g} from the line through {labels[0]} and {labels[1]} (at "
        f"distance {np.linalg.norm(d3):.3g} from {labels[0]}); a plane needs "
        "three points not on one line.")
  v = v / y3
  coordinates = np.array([[0.0, 0.0], [x2, 0.0], [x3, y3]])
  return Plane(spec, w[0], u, v, coordinates, labels)


def grid(coordinates: np.ndarray, *, steps: int = 21,
         margin: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
  """Grid axes covering points with a margin on every side.

  Args:
    coordinates: n x 2, the points' (x, y).
    steps: points per axis, at least 2.
    margin: the margin on each side, as a fraction of the points' extent
      along that axis.

  Returns:
    (xs, ys), each `steps` evenly spaced increasing values.
  """
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
    raise ValueError(f"grid: steps must be an integer >= 2; got {steps!r}.")
  if not (math.isfinite(margin) and margin >= 0):
    raise ValueError(f"grid: margin must be finite and >= 0; got {margin!r}.")
  coordinates = np.asarray(coordinates, np.float64)
  if coordinates.ndim != 2 or coordinates.shape[1] != 2 or not len(coordinates):
    raise ValueError("grid: coordinates must be an n x 2 array with n >= 1; "
                     f"got shape {coordinates.shape}.")
  low, high = coordinates.min(axis=0), coordinates.max(axis=0)
  if not np.all(high > low):
    raise ValueError("grid: the points must spread along both axes; got x "
                     f"range [{low[0]:.4g}, {high[0]:.4g}] and y range "
                     f"[{low[1]:.4g}, {high[1]:.4g}].")
  pad = margin * (high - low)
  return tuple(np.linspace(a, b, steps) for a, b in zip(low - pad, high + pad))


def surface(points: Sequence[PyTree],
            evaluate: Callable[[PyTree], Mapping[str, float]], *,
            labels: Sequence[str] = LABELS, steps: int = 21,
            margin: float = 0.2) -> Surface:
  """Evaluates the networks on a grid of the plane through three points.

  Args:
    points: three parameter trees (see `plane`).
    evaluate: params -> {metric name: scalar}, the same names at every
      point, e.g. {"train_loss", "test_error"}; it recomputes batch-norm
      statistics itself if the model has any.
    labels: the points' names.
    steps: grid points per axis (`steps`**2 evaluations).
    margin: grid margin as a fraction of the points' extent (see `grid`).

  Returns:
    The metrics over the grid, with the points' coordinates and labels.
  """
  frame = plane(points, labels)
  xs, ys = grid(frame.coordinates, steps=steps, margin=margin)
  metrics: dict[str, np.ndarray] = {}
  cells = list(itertools.product(range(len(ys)), range(len(xs))))
  for j, i in tqdm.tqdm(cells, desc="loss surface", leave=False, disable=None):
    where = f"surface: evaluate at grid point (x={xs[i]:.4g}, y={ys[j]:.4g})"
    values = evaluate(frame.params(xs[i], ys[j]))
    if not metrics:
      if not values:
        raise ValueError(f"{where} returned no metrics.")
      metrics = {k: np.full((len(ys), len(xs)), np.nan) for k in values}
    if set(values) != set(metrics):
      raise ValueError(f"{where} returned metrics {sorted(values)}; the first "
                       f"point returned {sorted(metrics)}.")
    for name, value in values.items():
      if np.size(value) != 1:
        raise ValueError(f"{where}: metric {name!r} has shape "
                         f"{np.shape(value)}; expected a scalar.")
      metrics[name][j, i] = float(np.asarray(value))
  return Surface(xs, ys, metrics, frame.coordinates, frame.labels)


def to_dict(result: Surface) -> dict[str, Any]:
  """The surface as JSON data; non-finite metric values become None."""
  return {
      "xs": result.xs.tolist(), "ys": result.ys.tolist(),
      "metrics": {k: np.where(np.isfinite(z), z, None).tolist()
                  for k, z in result.metrics.items()},
      "coordinates": result.coordinates.tolist(),
      "labels": list(result.labels),
  }


def from_dict(data: Mapping[str, Any]) -> Surface:
  """Inverse of `to_dict` (None values become NaN)."""
  return Surface(
      np.asarray(data["xs"], np.float64), np.asarray(data["ys"], np.float64),
      {k: np.asarray(z, np.float64) for k, z in data["metrics"].items()},
      np.asarray(data["coordinates"], np.float64), tuple(data["labels"]))


def plot(result: Surface, path: str | pathlib.Path) -> pathlib.Path:
  """Writes the train-loss and test-error (%) contour maps of the plane.

  Args:
    result: a surface with metrics "train_loss" and "test_error" (a fraction).
    path: the PNG file to write; its folder is created.

  Returns:
    The path written.
  """
  panels = (("train_loss", 1.0, "train loss"),
            ("test_error", 100.0, "test error (%)"))
  missing = [name for name, _, _ in panels if name not in result.metrics]
  if missing:
    raise ValueError(f"plot: the surface lacks metrics {missing}; it has "
                     f"{sorted(result.metrics)}.")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig = figure.Figure(figsize=(11, 4.5))
  backend_agg.FigureCanvasAgg(fig)
  labels = result.labels
  for k, (name, scale, title) in enumerate(panels):
    ax = fig.add_subplot(1, 2, k + 1)
    z = np.ma.masked_invalid(scale * result.metrics[name])
    levels = _levels(z)
    filled = ax.contourf(result.xs, result.ys, z, levels=levels,
                         cmap="viridis_r")
    ax.contour(result.xs, result.ys, z, levels=levels, colors="white",
               linewidths=0.4, alpha=0.6)
    fig.colorbar(filled, ax=ax, format="%.3g")
    for (x, y), label, marker in zip(result.coordinates, labels, "os*"):
      ax.plot([x], [y], marker=marker, color="black", markerfacecolor="white",
              markersize=11 if marker == "*" else 8, linestyle="none")
      ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6),
                  fontsize=9, color="black",
                  bbox={"boxstyle": "round,pad=0.2", "fc": "white",
                        "alpha": 0.7, "lw": 0})
    ax.set_xlabel(f"along {labels[1]} - {labels[0]}")
    ax.set_ylabel(f"towards {labels[2]}")
    ax.set_title(title)
  fig.suptitle(f"plane through {', '.join(labels)}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def _levels(z: np.ma.MaskedArray, count: int = 12) -> np.ndarray:
  """Contour levels from the minimum up, log-spaced to resolve the basins.

  As Garipov et al.'s plots: the level gaps grow geometrically from the
  minimum, so the low region near the solutions gets most of the colors.
  """
  if z.count() == 0:
    raise ValueError("plot: every value of a metric is NaN or infinite.")
  low, high = float(z.min()), float(z.max())
  span = max(high - low, 1e-12 * max(1.0, abs(low)))
  return low + span * np.concatenate(([0.0], np.geomspace(1e-3, 1.0, count)))
