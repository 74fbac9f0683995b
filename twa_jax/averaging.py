"""Averaging baselines and the averaging coefficients of a solution."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from twa_jax import tree as tree_lib
from twa_jax.basis import Basis

PyTree = Any


def swa(snapshots: Sequence[PyTree] | PyTree) -> PyTree:
  """Uniform average of the snapshots (SWA; TWA's head-stage start).

  Args:
    snapshots: as for `Basis.from_snapshots`: a list or tuple of parameter
      trees, or one tree with a leading snapshot axis.

  Returns:
    The mean tree, accumulated in float32, in the snapshots' dtypes.
  """
  spec, matrix = tree_lib.stack_snapshots(snapshots)
  return spec.unravel(jnp.asarray(matrix.mean(axis=0, dtype=np.float64)))


def averaging_coefficients(params: PyTree, snapshots: Sequence[PyTree] | PyTree,
                           basis=None) -> jax.Array | dict[str, jax.Array]:
  """Coefficients alpha with sum_i alpha_i w_i = params (least squares).

  The paper's Appendix D reads these off a trained TWA solution; they sum to
  about 1. Solved stably in the orthonormal coordinates: with B = W P (the
  snapshots' coordinates, n x k) and beta = P^T params, alpha is the
  minimum-norm least-squares solution of B^T alpha = beta (an SVD of the
  small k x n system, never an inverse of W^T W).

  Args:
    params: a parameter tree (e.g. the TWA solution).
    snapshots: the snapshots w_1..w_n.
    basis: their `Basis` or `BlockBasis`, if already built (saves an
      orthonormalization).

  Returns:
    alpha, shape (n,), float32; for a layer-wise `BlockBasis`, a dict of
    such vectors, one per block.
  """
  spec, matrix = tree_lib.stack_snapshots(snapshots)
  basis = basis or Basis.from_matrix(spec, matrix.copy())
  spec.check(params, what="averaging_coefficients: params")
  coords = jax.jit(jax.vmap(lambda row: basis.coordinates(spec.unravel(row))))
  def solve(b, beta):
    alpha, *_ = np.linalg.lstsq(np.asarray(b, np.float64).T,
                                np.asarray(beta, np.float64), rcond=None)
    return jnp.asarray(alpha, jnp.float32)
  return jax.tree.map(solve, coords(jnp.asarray(matrix)),
                      basis.coordinates(params))
