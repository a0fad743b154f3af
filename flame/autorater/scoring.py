"""Verdict probabilities from one forward pass (no decoding).

An autorater trained on FLAMe's format answers with a target that starts
``EVALUATION:\\n<answer field>: <verdict>``. For a set of verdict strings
(``A``/``B``/``Tie``, ``Yes``/``No``, the ratings ``1``…``5``) the tokens of
every full target are compared: their longest common prefix is the *answer
prefix*, and the next token of each target is that verdict's *first token*.

One-pass scoring (`VerdictTokens.one_pass`, when every verdict's first token
differs): the model reads inputs + answer prefix once, the output head runs at
the single position that predicts the next token, and

  log p(verdict) = log_softmax(logits)[first token of the verdict]

is read for every verdict at once. The verdict distribution is these
probabilities renormalised over the verdicts (`verdict_probabilities`); the
mass the model puts on them before renormalising (`mass`) says how well it
follows the format (near 1 for a trained judge, often far below for a
zero-shot model).

Sequence scoring (verdicts sharing a first token, e.g. ratings ``1`` and
``10``): each verdict's remaining target tokens, EOS included, are scored as a
sequence (one row per verdict, full logits), log p(verdict) = Σ log p(token).

Batching: rows that share a layout (one-pass or sequence, number of verdicts, an
encoder-decoder's target bucket) are sorted by length and taken `batch_size` at a
time, so each batch holds rows of similar length; a batch is padded to the
smallest bucket that holds its longest row (`features.bucket_lengths`, four
lengths per doubling: at most ~19% padding), so each distinct shape compiles
once. Every batch has exactly `batch_size` rows (a final partial batch is
filled with copies of a real row whose results are dropped), sharded over the
mesh's data axes like training batches, with the parameters' own shardings.
`VerdictScorer.tokens` counts real and padded tokens.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from flame import partitioning
from flame.autorater import features as features_lib
from flame.models import base

EVALUATION_HEADER = "EVALUATION:"


def answer_target(label: str, answer_field: str = "answer") -> str:
  """The start of a FLAMe target whose answer is `label` (`format.render_target`'s layout)."""
  return f"{EVALUATION_HEADER}\n{answer_field}: {label}"


@dataclasses.dataclass(frozen=True)
class VerdictTokens:
  """How the verdicts `labels` are read from a model's output.

  prefix: target tokens shared by every verdict (``EVALUATION:\\nanswer:`` …);
  tails: per verdict, its target tokens after the prefix, EOS included.
  """
  labels: tuple[str, ...]
  prefix: tuple[int, ...]
  tails: tuple[tuple[int, ...], ...]

  @property
  def first_tokens(self) -> tuple[int, ...]:
    return tuple(tail[0] for tail in self.tails)

  @property
  def one_pass(self) -> bool:
    """Whether the verdicts differ in their first token (one forward pass suffices)."""
    return len(set(self.first_tokens)) == len(self.labels)


def verdict_tokens(vocabulary: seqio.Vocabulary, labels: Sequence[str],
                   answer_field: str = "answer") -> VerdictTokens:
  """`VerdictTokens` of `labels` under `vocabulary` (targets tokenised whole, as in training)."""
  labels = tuple(labels)
  if len(labels) < 2 or len(set(labels)) != len(labels):
    raise ValueError(f"expected at least two distinct verdicts, got {list(labels)}")
  eos = vocabulary.eos_id
  targets = [list(vocabulary.encode(answer_target(label, answer_field))) +
             ([] if eos is None else [eos]) for label in labels]
  common = 0
  while all(len(t) > common for t in targets) and len({t[common] for t in targets}) == 1:
    common += 1
  for label, target in zip(labels, targets):
    if len(target) == common:
      raise ValueError(f"verdict {label!r} has no token of its own under this vocabulary")
  return VerdictTokens(labels, tuple(targets[0][:common]),
                       tuple(tuple(t[common:]) for t in targets))


def normalize(log_probs: np.ndarray) -> np.ndarray:
  """softmax over the last axis, in float64."""
  x = np.asarray(log_probs, np.float64)
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Query:
  """One judgment to score: the rendered input's tokens (EOS included, as in training)
  and how to read its verdicts."""
  inputs: tuple[int, ...]
  verdicts: VerdictTokens


@dataclasses.dataclass(frozen=True)
class _Row:
  query: int
  inputs: tuple[int, ...]
  targets: tuple[int, ...]
  labels: tuple[int, ...]  # one-pass rows: first tokens of the verdicts; sequence rows: ()
  scored_from: int  # index into targets of the first token that counts
  verdict: int  # sequence rows: which verdict; one-pass rows: -1


class VerdictScorer:
  """Log-probabilities of verdicts with `model` on `partitioner`'s mesh.

  `batch_size` rows per step (global; a multiple of the data-parallel size
  and of the number of processes). `max_length`: the longest row accepted
  (decoder-only: inputs + targets; encoder-decoder: inputs), the largest
  length bucket.
  """

  def __init__(self, model: base.Model, partitioner: Optional[partitioning.Partitioner] = None,
               batch_size: int = 8, max_length: int = 2048, smallest_bucket: int = 32,
               buckets_per_octave: int = 4):
    self.model = model
    self.partitioner = partitioner or partitioning.Partitioner()
    data, processes = self.partitioner.data_parallel_size(), jax.process_count()
    if batch_size <= 0 or batch_size % data or batch_size % processes:
      raise ValueError(f"batch_size={batch_size} must be a positive multiple of the "
                       f"data-parallel size {data} and of the {processes} processes")
    self.batch_size = batch_size
    self.converter_cls = model.feature_converter_cls
    self.decoder_only = features_lib.is_decoder_only(self.converter_cls)
    self.buckets = features_lib.bucket_lengths(max_length, smallest_bucket, buckets_per_octave)
    self.target_buckets = features_lib.bucket_lengths(max_length, 8)
    self.max_length = max_length
    self.tokens = {"real": 0, "padded": 0}  # over every batch run: padded counts fill rows too
    self._one_pass = jax.jit(self._answer_log_probs)
    self._sequence = jax.jit(self._sequence_log_probs)

  # ---- jitted steps ---------------------------------------------------------------------
  def _answer_log_probs(self, params, batch, positions, labels):
    """log p(first token of each verdict) at `positions` [b]; labels [b, n] → [b, n]."""
    logits = self.model.logits(params, batch, logit_positions=positions[:, None])[:, 0]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, labels, axis=1)

  def _sequence_log_probs(self, params, batch, weights):
    """Σ log p(target token) over the positions where `weights` [b, len] is 1 → [b]."""
    token_ll = base.token_log_likelihoods(self.model.logits(params, batch),
                                          batch["decoder_target_tokens"])
    return jnp.sum(token_ll * weights, axis=-1)

  # ---- rows ------------------------------------------------------------------------------
  def _rows(self, queries: Sequence[Query]) -> list[_Row]:
    rows = []
    for q, query in enumerate(queries):
      v = query.verdicts
      if v.one_pass:
        rows.append(_Row(q, query.inputs, v.prefix + (v.first_tokens[0],), v.first_tokens,
                         len(v.prefix), -1))
      else:
        rows += [_Row(q, query.inputs, v.prefix + tail, (), len(v.prefix), j)
                 for j, tail in enumerate(v.tails)]
    return rows

  def _layout(self, row: _Row) -> tuple[tuple[bool, int, int], int]:
    """((one-pass row, decoder length bucket of an encoder-decoder (else 0), number of
    verdicts), the row's length): rows of one layout batch together, sorted by length."""
    length, targets = features_lib.row_lengths(self.converter_cls, row.inputs, row.targets)
    if length > self.max_length:
      raise ValueError(f"query {row.query}: {length} tokens exceed max_length="
                       f"{self.max_length}; render it within the budget first")
    targets_bucket = 0 if self.decoder_only else features_lib.bucket_of(targets,
                                                                       self.target_buckets)
    return (row.verdict < 0, targets_bucket, len(row.labels)), length

  def _run_batch(self, params, key, rows: Sequence[_Row]):
    one_pass, length, targets_length, width = key
    feats, starts = features_lib.model_features(
        self.converter_cls, [r.inputs for r in rows], [r.targets for r in rows], length,
        targets_length)
    p, local = jax.process_index(), self.batch_size // jax.process_count()
    mine = slice(p * local, (p + 1) * local)
    feats = {k: v[mine] for k, v in feats.items()}
    if one_pass:
      extra = {"positions": (starts + [r.scored_from for r in rows])[mine].astype(np.int32),
               "labels": np.array([r.labels for r in rows], np.int32).reshape(-1, width)[mine]}
      sharded = self.partitioner.shard_batch({**feats, **extra})
      positions, labels = sharded.pop("positions"), sharded.pop("labels")
      return self._one_pass(params, sharded, positions, labels)
    weights = np.zeros(feats["decoder_target_tokens"].shape, np.float32)
    for i, (r, s) in enumerate(zip(rows[mine], starts[mine])):
      weights[i, s + r.scored_from:s + len(r.targets)] = 1.0
    sharded = self.partitioner.shard_batch({**feats, "weights": weights})
    return self._sequence(params, sharded, sharded.pop("weights"))

  def log_probs(self, params, queries: Sequence[Query],
                on_batch: Optional[Callable[[int], None]] = None) -> list[np.ndarray]:
    """log p(verdict) per query, float64 [number of its verdicts], in the queries' order.

    `on_batch(real_rows)` is called after each batch (for progress bars).
    """
    rows = self._rows(queries)
    groups, lengths = collections.defaultdict(list), []
    for i, row in enumerate(rows):
      layout, length = self._layout(row)
      groups[layout].append(i)
      lengths.append(length)
    results: list[Optional[np.ndarray]] = [None] * len(rows)
    pending = None

    def collect(item):
      outputs, indices = item
      values = partitioning.to_host(outputs)
      for slot, index in enumerate(indices):
        results[index] = np.asarray(values[slot], np.float64)
      if on_batch:
        on_batch(len(indices))

    for layout in sorted(groups):
      members = sorted(groups[layout], key=lambda i: lengths[i])
      one_pass, targets_bucket, width = layout
      for b in range(math.ceil(len(members) / self.batch_size)):
        indices = members[b * self.batch_size:(b + 1) * self.batch_size]
        padded = indices + [indices[0]] * (self.batch_size - len(indices))
        length = features_lib.bucket_of(lengths[indices[-1]], self.buckets)
        self.tokens["real"] += sum(lengths[i] for i in indices)
        self.tokens["padded"] += self.batch_size * length
        outputs = self._run_batch(params, (one_pass, length, targets_bucket, width),
                                  [rows[i] for i in padded])
        if pending is not None:  # Fetch the previous batch while this one runs.
          collect(pending)
        pending = (outputs, indices)
    if pending is not None:
      collect(pending)

    out: list[list] = [[] for _ in queries]
    for row, value in zip(rows, results):
      if row.verdict < 0:
        out[row.query] = list(value)
      else:
        out[row.query].append(float(value))
    return [np.asarray(v, np.float64) for v in out]
