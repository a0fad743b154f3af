"""Generative judgments: decode the whole ``EVALUATION:`` block (verdict + explanation).

For tasks trained with several output fields (``answer, explanation``), the model writes
``EVALUATION:\\n<field>: <value>\\n<field>: <value>``; `parse_evaluation` reads the fields
back and the verdict is the answer field's value when it is one of the labels (else None:
unparsable, which RewardBench counts as 0.5).

Decoding is greedy (`Model.decode`: the prompt is prefilled in one forward pass), batched in
length buckets like scoring (one compilation per bucket and decode length), batches of
exactly `batch_size` rows sharded over the data axes.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Optional, Sequence

import jax
import numpy as np

from flame import partitioning
from flame.autorater import features as features_lib
from flame.autorater import scoring
from flame.models import base


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """A decoded EVALUATION block: its text, its fields, and the verdict if parsable."""
  text: str
  fields: dict[str, str]
  verdict: Optional[str]

  def to_json(self) -> dict:
    return {"evaluation": self.text, "fields": self.fields, "verdict": self.verdict}


def parse_evaluation(text: str, answer_field: str = "answer",
                     labels: Sequence[str] = ()) -> Evaluation:
  """Fields of ``EVALUATION:\\n<name>: <value>…`` (a line without ``: `` continues the previous
  value); verdict = the answer field's value if it is in `labels` (or any, without labels)."""
  lines = text.strip().split("\n")
  if lines and lines[0].strip() == scoring.EVALUATION_HEADER:
    lines = lines[1:]
  fields: dict[str, str] = {}
  last = None
  for line in lines:
    name, sep, value = line.partition(": ")
    if sep and name and " " not in name.strip():
      last = name.strip()
      fields[last] = value
    elif last is not None:
      fields[last] += "\n" + line
  answer = fields.get(answer_field, "").strip()
  verdict = answer if answer and (not labels or answer in labels) else None
  return Evaluation(text, fields, verdict)


class Generator:
  """Greedy decoding of rendered inputs with `model` on `partitioner`'s mesh."""

  def __init__(self, model: base.Model, partitioner: Optional[partitioning.Partitioner] = None,
               batch_size: int = 8, max_length: int = 2048, smallest_bucket: int = 32):
    self.model = model
    self.partitioner = partitioner or partitioning.Partitioner()
    if batch_size % self.partitioner.data_parallel_size():
      raise ValueError(f"batch_size={batch_size} must be a multiple of the data-parallel "
                       f"size {self.partitioner.data_parallel_size()}")
    self.batch_size = batch_size
    self.buckets = features_lib.bucket_lengths(max_length, smallest_bucket)
    self._decode = jax.jit(model.decode, static_argnums=2)

  def generate(self, params, inputs: Sequence[Sequence[int]], max_decode_len: int
               ) -> list[list[int]]:
    """Generated ids per input (up to and including EOS), in the inputs' order."""
    groups = collections.defaultdict(list)
    for i, ids in enumerate(inputs):
      groups[features_lib.bucket_of(len(ids), self.buckets)].append(i)
    out: list[list[int]] = [[] for _ in inputs]
    eos = self.model.vocabulary.eos_id
    for length, members in sorted(groups.items()):
      for b in range(math.ceil(len(members) / self.batch_size)):
        rows = members[b * self.batch_size:(b + 1) * self.batch_size]
        padded = rows + [rows[0]] * (self.batch_size - len(rows))
        prompts = np.zeros((self.batch_size, length), np.int32)
        lengths = np.zeros(self.batch_size, np.int32)
        for r, i in enumerate(padded):
          prompts[r, :len(inputs[i])] = inputs[i]
          lengths[r] = len(inputs[i])
        batch = self.partitioner.shard_batch({"inputs": prompts, "input_lengths": lengths})
        tokens = np.asarray(jax.device_get(self._decode(params, batch, max_decode_len)))
        for r, i in enumerate(rows):
          ids = [int(t) for t in tokens[r]]
          out[i] = ids[:ids.index(eos) + 1] if eos in ids else ids
    return out
