"""Rank classification: pick the answer option the model finds most likely.

As in T0's held-out evaluation (Sanh et al., 2022) and T5X's
`rank_classification`: every item is an input text with a list of answer
options; each option is scored by the model's log-likelihood of it as the
target given the input, log p(option | input) = Σ_t log p(y_t | x, y_<t), and
the prediction is the option with the highest score. The same routine serves
autoraters (options "A" / "B" for a pairwise judgment, "Yes" / "No" for a
classification judgment).

Pipeline: texts → ids (the model's seqio vocabulary; EOS appended to inputs
and options by default, as the training tasks' ``seqio.Feature(add_eos=True)``
do) → one (input, option) row per option → the model's own seqio feature
converter (unpacked; `EncDecFeatureConverter` for T5, `PrefixLMFeatureConverter`
for the decoder) → fixed-shape batches of `batch_size` rows (the last one
filled with copies of a real row, whose scores are dropped), so `model.score`
compiles once → a jitted `model.score` whose batch is sharded over the mesh's
data axes (`Partitioner.shard_batch`; the parameters keep the shardings they
were placed with).

Truncation: an input longer than ``task_feature_lengths["inputs"]`` keeps its
*last* tokens (the question and answer cue usually end a prompt) and its EOS;
an option longer than ``task_feature_lengths["targets"]`` is an error, since
cutting it would score a different answer.

Multi-host: every process tokenises all items and feeds its own slice of each
global batch; each slot carries its row index through the jitted step, so the
gathered scores (`process_allgather`) return to their rows whatever order the
mesh puts the processes' devices in.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf
import tqdm

from flame import partitioning
from flame.models import base

Text = Union[str, Sequence[int]]


@dataclasses.dataclass(frozen=True)
class RankItem:
  """One multiple-choice question: `inputs` and `options` are texts or token ids
  (ids are used as they are, before EOS); `gold` is the index of the right
  option, or None when unknown."""
  inputs: Text
  options: Sequence[Text]
  gold: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Row:
  """One (input, option) pair as token ids, EOS included where asked."""
  item: int
  option: int
  inputs: tuple[int, ...]
  targets: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class RankClassificationResult:
  """Scores of every option of every item, in the items' order.

  `log_likelihoods[i][j]`: Σ over the target tokens of option j of item i of
  log p(token | input, previous tokens), in nats (float64 of the float32 sums).
  `target_lengths[i][j]`: the number of target tokens scored (EOS included
  when appended). `scores` are what the prediction maximises: the sums, or
  with `length_normalized` the mean per target token. Ties go to the first
  option.
  """
  log_likelihoods: tuple[np.ndarray, ...]
  target_lengths: tuple[np.ndarray, ...]
  gold: tuple[Optional[int], ...]
  length_normalized: bool = False

  @property
  def mean_log_likelihoods(self) -> tuple[np.ndarray, ...]:
    return tuple(ll / n for ll, n in zip(self.log_likelihoods, self.target_lengths))

  @property
  def scores(self) -> tuple[np.ndarray, ...]:
    return self.mean_log_likelihoods if self.length_normalized else self.log_likelihoods

  @property
  def predictions(self) -> np.ndarray:
    """Index of the best-scoring option per item [num_items]."""
    return np.array([int(np.argmax(s)) for s in self.scores], np.int64)

  def option_probabilities(self) -> tuple[np.ndarray, ...]:
    """softmax(scores) over each item's options (e.g. P("A") for a pairwise judge)."""
    out = []
    for s in self.scores:
      e = np.exp(s - np.max(s))
      out.append(e / e.sum())
    return tuple(out)

  @property
  def accuracy(self) -> Optional[float]:
    """Fraction of the items with a gold index whose prediction equals it; None if none has."""
    pairs = [(p, g) for p, g in zip(self.predictions, self.gold) if g is not None]
    if not pairs:
      return None
    return float(np.mean([p == g for p, g in pairs]))


def as_rank_item(item: Any, index: int = 0) -> RankItem:
  """A `RankItem` from a RankItem, an (inputs, options[, gold]) tuple or a mapping with
  keys inputs, options and optionally gold."""
  if isinstance(item, RankItem):
    return item
  if isinstance(item, Mapping):
    return RankItem(item["inputs"], item["options"], item.get("gold"))
  if isinstance(item, (tuple, list)) and len(item) in (2, 3):
    return RankItem(*item)
  raise TypeError(f"item {index}: expected RankItem, (inputs, options[, gold]) or a mapping "
                  f"with keys inputs/options[/gold], got {type(item).__name__}")


def _ids(text: Text, vocabulary: seqio.Vocabulary) -> list[int]:
  if isinstance(text, str):
    return list(vocabulary.encode(text))
  return [int(t) for t in text]


