"""Shared test settings: a modest hypothesis profile for the property tests.

Derandomized, so CI runs the same examples every time; run with
`--hypothesis-seed=N` (or edit the profile) to explore new ones.

Strategies for random parameter trees and snapshot sets live in
`tests/strategies.py` (`import strategies` from any test module).

The xdist workers and every subprocess they start (train.py, the benchmarks'
smoke runs, simulated devices) compile the same steps again and again, so
the run shares one persistent XLA compilation cache: a fresh directory,
removed when pytest exits, unless JAX_COMPILATION_CACHE_DIR names one. The
compiled low-bit products (twa_jax/native.py) are built once per run into
another such directory, unless TWA_JAX_CACHE_DIR names one.
"""

import atexit
import os
import shutil
import tempfile

from hypothesis import HealthCheck, settings

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  # Set before any test imports jax; xdist workers inherit it (and skip this).
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="twa_jax_xla_cache_")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"],
                  ignore_errors=True)
if "TWA_JAX_CACHE_DIR" not in os.environ:
  os.environ["TWA_JAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="twa_jax_native_")
  atexit.register(shutil.rmtree, os.environ["TWA_JAX_CACHE_DIR"],
                  ignore_errors=True)

settings.register_profile(
    "twa", max_examples=25, deadline=None, print_blob=True, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("twa")
