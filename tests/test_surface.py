"""Loss surface on the plane through three solutions: frame, grid, plot."""

import json

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import strategies
from twa_jax.training import surface as surface_lib


def _points(layout, seed: int, scale: float = 1.0) -> list:
  d = strategies._size(layout)
  rng = np.random.default_rng(seed)
  w1 = rng.normal(size=d)
  return [strategies.fill(layout, w)
          for w in (w1, w1 + scale * rng.normal(size=d),
                    w1 + scale * rng.normal(size=d))]


@given(strategies.layouts(strategies.DTYPES), st.sampled_from([1.0, 0.01]),
       st.integers(0, 2**32 - 1))
def test_frame_is_orthonormal_and_reconstructs_the_points(layout, scale, seed):
  points = _points(layout, seed, scale)
  frame = surface_lib.plane(points)
  np.testing.assert_allclose(
      np.stack([frame.u, frame.v]) @ np.stack([frame.u, frame.v]).T,
      np.eye(2), atol=1e-12)
  np.testing.assert_array_equal(frame.origin, strategies.flat(points[0]))
  (x1, y1), (x2, y2), (_, y3) = frame.coordinates
  assert x1 == y1 == y2 == 0.0 and x2 > 0.0 and y3 > 0.0
  for point, (x, y) in zip(points, frame.coordinates):
    rebuilt = frame.params(x, y)
    assert (jax.tree_util.tree_structure(rebuilt)
            == jax.tree_util.tree_structure(point))
    for a, b in zip(jax.tree_util.tree_leaves(rebuilt),
                    jax.tree_util.tree_leaves(point)):
      assert a.dtype == b.dtype and a.shape == b.shape
      # float64 arithmetic rounds back to the stored values (1 ulp at most).
      np.testing.assert_allclose(np.asarray(a, np.float64),
                                 np.asarray(b, np.float64),
                                 rtol=float(jax.numpy.finfo(b.dtype).eps),
                                 atol=1e-12)


def test_surface_matches_analytic_quadratics():
  layout = {"params": {"w": strategies.Leaf((4, 5)),
                       "b": strategies.Leaf((3,))}}
  points = _points(layout, seed=0)
  w1, w2, w3 = (strategies.flat(p) for p in points)

  def evaluate(params):
    delta = strategies.flat(params) - w1
    return {"train_loss": delta @ delta,  # x^2 + y^2 in the frame
            "along_w2": delta @ (w2 - w1),  # x |w2 - w1|
            "along_w3": delta @ (w3 - w1)}  # x x3 + y y3

  result = surface_lib.surface(points, evaluate, steps=5, margin=0.3)
  assert result.labels == ("SGD", "SWA", "TWA")
  x, y = np.meshgrid(result.xs, result.ys)  # [j, i] = (xs[i], ys[j])
  (_, _), (x2, _), (x3, y3) = result.coordinates
  np.testing.assert_allclose(x2, np.linalg.norm(w2 - w1), rtol=1e-12)
  np.testing.assert_allclose(np.hypot(x3, y3), np.linalg.norm(w3 - w1),
                             rtol=1e-12)
  tol = 1e-5 * (np.linalg.norm(w2 - w1) + np.linalg.norm(w3 - w1))**2
  np.testing.assert_allclose(result.metrics["train_loss"], x**2 + y**2,
                             atol=tol)
  np.testing.assert_allclose(result.metrics["along_w2"], x * x2, atol=tol)
  np.testing.assert_allclose(result.metrics["along_w3"], x * x3 + y * y3,
                             atol=tol)


def test_grid_covers_the_points_with_the_margin():
  coordinates = np.array([[0.0, 0.0], [2.0, 0.0], [-1.0, 3.0]])
  xs, ys = surface_lib.grid(coordinates, steps=7, margin=0.2)
  assert xs.shape == ys.shape == (7,)
  np.testing.assert_allclose([xs[0], xs[-1]], [-1.6, 2.6])
  np.testing.assert_allclose([ys[0], ys[-1]], [-0.6, 3.6])
  assert np.all(np.diff(xs) > 0) and np.all(np.diff(ys) > 0)
  xs, ys = surface_lib.grid(coordinates, steps=2, margin=0.0)
  np.testing.assert_array_equal(xs, [-1.0, 2.0])
  np.testing.assert_array_equal(ys, [0.0, 3.0])


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 1}, "steps must be an integer >= 2"),
    ({"steps": 3.0}, "steps must be an integer >= 2"),
    ({"margin": -0.1}, "margin must be finite and >= 0"),
    ({"margin": float("nan")}, "margin must be finite and >= 0"),
])
def test_grid_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    surface_lib.grid(np.array([[0.0, 0.0], [1.0, 1.0]]), **kwargs)