def truncate_tail(ids: Sequence[int], budget: int, eos_id: Optional[int]) -> tuple[int, ...]:
  """`ids` (+ EOS when `eos_id` is not None) in at most `budget` tokens, dropping the front."""
  room = budget - (eos_id is not None)
  if room < 0:
    raise ValueError(f"an input budget of {budget} tokens leaves no room for EOS")
  kept = list(ids)[len(ids) - room:] if len(ids) > room else list(ids)
  return tuple(kept + ([eos_id] if eos_id is not None else []))


def tokenize_items(items: Sequence[Any], vocabulary: seqio.Vocabulary,
                   task_feature_lengths: Mapping[str, int], add_eos_inputs: bool = True,
                   add_eos_targets: bool = True) -> tuple[list[Row], list[RankItem]]:
  """(rows, items): one `Row` per option of every item, in item-then-option order.

  Inputs longer than ``task_feature_lengths["inputs"]`` keep their last tokens;
  an option longer than ``task_feature_lengths["targets"]`` (EOS included), an
  empty option, a gold index out of range or an item without options raise a
  ValueError naming the item.
  """
  eos = vocabulary.eos_id
  if (add_eos_inputs or add_eos_targets) and eos is None:
    raise ValueError("the vocabulary has no eos_id; set add_eos_inputs=add_eos_targets=False")
  input_budget, target_budget = task_feature_lengths["inputs"], task_feature_lengths["targets"]
  rows, parsed, truncated = [], [], 0
  for i, raw in enumerate(items):
    item = as_rank_item(raw, i)
    if not item.options:
      raise ValueError(f"item {i}: has no options")
    if item.gold is not None and not 0 <= item.gold < len(item.options):
      raise ValueError(f"item {i}: gold index {item.gold} is outside its "
                       f"{len(item.options)} options")
    input_ids = _ids(item.inputs, vocabulary)
    truncated += len(input_ids) + add_eos_inputs > input_budget
    inputs = truncate_tail(input_ids, input_budget, eos if add_eos_inputs else None)
    for j, option in enumerate(item.options):
      targets = tuple(_ids(option, vocabulary) + ([eos] if add_eos_targets else []))
      if not targets:
        raise ValueError(f"item {i}: option {j} has no target tokens")
      if len(targets) > target_budget:
        raise ValueError(f"item {i}: option {j} ({option!r:.60}) has {len(targets)} target "
                         f"tokens, more than the targets budget of {target_budget}")
      rows.append(Row(i, j, inputs, targets))
    parsed.append(item)
  if truncated:
    logging.warning("rank classification: %d of %d inputs were longer than %d tokens and keep "
                 "their last tokens", truncated, len(parsed), input_budget)
  return rows, parsed


def host_row_indices(num_rows: int, batch_size: int, process_index: int = 0,
                     process_count: int = 1) -> np.ndarray:
  """Row indices this process feeds, batch after batch [num_batches * batch_size / processes].

  Global batch g holds rows g*batch_size … (g+1)*batch_size - 1, process p the
  p-th contiguous slice of it. Slots past the last row hold -1 (padding).
  """
  num_batches = max(1, math.ceil(num_rows / batch_size))
  local = batch_size // process_count
  index = np.arange(num_batches * batch_size).reshape(num_batches, process_count, local)
  index = index[:, process_index].reshape(-1)
  return np.where(index < num_rows, index, -1)


ROW_INDEX = "rank_classification_row"  # Extra batch feature: the row of each slot (-1: padding).


def _converted_batches(rows: Sequence[Row], indices: np.ndarray, local_batch_size: int,
                       converter: seqio.FeatureConverter,
                       task_feature_lengths: Mapping[str, int]
                       ) -> Iterator[dict[str, np.ndarray]]:
  """Model-feature batches of the rows at `indices` (row 0 stands in for padding -1), each
  with the `ROW_INDEX` feature [local_batch_size] saying which row every slot holds."""
  def generate():
    for k in indices:
      row = rows[max(int(k), 0)]
      yield {"inputs": np.asarray(row.inputs, np.int32),
             "targets": np.asarray(row.targets, np.int32)}
  spec = tf.TensorSpec([None], tf.int32)
  ds = tf.data.Dataset.from_generator(generate, output_signature={"inputs": spec,
                                                                  "targets": spec})
  ds = converter(ds, dict(task_feature_lengths)).batch(local_batch_size, drop_remainder=True)
  for b, batch in enumerate(ds.as_numpy_iterator()):
    features = {k: np.asarray(v, np.int32) for k, v in batch.items()}
    features[ROW_INDEX] = np.asarray(indices[b * local_batch_size:(b + 1) * local_batch_size],
                                     np.int32)
    yield features


