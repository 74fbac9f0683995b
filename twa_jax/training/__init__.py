"""The training world of twa_jax: models, data, phase loop, reports, plots.

It builds on the core library (`twa_jax`) and is never imported by it.
"""
