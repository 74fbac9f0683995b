"""Training-time overhead of recording snapshots with the asynchronous store.

Issue 3, performance item 1. One run alternates two sides on the same
~1M-parameter MLP, batch and jitted SGD step (parameters donated), rotating
their order each repeat:

  plain  `--epochs` epochs of `--steps-per-epoch` steps
  store  the same, with `TrajectoryStore.save(step, params)` at the end of
         every epoch (once per epoch, as in the paper's CIFAR runs); the
         block's time includes the final `wait_until_finished`, so every
         byte written is paid for inside the timed block

Reported: median seconds per epoch of each side and the overhead, the median
over repeats of store/plain - 1 (target <= 2%), in wall time and in CPU time
of this process (all its threads: XLA's and orbax' writers; CPU time is
what the saving costs a training run that has the cores to itself, and it
is much less disturbed by other processes on a shared machine than wall
time), plus the median time spent
inside `save` (what the training loop blocks on, after the queued steps
are done) and in the final wait.

Then the cost of the checksums (issue 13 item 3), on the same snapshots:

  save  the time to compute a snapshot's checksums (in `save`, blocking)
        against the rest of a save (`save` + `wait_until_finished`)
  read  `read_matrix` of every stored snapshot, verified, against the same
        read of a copy of the store marked format version 1 (read without
        checksums), alternating; the median of verified/unverified - 1

  python benchmarks/store_overhead.py
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import twa_jax
from twa_jax import checksums
from twa_jax import store_format
from twa_jax.store import TrajectoryStore

import common  # benchmarks/common.py


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--widths", default="784,1024,256,10",
                 help="MLP layer widths (default: 1.07M parameters)")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps-per-epoch", type=int, default=100)
  p.add_argument("--epochs", type=int, default=4,
                 help="epochs per timed block (one snapshot per epoch)")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes, for the smoke test")
  p.add_argument("--out", default="benchmarks/results/store_overhead.json")
  args = p.parse_args(argv)
  if args.smoke:
    args.widths, args.batch, args.steps_per_epoch = "16,8,4", 4, 3
    args.epochs, args.repeats = 2, 2
  return args


def init_mlp(widths: list[int], key: jax.Array) -> dict:
  params = {}
  for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
    key, sub = jax.random.split(key)
    params[f"Dense_{i}"] = {
        "kernel": jax.random.normal(sub, (a, b)) / np.sqrt(a),
        "bias": jnp.zeros((b,))}
  return {"params": params}


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  layers = params["params"]
  h = x
  for i in range(len(layers)):
    h = h @ layers[f"Dense_{i}"]["kernel"] + layers[f"Dense_{i}"]["bias"]
    if i < len(layers) - 1:
      h = jax.nn.relu(h)
  logp = jax.nn.log_softmax(h)
  return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


@functools.partial(jax.jit, donate_argnums=0)
def sgd_step(params: dict, x: jax.Array, y: jax.Array) -> dict:
  grads = jax.grad(loss_fn)(params, x, y)
  return jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)


def run_block(params, batch, args, store=None, first_step=0):
  """`args.epochs` epochs; with a store, a snapshot at every epoch's end."""
  x, y = batch
  in_save = 0.0
  start, start_cpu = time.perf_counter(), time.process_time()
  step = first_step
  for _ in range(args.epochs):
    for _ in range(args.steps_per_epoch):
      params = sgd_step(params, x, y)
      step += 1
    if store is not None:
      jax.block_until_ready(params)  # time the store, not the queued steps
      t = time.perf_counter()
      store.save(step, params, metadata={"step": step})
      in_save += time.perf_counter() - t
  jax.block_until_ready(params)
  t = time.perf_counter()
  if store is not None:
    store.wait_until_finished()
  wait = time.perf_counter() - t
  return (params, time.perf_counter() - start,
          time.process_time() - start_cpu, in_save, wait)