class RankClassifier:
  """Scores answer options with `model.score` on a mesh; one compilation per instance.

  `batch_size` is the global number of (input, option) rows per step; it must
  divide over the data-parallel axes and the processes. `task_feature_lengths`
  are the budgets {"inputs": …, "targets": …} in tokens, EOS included.
  """

  def __init__(self, model: base.Model, partitioner: partitioning.Partitioner,
               task_feature_lengths: Mapping[str, int], batch_size: int,
               add_eos_inputs: bool = True, add_eos_targets: bool = True):
    data, processes = partitioner.data_parallel_size(), jax.process_count()
    if batch_size <= 0 or batch_size % data or batch_size % processes:
      raise ValueError(f"batch_size={batch_size} must be a positive multiple of the "
                       f"data-parallel size {data} and of the {processes} processes")
    self.model = model
    self.partitioner = partitioner
    self.task_feature_lengths = {"inputs": int(task_feature_lengths["inputs"]),
                                 "targets": int(task_feature_lengths["targets"])}
    self.batch_size = batch_size
    self.add_eos_inputs, self.add_eos_targets = add_eos_inputs, add_eos_targets
    out = partitioner.batch_sharding(1)
    self._score = jax.jit(self._score_and_count, out_shardings=(out, out, out))

  def _score_and_count(self, params, batch):
    """(Σ target log-likelihood, number of target tokens, row index) per batch slot."""
    features = {k: v for k, v in batch.items() if k != ROW_INDEX}
    return (self.model.score(params, features),
            jnp.sum(features["decoder_loss_weights"], axis=-1).astype(jnp.int32),
            batch[ROW_INDEX])

  def tokenize(self, items: Sequence[Any]) -> tuple[list[Row], list[RankItem]]:
    return tokenize_items(items, self.model.vocabulary, self.task_feature_lengths,
                          self.add_eos_inputs, self.add_eos_targets)

  def score_rows(self, params, rows: Sequence[Row], progress: bool = True,
                 desc: str = "rank classification") -> tuple[np.ndarray, np.ndarray]:
    """(log-likelihood sums float64 [num_rows], target token counts int64 [num_rows])."""
    if not rows:
      return np.zeros(0, np.float64), np.zeros(0, np.int64)
    indices = host_row_indices(len(rows), self.batch_size, jax.process_index(),
                               jax.process_count())
    local = self.batch_size // jax.process_count()
    batches = _converted_batches(rows, indices, local, self.model.feature_converter(pack=False),
                                 self.task_feature_lengths)
    num_batches = len(indices) // local
    bar = tqdm.tqdm(total=num_batches, desc=desc, unit="batch",
                    disable=not progress or jax.process_index() != 0)
    fetched, pending = [], None
    for batch in batches:
      outputs = self._score(params, self.partitioner.shard_batch(batch))
      if pending is not None:  # Fetch the previous batch while this one runs.
        fetched.append([partitioning.to_host(x) for x in pending])
        bar.update(1)
      pending = outputs
    fetched.append([partitioning.to_host(x) for x in pending])
    bar.update(1)
    bar.close()
    sums, counts, slots = (np.concatenate(column) for column in zip(*fetched))
    real = slots >= 0
    if len(fetched) != num_batches or sorted(slots[real]) != list(range(len(rows))):
      raise RuntimeError(f"rank classification scored {len(fetched)} batches covering "
                         f"{int(real.sum())} rows; expected {num_batches} covering {len(rows)}")
    out_sums, out_counts = np.zeros(len(rows), np.float64), np.zeros(len(rows), np.int64)
    out_sums[slots[real]] = sums[real]
    out_counts[slots[real]] = counts[real]
    return out_sums, out_counts

  def __call__(self, params, items: Sequence[Any], length_normalize: bool = False,
               progress: bool = True) -> RankClassificationResult:
    """Scores every option of every item; see `RankClassificationResult`."""
    rows, parsed = self.tokenize(items)
    sums, counts = self.score_rows(params, rows, progress)
    for row, count in zip(rows, counts):
      if count != len(row.targets):
        raise RuntimeError(f"item {row.item} option {row.option}: the feature converter "
                           f"weighted {count} target tokens, expected {len(row.targets)}")
    bounds = np.cumsum([0] + [len(item.options) for item in parsed])
    return RankClassificationResult(
        log_likelihoods=tuple(sums[a:b] for a, b in zip(bounds[:-1], bounds[1:])),
        target_lengths=tuple(counts[a:b] for a, b in zip(bounds[:-1], bounds[1:])),
        gold=tuple(item.gold for item in parsed),
        length_normalized=length_normalize)


def rank_classify(model: base.Model, params, items: Sequence[Any],
                  task_feature_lengths: Mapping[str, int], batch_size: int,
                  partitioner: Optional[partitioning.Partitioner] = None,
                  length_normalize: bool = False, progress: bool = True,
                  **kwargs) -> RankClassificationResult:
  """One-off `RankClassifier(...)(params, items)`; a data-parallel mesh over all devices by
  default. Build a `RankClassifier` once to reuse its compilation across calls."""
  partitioner = partitioner or partitioning.Partitioner()
  classifier = RankClassifier(model, partitioner, task_feature_lengths, batch_size, **kwargs)
  return classifier(params, items, length_normalize, progress)
