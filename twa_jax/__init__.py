"""twa_jax: Trainable Weight Averaging for JAX, optax and flax.

  import twa_jax as twa
  basis = twa.basis_from_snapshots(snapshots)
  tx = twa.twa(basis, learning_rate=2.0)

The snapshot store is `twa_jax.store.TrajectoryStore` (imported on its own:
it loads orbax and TensorStore).
"""

from twa_jax.averaging import averaging_coefficients
from twa_jax.averaging import greedy_soup
from twa_jax.averaging import swa
from twa_jax.basis import Basis
from twa_jax.blocks import BlockBasis
from twa_jax.build import from_matrix as basis_from_matrix
from twa_jax.build import from_snapshots as basis_from_snapshots
from twa_jax.build import from_store as basis_from_store
from twa_jax.orthonormalize import EmptySpanError
from twa_jax.orthonormalize import orthonormalize
from twa_jax.running_average import AveragedState
from twa_jax.running_average import init_running_average
from twa_jax.running_average import RunningAverage
from twa_jax.running_average import swa_lr_schedule
from twa_jax.running_average import update_running_average
from twa_jax.running_average import with_running_average
from twa_jax.sampling import SamplingSchedule
from twa_jax.transform import project
from twa_jax.transform import scale_by_subspace
from twa_jax.transform import twa
from twa_jax.tree import ParamSpec

__all__ = [
    "AveragedState", "Basis", "BlockBasis", "EmptySpanError", "ParamSpec",
    "RunningAverage", "averaging_coefficients", "basis_from_matrix",
    "basis_from_snapshots", "basis_from_store", "greedy_soup",
    "init_running_average", "orthonormalize", "project", "scale_by_subspace",
    "swa", "swa_lr_schedule", "twa", "update_running_average",
    "with_running_average", "SamplingSchedule",
]
__version__ = "0.1.0"
