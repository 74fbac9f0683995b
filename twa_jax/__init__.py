"""twa_jax: Trainable Weight Averaging for JAX, optax and flax.

  import twa_jax as twa
  basis = twa.Basis.from_snapshots(snapshots)
  tx = twa.twa(basis, learning_rate=2.0)
"""

from twa_jax.averaging import averaging_coefficients
from twa_jax.averaging import greedy_soup
from twa_jax.averaging import swa
from twa_jax.basis import Basis
from twa_jax.basis import orthonormalize
from twa_jax.running_average import AveragedState
from twa_jax.running_average import init_running_average
from twa_jax.running_average import RunningAverage
from twa_jax.running_average import swa_lr_schedule
from twa_jax.running_average import update_running_average
from twa_jax.running_average import with_running_average
from twa_jax.sampling import SamplingSchedule
from twa_jax.store import TrajectoryStore
from twa_jax.transform import project
from twa_jax.transform import scale_by_subspace
from twa_jax.transform import twa
from twa_jax.tree import ParamSpec

__all__ = [
    "Basis", "ParamSpec",
    "averaging_coefficients", "greedy_soup", "orthonormalize",
    "project", "scale_by_subspace", "swa", "twa",
    "SamplingSchedule", "TrajectoryStore",
    "AveragedState", "RunningAverage", "init_running_average",
    "swa_lr_schedule", "update_running_average", "with_running_average",
]
__version__ = "0.1.0"
