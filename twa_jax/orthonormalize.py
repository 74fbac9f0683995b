"""The orthonormalizer: a rank-revealing CholeskyQR2 of the snapshot matrix.

The small n x n Gram matrices are accumulated in float64 on the devices
(`twa_jax.kernels`) and factored on the host; the device passes over the D
columns are a `ColumnPasses`, local here and column-sharded in
`twa_jax.sharding`, so both share the host side.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from twa_jax import kernels
from twa_jax import tree as tree_lib

_LOG = logging.getLogger(__name__)
_SAFETY = 10.0  # the default cut-off, in units of the expected rounding noise


class ColumnPasses(NamedTuple):
  """The device side of :func:`orthonormalize`: its passes over the columns.

  `twa_jax.sharding` supplies column-sharded versions (the same kernels
  under `jax.shard_map`, Grams summed by psum); the host side is shared.

  Attributes:
    put: host float64 matrix -> device array (replicated where sharded).
    center: W -> (V, V V^T), see `kernels.center`; consumes W.
    combine_and_gram: (C, V) -> (Q = C V, Q Q^T), C n x n; Q is written
      over V (consumed).
    combine: (C, Q, dtype) -> C Q rounded to dtype; consumes Q (and writes
      over it where C is square and dtype is Q's).
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


def _in_ref(kernel: Callable[..., tuple[jax.Array, jax.Array]]
            ) -> Callable[..., tuple[jax.Ref, jax.Array]]:
  """A rewriting pass, kernel(*args, x) -> (y, gram), run on x held in a
  `jax.Ref` (the last argument): jitted, y is written back into the Ref's
  buffer (in place, as over a donated x). Returns (the Ref, gram)."""
  @jax.jit
  def run(*args):
    *rest, ref = args
    out, gram = kernel(*rest, ref[...])
    ref[...] = out
    return gram
  return lambda *args: (args[-1], run(*args))


@functools.partial(jax.jit, static_argnums=2)
def _combine_ref(c: jax.Array, ref: jax.Ref, dtype) -> jax.Array | None:
  """`kernels.combine64` of the rows in `ref`: written back into it where it
  combines in place (None returned), else a new array."""
  out = kernels.combine64(c, ref[...], dtype)
  if kernels.combines_in_place(c, ref, dtype):
    ref[...] = out
    return None
  return out


def _combine_in_ref(c: jax.Array, ref: jax.Ref, dtype) -> jax.Array | jax.Ref:
  """The combined rows: `ref` itself where written over it, else an array."""
  out = _combine_ref(c, ref, dtype)
  return ref if out is None else out


# The passes on W held in a `jax.Ref`: each writes over the Ref's buffer, so
# the basis ends in the Ref that W was written into (where nothing is
# dropped and it is float32), and no second Ref need be filled with a copy.
REF_PASSES = ColumnPasses(
    put=jnp.asarray,
    center=_in_ref(kernels.center),
    combine_and_gram=_in_ref(kernels.combine_and_gram),
    combine=_combine_in_ref,
)


class EmptySpanError(ValueError):
  """Every snapshot is zero (found on the devices, so by every process)."""


class Spectrum(NamedTuple):
  """The singular values of W and the cut-off that chose the basis from them.

  Attributes:
    values: the n singular values of W, decreasing (0.0 for the directions
      of exact linear dependencies).
    cutoff: directions with a singular value at or below it were dropped.
  """

  values: tuple[float, ...]
  cutoff: float

  @property
  def dim(self) -> int:
    """The number of directions kept."""
    return sum(v > self.cutoff for v in self.values)

  @property
  def dropped(self) -> int:
    """The number of directions dropped (dependent or below the cut-off)."""
    return len(self.values) - self.dim

  @property
  def condition(self) -> float:
    """The condition number of W (inf where its rows are dependent)."""
    return self.values[0] / self.values[-1] if self.values[-1] > 0 else math.inf


def check_rtol(rtol: float | None) -> None:
  """Raises a ValueError unless rtol is None or a number in (0, 1)."""
  if rtol is None:
    return
  try:
    value = float(rtol)
  except (TypeError, ValueError):
    raise TypeError(f"rtol: expected a number in (0, 1), got {rtol!r}.") from None
  if not 0.0 < value < 1.0:  # NaN fails too
    raise ValueError(
        f"rtol: must be in (0, 1), a fraction of the largest snapshot's norm; "
        f"got {rtol!r}.")


def default_rtol(spec: tree_lib.ParamSpec, n: int) -> float:
  """The singular-value cut-off that keeps what n snapshots resolve.

  Storing a snapshot w in its dtypes perturbs it by about u |w| (u = eps / 2,
  the unit roundoff, averaged over the leaves by their sizes: a small
  low-precision leaf adds little), and n such independent perturbations of
  D entries have a spectral norm near u |w| (1 + sqrt(n / D)). Directions of
  W below 10 times that are noise; all others are differences the snapshots
  resolve, however small next to the snapshots themselves.

  Args:
    spec: the layout (leaf dtypes and sizes) of one snapshot.
    n: the number of snapshots.

  Returns:
    rtol, relative to the largest snapshot norm.
  """
  d = spec.num_params
  sizes = spec.sizes if d else (1,) * len(spec.sizes)  # no entries: any weights
  u2 = sum(size * (float(jnp.finfo(dtype).eps) / 2) ** 2
           for size, dtype in zip(sizes, spec.dtypes)) / max(sum(sizes), 1)
  return min(_SAFETY * math.sqrt(u2) * (1.0 + math.sqrt(n / max(d, 1))), 0.5)


def orthonormalize(matrix: jax.Array | np.ndarray | jax.Ref, *, rtol: float,
                   dtype=jnp.float32, passes: ColumnPasses | None = None
                   ) -> tuple[jax.Array | jax.Ref, Spectrum]:
  """Rank-revealing orthonormal basis of the row space of `matrix`.

  CholeskyQR2 on a better-conditioned generating set: the rows are replaced
  by the middle snapshot w_r and the differences w_i - w_r (the same span,
  exactly, since w_i = (w_i - w_r) + w_r), which are far from collinear along
  a training trajectory even when the snapshots themselves have cosine
  similarity 0.99999. The Gram matrices are
  accumulated in float64 and factored on the host (they are n x n); the three
  passes over the D columns are jitted, blockwise float64 matrix products
  (each result rounded to float32 once) that write each column block over
  the same block of their donated input, so W, the generating set, Q and
  the basis share one n x D buffer (the basis too where nothing is dropped
  and `dtype` is float32; otherwise it is a new k x D array).

  Args:
    matrix: W, n x D, one snapshot per row (float32). It is consumed (its
      device buffer is donated), or a float32 `jax.Ref` written over in
      place.
    rtol: directions whose singular value of W is at most `rtol` times the
      norm of the largest snapshot are dropped (see `default_rtol`); in
      (0, 1), so the largest direction is always kept. Every dropped
      direction is logged (a warning).
    dtype: storage dtype of the result.
    passes: the device passes over the columns (default: one device,
      `REF_PASSES` for a Ref, else `LOCAL_PASSES`; `twa_jax.sharding` passes
      column-sharded ones).

  Returns:
    The basis rows (k x D, orthonormal, ordered by decreasing singular value
    of W; for a Ref `matrix`, that Ref where the result is written over it)
    and the spectrum of W with the cut-off applied.

  Raises:
    ValueError: rtol is not in (0, 1); W holds NaN or Inf, or snapshots so
      large (|w| near 1.7e38 and above) that their differences overflow.
    EmptySpanError: every snapshot is zero.
  """
  check_rtol(rtol)
  if isinstance(matrix, jax.Ref):
    w, default = matrix, REF_PASSES
  else:
    w, default = jnp.asarray(matrix, jnp.float32), LOCAL_PASSES
  passes = default if passes is None else passes
  n = w.shape[0]
  with jax.enable_x64(True), warnings.catch_warnings():
    # Donation only helps where shapes match (k == n); the rest is expected.
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
    v, gram = passes.center(w)
    gram = np.asarray(gram)
    if not np.isfinite(gram).all():
      raise ValueError(
          "snapshots: W holds NaN or Inf, or snapshots so large (|w| near "
          "float32's 3.4e38) that their differences overflow float32; pass "
          "finite snapshots of moderate size (rescale them).")
    # Pass 1: whiten the normalized generating set; drop exact dependencies.
    norms = np.sqrt(np.diag(gram))
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    evals, evecs = np.linalg.eigh(scale[:, None] * gram * scale[None, :])
    keep = evals > max(evals[-1], 0.0) * 1e-12
    if not keep.any():
      raise EmptySpanError(
          "snapshots: every snapshot is zero; the span is empty.")
    c1 = (evecs[:, keep] / np.sqrt(evals[keep])).T * scale[None, :]
    k1 = c1.shape[0]
    # Q is written over V, so C1 gets zero rows up to n (Q's rows past k1
    # are zero and left out of its Gram).
    q, gram2 = passes.combine_and_gram(passes.put(_pad(c1, n, n)), v)
    del v
    # Pass 2 (CholeskyQR2): re-orthonormalize, then rank-reveal on W itself.
    chol = np.linalg.cholesky(np.asarray(gram2)[:k1, :k1])
    chol_inv = scipy.linalg.solve_triangular(
        chol, np.eye(chol.shape[0]), lower=True)
    # W = T^-1 V with w_i = v_i + v_r (i != r) and w_r = v_r.
    t_inv = np.eye(n)
    t_inv[:, n // 2] = 1.0
    # W Q^T = T^-1 (V V^T) C1^T L^-T, all n x k and float64.
    r = t_inv @ gram @ c1.T @ chol_inv.T
    _, svals, zt = np.linalg.svd(r, full_matrices=False)
    # The largest snapshot norm, from W W^T = T^-1 (V V^T) T^-T.
    size = math.sqrt(np.max(np.diag(t_inv @ gram @ t_inv.T)))
    spectrum = Spectrum(
        tuple(float(s) for s in svals) + (0.0,) * (n - svals.size),
        float(rtol) * size)
    kept = svals > spectrum.cutoff
    rotation = zt[kept] @ chol_inv
    # Written over Q where the rotation is square (nothing dropped, float32).
    vectors = passes.combine(passes.put(_pad(rotation, rotation.shape[0], n)),
                             q, jnp.dtype(dtype))
  _report(spectrum, float(rtol), size)
  return vectors, spectrum


def _pad(matrix: np.ndarray, rows: int, cols: int) -> np.ndarray:
  """`matrix` with zero rows and columns appended up to rows x cols."""
  return np.pad(matrix, ((0, rows - matrix.shape[0]),
                         (0, cols - matrix.shape[1])))


def _report(spectrum: Spectrum, rtol: float, size: float) -> None:
  """Logs the kept dimension, every dropped direction and W's condition."""
  values = np.asarray(spectrum.values) / size
  dropped = values[spectrum.dim:]
  message = (f"orthonormalize: kept {spectrum.dim} of {len(values)} directions"
             f" (condition number of W {spectrum.condition:.3g})")
  if not dropped.size:
    _LOG.info(message)
    return
  _LOG.warning(
      f"{message}; dropped {dropped.size} at or below rtol = {rtol:.3g} of "
      f"the largest snapshot's norm, with singular values (relative to it) "
      f"{np.array2string(dropped, precision=3, max_line_width=10_000)}")