def test_grid_rejects_points_without_extent():
  with pytest.raises(ValueError, match="spread along both axes"):
    surface_lib.grid(np.array([[0.0, 1.0], [2.0, 1.0]]))


@pytest.mark.parametrize("pair, names", [
    ((0, 1), "SGD and SWA"), ((0, 2), "SGD and TWA"), ((1, 2), "SWA and TWA")])
def test_plane_names_coincident_points(pair, names):
  rng = np.random.default_rng(1)
  w = [rng.normal(size=10) for _ in range(3)]
  w[pair[1]] = w[pair[0]].copy()
  points = [{"w": np.asarray(x, np.float32)} for x in w]
  with pytest.raises(ValueError, match=f"points {names} coincide"):
    surface_lib.plane(points)


@pytest.mark.parametrize("t", [-1.5, 0.5, 3.0])
def test_plane_rejects_collinear_points(t):
  rng = np.random.default_rng(2)
  w1, w2 = rng.normal(size=(2, 50))
  w3 = w1 + t * (w2 - w1)  # rounded to float32: collinear up to rounding
  points = [{"w": np.asarray(x, np.float32)} for x in (w1, w2, w3)]
  with pytest.raises(ValueError, match="SGD, SWA, TWA are collinear: TWA"):
    surface_lib.plane(points)


def test_plane_rejects_wrong_count_and_mismatched_layouts():
  a = {"w": np.ones(3, np.float32)}
  with pytest.raises(ValueError, match="needs 3 points and 3 labels; got 2"):
    surface_lib.plane([a, a])
  with pytest.raises(ValueError, match="labels"):
    surface_lib.plane([a, a, a], labels=("a", "b"))
  with pytest.raises(ValueError, match="snapshot 2: leaf \\['w'\\] has shape"):
    surface_lib.plane([a, {"w": np.zeros(3, np.float32)},
                       {"w": np.zeros(4, np.float32)}])


def test_surface_rejects_inconsistent_metrics():
  points = [{"w": np.asarray(x, np.float32)} for x in np.eye(3)]
  calls = []

  def evaluate(params):
    calls.append(params)
    return {"loss": 1.0} if len(calls) == 1 else {"loss": 1.0, "extra": 2.0}

  with pytest.raises(ValueError,
                     match="returned metrics \\['extra', 'loss'\\]"):
    surface_lib.surface(points, evaluate, steps=2)
  with pytest.raises(ValueError, match="metric 'loss' has shape \\(2,\\)"):
    surface_lib.surface(points, lambda p: {"loss": np.ones(2)}, steps=2)


def test_plot_and_json_round_trip(tmp_path):
  points = [{"w": np.asarray(x, np.float32)} for x in np.eye(3)]

  def evaluate(params):
    w = np.asarray(params["w"], np.float64)
    return {"train_loss": float(w @ w), "test_error": float(abs(w[0]) / 2)}

  result = surface_lib.surface(points, evaluate, labels=("A", "B", "C"),
                               steps=3)
  assert result.metrics["train_loss"].shape == (3, 3)
  result.metrics["train_loss"][0, 0] = np.nan  # a diverged grid point
  data = json.loads(json.dumps(surface_lib.to_dict(result), allow_nan=False))
  assert data["labels"] == ["A", "B", "C"]
  assert data["metrics"]["train_loss"][0][0] is None
  back = surface_lib.from_dict(data)
  for a, b in zip(back[:2] + back[3:], result[:2] + result[3:]):
    np.testing.assert_array_equal(a, b)
  for name, z in result.metrics.items():
    np.testing.assert_array_equal(back.metrics[name], z)

  path = surface_lib.plot(back, tmp_path / "plots" / "surface.png")
  assert path == tmp_path / "plots" / "surface.png"
  assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 1000
  del back.metrics["test_error"]
  with pytest.raises(ValueError, match="lacks metrics \\['test_error'\\]"):
    surface_lib.plot(back, tmp_path / "other.png")
