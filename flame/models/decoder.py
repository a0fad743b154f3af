"""Decoder-only transformer of the Llama family.

Pre-norm blocks: RMSNorm → grouped-query attention with RoPE → residual,
RMSNorm → SwiGLU MLP → residual; a final RMSNorm and an output head that is
either the transposed embedding (tied) or its own [embed, vocab] kernel.
Parameter tree (plain nested dict)::

  token_embedder/embedding            [vocab, embed]
  layers_{i}/pre_attention_norm/scale [embed]
  layers_{i}/attention/{query,key,value}  [embed, heads|kv_heads, head_dim]
  layers_{i}/attention/out            [heads, head_dim, embed]
  layers_{i}/pre_mlp_norm/scale       [embed]
  layers_{i}/mlp/{wi_0,wi_1}/kernel   [embed, mlp]; mlp/wo/kernel [mlp, embed]
  final_norm/scale                    [embed]
  logits_dense/kernel                 [embed, vocab]   (untied only)

With ``scan_layers`` the layer stack is one `nn.scan` over a single layer (as T5X and
MaxText do): compile time stops growing with depth, and the layers' parameters are stacked
under ``layers/…`` with a leading [layers] axis (logical axis ``layers``, never sharded).
`flame.models.scan` converts between the two layouts, and checkpoints of one restore into
models of the other (`flame.checkpoints.manager`). ``remat_policy`` recomputes each layer's
activations in the backward pass: ``full`` keeps only the layer inputs, ``dots`` also keeps
the matmul outputs, ``none`` (default) keeps everything.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from flame.models import base, layers

if TYPE_CHECKING:  # Annotations only: seqio (TensorFlow) loads when a model needs it.
  import seqio


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Shape and numerics of a Llama-family decoder."""
  vocab_size: int = 259
  emb_dim: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  mlp_dim: int = 128
  rope_theta: float = 10000.0
  norm_epsilon: float = 1e-5
  tie_embeddings: bool = True
  dropout_rate: float = 0.0
  # Dropout on the attention probabilities; None: dropout_rate. Llama-family models train
  # with none (HF LlamaConfig.attention_dropout = 0.0). It is the expensive dropout: one
  # random number per (head, query, key), 8x the activations' count at 512 tokens (on 2 CPU
  # cores 0.05 of it costs ~25% of a SmolLM2 training step; residual dropout ~2%).
  attention_dropout_rate: Optional[float] = None
  embedding_init_stddev: float = 0.02
  bidirectional_prefix: bool = False  # T5-style prefix LM attention; False keeps Llama's causal mask.
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  scan_layers: bool = False
  remat_policy: str = "none"  # none | full | dots
  # Causal attention in query blocks of this many tokens, each scoring only the keys up to
  # its end (`layers.Attention.causal_block`); 0: the full square. Ignored with
  # bidirectional_prefix (prefix queries see later keys).
  attention_block: int = 128

  def __post_init__(self):
    layers.check_remat_policy("DecoderConfig", self.remat_policy)

  def num_params(self) -> int:
    """Parameter count (used for the FLOPs estimate)."""
    attn = self.emb_dim * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    mlp = 3 * self.emb_dim * self.mlp_dim
    per_layer = attn + mlp + 2 * self.emb_dim
    head = 0 if self.tie_embeddings else self.emb_dim * self.vocab_size
    return self.vocab_size * self.emb_dim + self.num_layers * per_layer + self.emb_dim + head


class DecoderLayer(nn.Module):
  """One block; with `scanned`, returns (x, None) as an `nn.scan` body must."""
  config: DecoderConfig
  deterministic: bool = True
  decode: bool = False
  scanned: bool = False

  @nn.compact
  def __call__(self, x, mask, rope):
    c, deterministic, decode = self.config, self.deterministic, self.decode
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    h = layers.RMSNorm(c.norm_epsilon, name="pre_attention_norm", **kw)(x)
    block = 0 if c.bidirectional_prefix else c.attention_block
    attention_dropout = (c.dropout_rate if c.attention_dropout_rate is None
                         else c.attention_dropout_rate)
    h = layers.Attention(c.num_heads, c.num_kv_heads, c.head_dim,
                         dropout_rate=attention_dropout, causal_block=block, name="attention",
                         **kw)(
                             h, h, mask, rope_q=rope, rope_kv=rope,
                             deterministic=deterministic, decode=decode)
    x = x + nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
    h = layers.RMSNorm(c.norm_epsilon, name="pre_mlp_norm", **kw)(x)
    h = layers.GatedMlp(c.mlp_dim, "silu", c.dropout_rate, name="mlp", **kw)(h, deterministic)
    x = x + nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
    x = layers.constrain_activations(x)
    return (x, None) if self.scanned else x


