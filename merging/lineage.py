"""Did the experts start from the base they are merged over?

A task vector is an expert minus the model it was fine-tuned from. Merged over another base
(same shapes, other weights), every method silently adds the difference between the two bases
to each expert's update. `flame.train` records in each checkpoint's meta the checkpoint its
parameters started from (``fine_tuned_from``, a ``DIR/<step>`` path), so the merge can check:
an expert is accepted when its recorded start — or the start of that start, and so on — is
the base, by path or by content (a copy of the base: one small parameter read from both, bit
for bit the same). An expert whose recorded chain reaches a checkpoint that no longer exists
cannot be confirmed (a warning); one without a record (an import, an earlier merge, a Hugging
Face folder) is not checked.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import numpy as np

from flame.checkpoints import manager
from merging import io

MAX_DEPTH = 32


def fine_tuned_from(location: str) -> Optional[str]:
  """The recorded start of the checkpoint step folder `location` (None: no record)."""
  directory, step = os.path.split(location.rstrip("/"))
  checkpointer = manager.Checkpointer(directory, read_only=True)
  try:
    return checkpointer.restore_meta(int(step)).get("fine_tuned_from")
  finally:
    checkpointer.close()


def starts(location: str) -> tuple[list[str], bool]:
  """(the checkpoints `location` was fine-tuned from, nearest first; True when the chain ends
  at a checkpoint that records no start, False when it reaches one that is gone)."""
  chain: list[str] = []
  current = location
  for _ in range(MAX_DEPTH):
    if not os.path.isdir(os.path.join(current, "params")):
      return chain, False
    try:
      start = fine_tuned_from(current)
    except manager.CheckpointError:
      return chain, True
    if not start:
      return chain, True
    chain.append(start)
    current = start
  return chain, True


def _probe_key(source: io.Source):
  """The base's smallest parameter (a norm scale, typically): cheap to read twice."""
  return min(source.shapes, key=lambda k: (int(np.prod(source.shapes[k].shape)), k))


def same_content(base: io.Source, location: str) -> bool:
  """Whether the checkpoint at `location` holds the base's probe parameter bit for bit."""
  if not os.path.isdir(os.path.join(location, "params")):
    return False
  other = io.open_checkpoint(location)
  key = _probe_key(base)
  if not isinstance(other, io.Source) or key not in other.shapes or (
      tuple(other.shapes[key].shape) != tuple(base.shapes[key].shape)):
    return False
  sharding = io.single_device_sharding()(key, tuple(base.shapes[key].shape))
  values = []
  for source in (base, other):
    reader = source.reader()
    try:
      values.append(np.asarray(reader.read([key], [sharding])[0]))
    finally:
      reader.close()
  return values[0].dtype == values[1].dtype and np.array_equal(values[0], values[1])


def check_same_base(base: Optional[str], experts: Sequence[str]) -> None:
  """A MergeInputError naming the expert, its recorded start and the base when an expert was
  fine-tuned from another model than `base`; a warning when that cannot be confirmed."""
  if base is None:
    return
  base_source = io.open_checkpoint(base)
  if not isinstance(base_source, io.Source):
    return  # A Hugging Face base: experts record Orbax paths, nothing to compare.
  here = os.path.realpath(base_source.location)
  for i, path in enumerate(experts):
    expert = io.open_checkpoint(path)
    if not isinstance(expert, io.Source):
      continue
    chain, complete = starts(expert.location)
    if not chain or any(os.path.realpath(c) == here for c in chain):
      continue
    if any(same_content(base_source, c) for c in chain):
      continue
    if not complete:
      logging.warning("expert #%d %s was fine-tuned from %s, which is gone: cannot confirm "
                      "that it started from the base %s", i, expert.location, chain[-1],
                      base_source.location)
      continue
    raise io.MergeInputError(
        f"expert #{i} {expert.location} was fine-tuned from {chain[0]} (its checkpoint meta), "
        f"not from the base {base_source.location}: its task vector over this base would add "
        f"the difference between the two models. Merge over {chain[-1]}"
        + (f" (where its chain of fine-tunes starts: {' <- '.join(chain)})" if len(chain) > 1
           else "") + ", or over a copy of it")
