"""The orthonormalizer: a rank-revealing CholeskyQR2 of the snapshot matrix.

The small n x n Gram matrices are accumulated in float64 on the devices
(`twa_jax.kernels`) and factored on the host; the device passes over the D
columns are a `ColumnPasses`, local here and column-sharded in
`twa_jax.sharding`, so both share the host side.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from twa_jax import kernels


class ColumnPasses(NamedTuple):
  """The device side of :func:`orthonormalize`: its passes over the columns.

  `twa_jax.sharding` supplies column-sharded versions (the same kernels
  under `jax.shard_map`, Grams summed by psum); the host side is shared.

  Attributes:
    put: host float64 matrix -> device array (replicated where sharded).
    center: W -> (V, V V^T), see `kernels.center`; consumes W.
    combine_and_gram: (C, V) -> (Q = C V, Q Q^T); consumes V.
    combine: (C, Q, dtype) -> C Q rounded to dtype; consumes Q.
  """

  put: Callable[[np.ndarray], jax.Array]
  center: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
  combine_and_gram: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
  combine: Callable[[jax.Array, jax.Array, Any], jax.Array]


LOCAL_PASSES = ColumnPasses(
    put=jnp.asarray,
    center=jax.jit(kernels.center, donate_argnums=0),
    combine_and_gram=jax.jit(kernels.combine_and_gram, donate_argnums=1),
    combine=jax.jit(kernels.combine64, static_argnums=2, donate_argnums=1),
)


class EmptySpanError(ValueError):
  """Every snapshot is zero (found on the devices, so by every process)."""


def default_rtol(eps: float) -> float:
  """Relative singular-value cut-off for snapshots stored with precision eps."""
  return 10.0 * eps


def orthonormalize(matrix: jax.Array | np.ndarray, *, rtol: float,
                   dtype=jnp.float32, passes: ColumnPasses = LOCAL_PASSES
                   ) -> tuple[jax.Array, np.ndarray]:
  """Rank-revealing orthonormal basis of the row space of `matrix`.

  CholeskyQR2 on a better-conditioned generating set: the rows are replaced
  by the middle snapshot w_r and the differences w_i - w_r (the same span,
  exactly, since w_i = (w_i - w_r) + w_r), which are far from collinear along
  a training trajectory even when the snapshots themselves have cosine
  similarity 0.99999. The Gram matrices are
  accumulated in float64 and factored on the host (they are n x n); the three
  passes over the D columns are jitted, blockwise float64 matrix products
  (each result rounded to float32 once), with their inputs donated.

  Args:
    matrix: W, n x D, one snapshot per row (float32). It is consumed (its
      device buffer is donated).
    rtol: directions whose singular value of W is below `rtol` times the
      largest one are dropped.
    dtype: storage dtype of the result.
    passes: the device passes over the columns (default: one device;
      `twa_jax.sharding` passes column-sharded ones).

  Returns:
    The basis rows (k x D, orthonormal, ordered by decreasing singular value
    of W) and the k kept singular values of W.

  Raises:
    EmptySpanError: every snapshot is zero.
  """
  w = jnp.asarray(matrix, jnp.float32)
  n = w.shape[0]
  with jax.enable_x64(True), warnings.catch_warnings():
    # Donation only helps where shapes match (k == n); the rest is expected.
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    v, gram = passes.center(w)
    gram = np.asarray(gram)
    # Pass 1: whiten the normalized generating set; drop exact dependencies.
    norms = np.sqrt(np.diag(gram))
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    evals, evecs = np.linalg.eigh(scale[:, None] * gram * scale[None, :])
    keep = evals > max(evals[-1], 0.0) * 1e-12
    if not keep.any():
      raise EmptySpanError(
          "snapshots: every snapshot is zero; the span is empty.")
    c1 = (evecs[:, keep] / np.sqrt(evals[keep])).T * scale[None, :]
    q, gram2 = passes.combine_and_gram(passes.put(c1), v)
    del v
    # Pass 2 (CholeskyQR2): re-orthonormalize, then rank-reveal on W itself.
    chol = np.linalg.cholesky(np.asarray(gram2))
    chol_inv = scipy.linalg.solve_triangular(
        chol, np.eye(chol.shape[0]), lower=True)
    # W = T^-1 V with w_i = v_i + v_r (i != r) and w_r = v_r.
    t_inv = np.eye(n)
    t_inv[:, n // 2] = 1.0
    # W Q^T = T^-1 (V V^T) C1^T L^-T, all n x k and float64.
    r = t_inv @ gram @ c1.T @ chol_inv.T
    _, svals, zt = np.linalg.svd(r, full_matrices=False)
    kept = svals > rtol * svals[0]
    rotation = zt[kept] @ chol_inv
    vectors = passes.combine(passes.put(rotation), q, jnp.dtype(dtype))
  return vectors, svals[kept]
