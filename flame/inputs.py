"""seqio Tasks/Mixtures → batches of model features, one shard per host.

Each process reads shard `jax.process_index()` of `jax.process_count()` and
yields numpy batches of `global_batch_size / process_count` rows;
`Partitioner.shard_batch` assembles them into global arrays. With a fixed
seed the order is deterministic, so a resumed run skips the batches it has
already consumed and sees exactly the data of an uninterrupted run.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import jax
import numpy as np
import seqio


def host_batch_size(global_batch_size: int) -> int:
  if global_batch_size % jax.process_count():
    raise ValueError(f"batch size {global_batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")
  return global_batch_size // jax.process_count()


def get_batches(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                feature_converter: seqio.FeatureConverter, global_batch_size: int,
                split: str = "train", shuffle: bool = True, seed: int = 0,
                num_epochs=None, skip_batches: int = 0, use_cached: bool = False,
                pad_final_batch: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Yields host-local numpy batches; `num_epochs=None` repeats forever.

  `pad_final_batch`: a final partial batch is kept and filled up to the batch size with
  all-zero rows (zero loss weights, so they add nothing to sums) instead of dropped.
  """
  try:
    seqio.get_mixture_or_task(mixture_or_task_name)
  except ValueError as e:
    raise ValueError(f"unknown seqio task or mixture {mixture_or_task_name!r} (import the "
                     "module that registers it, e.g. from a gin file)") from e
  dataset = seqio.get_dataset(
      mixture_or_task_name, task_feature_lengths=dict(task_feature_lengths),
      feature_converter=feature_converter, dataset_split=split, use_cached=use_cached,
      shuffle=shuffle, num_epochs=num_epochs, seed=seed,
      shard_info=seqio.ShardInfo(jax.process_index(), jax.process_count()),
      batch_size=None if pad_final_batch else host_batch_size(global_batch_size),
      verbose=False)
  if pad_final_batch:
    dataset = dataset.batch(host_batch_size(global_batch_size), drop_remainder=False)
  if skip_batches:
    dataset = dataset.skip(skip_batches)
  for batch in dataset.as_numpy_iterator():
    batch = {k: np.asarray(v, np.int32) for k, v in batch.items()}
    rows = next(iter(batch.values())).shape[0]
    missing = host_batch_size(global_batch_size) - rows
    if missing:
      batch = {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)])
               for k, v in batch.items()}
    yield batch


def batch_counts(batch: Mapping[str, np.ndarray]) -> tuple[int, int]:
  """(examples, non-padding tokens) in a batch of model features.

  Tokens: non-zero target tokens (a decoder-only target holds the input too) plus non-zero
  encoder inputs. Examples: distinct segments per row when packed, else rows with a target.
  """
  targets = batch["decoder_target_tokens"]
  tokens = int(np.count_nonzero(targets))
  if "encoder_input_tokens" in batch:
    tokens += int(np.count_nonzero(batch["encoder_input_tokens"]))
  segments = batch.get("decoder_segment_ids")
  if segments is not None:
    examples = sum(len(np.unique(row[row > 0])) for row in segments)
  else:
    examples = int(np.count_nonzero(targets.any(axis=1)))
  return examples, tokens