def checksum_cost(store: TrajectoryStore, params: dict, step: int,
                  repeats: int) -> dict:
  """Checksum time against save time, and verified against unverified
  reads of every snapshot in `store` (see the module docstring)."""
  leaves = jax.tree.leaves(jax.device_get(params))
  saves, sums = [], []
  for r in range(repeats):
    t = time.perf_counter()
    store.save(step + 1 + r, params)
    store.wait_until_finished()
    saves.append(time.perf_counter() - t)
    t = time.perf_counter()
    for leaf in leaves:
      checksums.block_checksums(np.asarray(leaf), store.chunk_bytes)
    sums.append(time.perf_counter() - t)
  save_s, sum_s = statistics.median(saves), statistics.median(sums)
  unverified = f"{store.directory}-v1"
  shutil.copytree(store.directory, unverified,
                  ignore=shutil.ignore_patterns("twa_store.lock"))
  info_path = os.path.join(unverified, store_format.INFO_FILE)
  with open(info_path) as f:
    info = json.load(f)
  info["version"], info["layout"] = 1, info.pop("params")
  with open(info_path, "w") as f:
    json.dump(info, f)
  reads = {"verified": [], "unverified": []}
  with TrajectoryStore(store.directory, read_only=True) as verified, \
      TrajectoryStore(unverified, read_only=True) as plain:
    n = len(verified.steps())
    for r in range(repeats):
      for side in (("verified", "unverified") if r % 2 else
                   ("unverified", "verified")):
        t = time.perf_counter()
        (verified if side == "verified" else plain).read_matrix()
        reads[side].append(time.perf_counter() - t)
  ratios = [v / u for v, u in zip(reads["verified"], reads["unverified"])]
  return {
      "save_s": save_s, "checksum_s": sum_s,
      "save_overhead": sum_s / (save_s - sum_s),
      "read_snapshots": n,
      "read_s": {k: statistics.median(v) for k, v in reads.items()},
      "read_overhead": statistics.median(ratios) - 1.0,
  }


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  widths = [int(w) for w in args.widths.split(",")]
  params = init_mlp(widths, jax.random.key(0))
  num_params = twa_jax.ParamSpec.of(params).num_params
  rng = np.random.default_rng(0)
  batch = (jnp.asarray(rng.standard_normal((args.batch, widths[0]),
                                           np.float32)),
           jnp.asarray(rng.integers(0, widths[-1], args.batch)))
  times = {"plain": [], "store": []}
  ratios, cpu_ratios, in_save, waits = [], [], [], []
  with tempfile.TemporaryDirectory() as directory, \
      TrajectoryStore(os.path.join(directory, "s")) as store:
    params, *_ = run_block(params, batch, args)  # compile, warm up
    params, *_ = run_block(params, batch, args, store, first_step=0)
    step = 10 * args.epochs * args.steps_per_epoch
    for r in range(args.repeats):
      block, cpu = {}, {}
      for side in (("plain", "store") if r % 2 else ("store", "plain")):
        params, seconds, cpu[side], saving, wait = run_block(
            params, batch, args, store if side == "store" else None, step)
        step += args.epochs * args.steps_per_epoch
        block[side] = seconds
        times[side].append(seconds / args.epochs)
        if side == "store":
          in_save.append(saving / args.epochs)
          waits.append(wait)
      ratios.append(block["store"] / block["plain"])
      cpu_ratios.append(cpu["store"] / cpu["plain"])
    saved = len(store.steps())
    cost = checksum_cost(store, params, step, args.repeats)
  epoch = {k: statistics.median(v) for k, v in times.items()}
  result = {
      "benchmark": "store_overhead",
      "config": {k: v for k, v in vars(args).items() if k != "out"},
      "num_params": num_params,
      "snapshot_mb": 4 * num_params / 1e6,
      "snapshots_saved": saved,
      "epoch_s": epoch,
      "save_call_s_per_epoch": statistics.median(in_save),
      "final_wait_s": statistics.median(waits),
      "overhead": statistics.median(ratios) - 1.0,
      "overhead_per_repeat": [r - 1.0 for r in ratios],
      "cpu_overhead": statistics.median(cpu_ratios) - 1.0,
      "cpu_overhead_per_repeat": [r - 1.0 for r in cpu_ratios],
      "checksums": cost,
  }
  print(f"store_overhead: MLP {args.widths} ({num_params / 1e6:.2f}M params, "
        f"{result['snapshot_mb']:.1f} MB/snapshot), {args.steps_per_epoch} "
        f"steps/epoch, batch {args.batch}, {args.repeats} repeats x "
        f"{args.epochs} epochs")
  print(f"{'side':<8}{'s/epoch':>10}")
  for side, seconds in epoch.items():
    print(f"{side:<8}{seconds:>10.4f}")
  print(f"time in save() per epoch: {result['save_call_s_per_epoch'] * 1e3:.1f}"
        f" ms; final wait: {result['final_wait_s'] * 1e3:.1f} ms")
  print("overhead (median of store/plain - 1): "
        f"{100 * result['overhead']:+.2f}% wall time, "
        f"{100 * result['cpu_overhead']:+.2f}% process CPU time "
        "(target <= 2%)")
  print(f"checksums: {cost['checksum_s'] * 1e3:.2f} ms per snapshot against "
        f"{cost['save_s'] * 1e3:.1f} ms per save+wait: save overhead "
        f"{100 * cost['save_overhead']:+.2f}%; read_matrix of "
        f"{cost['read_snapshots']} snapshots {cost['read_s']['verified']:.3f}"
        f" s verified, {cost['read_s']['unverified']:.3f} s unverified: read "
        f"overhead {100 * cost['read_overhead']:+.2f}% (target < 5%)")
  common.write_json(args.out, result)
  return result


if __name__ == "__main__":
  main()
