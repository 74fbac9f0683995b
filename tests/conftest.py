"""Shared test settings: a modest hypothesis profile for the property tests.

Derandomized, so CI runs the same examples every time; run with
`--hypothesis-seed=N` (or edit the profile) to explore new ones.

Strategies for random parameter trees and snapshot sets live in
`tests/strategies.py` (`import strategies` from any test module).
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "twa", max_examples=25, deadline=None, print_blob=True, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("twa")
