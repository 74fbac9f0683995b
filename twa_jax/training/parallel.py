"""Data parallelism for train.py: processes, the device mesh, global batches.

Every phase runs on a mesh over all devices of all processes (`data_mesh`),
one axis named "data": the parameters, batch-norm statistics and optimizer
state are replicated, or with `config.parallel.param_sharding="fsdp"` split
along the data axis (`state_sharding`), each batch is split along the data
axis, and one jitted step (GSPMD) reduces the gradient over it (with FSDP,
XLA places the all-gathers of the parameters and the reduce-scatters of the
gradients). Batch-norm layers see the statistics of the whole global batch
(synchronized batch norm, as PyTorch's `SyncBatchNorm`), so a run on 8
devices computes what one device computes on the same global batch, up to
the order of float32 reductions. Each process loads its share of every
global batch (`input_pipeline`) and `global_batch` joins the shares into one
array.

With several processes (hosts), `initialize` starts `jax.distributed` first;
files of the workdir are written by process 0 (`is_primary`), snapshots and
checkpoints by orbax's multi-host saving.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np

PyTree = Any
DATA_AXIS = "data"


def initialize(cfg: ml_collections.ConfigDict) -> None:
  """Starts `jax.distributed` when `config.parallel` asks for it.

  Args:
    cfg: `config.parallel`: `distributed` (False: one process), and
      `coordinator_address`, `num_processes`, `process_id` (None: detected
      from the cluster environment, e.g. SLURM, Open MPI or a TPU pod).
  """
  if cfg.distributed:
    # CPU devices talk over gloo (no effect on GPU and TPU backends).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address,
        num_processes=cfg.num_processes, process_id=cfg.process_id)


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis mesh ("data") over `devices` (default: every device of every
  process). Its axis type is Auto: the shardings of the jitted steps are
  left to XLA (GSPMD), so the steps and the basis's kernels need no
  sharding annotations."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                       axis_types=(AxisType.Auto,))


def is_primary() -> bool:
  """Whether this process writes the workdir's files (process 0)."""
  return jax.process_index() == 0


def state_sharding(tree: PyTree, mesh: Mesh, param_sharding: str) -> PyTree:
  """The shardings of a training state's leaves on `mesh`.

  Args:
    tree: the state (parameters, optimizer state, ...): arrays or shapes.
    mesh: the data mesh.
    param_sharding: `config.parallel.param_sharding`: "replicated" (every
      leaf whole on every device) or "fsdp" (each leaf split along "data" on
      its largest dimension that the device count divides; a leaf without
      one, e.g. a scalar or a short bias, replicated).

  Returns:
    A `NamedSharding` per leaf of `tree`.
  """
  def sharding(leaf) -> NamedSharding:
    shape = np.shape(leaf)
    dims = [d for d, size in enumerate(shape)
            if size and size % mesh.size == 0]
    if param_sharding != "fsdp" or not dims:
      return NamedSharding(mesh, PartitionSpec())
    dim = max(dims, key=lambda d: shape[d])  # the first of equal sizes
    return NamedSharding(mesh, PartitionSpec(*[None] * dim, DATA_AXIS))
  return jax.tree.map(sharding, tree)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """`tree` on every device of `mesh` (from host or device arrays)."""
  sharding = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, Any]:
  """This process's share of a batch as one array split along "data".

  Args:
    local: arrays with this process's rows of the global batch (the
      processes' shares concatenated in process order form the batch).
    mesh: the data mesh.

  Returns:
    Global arrays of `process_count` times the rows.
  """
  sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local.items()}


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
  """Raises ValueError unless `batch_size` splits evenly over the devices."""
  if batch_size % mesh.size:
    raise ValueError(f"{field}={batch_size} does not split over the "
                     f"{mesh.size} devices (a multiple of {mesh.size} "
                     "is needed)")


def barrier(name: str) -> None:
  """Waits until every process arrives (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
