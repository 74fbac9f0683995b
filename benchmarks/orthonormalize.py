"""Orthonormalization: twa_jax's orthonormalizer against Gram-Schmidt and QR.

Sides, all starting from the same host snapshot matrix W (n x D, float32):

* ``twa``: `twa_jax.basis.orthonormalize` (rank-revealing CholeskyQR2 on the
  middle snapshot and the differences from it, float64 Gram, jitted);
* ``cgs``: classical Gram-Schmidt as the paper's reference code does it
  (eq. 3: each snapshot minus all earlier directions at once,
  e_i ~ w_i - P_<i (P_<i^T w_i), float32), jitted, with growing static
  slices (``cgs_masked``: the same with a masked `fori_loop`);
* ``cgs_numpy``: the same loop in numpy (float32 BLAS);
* ``householder``: `jnp.linalg.qr` of W^T (reduced);
* ``twa_device``: ``twa`` with W already on the device and no host copy:
  the same computation, but its memory is measured with W written into a
  device buffer one snapshot at a time (what `basis_from_store` and
  `basis_from_snapshots` hand the orthonormalizer once the host copy is
  dropped).

Reported per kind of snapshots (random Gaussian, trajectory-like with
consecutive cosine 0.99999, or real ones from a TrajectoryStore): median
time, its ratio to ``cgs``, orthogonality error max|P^T P - I|, relative
reconstruction error max_i |w_i - P P^T w_i| / |w_i| (float64 checks), and
peak resident memory of a fresh process doing only that side, as a multiple
of W's size (peak minus the process' size before W existed).

  python benchmarks/orthonormalize.py            # D = 1e6, n = 100
  python benchmarks/orthonormalize.py --smoke    # tiny, for tests
  python benchmarks/orthonormalize.py --store DIR  # add a real trajectory
"""

from __future__ import annotations

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from twa_jax import kernels  # pylint: disable=wrong-import-position
from twa_jax.orthonormalize import LOCAL_PASSES, default_rtol, orthonormalize  # pylint: disable=wrong-import-position
from twa_jax.tree import ParamSpec  # pylint: disable=wrong-import-position


def _rtol(w: np.ndarray) -> float:
  """The builder's default cut-off for float32 snapshots W."""
  return default_rtol(ParamSpec.of(w[0]), w.shape[0])


# --- the sides: host W (n x D float32) -> basis rows (k x D) -------------------

def twa_side(w: np.ndarray) -> jax.Array:
  vectors, _ = orthonormalize(w, rtol=_rtol(w))
  return vectors


@jax.jit
def _cgs_slices(w: jax.Array) -> jax.Array:
  rows = []
  for i in range(w.shape[0]):
    v = w[i]
    if rows:
      p = jnp.stack(rows)
      v = v - (p @ v) @ p
    rows.append(v / jnp.linalg.norm(v))
  return jnp.stack(rows)


@jax.jit
def _cgs_masked(w: jax.Array) -> jax.Array:
  def body(i, p):
    v = w[i] - (p @ w[i]) @ p  # rows >= i of p are still zero
    return p.at[i].set(v / jnp.linalg.norm(v))
  return jax.lax.fori_loop(0, w.shape[0], body, jnp.zeros_like(w))


def cgs_side(w: np.ndarray) -> jax.Array:
  return _cgs_slices(jnp.asarray(w))


def cgs_masked_side(w: np.ndarray) -> jax.Array:
  return _cgs_masked(jnp.asarray(w))


def cgs_numpy_side(w: np.ndarray) -> np.ndarray:
  p = np.empty_like(w)
  for i in range(w.shape[0]):
    v = w[i] - (p[:i] @ w[i]) @ p[:i]
    p[i] = v / np.linalg.norm(v)
  return p


@jax.jit
def _householder(w: jax.Array) -> jax.Array:
  q, _ = jnp.linalg.qr(w.T, mode="reduced")
  return q.T


def householder_side(w: np.ndarray) -> jax.Array:
  return _householder(jnp.asarray(w))


