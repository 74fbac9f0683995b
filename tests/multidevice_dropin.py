"""TWA in a plain jitted step with a mesh-sharded basis (8 simulated devices).

Run by tests/test_dropin.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax loads.
"""

import jax
import optax

import test_dropin
import twa_jax as twa

if jax.device_count() != 8:
  raise RuntimeError("multidevice_dropin.py needs 8 devices: run it through "
                     "tests/test_dropin.py.")


def main():
  snaps, start = test_dropin._linen_problem()  # pylint: disable=protected-access
  mesh = jax.make_mesh((8,), ("x",))
  for layout in ("basis", "params"):
    basis = twa.basis_from_snapshots(snaps, mesh=mesh, axis="x", layout=layout)
    tx = test_dropin._tx(basis)  # pylint: disable=protected-access

    @jax.jit
    def step(params, opt_state):
      grads = jax.grad(test_dropin.loss)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    params, opt_state, history = start, tx.init(start), []
    for _ in range(test_dropin.STEPS):
      params, opt_state = step(params, opt_state)
      history.append(params)
    reference = test_dropin._linen_reference(basis, start)[0]  # pylint: disable=protected-access
    test_dropin._check(basis, history, reference)  # pylint: disable=protected-access
    print(f"layout={layout}: ok")


if __name__ == "__main__":
  main()
