"""Parameters of a layer stack: unrolled (``layers_{i}/…``, one subtree per layer) and scanned
(``layers/…``, each leaf stacked on a leading [num_layers] axis), and conversions between them.

`stack` and `unstack` work on nested dicts of arrays or of `jax.ShapeDtypeStruct`s (for
abstract trees) at any prefix (``encoder``/``decoder`` subtrees of T5 included): the
conversion is exact (the same numbers, moved). `layout` tells which one a tree uses.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import jax
import numpy as np

_LAYER = re.compile(r"^layers_(\d+)$")
SCANNED = "layers"


def layout(tree: Mapping[str, Any]) -> Optional[str]:
  """"scanned", "unrolled" or None (no layer stack) for a params tree (searched recursively)."""
  if SCANNED in tree and isinstance(tree[SCANNED], Mapping):
    return "scanned"
  if any(_LAYER.match(k) for k in tree):
    return "unrolled"
  for value in tree.values():
    if isinstance(value, Mapping):
      found = layout(value)
      if found:
        return found
  return None


def _stack_leaves(leaves):
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype)
  return np.stack([np.asarray(leaf) for leaf in leaves])


def _unstack_leaf(leaf, i: int):
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype)
  return np.asarray(leaf)[i]


def stack(tree: Mapping[str, Any]) -> dict:
  """Unrolled → scanned: every dict holding ``layers_0 … layers_{n-1}`` gets ``layers``."""
  out = {}
  indices = sorted(int(m.group(1)) for k in tree if (m := _LAYER.match(k)))
  if indices:
    if indices != list(range(len(indices))):
      raise ValueError(f"layers {indices} are not numbered 0 … {len(indices) - 1}")
    out[SCANNED] = jax.tree_util.tree_map(lambda *leaves: _stack_leaves(leaves),
                                          *[tree[f"layers_{i}"] for i in indices])
  for key, value in tree.items():
    if _LAYER.match(key):
      continue
    out[key] = stack(value) if isinstance(value, Mapping) else value
  return out


def unstack(tree: Mapping[str, Any]) -> dict:
  """Scanned → unrolled: every ``layers`` subtree of stacked leaves becomes ``layers_{i}``."""
  out = {}
  for key, value in tree.items():
    if key == SCANNED and isinstance(value, Mapping):
      depth = {int(np.shape(leaf)[0]) for leaf in jax.tree_util.tree_leaves(value)}
      if len(depth) != 1:
        raise ValueError(f"stacked layers disagree on their number: {sorted(depth)}")
      for i in range(depth.pop()):
        out[f"layers_{i}"] = jax.tree_util.tree_map(lambda leaf, i=i: _unstack_leaf(leaf, i),
                                                    value)
    else:
      out[key] = unstack(value) if isinstance(value, Mapping) else value
  return out


def to_layout(tree: Mapping[str, Any], target: Optional[str]) -> dict:
  """`tree` in layout `target` ("scanned" / "unrolled"; None or the same: unchanged)."""
  current = layout(tree)
  if target is None or current is None or current == target:
    return dict(tree)
  return stack(tree) if target == "scanned" else unstack(tree)
