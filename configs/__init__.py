"""Experiment configs for train.py: ml_collections files with `get_config()`."""
