"""The model API shared by the encoder-decoder and decoder-only models.

A `Model` pairs a Flax module with a seqio feature converter. Parameters are a
plain nested dict of arrays (no boxing) in memory and on disk. Batches are
dicts of the converter's model features (e.g. ``decoder_target_tokens``,
``decoder_loss_weights``).

- `init(rng, batch_size, task_feature_lengths)` → boxed variables (their
  `nn.Partitioned` metadata carries the logical axes; `unbox` for arrays).
- `loss_terms(params, batch, rng)` → un-normalised sums (loss, target tokens,
  correct tokens); summing these over micro-batches and dividing once gives
  exactly the loss of the whole batch, normalised over its target tokens.
- `loss(params, batch, rng)` → (mean loss per target token, metrics).
- `score(params, batch)` → per-example log-likelihood of the targets [batch].
- `decode(params, {"inputs": [batch, len]}, max_decode_len)` → greedy tokens
  [batch, max_decode_len], padded with 0 after the first EOS.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:  # Annotations only: seqio (TensorFlow) loads when a model needs it.
  import seqio

Batch = Mapping[str, jax.Array]
Params = Mapping[str, Any]

# What a model may compute in (`dtype` of DecoderConfig / T5Config); parameters, optimizer
# state, softmax, norms, logsumexp and the loss stay float32 in both.
COMPUTE_DTYPES = ("float32", "bfloat16")


def check_compute_dtype(dtype: str, setting: Optional[str] = None) -> str:
  """`dtype` if it is one of COMPUTE_DTYPES; else a ValueError naming the `setting` (e.g.
  "PipelineSettings.dtype") that holds it."""
  if dtype not in COMPUTE_DTYPES:
    given = f"dtype {dtype!r}" if setting is None else f"{setting}={dtype!r}"
    raise ValueError(f"{given}: expected one of {list(COMPUTE_DTYPES)}")
  return dtype


def with_compute_dtype(config, dtype: Optional[str]):
  """`config` (a DecoderConfig or T5Config) computing its matmuls in `dtype`; its parameters
  keep their own dtype, so a checkpoint restores the same way whichever was used. None:
  `config` unchanged."""
  if dtype is None:
    return config
  return dataclasses.replace(config, dtype=check_compute_dtype(dtype))


def token_log_likelihoods(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) = logit[target] - logsumexp(logits), per position [batch, length].

  The target logit is picked with a one-hot product rather than a gather: its
  gradient is then dense, which is faster than a scatter on CPU and shards
  over a vocabulary-parallel axis without communication beyond the reductions.
  """
  logits = logits.astype(jnp.float32)
  picked = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype),
                   axis=-1)
  return picked - jax.nn.logsumexp(logits, axis=-1)


def target_positions(loss_weights: jax.Array, k: int) -> jax.Array:
  """Indices [batch, k] of the first k positions of each row with a non-zero loss weight,
  in order; a row with fewer is filled with positions whose weight is zero."""
  unweighted = (loss_weights == 0).astype(jnp.int32)
  return jnp.argsort(unweighted, axis=-1, stable=True)[:, :k].astype(jnp.int32)


def mask_after_eos(tokens: jax.Array, eos_id: int) -> jax.Array:
  """Zeros every token after the first EOS of each row (the EOS is kept)."""
  is_eos = (tokens == eos_id).astype(jnp.int32)
  seen_before = jnp.cumsum(is_eos, axis=-1) - is_eos
  return jnp.where(seen_before > 0, 0, tokens)