def chunked_twa_side(chunk: int):
  """`twa` with column blocks of `chunk` instead of `kernels.CHUNK`."""
  passes = LOCAL_PASSES._replace(
      center=jax.jit(functools.partial(kernels.center, chunk=chunk),
                     donate_argnums=0),
      combine_and_gram=jax.jit(
          functools.partial(kernels.combine_and_gram, chunk=chunk),
          donate_argnums=1),
      combine=jax.jit(functools.partial(kernels.combine64, chunk=chunk),
                      static_argnums=2, donate_argnums=1))
  def side(w: np.ndarray) -> jax.Array:
    vectors, _ = orthonormalize(w, rtol=_rtol(w), passes=passes)
    return vectors
  return side


SIDES = {"twa": twa_side, "twa_device": twa_side, "cgs": cgs_side, "cgs_masked": cgs_masked_side,
         "cgs_numpy": cgs_numpy_side, "householder": householder_side}


# --- snapshots and error measures -----------------------------------------------

def snapshots(kind: str, n: int, d: int, seed: int = 0,
              store: str | None = None) -> np.ndarray:
  """W (n x D float32): 'random', 'trajectory' (cosine 0.99999) or 'store'."""
  if kind == "store":
    from twa_jax.store import TrajectoryStore  # pylint: disable=g-import-not-at-top
    with TrajectoryStore(store, create=False) as s:
      steps = s.steps
      if n and len(steps) > n:  # n evenly spaced snapshots
        steps = [steps[i] for i in np.linspace(0, len(steps) - 1, n).astype(int)]
      _, w = s.read_matrix(steps)
    return np.ascontiguousarray(w, np.float32)
  w = np.empty((n, d), np.float32)
  for i, row in enumerate(snapshot_rows(kind, n, d, seed)):
    w[i] = row
  return w


def snapshot_rows(kind: str, n: int, d: int, seed: int = 0):
  """The rows of W for 'random' or 'trajectory', one at a time."""
  rng = np.random.default_rng(seed)
  row = rng.standard_normal(d, np.float32)
  yield row
  # Random walk w_i = w_0 + sum of steps; |step| / |w| = sqrt(2 * 1e-5) gives
  # consecutive cosine similarity about 0.99999.
  scale = np.sqrt(2e-5) * np.linalg.norm(row) / np.sqrt(d)
  for _ in range(1, n):
    step = rng.standard_normal(d, np.float32)
    row = step if kind == "random" else (row + scale * step).astype(np.float32)
    yield row


@functools.partial(jax.jit, donate_argnums=0)
def _set_row(w: jax.Array, i, row: jax.Array) -> jax.Array:
  return w.at[i].set(row)


def device_snapshots(kind: str, n: int, d: int) -> jax.Array:
  """W on the device, written one row at a time (no host copy of W)."""
  w = jnp.zeros((n, d), jnp.float32)
  for i, row in enumerate(snapshot_rows(kind, n, d)):
    w = _set_row(w, i, row)
  return jax.block_until_ready(w)


def consecutive_cosine(w: np.ndarray) -> float:
  a, b = w[:-1].astype(np.float64), w[1:].astype(np.float64)
  return float(np.min(np.sum(a * b, 1) / np.linalg.norm(a, axis=1)
                      / np.linalg.norm(b, axis=1))) if len(w) > 1 else 1.0


def errors(w: np.ndarray, p) -> dict:
  """max|P P^T - I| and max_i |w_i - P^T P w_i| / |w_i|, in float64 blocks."""
  p = np.asarray(p, np.float32)
  k, d = p.shape
  gram = np.zeros((k, k))
  coords = np.zeros((w.shape[0], k))
  block = 1 << 16
  for s in range(0, d, block):
    pb = p[:, s:s + block].astype(np.float64)
    gram += pb @ pb.T
    coords += w[:, s:s + block].astype(np.float64) @ pb.T
  res2 = np.zeros(w.shape[0])
  for s in range(0, d, block):
    wb = w[:, s:s + block].astype(np.float64)
    res2 += np.sum((wb - coords @ p[:, s:s + block].astype(np.float64)) ** 2, 1)
  norms = np.linalg.norm(w.astype(np.float64), axis=1)
  return {"dim": k,
          "orth_err": float(np.abs(gram - np.eye(k)).max()),
          "recon_err": float(np.max(np.sqrt(res2) / norms))}


