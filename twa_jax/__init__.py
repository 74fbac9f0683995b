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
from twa_jax.sampling import SamplingSchedule
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
    "Basis", "BlockBasis", "EmptySpanError", "ParamSpec", "ProjectState",
    "SubspaceState", "averaging_coefficients", "basis_from_matrix",
    "basis_from_snapshots", "basis_from_store", "basis_of", "greedy_soup",
    "orthonormalize", "project", "restore_basis", "scale_by_subspace",
    "strip_basis", "swa", "twa", "SamplingSchedule",
]
__version__ = "0.1.0"
