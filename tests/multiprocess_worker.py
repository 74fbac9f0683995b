"""One process of the two-process sharded-TWA run in test_sharding.py.

Usage: multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_JSON STORE,
with XLA_FLAGS=--xla_force_host_platform_device_count=4 (4 CPU devices each).
Joins a `jax.distributed` run over localhost with gloo CPU collectives,
builds a basis sharded over all processes' devices (each process feeding
only its own devices), runs TWA steps on a batch sharded over the global
mesh, and checks them against the unsharded single-process computation.
Then both processes save snapshots to one `TrajectoryStore` at STORE and
build the sharded basis from it, each reading only its devices' columns
(counted in bytes read from disk), and check it against `from_snapshots`;
also a block basis per leaf, and that a NaN in the columns only process 1
reads makes both processes raise.
Writes the results as JSON for the parent test to compare across processes.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorstore as ts
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import twa_jax as twa
from twa_jax.store import TrajectoryStore

LOCAL_DEVICES = 4
N, SHAPES = 7, {"w": (9, 5), "b": (5,)}  # n = 7, D = 50: neither divides 8
# Stored snapshots: D = 130 000 in 4 KiB chunks (a device's slice: 64 KiB), so
# that a process' half of the columns is read to within a chunk or two.
STORED = {"w": (1000, 128), "b": (2000,)}


def _global(mesh, value: np.ndarray, spec: P) -> jax.Array:
  """A global array of which this process fills only its own devices."""
  return jax.make_array_from_callback(
      value.shape, NamedSharding(mesh, spec), lambda index: value[index])


def _loss(params, batch):
  x, y = batch
  return jnp.mean((jnp.tanh(x @ params["w"] + params["b"]) - y) ** 2)


def _steps(tx, params, batches):
  @jax.jit
  def step(params, opt_state, batch):
    grads = jax.grad(_loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for batch in batches:
    params, opt_state = step(params, opt_state, batch)
  return params


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree.leaves(tree)])


def _bytes_read() -> int:
  """Bytes TensorStore has read from local files in this process."""
  return sum(v["value"] for m in ts.experimental_collect_matching_metrics(
      "/tensorstore/kvstore/file/bytes_read") for v in m["values"])


def _from_store(mesh, directory: str) -> dict[str, Any]:
  """Sharded bases from a store both processes save to; bytes each read."""
  rng = np.random.default_rng(1)
  snapshots = [{name: rng.normal(size=shape).astype(np.float32)
                for name, shape in STORED.items()} for _ in range(N)]
  results = {}
  with TrajectoryStore(directory, chunk_bytes=4 << 10) as store:
    for step, snapshot in enumerate(snapshots):
      store.save(step, snapshot)
    store.wait_until_finished()
    before = _bytes_read()
    store.read_matrix()
    results["read_matrix"] = {"bytes": _bytes_read() - before}
    for layout in ("basis", "params"):
      before = _bytes_read()
      basis = twa.basis_from_store(store, mesh=mesh, layout=layout)
      read = _bytes_read() - before
      want = twa.basis_from_snapshots(snapshots, mesh=mesh, layout=layout)
      for got, expected in zip(basis.read_vectors().addressable_shards,
                               want.read_vectors().addressable_shards):
        np.testing.assert_array_equal(got.data, expected.data)
      results[layout] = {"bytes": read}
    # One basis per leaf, each through its own view: again this process'
    # columns only.
    before = _bytes_read()
    blocks = twa.basis_from_store(store, granularity="leaf", mesh=mesh,
                                  layout="params")
    results["leaf"] = {"bytes": _bytes_read() - before}
    want = twa.basis_from_snapshots(snapshots, granularity="leaf", mesh=mesh,
                                    layout="params")
    assert blocks.names == want.names
    for got, expected in zip(blocks.bases, want.bases):
      for a, b in zip(got.read_vectors().addressable_shards,
                      expected.read_vectors().addressable_shards):
        np.testing.assert_array_equal(a.data, b.data)
    # A NaN in the last column, which only process 1's devices read: both
    # processes raise (process 0 naming process 1), neither hangs.
    assert mesh.devices.flat[-1].process_index == 1
    bad = {name: leaf.copy() for name, leaf in snapshots[0].items()}
    bad["w"][-1, -1] = np.nan
    store.save(N, bad)
    store.wait_until_finished()
    try:
      twa.basis_from_store(store, mesh=mesh)
    except ValueError as e:
      results["nan_error"] = str(e)
  # The columns of W (sharded by columns in both layouts) this process holds.
  d = basis.num_params
  results["columns"] = sum(
      len(range(*index[1].indices(d))) for index in NamedSharding(
          mesh, P(None, "x")).addressable_devices_indices_map((N, d)).values())
  return results


def main(process_id: int, num_processes: int, port: int, out: str,
         store_dir: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=num_processes,
                             process_id=process_id)
  assert jax.process_count() == num_processes
  assert jax.local_device_count() == LOCAL_DEVICES
  k = jax.device_count()
  mesh = jax.make_mesh((k,), ("x",), axis_types=(AxisType.Auto,))

  rng = np.random.default_rng(0)  # the same data in every process
  w0 = {name: rng.normal(size=shape).astype(np.float32)
        for name, shape in SHAPES.items()}
  snapshots = [jax.tree.map(
      lambda x, i=i: x + np.float32(0.05 * i) * rng.normal(size=x.shape).astype(np.float32),
      w0) for i in range(N)]
  batches = [(rng.normal(size=(16, 9)).astype(np.float32),
              rng.normal(size=(16, 5)).astype(np.float32)) for _ in range(3)]

  plain = twa.basis_from_snapshots(snapshots)
  start = snapshots[N // 2]
  want = _flat(_steps(twa.twa(plain, 0.5), start, batches))
  p = np.asarray(plain.read_vectors(), np.float64)[:, :plain.num_params]
  projector = p.T @ p

  results = {}
  for layout in ("basis", "params"):
    basis = twa.basis_from_snapshots(snapshots, mesh=mesh, layout=layout)
    shards = basis.read_vectors().addressable_shards
    assert len(shards) == LOCAL_DEVICES, len(shards)
    assert not basis.read_vectors().is_fully_addressable
    vectors = multihost_utils.process_allgather(basis.read_vectors(), tiled=True)
    q = np.asarray(vectors, np.float64)[:basis.dim, :basis.num_params]
    np.testing.assert_allclose(q.T @ q, projector, atol=2e-5)

    params = jax.tree.map(lambda x: _global(mesh, x, P()), start)
    sharded_batches = [tuple(_global(mesh, x, P("x")) for x in batch)
                       for batch in batches]
    got = _steps(twa.twa(basis, 0.5), params, sharded_batches)
    for leaf in jax.tree.leaves(got):
      assert leaf.sharding.is_fully_replicated, leaf.sharding
    got = _flat(got)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    results[layout] = {"shard_shape": list(shards[0].data.shape),
                       "params": got.tolist()}
  results["unsharded"] = want.tolist()
  results["store"] = _from_store(mesh, store_dir)
  with open(out, "w") as f:
    json.dump(results, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
       sys.argv[5])