# --- peak memory in a fresh process ---------------------------------------------

def child(side: str, kind: str, n: int, d: int, store: str | None) -> None:
  """Runs one side once after a warm-up on a small W; prints JSON."""
  warm = device_snapshots if side == "twa_device" else snapshots
  SIDES[side](warm(kind, n, min(d, 4096)))  # compile paths, allocators
  base = common.peak_rss_bytes()
  if side == "twa_device":
    if kind == "store":
      raise ValueError("twa_device: random or trajectory snapshots only.")
    w = device_snapshots(kind, n, d)
  else:
    w = snapshots(kind, n, d, store=store)
  w_bytes = w.nbytes
  jax.block_until_ready(SIDES[side](w))
  print(json.dumps({"base": base, "peak": common.peak_rss_bytes(),
                    "w_bytes": w_bytes}))


def peak_memory(side: str, kind: str, n: int, d: int, store: str | None) -> float:
  argv = [os.path.abspath(__file__), "--child", side, "--kinds", kind,
          "--n", str(n), "--d", str(d)] + (["--store", store] if store else [])
  if side.startswith("twa_chunk"):
    argv += ["--chunks", side[len("twa_chunk"):]]
  r = common.run_child(argv)
  return (r["peak"] - r["base"]) / r["w_bytes"]


def main(argv=None) -> None:
  p = common.parser("orthonormalize", __doc__.split("\n")[0])
  p.add_argument("--n", type=int, default=100)
  p.add_argument("--d", type=int, default=1_000_000)
  p.add_argument("--kinds", default="random,trajectory")
  p.add_argument("--sides", default=",".join(SIDES))
  p.add_argument("--store", default=None,
                 help="a TrajectoryStore directory: adds kind 'store'")
  p.add_argument("--no-memory", action="store_true")
  p.add_argument("--chunks", default="",
                 help="comma-separated column block sizes: adds sides "
                 "twa_chunk<C> (the orthonormalizer with kernels.CHUNK = C)")
  p.add_argument("--child", default=None, help=argparse_hidden())
  args = p.parse_args(argv)
  if args.smoke:
    args.n, args.d, args.repeats = 6, 2048, 2
  kinds = args.kinds.split(",") + (["store"] if args.store else [])
  for c in filter(None, args.chunks.split(",")):
    SIDES[f"twa_chunk{c}"] = chunked_twa_side(int(c))
  if args.child:
    child(args.child, kinds[0], args.n, args.d, args.store)
    return
  sides = args.sides.split(",")
  rows = []
  for kind in kinds:
    w = snapshots(kind, args.n, args.d, store=args.store)
    n, d = w.shape
    print(f"{kind}: n={n} D={d} min consecutive cosine "
          f"{consecutive_cosine(w):.6f}", flush=True)
    times = common.alternate(
        {s: functools.partial(SIDES[s], w.copy()) for s in sides},
        repeats=args.repeats)
    for s in sides:
      row = {"kind": kind, "side": s, "n": n, "D": d,
             "time_s": common.median(times[s]),
             "ratio_to_cgs": (common.ratio(times[s], times["cgs"])
                              if "cgs" in times else None),
             **errors(w, SIDES[s](w.copy()))}
      if not args.no_memory:
        row["peak_mem_x_W"] = peak_memory(s, kind, n, d, args.store)
      rows.append(row)
      print(common.table([row], list(row)), flush=True)
  columns = ["kind", "side", "dim", "time_s", "ratio_to_cgs", "orth_err",
             "recon_err", "peak_mem_x_W"]
  print(common.table(rows, columns))
  common.write_json(args.out, {"n": args.n, "D": args.d,
                               "repeats": args.repeats, "rows": rows})


def argparse_hidden() -> str:
  import argparse  # pylint: disable=g-import-not-at-top
  return argparse.SUPPRESS


if __name__ == "__main__":
  main()
