"""Averaging baselines (SWA, greedy soup) and the coefficients of a solution."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from twa_jax import tree as tree_lib
from twa_jax import build

PyTree = Any


def swa(snapshots: Sequence[PyTree] | Iterator[PyTree] | PyTree) -> PyTree:
  """Uniform average of the snapshots (SWA; TWA's head-stage start).

  Args:
    snapshots: as for `twa_jax.basis_from_snapshots`: a list or tuple of
      parameter trees, one tree with a leading snapshot axis, or an iterator
      of trees (read one at a time: e.g. a generator loading each snapshot
      from a store holds one in memory).

  Returns:
    The mean tree, accumulated in float64, in the snapshots' dtypes.
  """
  spec, _, rows = tree_lib.snapshot_rows(snapshots)
  total, n = np.zeros((spec.num_params,), np.float64), 0
  for row in rows:
    total += row
    n += 1
  return spec.unravel(jnp.asarray(total / n))


def greedy_soup(candidates: Sequence[PyTree],
                score: Callable[[PyTree], float], *,
                scores: Sequence[float] | None = None
                ) -> tuple[PyTree, list[int]]:
  """Greedy soup (Wortsman et al. 2022): average models while it helps.

  The candidates are ranked by their own score (ties keep their order); the
  best starts the soup, then each next one is added (the soup being the
  uniform average of those kept, `swa`) if the soup's score does not drop.
  Score on held-out data: the selection fits whatever `score` measures.

  Args:
    candidates: parameter trees of one structure (e.g. models trained with
      different seeds or hyper-parameters).
    score: higher is better (e.g. held-out accuracy of a parameter tree).
    scores: the candidates' own scores, if already known (saves n calls).

  Returns:
    The soup and the indices of the candidates kept, in the order added.

  Raises:
    ValueError: a candidate differs in layout from the first or holds NaN
      or Inf (its index named), before any scoring.
  """
  if not candidates:
    raise ValueError("greedy_soup: no candidates.")
  spec = tree_lib.ParamSpec.of(candidates[0], what="candidate 0")
  for i, candidate in enumerate(candidates):  # layout and NaN/Inf, by index
    tree_lib.flatten_snapshot(spec, candidate, what=f"candidate {i}")
  if scores is None:
    scores = [float(score(c)) for c in candidates]
  elif len(scores) != len(candidates):
    raise ValueError(f"greedy_soup: {len(scores)} scores for "
                     f"{len(candidates)} candidates.")
  order = sorted(range(len(candidates)), key=lambda i: -scores[i])
  kept, soup, best = [order[0]], candidates[order[0]], scores[order[0]]
  for i in order[1:]:
    trial = swa([candidates[j] for j in kept + [i]])
    trial_score = float(score(trial))
    if trial_score >= best:
      kept, soup, best = kept + [i], trial, trial_score
  return soup, kept


def averaging_coefficients(
    params: PyTree, snapshots: Sequence[PyTree] | Iterator[PyTree] | PyTree,
    basis=None) -> jax.Array | dict[str, jax.Array]:
  """Coefficients alpha with sum_i alpha_i w_i = params (least squares).

  The paper's Appendix D reads these off a trained TWA solution; they sum to
  about 1. Solved stably in the orthonormal coordinates: with B = W P (the
  snapshots' coordinates, n x k) and beta = P^T params, alpha is the
  minimum-norm least-squares solution of B^T alpha = beta (an SVD of the
  small k x n system, never an inverse of W^T W).

  Args:
    params: a parameter tree (e.g. the TWA solution).
    snapshots: the snapshots w_1..w_n, as for `swa`; with `basis`, B is
      accumulated one snapshot at a time, so an iterator (e.g. a generator
      loading each from a store) holds one snapshot in memory.
    basis: their `Basis` or `BlockBasis`, if already built (saves an
      orthonormalization; may be sharded over a mesh).

  Returns:
    alpha, shape (n,), float32; for a layer-wise `BlockBasis`, a dict of
    such vectors, one per block.
  """
  if basis is None:
    spec, matrix = tree_lib.stack_snapshots(snapshots)
    basis, rows = build.from_matrix(spec, matrix.copy()), iter(matrix)
  else:
    spec, _, rows = tree_lib.snapshot_rows(snapshots)
  spec.check(params, what="averaging_coefficients: params")
  coords = jax.jit(lambda row: basis.coordinates(spec.unravel(row)))
  b = [jax.tree.map(np.asarray, coords(jnp.asarray(row))) for row in rows]
  def solve(beta, *b_rows):
    alpha, *_ = np.linalg.lstsq(np.asarray(b_rows, np.float64).T,
                                np.asarray(beta, np.float64), rcond=None)
    return jnp.asarray(alpha, jnp.float32)
  return jax.tree.map(solve, basis.coordinates(params), *b)
