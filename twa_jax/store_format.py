"""On-disk format of a trajectory store: its info file and tree skeleton.

The info file ``twa_store.json`` holds the format name and version and,
from the first snapshot on, the parameter spec (leaf paths, shapes, dtypes)
and the tree skeleton: JSON for the plain-container part of a pytree, with
null for a None node, "leaf", {"dict": [[key, child], ...]} (keys in JAX's
sorted order), {"list": [...]} and {"tuple": [...]}. Orbax saves a snapshot
in the "stored form" of its skeleton: string keys without '.', lists for
tuples.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from etils import epath

from twa_jax import tree as tree_lib

PyTree = Any
Skeleton = Any
FORMAT = "twa_jax.TrajectoryStore"
# Version 2 records a checksum per block of every stored leaf; version 1
# stores (no checksums) are still read, unverified.
VERSION = 2
READABLE_VERSIONS = (1, 2)
INFO_FILE = "twa_store.json"


def skeleton_of(tree: PyTree, what: str, path: str = "") -> Skeleton:
  """JSON description of the containers of `tree`; rejects other nodes.

  Raises:
    TypeError: a node is not a plain dict, list, tuple or None, or a dict
      key is not a str or int (the node's path is named).
  """
  if tree is None:
    return None
  if type(tree) is dict:  # pylint: disable=unidiomatic-typecheck
    for key in tree:
      if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise TypeError(f"{what}: key {key!r} at {path or '<root>'} is a "
                        f"{type(key).__name__}; keys must be str or int.")
    return {"dict": [[k, skeleton_of(tree[k], what, f"{path}[{k!r}]")]
                     for k in sorted(tree)]}
  if type(tree) in (list, tuple):
    kind = type(tree).__name__
    return {kind: [skeleton_of(c, what, f"{path}[{i}]")
                   for i, c in enumerate(tree)]}
  if not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(tree)):
    raise TypeError(
        f"{what}: the node at {path or '<root>'} is a {type(tree).__name__}; "
        "a stored tree holds plain dicts, lists, tuples and arrays (convert "
        "it first, e.g. with flax.core.unfreeze).")
  return "leaf"


def build(skeleton: Skeleton, leaves: Iterator[Any], *,
          stored: bool) -> PyTree:
  """The tree described by `skeleton` with `leaves` in order.

  With `stored`, in the form orbax saves and restores (see `stored_key`;
  lists for tuples).
  """
  if skeleton is None:
    return None
  if skeleton == "leaf":
    return next(leaves)
  (kind, children), = skeleton.items()
  if kind == "dict":
    return {stored_key(k) if stored else k: build(c, leaves, stored=stored)
            for k, c in children}
  built = [build(c, leaves, stored=stored) for c in children]
  return tuple(built) if kind == "tuple" and not stored else built


def stored_key(key: str | int) -> str:
  """The key as orbax stores it: a string without '.' (orbax joins leaf
  names with '.', so {'a.b': x} and {'a': {'b': y}} would collide)."""
  return str(key).replace("%", "%25").replace(".", "%2E")


def stored_leaves(skeleton: Skeleton, node: Any, what: str) -> list[Any]:
  """The leaves, in order, of a tree orbax restored in the stored form of
  `skeleton`.

  Raises:
    ValueError: naming `what` and the first container that differs.
  """
  try:
    return _leaves(skeleton, node, "")
  except ValueError as e:
    raise ValueError(f"{what}: the stored snapshot does not match the "
                     f"store's parameter spec: {e}") from e


def _leaves(skeleton: Skeleton, node: Any, path: str) -> list[Any]:
  if skeleton is None:
    return []
  if skeleton == "leaf":
    if isinstance(node, (dict, list)):
      raise ValueError(f"{path or '<root>'} is a container, not a leaf")
    return [node]
  (kind, children), = skeleton.items()
  if kind == "dict":
    if not isinstance(node, dict):
      raise ValueError(f"{path or '<root>'} is not a dict")
    missing = [k for k, _ in children if stored_key(k) not in node]
    if missing:
      raise ValueError(f"missing key {missing[0]!r} at {path or '<root>'}")
    pairs = [(c, node[stored_key(k)], f"{path}[{k!r}]") for k, c in children]
  else:
    if not isinstance(node, (list, tuple)) or len(node) != len(children):
      raise ValueError(
          f"{path or '<root>'} is not a {kind} of {len(children)}")
    pairs = [(c, n, f"{path}[{i}]")
             for i, (c, n) in enumerate(zip(children, node))]
  return [leaf for c, n, p in pairs for leaf in _leaves(c, n, p)]


def write_info(directory: epath.Path,
               spec: tree_lib.ParamSpec | None = None,
               skeleton: Skeleton = None) -> None:
  """Writes the info file atomically (temporary file, then rename)."""
  info = {"format": FORMAT, "version": VERSION, "params": None}
  if spec is not None:
    info["params"] = {
        "structure": skeleton, "paths": list(spec.paths),
        "shapes": [list(s) for s in spec.shapes],
        "dtypes": [np.dtype(d).name for d in spec.dtypes]}
  tmp = directory / f"{INFO_FILE}.tmp-{os.getpid()}"
  tmp.write_text(json.dumps(info))
  tmp.replace(directory / INFO_FILE)


def read_info(path: epath.Path) -> tuple[
    int, tree_lib.ParamSpec | None, Skeleton]:
  """Reads the info file: (version, spec, skeleton); spec and skeleton are
  None before the first snapshot.

  Raises:
    ValueError: not a store's info file, an unreadable version, or a
      corrupted parameter spec.
  """
  try:
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT:
      raise ValueError(f"format is {info.get('format')!r}, not {FORMAT!r}")
  except (ValueError, AttributeError) as e:
    raise ValueError(f"{path}: not a trajectory store file ({e}).") from e
  version = info.get("version")
  if version not in READABLE_VERSIONS:
    raise ValueError(
        f"{path}: store format version {version!r}; this twa_jax reads "
        f"versions {list(READABLE_VERSIONS)} (use the twa_jax release that "
        "wrote it).")
  params = info.get("params" if version > 1 else "layout")
  if params is None:
    return version, None, None
  skeleton = params["structure"]
  n = len(params["paths"])
  placeholder = build(skeleton, iter(range(n)), stored=False)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(placeholder)
  paths = tuple(jax.tree_util.keystr(p) or "<root>" for p, _ in leaves)
  if [i for _, i in leaves] != list(range(n)) or paths != tuple(
      params["paths"]):
    raise ValueError(f"{path}: corrupted parameter spec (structure and leaf "
                     "paths disagree).")
  spec = tree_lib.ParamSpec(
      treedef, paths, tuple(tuple(s) for s in params["shapes"]),
      tuple(np.dtype(jax.numpy.dtype(d)) for d in params["dtypes"]))
  return version, spec, skeleton
