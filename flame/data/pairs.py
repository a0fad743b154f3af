"""Training batches that hold both orders of each pair, side by side.

A pairwise judge trained on shuffled examples sees a pair in one order here and in the other
order thousands of steps later, so nothing in its loss says that the two verdicts must agree:
a small judge learns to answer by position (swap consistency 1–33% for the SmolLM2 judges of
docs/autoraters.md). `paired_batches` yields unpacked rows in which rows 2i and 2i+1 are the
same pair in its two orders (the sources store the swapped copy of every training pair as
``<id>/swapped``), with three more features per row for the loss:

  pair_verdict_position  [1]: the position (in the row) whose target is the verdict's first
                         token (rank 2 like every batch feature, which the batch sharding needs)
  pair_label_tokens      [first token of "A", first token of "B"] (`scoring.verdict_tokens`)

A tie's two rows (PandaLM) are kept: their bias is penalised like any pair's.

`flame.models.base.Model.loss_terms` reads them (with ``pair_bias_weight`` > 0) to penalise
the position bias: with m = log p(A) − log p(B) at the verdict in each order, a pair's bias is
b = (m_order1 + m_order2) / 2 (zero when the verdict follows the content: the swap negates m).

Sampling: a pair (both rows) at a time, tasks drawn by the mixture's rates, each task's pairs
in a fresh shuffled order every pass. Rows are padded only to the bucket of the longest row of
their batch (`features.bucket_lengths`, two lengths per doubling): pairs are sorted by length
within windows of `window` batches before being cut into batches, and the batches of a window
are then shuffled, so short pairs do not pay for 512-token rows. Deterministic given `seed`; a
resumed run skips the batches it has consumed.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Sequence

import jax
import numpy as np
import seqio

from flame import inputs
from flame.autorater import features, scoring
from flame.data import format, tasks

LABELS = ("A", "B")


@dataclasses.dataclass
class TaskPairs:
  """One task's training pairs as unpacked model features: rows[2i], rows[2i + 1]."""
  rows: dict[str, np.ndarray]  # feature -> [2 * pairs, length]
  lengths: np.ndarray  # [pairs]: the longer row of each pair (tokens, padding excluded)

  @property
  def pairs(self) -> int:
    return len(self.lengths)


def verdict_positions(targets: np.ndarray, weights: np.ndarray, prefix_length: int,
                      label_tokens: Sequence[int], task: str, ids: Sequence[str]) -> np.ndarray:
  """Per row, the position whose target token is the verdict: the `prefix_length`-th weighted
  position (0-based). A row whose token there is not one of the verdicts' first tokens (a
  target laid out otherwise, or cut short) is an error naming the example."""
  out = np.zeros(len(targets), np.int32)
  for row, (tokens, weight) in enumerate(zip(targets, weights)):
    weighted = np.flatnonzero(weight)
    if len(weighted) <= prefix_length or tokens[weighted[prefix_length]] not in label_tokens:
      raise ValueError(f"task {task!r}, example {ids[row]!r}: no verdict token at target "
                       f"position {prefix_length} (expected one of {list(label_tokens)}, "
                       f"targets {tokens[weighted].tolist()})")
    out[row] = weighted[prefix_length]
  return out


def task_pairs(seqio_name: str, task_feature_lengths: Mapping[str, int],
               feature_converter: seqio.FeatureConverter) -> TaskPairs:
  """The train split of one pairwise seqio task, as complete pairs (an example whose other
  order was dropped, e.g. for not fitting the input budget, is left out)."""
  spec = tasks.info(seqio_name).spec
  if spec.kind != format.TaskKind.PAIRWISE or set(LABELS) - set(spec.labels):
    raise ValueError(f"paired batches: task {seqio_name!r} is {spec.kind.value} with labels "
                     f"{list(spec.labels)}; only pairwise tasks with verdicts A and B pair up")
  task = seqio.get_mixture_or_task(seqio_name)
  dataset = task.get_dataset(dict(task_feature_lengths), split="train", shuffle=False,
                             num_epochs=1).cache()
  ids = [example["example_id"].decode() for example in dataset.as_numpy_iterator()]
  converted = list(feature_converter(dataset, dict(task_feature_lengths)).as_numpy_iterator())
  where = {example_id: i for i, example_id in enumerate(ids)}
  order = []
  for example_id in ids:
    if not example_id.endswith(format.SWAP_SUFFIX) and example_id + format.SWAP_SUFFIX in where:
      order += [where[example_id], where[example_id + format.SWAP_SUFFIX]]
  if not order:
    raise ValueError(f"paired batches: task {seqio_name!r} has no example stored in both "
                     f"orders (ids ending in {format.SWAP_SUFFIX!r}) in its train split")
  rows = {name: np.stack([converted[i][name] for i in order]).astype(np.int32)
          for name in converted[0]}
  verdicts = scoring.verdict_tokens(task.output_features["targets"].vocabulary, spec.labels,
                                    spec.answer_field)  # a tie's target is a verdict too
  rows["pair_verdict_position"] = verdict_positions(
      rows["decoder_target_tokens"], rows["decoder_loss_weights"], len(verdicts.prefix),
      verdicts.first_tokens, seqio_name, [ids[i] for i in order])[:, None]
  label_tokens = [verdicts.first_tokens[spec.labels.index(label)] for label in LABELS]
  rows["pair_label_tokens"] = np.tile(np.asarray(label_tokens, np.int32), (len(order), 1))
  lengths = np.count_nonzero(rows["decoder_target_tokens"], axis=1).reshape(-1, 2).max(axis=1)
  return TaskPairs(rows, lengths)


