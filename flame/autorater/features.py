"""Model features of (inputs, targets) token rows, built in NumPy.

The same layouts seqio's unpacked feature converters produce (tests compare
them), without a tf.data pipeline per batch, which costs more than a forward
pass of a small model:

  decoder-only (`PrefixLMFeatureConverter`), one sequence of length L::

    decoder_target_tokens    inputs + targets, then 0
    decoder_input_tokens     the same shifted right by one, 0 in front
    decoder_loss_weights     1 on the targets
    decoder_causal_attention 1 on the inputs and the first target position

  encoder-decoder (`EncDecFeatureConverter`), inputs length Li, targets Lt::

    encoder_input_tokens     inputs, then 0
    decoder_target_tokens    targets, then 0
    decoder_input_tokens     targets shifted right by one, 0 in front
    decoder_loss_weights     1 on the targets

`target_starts` gives, per row, the index in ``decoder_target_tokens`` of the
first target token; logits at index ``start + j`` predict target token j.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import seqio

Ids = Sequence[int]


def is_decoder_only(converter_cls: type) -> bool:
  if issubclass(converter_cls, seqio.PrefixLMFeatureConverter):
    return True
  if issubclass(converter_cls, seqio.EncDecFeatureConverter):
    return False
  raise ValueError(f"no feature layout for {converter_cls.__name__}; expected seqio's "
                   "PrefixLMFeatureConverter (decoder-only) or EncDecFeatureConverter (T5)")


def row_lengths(converter_cls: type, inputs: Ids, targets: Ids) -> tuple[int, int]:
  """(length of the first feature dimension used, of the targets); for a decoder-only
  model the first is inputs + targets, for an encoder-decoder the inputs alone."""
  if is_decoder_only(converter_cls):
    return len(inputs) + len(targets), len(targets)
  return len(inputs), len(targets)


def model_features(converter_cls: type, inputs: Sequence[Ids], targets: Sequence[Ids],
                   length: int, targets_length: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """(features int32 [rows, …], target_starts int32 [rows]).

  `length`: the decoder sequence length (decoder-only) or the encoder length
  (encoder-decoder); `targets_length`: the decoder length of an encoder-decoder
  (ignored for a decoder-only model). A row that does not fit raises ValueError.
  """
  rows = len(inputs)
  if len(targets) != rows:
    raise ValueError(f"{rows} input rows but {len(targets)} target rows")
  decoder_only = is_decoder_only(converter_cls)
  decoder_len = length if decoder_only else targets_length
  target = np.zeros((rows, decoder_len), np.int32)
  weights = np.zeros((rows, decoder_len), np.int32)
  starts = np.zeros(rows, np.int32)
  features = {}
  if decoder_only:
    causal = np.zeros((rows, decoder_len), np.int32)
  else:
    encoder = np.zeros((rows, length), np.int32)
  for r, (x, y) in enumerate(zip(inputs, targets)):
    if decoder_only:
      sequence, start = list(x) + list(y), len(x)
      causal[r, :start + 1] = 1
    else:
      if len(x) > length:
        raise ValueError(f"row {r}: {len(x)} input tokens do not fit the encoder length {length}")
      encoder[r, :len(x)] = x
      sequence, start = list(y), 0
    if len(sequence) > decoder_len:
      raise ValueError(f"row {r}: {len(sequence)} tokens do not fit the decoder length "
                       f"{decoder_len}")
    target[r, :len(sequence)] = sequence
    weights[r, start:len(sequence)] = 1
    starts[r] = start
  shifted = np.zeros_like(target)
  shifted[:, 1:] = target[:, :-1]
  features.update(decoder_target_tokens=target, decoder_input_tokens=shifted,
                  decoder_loss_weights=weights)
  if decoder_only:
    features["decoder_causal_attention"] = causal
  else:
    features["encoder_input_tokens"] = encoder
  return features, starts


def bucket_lengths(max_length: int, smallest: int = 32, per_octave: int = 1) -> tuple[int, ...]:
  """Padded lengths rows are grouped into: `per_octave` lengths per doubling from `smallest`
  (smallest × 2^(i / per_octave), rounded up to a multiple of 8 above 8), then `max_length`.

  One per octave (powers of two) pads a row to up to twice its length; four pad it by at most
  19% (plus the rounding), at the price of more shapes to compile."""
  if max_length < 1:
    raise ValueError(f"max_length must be positive, got {max_length}")
  if per_octave < 1:
    raise ValueError(f"per_octave must be positive, got {per_octave}")
  out, i = [], 0
  while True:
    length = smallest * 2 ** (i / per_octave)
    length = int(math.ceil(length / 8) * 8) if length > 8 else int(math.ceil(length))
    if length >= max_length:
      break
    if not out or length > out[-1]:
      out.append(length)
    i += 1
  return tuple(out) + (max_length,)


def bucket_of(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket length that holds `length`."""
  for b in buckets:
    if length <= b:
      return b
  raise ValueError(f"a row of {length} tokens is longer than the largest bucket {buckets[-1]}")