class Decoder(nn.Module):
  """Maps token ids [batch, length] to logits [batch, length, vocab] (float32)."""
  config: DecoderConfig

  @nn.compact
  def __call__(self, tokens, segment_ids: Optional[jnp.ndarray] = None,
               positions: Optional[jnp.ndarray] = None,
               prefix_mask: Optional[jnp.ndarray] = None,
               deterministic: bool = True, decode: bool = False,
               logit_positions: Optional[jnp.ndarray] = None,
               decode_key_mask: Optional[jnp.ndarray] = None):
    """`logit_positions` [batch, k]: only those positions' logits, [batch, k, vocab].

    `decode_key_mask` [batch, cache length] (decode only): cache slots each row may attend
    to, on top of the cache's causal mask (e.g. to skip a short prompt's padding)."""
    c = self.config
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    embedder = layers.Embed(c.vocab_size, c.emb_dim, c.embedding_init_stddev,
                            name="token_embedder", **kw)
    rope = layers.rope_tables(positions, tokens.shape[1], c.head_dim, c.rope_theta)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if decode:  # Tokens arrive a few at a time; the cache builds the causal mask.
      mask = None if decode_key_mask is None else decode_key_mask[:, None, None, :]
    else:
      if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
      bidirectional = prefix_mask if c.bidirectional_prefix else None
      mask = layers.attention_mask(segment_ids, segment_ids, True, positions, positions,
                                   bidirectional, bidirectional)
    x = embedder(tokens)
    x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
    x = layers.apply_stack(DecoderLayer, dict(config=c, deterministic=deterministic,
                                              decode=decode), c.num_layers, x, (mask, rope),
                           c.scan_layers, c.remat_policy)
    if logit_positions is not None:
      x = jnp.take_along_axis(x, logit_positions[:, :, None], axis=1)
    x = layers.RMSNorm(c.norm_epsilon, name="final_norm", **kw)(x)
    if c.tie_embeddings:
      logits = embedder.attend(x)
    else:
      logits = layers.Dense(c.vocab_size, ("embed", "vocab"), name="logits_dense", **kw)(x)
    return logits.astype(jnp.float32)


@gin.configurable
class DecoderOnlyModel(base.Model):
  """A Llama-family decoder trained as a prefix LM with the loss on targets only.

  Inputs and targets are concatenated by seqio's `PrefixLMFeatureConverter`
  (which shifts right, inserting id 0 at the front) and
  `decoder_loss_weights` is zero on the inputs. Attention stays causal unless
  `DecoderConfig.bidirectional_prefix` is set.
  """

  @property
  def feature_converter_cls(self) -> type:
    import seqio  # pylint: disable=import-outside-toplevel  # TensorFlow: only when used
    return seqio.PrefixLMFeatureConverter

  def __init__(self, config: DecoderConfig = gin.REQUIRED, vocabulary: seqio.Vocabulary = None,
               decode_bos_id: Optional[int] = 0):
    if vocabulary is None:
      import seqio  # pylint: disable=import-outside-toplevel
      vocabulary = seqio.ByteVocabulary()
    if vocabulary.vocab_size > config.vocab_size:
      raise ValueError(f"vocabulary has {vocabulary.vocab_size} ids but "
                       f"DecoderConfig.vocab_size={config.vocab_size}")
    super().__init__(Decoder(config), vocabulary)
    self.config = config
    self.decode_bos_id = decode_bos_id

  def model_feature_shapes(self, batch_size, task_feature_lengths, packed=False):
    length = self.model_feature_lengths(task_feature_lengths)["decoder_target_tokens"]
    names = ["decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
             "decoder_causal_attention"]
    if packed:
      names += ["decoder_segment_ids", "decoder_positions"]
    return {n: (batch_size, length) for n in names}

  def _init_variables(self, rng, batch):
    return self.module.init(rng, batch["decoder_input_tokens"])

  def logits(self, params, batch, dropout_rng=None, logit_positions=None):
    return self.module.apply(
        {"params": params}, batch["decoder_input_tokens"],
        segment_ids=batch.get("decoder_segment_ids"), positions=batch.get("decoder_positions"),
        prefix_mask=batch.get("decoder_causal_attention"),
        deterministic=dropout_rng is None, logit_positions=logit_positions,
        rngs=None if dropout_rng is None else {"dropout": dropout_rng})

  def decode(self, params, batch, max_decode_len):
    """Greedy continuation of left-aligned prompts `batch["inputs"]` [b, len].

    Prompt lengths come from `batch["input_lengths"]` or, if absent, the
    number of non-zero ids. The whole padded prompt block is prefilled in one
    forward pass (each row's first new token read at its own last prompt
    position); then one token per step is fed at cache slot len + s with RoPE
    position length + s, attending to its own prompt and the generated slots
    but not to its prompt's padding.
    """
    prompts = jnp.asarray(batch["inputs"], jnp.int32)
    lengths = batch.get("input_lengths")
    lengths = jnp.sum(prompts != 0, axis=-1) if lengths is None else jnp.asarray(lengths)
    lengths = lengths.astype(jnp.int32)
    if self.decode_bos_id is not None:
      bos = jnp.full((prompts.shape[0], 1), self.decode_bos_id, jnp.int32)
      prompts, lengths = jnp.concatenate([bos, prompts], axis=1), lengths + 1
    b, p = prompts.shape
    total = p + max_decode_len
    cache = self.zeros_like_shapes(self._cache_shapes(jnp.zeros((b, total), jnp.int32)))
    logits, mutated = self.module.apply(
        {"params": params, "cache": cache}, prompts, decode=True,
        logit_positions=(lengths - 1)[:, None], mutable=["cache"])
    generated = jnp.zeros((b, max_decode_len), jnp.int32)
    generated = generated.at[:, 0].set(jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32))
    slots = jnp.arange(total)[None, :]
    key_mask = (slots < lengths[:, None]) | (slots >= p)

    def step(s, carry):
      generated, cache = carry
      logits, mutated = self.module.apply(
          {"params": params, "cache": cache}, jax.lax.dynamic_slice_in_dim(generated, s, 1, 1),
          positions=(lengths + s)[:, None], decode=True, decode_key_mask=key_mask,
          mutable=["cache"])
      nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
      generated = jax.lax.dynamic_update_slice_in_dim(generated, nxt[:, None], s + 1, axis=1)
      return generated, mutated["cache"]

    generated, _ = jax.lax.fori_loop(0, max_decode_len - 1, step,
                                     (generated, mutated["cache"]))
    return base.mask_after_eos(generated, self.vocabulary.eos_id)
