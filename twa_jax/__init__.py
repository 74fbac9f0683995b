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
from twa_jax.sampling import SamplingSchedule
from twa_jax.store import TrajectoryStore
from twa_jax.transform import basis_of
from twa_jax.transform import project
from twa_jax.transform import ProjectState
from twa_jax.transform import restore_basis
from twa_jax.transform import scale_by_subspace
from twa_jax.transform import strip_basis
from twa_jax.transform import SubspaceState
from twa_jax.transform import twa
from twa_jax.tree import ParamSpec

__all__ = [
    "Basis", "ParamSpec", "ProjectState", "SubspaceState",
    "averaging_coefficients", "basis_of", "greedy_soup", "orthonormalize",
    "project", "restore_basis", "scale_by_subspace", "strip_basis", "swa", "twa",
    "SamplingSchedule", "TrajectoryStore",
]
__version__ = "0.1.0"
