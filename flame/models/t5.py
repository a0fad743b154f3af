"""T5 v1.1 encoder-decoder (Raffel et al.; the "v1.1" recipe of T5X / transformers).

As transformers' `T5ForConditionalGeneration` with ``feed_forward_proj="gated-gelu"``:
one token embedding shared by the encoder and decoder inputs; pre-norm blocks
with RMSNorm (no bias); attention without the 1/sqrt(head_dim) scaling; a
learned relative position bias computed once per stack (bidirectional buckets
in the encoder, causal ones in the decoder) and added in every self-attention
layer of that stack; gated-GELU MLPs (tanh GELU, "gelu_new"); dropout on the
embeddings, attention weights, MLP hidden units, residual branches and after
each stack's final RMSNorm; an untied output head with no d_model**-0.5
rescaling. Parameter tree (plain nested dict)::

  token_embedder/embedding                         [vocab, embed]
  encoder/relpos_bias/embedding                    [relpos_buckets, heads]
  encoder/layers_{i}/pre_attention_norm/scale      [embed]
  encoder/layers_{i}/attention/{query,key,value}   [embed, heads, head_dim]
  encoder/layers_{i}/attention/out                 [heads, head_dim, embed]
  encoder/layers_{i}/pre_mlp_norm/scale            [embed]
  encoder/layers_{i}/mlp/{wi_0,wi_1}/kernel        [embed, mlp]; mlp/wo/kernel [mlp, embed]
  encoder/final_norm/scale                         [embed]
  decoder/relpos_bias/embedding                    [relpos_buckets, heads]
  decoder/layers_{i}/pre_self_attention_norm/scale [embed]
  decoder/layers_{i}/self_attention/...            (as encoder attention)
  decoder/layers_{i}/pre_cross_attention_norm/scale [embed]
  decoder/layers_{i}/cross_attention/...           (as encoder attention)
  decoder/layers_{i}/pre_mlp_norm/scale            [embed]
  decoder/layers_{i}/mlp/...                       (as encoder mlp)
  decoder/final_norm/scale                         [embed]
  decoder/logits_dense/kernel                      [embed, vocab]

The module `Transformer` has `encode` and `decode` methods (the latter takes
the encoder output) so that decoding runs the encoder once; `__call__` chains
them for training and scoring.

With ``scan_layers`` each stack's ``layers_{i}`` become one ``layers`` subtree stacked on a
leading [layers] axis (`flame.models.scan`, as in `flame.models.decoder`); ``remat_policy``
recomputes layer activations in the backward pass.
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
class T5Config:
  """Shape and numerics of a T5 v1.1 encoder-decoder (defaults: the "tiny" test size)."""
  vocab_size: int = 259
  emb_dim: int = 64
  num_heads: int = 4
  num_encoder_layers: int = 2
  num_decoder_layers: int = 2
  head_dim: int = 16
  mlp_dim: int = 128
  dropout_rate: float = 0.0
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  norm_epsilon: float = 1e-6
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  embedding_init_stddev: float = 1.0
  scan_layers: bool = False  # each stack one nn.scan over a layer (flame.models.scan)
  remat_policy: str = "none"  # none | full | dots

  def __post_init__(self):
    layers.check_remat_policy("T5Config", self.remat_policy)

  def num_params(self) -> int:
    """Parameter count (used for the FLOPs estimate)."""
    attn = 4 * self.emb_dim * self.num_heads * self.head_dim
    mlp = 3 * self.emb_dim * self.mlp_dim
    relpos = self.relative_attention_num_buckets * self.num_heads
    encoder = self.num_encoder_layers * (attn + mlp + 2 * self.emb_dim) + relpos + self.emb_dim
    decoder = self.num_decoder_layers * (2 * attn + mlp + 3 * self.emb_dim) + relpos + self.emb_dim
    embeddings = 2 * self.vocab_size * self.emb_dim  # Input embedding and untied output head.
    return embeddings + encoder + decoder


# (emb_dim, num_encoder_layers, num_decoder_layers, num_heads, head_dim, mlp_dim, vocab_size)
_T5_1_1_SIZES = {
    "tiny": (64, 2, 2, 4, 16, 128, 259),  # seqio.ByteVocabulary; for tests.
    "small": (512, 8, 8, 6, 64, 1024, 32128),
    "base": (768, 12, 12, 12, 64, 2048, 32128),
    "large": (1024, 24, 24, 16, 64, 2816, 32128),
    "xl": (2048, 24, 24, 32, 64, 5120, 32128),
    "xxl": (4096, 24, 24, 64, 64, 10240, 32128),
}


@gin.configurable
def t5_1_1_config(size: str = gin.REQUIRED, **overrides) -> T5Config:
  """The published T5 v1.1 shapes (plus "tiny"); `overrides` replace any field.

  dropout_rate defaults to 0.1 (the fine-tuning value of the released
  configs; v1.1 was pre-trained without dropout).
  """
  if size not in _T5_1_1_SIZES:
    raise ValueError(f"unknown T5 v1.1 size {size!r}; valid sizes: {sorted(_T5_1_1_SIZES)}")
  emb, enc, dec, heads, head_dim, mlp, vocab = _T5_1_1_SIZES[size]
  fields = dict(vocab_size=vocab, emb_dim=emb, num_heads=heads, num_encoder_layers=enc,
                num_decoder_layers=dec, head_dim=head_dim, mlp_dim=mlp, dropout_rate=0.1)
  fields.update(overrides)
  return T5Config(**fields)


def _kw(c: T5Config) -> dict:
  return dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))


def _default_positions(tokens: jax.Array) -> jax.Array:
  return jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]


def _attention(c: T5Config, name: str) -> layers.Attention:
  return layers.Attention(c.num_heads, c.num_heads, c.head_dim,
                          scale_logits=False, dropout_rate=c.dropout_rate, name=name, **_kw(c))


class EncoderLayer(nn.Module):
  """One encoder block; with `scanned`, returns (x, None) for `nn.scan`."""
  config: T5Config
  deterministic: bool = True
  scanned: bool = False

  @nn.compact
  def __call__(self, x, mask, bias):
    c, deterministic = self.config, self.deterministic
    h = layers.RMSNorm(c.norm_epsilon, name="pre_attention_norm", **_kw(c))(x)
    h = _attention(c, "attention")(h, h, mask, bias, deterministic=deterministic)
    x = x + nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
    h = layers.RMSNorm(c.norm_epsilon, name="pre_mlp_norm", **_kw(c))(x)
    h = layers.GatedMlp(c.mlp_dim, "gelu", c.dropout_rate, name="mlp", **_kw(c))(h, deterministic)
    x = x + nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
    x = layers.constrain_activations(x)
    return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
  """One decoder block; with `scanned`, returns (x, None) for `nn.scan`."""
  config: T5Config
  deterministic: bool = True
  decode: bool = False
  scanned: bool = False

  @nn.compact
  def __call__(self, x, encoded, self_mask, self_bias, cross_mask):
    c, deterministic, decode = self.config, self.deterministic, self.decode
    h = layers.RMSNorm(c.norm_epsilon, name="pre_self_attention_norm", **_kw(c))(x)
    h = _attention(c, "self_attention")(h, h, self_mask, self_bias, deterministic=deterministic,
                                        decode=decode)
    x = x + nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
    h = layers.RMSNorm(c.norm_epsilon, name="pre_cross_attention_norm", **_kw(c))(x)
    h = _attention(c, "cross_attention")(h, encoded, cross_mask, deterministic=deterministic)
    x = x + nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
    h = layers.RMSNorm(c.norm_epsilon, name="pre_mlp_norm", **_kw(c))(x)
    h = layers.GatedMlp(c.mlp_dim, "gelu", c.dropout_rate, name="mlp", **_kw(c))(h, deterministic)
    x = x + nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
    x = layers.constrain_activations(x)
    return (x, None) if self.scanned else x


class Encoder(nn.Module):
  """Token ids [batch, length] → encoded [batch, length, embed]."""
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, tokens, segment_ids, positions=None, deterministic: bool = True):
    c = self.config
    if positions is None:
      positions = _default_positions(tokens)
    mask = layers.attention_mask(segment_ids, segment_ids, causal=False)
    bias = layers.RelativePositionBias(
        c.num_heads, c.relative_attention_num_buckets, c.relative_attention_max_distance,
        bidirectional=True, name="relpos_bias", **_kw(c))(positions, positions)
    x = self.shared_embedding(tokens)
    x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
    x = layers.apply_stack(EncoderLayer, dict(config=c, deterministic=deterministic),
                           c.num_encoder_layers, x, (mask, bias), c.scan_layers,
                           c.remat_policy)
    x = layers.RMSNorm(c.norm_epsilon, name="final_norm", **_kw(c))(x)
    return nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
  """Decoder ids [batch, length] and encoder output → float32 logits [batch, length, vocab].

  With `decode=True` self-attention keys/values go to the cache (sized by the
  first call, to `max_decode_length`), `positions` must give each fed token's
  index in the output, and the causal mask comes from the cache.
  """
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, tokens, encoded, encoder_segment_ids, segment_ids=None, positions=None,
               deterministic: bool = True, decode: bool = False,
               max_decode_length: Optional[int] = None,
               logit_positions: Optional[jnp.ndarray] = None):
    c = self.config
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    if positions is None:
      positions = _default_positions(tokens)
    relpos = layers.RelativePositionBias(
        c.num_heads, c.relative_attention_num_buckets, c.relative_attention_max_distance,
        bidirectional=False, name="relpos_bias", **_kw(c))
    if decode:
      # Queries are the fed tokens; keys are every cache slot (future ones masked by the cache).
      key_positions = jnp.arange(max_decode_length or tokens.shape[1], dtype=jnp.int32)[None, :]
      self_bias = relpos(positions, key_positions)
      self_mask = None
    else:
      self_bias = relpos(positions, positions)
      self_mask = layers.attention_mask(segment_ids, segment_ids, True, positions, positions)
    cross_mask = layers.attention_mask(segment_ids, encoder_segment_ids, causal=False)

    x = self.shared_embedding(tokens)
    x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
    x = layers.apply_stack(DecoderLayer, dict(config=c, deterministic=deterministic,
                                              decode=decode), c.num_decoder_layers, x,
                           (encoded, self_mask, self_bias, cross_mask), c.scan_layers,
                           c.remat_policy)
    if logit_positions is not None:  # [batch, k]: only those positions' logits.
      x = jnp.take_along_axis(x, logit_positions[:, :, None], axis=1)
    x = layers.RMSNorm(c.norm_epsilon, name="final_norm", **_kw(c))(x)
    x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
    logits = layers.Dense(c.vocab_size, ("embed", "vocab"), name="logits_dense", **_kw(c))(x)
    return logits.astype(jnp.float32)


class Transformer(nn.Module):
  """The T5 v1.1 encoder-decoder; `encode` once, then `decode` (optionally step by step)."""
  config: T5Config

  def setup(self):
    c = self.config
    self.token_embedder = layers.Embed(c.vocab_size, c.emb_dim, c.embedding_init_stddev,
                                       **_kw(c))
    self.encoder = Encoder(c, self.token_embedder)
    self.decoder = Decoder(c, self.token_embedder)

  def encode(self, encoder_input_tokens, encoder_segment_ids=None, encoder_positions=None,
             deterministic: bool = True):
    """Encoded inputs [batch, inputs_len, embed]; padding (id 0) is masked out."""
    if encoder_segment_ids is None:
      encoder_segment_ids = (encoder_input_tokens != 0).astype(jnp.int32)
    return self.encoder(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                        deterministic)

  def decode(self, encoded, encoder_segment_ids, decoder_input_tokens,
             decoder_segment_ids=None, decoder_positions=None, deterministic: bool = True,
             decode: bool = False, max_decode_length: Optional[int] = None,
             logit_positions=None):
    """Logits [batch, len, vocab] given `encode`'s output (or [batch, k, vocab] at
    `logit_positions` [batch, k]).

    `encoder_segment_ids` [batch, inputs_len] marks the encoder positions
    each decoder token may attend to (0 = padding); unpacked, pass
    `encoder_input_tokens != 0`.
    """
    return self.decoder(decoder_input_tokens, encoded, encoder_segment_ids, decoder_segment_ids,
                        decoder_positions, deterministic, decode, max_decode_length,
                        logit_positions)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids=None,
               decoder_segment_ids=None, encoder_positions=None, decoder_positions=None,
               deterministic: bool = True, decode: bool = False,
               max_decode_length: Optional[int] = None, logit_positions=None):
    if encoder_segment_ids is None:
      encoder_segment_ids = (encoder_input_tokens != 0).astype(jnp.int32)
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                          deterministic)
    return self.decode(encoded, encoder_segment_ids, decoder_input_tokens, decoder_segment_ids,
                       decoder_positions, deterministic, decode, max_decode_length,
                       logit_positions)


@gin.configurable
class EncoderDecoderModel(base.Model):
  """T5 v1.1 trained on seqio's `EncDecFeatureConverter` features.

  The decoder input is the target shifted right with id 0 in front, which is
  also the start id of greedy decoding.
  """

  @property
  def feature_converter_cls(self) -> type:
    import seqio  # pylint: disable=import-outside-toplevel  # TensorFlow: only when used
    return seqio.EncDecFeatureConverter

  def __init__(self, config: T5Config = gin.REQUIRED, vocabulary: seqio.Vocabulary = None):
    if vocabulary is None:
      import seqio  # pylint: disable=import-outside-toplevel
      vocabulary = seqio.ByteVocabulary()
    if vocabulary.vocab_size > config.vocab_size:
      raise ValueError(f"vocabulary has {vocabulary.vocab_size} ids but "
                       f"T5Config.vocab_size={config.vocab_size}")
    super().__init__(Transformer(config), vocabulary)
    self.config = config

  def model_feature_shapes(self, batch_size, task_feature_lengths, packed=False):
    lengths = self.model_feature_lengths(task_feature_lengths)
    inputs_len, targets_len = lengths["encoder_input_tokens"], lengths["decoder_target_tokens"]
    shapes = {"encoder_input_tokens": (batch_size, inputs_len)}
    for n in ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"):
      shapes[n] = (batch_size, targets_len)
    if packed:
      shapes.update(encoder_segment_ids=(batch_size, inputs_len),
                    encoder_positions=(batch_size, inputs_len),
                    decoder_segment_ids=(batch_size, targets_len),
                    decoder_positions=(batch_size, targets_len))
    return shapes

  def _init_variables(self, rng, batch):
    return self.module.init(rng, batch["encoder_input_tokens"], batch["decoder_input_tokens"])

  def logits(self, params, batch, dropout_rng=None, logit_positions=None):
    return self.module.apply(
        {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        encoder_segment_ids=batch.get("encoder_segment_ids"),
        decoder_segment_ids=batch.get("decoder_segment_ids"),
        encoder_positions=batch.get("encoder_positions"),
        decoder_positions=batch.get("decoder_positions"),
        deterministic=dropout_rng is None, logit_positions=logit_positions,
        rngs=None if dropout_rng is None else {"dropout": dropout_rng})

  def decode(self, params, batch, max_decode_len):
    """Greedy decoding of `max_decode_len` tokens for encoder inputs `batch["inputs"]` [b, len].

    The inputs are encoded once; the decoder starts from id 0 and is fed one
    token per step through its self-attention KV cache.
    """
    inputs = jnp.asarray(batch["inputs"], jnp.int32)
    b = inputs.shape[0]
    encoder_segment_ids = (inputs != 0).astype(jnp.int32)
    encoded = self.module.apply({"params": params}, inputs, encoder_segment_ids,
                                method=Transformer.encode)
    # Slot 0 holds the start id 0; step t feeds slot t and writes its argmax to slot t + 1.
    tokens = jnp.zeros((b, max_decode_len + 1), jnp.int32)
    cache = self.zeros_like_shapes(self._cache_shapes(
        encoded, encoder_segment_ids, jnp.zeros((b, max_decode_len), jnp.int32),
        max_decode_length=max_decode_len, method=Transformer.decode))

    def step(t, carry):
      tokens, cache = carry
      logits, mutated = self.module.apply(
          {"params": params, "cache": cache}, encoded, encoder_segment_ids,
          jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1),
          decoder_positions=jnp.full((b, 1), t, jnp.int32), decode=True,
          max_decode_length=max_decode_len, method=Transformer.decode, mutable=["cache"])
      predicted = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
      tokens = jax.lax.dynamic_update_slice_in_dim(tokens, predicted[:, None], t + 1, axis=1)
      return tokens, mutated["cache"]

    tokens, _ = jax.lax.fori_loop(0, max_decode_len, step, (tokens, cache))
    return base.mask_after_eos(tokens[:, 1:], self.vocabulary.eos_id)