def mixture_tasks(mixture_or_task_name: str) -> list[tuple[str, float]]:
  """(seqio task, rate) of a mixture, or [(task, 1.0)] for a task."""
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  if isinstance(provider, seqio.Mixture):
    return [(task.name, float(provider.get_rate(task))) for task in provider.tasks]
  return [(provider.name, 1.0)]


def pair_schedule(sizes: Sequence[int], rates: Sequence[float], pairs_per_batch: int,
                  rng: np.random.Generator) -> Iterator[list[tuple[int, int]]]:
  """Batches of (task, pair) picks: tasks by `rates`, each task's pairs in a fresh random
  order on every pass."""
  probabilities = np.asarray(rates, np.float64) / np.sum(rates)
  orders = [rng.permutation(size) for size in sizes]
  cursors = [0] * len(sizes)
  while True:
    batch = []
    for task in rng.choice(len(sizes), size=pairs_per_batch, p=probabilities):
      if cursors[task] == sizes[task]:
        orders[task], cursors[task] = rng.permutation(sizes[task]), 0
      batch.append((int(task), int(orders[task][cursors[task]])))
      cursors[task] += 1
    yield batch


def paired_batches(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                   feature_converter: seqio.FeatureConverter, global_batch_size: int,
                   seed: int = 0, skip_batches: int = 0, window: int = 16
                   ) -> Iterator[dict[str, np.ndarray]]:
  """Host-local batches of `global_batch_size` rows (pairs × 2) from the pairwise tasks of a
  mixture (or one task); see the module docstring. Repeats forever."""
  if global_batch_size % 2:
    raise ValueError(f"BATCH_SIZE = {global_batch_size}: paired batches hold both orders of "
                     "each pair, so the batch size must be even")
  host_rows = inputs.host_batch_size(global_batch_size)
  if host_rows % 2:
    raise ValueError(f"BATCH_SIZE = {global_batch_size} over {jax.process_count()} processes "
                     f"gives {host_rows} rows per host: a pair cannot span two hosts")
  names, rates = zip(*[(name, rate) for name, rate in mixture_tasks(mixture_or_task_name)
                       if rate > 0])
  every = [task_pairs(name, task_feature_lengths, feature_converter) for name in names]
  buckets = features.bucket_lengths(every[0].rows["decoder_target_tokens"].shape[1],
                                    per_octave=2)
  rng = np.random.default_rng(seed)
  schedule = pair_schedule([t.pairs for t in every], rates, global_batch_size // 2, rng)
  first_pair = jax.process_index() * host_rows // 2
  host_pairs = slice(first_pair, first_pair + host_rows // 2)
  emitted = 0
  while True:
    picks = [pick for _ in range(window) for pick in next(schedule)]
    picks.sort(key=lambda pick: every[pick[0]].lengths[pick[1]])
    batches = [picks[i:i + global_batch_size // 2]
               for i in range(0, len(picks), global_batch_size // 2)]
    for b in rng.permutation(len(batches)):
      emitted += 1
      if emitted <= skip_batches:
        continue
      yield _assemble(every, batches[b], buckets, host_pairs)


def _assemble(every: Sequence[TaskPairs], picks, buckets, host_pairs: slice
              ) -> dict[str, np.ndarray]:
  """This host's rows of a batch of `picks`, cut to the bucket of the global batch's longest
  row (every host pads to the same width)."""
  length = max(every[task].lengths[pair] for task, pair in picks)
  width = next(b for b in buckets if b >= length)
  rows = [(task, 2 * pair + k) for task, pair in picks[host_pairs] for k in (0, 1)]
  batch = {}
  for name in every[0].rows:
    stacked = np.stack([every[task].rows[name][row] for task, row in rows])
    batch[name] = stacked[:, :width] if name.startswith("decoder_") else stacked
  return batch