class Model(abc.ABC):
  """Common behaviour; subclasses define the forward pass and decoding."""

  feature_converter_cls: type[seqio.FeatureConverter]

  def __init__(self, module: nn.Module, vocabulary: seqio.Vocabulary):
    self.module = module
    self.vocabulary = vocabulary

  # ---- shapes -------------------------------------------------------------
  def feature_converter(self, pack: bool = False) -> seqio.FeatureConverter:
    return self.feature_converter_cls(pack=pack)

  def model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
    return dict(self.feature_converter().get_model_feature_lengths(task_feature_lengths))

  @abc.abstractmethod
  def model_feature_shapes(self, batch_size: int, task_feature_lengths: Mapping[str, int],
                           packed: bool = False) -> dict[str, tuple[int, ...]]:
    """Shapes of every int32 model feature of a batch."""

  def dummy_batch(self, batch_size: int, task_feature_lengths: Mapping[str, int],
                  packed: bool = False) -> dict[str, np.ndarray]:
    return {k: np.ones(s, np.int32)
            for k, s in self.model_feature_shapes(batch_size, task_feature_lengths, packed).items()}

  # ---- forward ------------------------------------------------------------
  @abc.abstractmethod
  def logits(self, params: Params, batch: Batch, dropout_rng: Optional[jax.Array] = None,
             logit_positions: Optional[jax.Array] = None) -> jax.Array:
    """Float32 logits [batch, target_length, vocab]; dropout iff `dropout_rng`.

    With `logit_positions` (int [batch, k], indices into the target length) only
    those positions go through the final norm and output head: [batch, k, vocab].
    """

  def init(self, rng: jax.Array, batch_size: int, task_feature_lengths: Mapping[str, int]):
    batch = self.dummy_batch(batch_size, task_feature_lengths)
    return self._init_variables(rng, batch)

  @abc.abstractmethod
  def _init_variables(self, rng: jax.Array, batch: Mapping[str, np.ndarray]):
    """module.init on a dummy batch; returns the boxed variables dict."""

  def init_params(self, rng: jax.Array, batch_size: int,
                  task_feature_lengths: Mapping[str, int]) -> Params:
    return nn.meta.unbox(self.init(rng, batch_size, task_feature_lengths)["params"])

  def loss_terms(self, params: Params, batch: Batch, dropout_rng: Optional[jax.Array] = None,
                 loss_positions: Optional[int] = None,
                 pair_bias_weight: float = 0.0) -> dict[str, jax.Array]:
    """Summed loss terms of `batch`.

    `pair_bias_weight` (w > 0, batches of `flame.data.pairs`: rows 2i and 2i+1 are one pair in
    its two orders): adds ``penalty_sum`` = w · mean over pairs of b² · weight_sum, where
    b = (m₁ + m₂) / 2 and m = log p(A) − log p(B) at each row's verdict position, so that the
    trainer, dividing by the batch's target tokens, minimises (token cross-entropy) + w · mean
    b². b is the part of the verdict that follows the position (the swap negates the part that
    follows the content). Also ``pairs``, ``pair_bias_sq_sum`` and ``pair_consistent_sum``
    (pairs whose two verdicts agree: m₁ · m₂ < 0), for any batch of pairs (w = 0 included).

    `loss_positions` (k): the output head and the loss run only at the first k positions of
    each row whose loss weight is non-zero (`target_positions`), not at every position: for
    a judge (~500 input tokens, a few dozen target tokens) that skips most of the head's
    FLOPs. Exact when no row has more than k weighted positions; rows with more would lose
    their later targets, which `train` rules out by checking each batch on the host.
    """
    targets = batch["decoder_target_tokens"]
    weights = batch["decoder_loss_weights"]
    positions = None
    if loss_positions is not None and loss_positions < targets.shape[1]:
      positions = target_positions(weights, loss_positions)
      targets = jnp.take_along_axis(targets, positions, axis=1)
      weights = jnp.take_along_axis(weights, positions, axis=1)
    logits = self.logits(params, batch, dropout_rng, logit_positions=positions)
    weights = weights.astype(jnp.float32)
    token_ll = token_log_likelihoods(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    terms = {"loss_sum": -jnp.sum(token_ll * weights),
             "weight_sum": jnp.sum(weights),
             "correct_sum": jnp.sum(correct * weights)}
    if pair_bias_weight or "pair_verdict_position" in batch:
      terms.update(pair_bias_terms(logits, positions, batch, pair_bias_weight,
                                   terms["weight_sum"]))
    return terms

  def loss(self, params: Params, batch: Batch, dropout_rng: Optional[jax.Array] = None):
    terms = self.loss_terms(params, batch, dropout_rng)
    return normalize_loss_terms(terms)

  def score(self, params: Params, batch: Batch) -> jax.Array:
    logits = self.logits(params, batch)
    token_ll = token_log_likelihoods(logits, batch["decoder_target_tokens"])
    return jnp.sum(token_ll * batch["decoder_loss_weights"].astype(jnp.float32), axis=-1)

  @abc.abstractmethod
  def decode(self, params: Params, batch: Batch, max_decode_len: int) -> jax.Array:
    """Greedy decoding with a KV cache."""

  def _cache_shapes(self, *args, **kwargs):
    """Abstract 'cache' collection of the module called with decode=True."""
    shapes = jax.eval_shape(lambda: self.module.init(jax.random.PRNGKey(0), *args,
                                                     decode=True, **kwargs))
    return shapes["cache"]

  @staticmethod
  def zeros_like_shapes(shapes):
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def verdict_margins(logits: jax.Array, positions: Optional[jax.Array],
                    batch: Batch) -> jax.Array:
  """m = log p(A) − log p(B) [rows] at each row's ``pair_verdict_position`` ([rows, 1]), from
  logits over every position ([rows, length, vocab], `positions` None) or over the target
  positions `positions` ([rows, k]: the logits' second axis)."""
  where = batch["pair_verdict_position"][:, 0].astype(jnp.int32)
  if positions is not None:
    where = jnp.argmax(positions == where[:, None], axis=1)
  at = jnp.take_along_axis(logits, where[:, None, None], axis=1)[:, 0].astype(jnp.float32)
  log_probs = jax.nn.log_softmax(at, axis=-1)
  labels = batch["pair_label_tokens"].astype(jnp.int32)
  picked = jnp.take_along_axis(log_probs, labels, axis=1)
  return picked[:, 0] - picked[:, 1]


def pair_bias_terms(logits, positions, batch: Batch, weight: float, weight_sum: jax.Array
                    ) -> dict[str, jax.Array]:
  """The position-bias penalty and its counts (see `Model.loss_terms`)."""
  if "pair_verdict_position" not in batch:
    raise ValueError("pair_bias_weight > 0 needs batches from flame.data.pairs (features "
                     "pair_verdict_position, pair_label_tokens); set train.pair_orders = True")
  margins = verdict_margins(logits, positions, batch).reshape(-1, 2)
  bias = (margins[:, 0] + margins[:, 1]) / 2
  pairs = jnp.asarray(bias.shape[0], jnp.float32)
  return {"penalty_sum": weight * jnp.mean(bias ** 2) * weight_sum,
          "pairs": pairs,
          "pair_bias_sq_sum": jnp.sum(bias ** 2),
          "pair_consistent_sum": jnp.sum((margins[:, 0] * margins[:, 1] < 0)
                                         .astype(jnp.float32))}


def normalize_loss_terms(terms: Mapping[str, jax.Array]):
  """(loss per target token, metrics) from summed `loss_terms`; with pair terms also the
  position bias (root mean square of b, in nats) and the pairs' swap consistency."""
  denom = jnp.maximum(terms["weight_sum"], 1.0)
  loss = terms["loss_sum"] / denom
  metrics = {"loss": loss, "accuracy": terms["correct_sum"] / denom,
             "target_tokens": terms["weight_sum"]}
  if "pairs" in terms:
    pairs = jnp.maximum(terms["pairs"], 1.0)
    metrics["pair_bias_rms"] = jnp.sqrt(terms["pair_bias_sq_sum"] / pairs)
    metrics["pair_swap_consistency"] = terms["pair_consistent_sum"] / pairs
  return loss, metrics
