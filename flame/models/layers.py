"""Building blocks shared by the T5 and decoder-only models.

Every weight is created with a tuple of *logical* axis names (``embed``,
``mlp``, ``heads``, ``kv_heads``, ``kv``, ``vocab``, ``relpos_buckets``);
`flame.partitioning` maps them to mesh axes. Parameters are kept in
``param_dtype`` (float32 by default) and cast to ``dtype`` (e.g. bfloat16)
for the computation. Softmax and normalisation statistics run in float32.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flame.models import mixed

Array = jax.Array
DType = Any
Initializer = Callable[..., Array]

NEG_INF = mixed.NEG_INF  # masked logits (one value for both attention paths)


def matmul(a: Array, b: Array, dtype: DType = None, b_transposed: bool = False) -> Array:
  """a[..., m, k] @ b[..., k, n], or a @ bᵀ for b[..., n, k] read as stored (`b_transposed`),
  computed in `dtype`: bfloat16 through `mixed.matmul` (bfloat16 products, a float32 result,
  each gradient in its operand's dtype); otherwise both operands cast to `dtype` (None: each
  keeps its own)."""
  if _is_bfloat16(dtype):
    return mixed.matmul(a, b, b_transposed)
  b = jnp.swapaxes(b, -1, -2) if b_transposed else b
  return a.astype(dtype or a.dtype) @ b.astype(dtype or b.dtype)


def flat_matmul(x: Array, kernel: Array, contract: int = 1, dtype: DType = None) -> Array:
  """x[..., k1..kc] @ kernel[k1..kc, o1..] as ONE 2-D `matmul` in `dtype`, the result in it.

  Folding the leading (batch, length) dimensions first matters on XLA:CPU,
  where a dot with several batch-like contracting dimensions in the backward
  pass (the weight gradient) runs about twice as slow as the 2-D form.
  """
  lead, inner = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
  out = kernel.shape[contract:]
  k = math.prod(inner)
  y = matmul(x.reshape(-1, k), kernel.reshape(k, -1), dtype)
  return (y if dtype is None else y.astype(dtype)).reshape(*lead, *out)


def _is_bfloat16(dtype: DType) -> bool:
  return dtype is not None and jnp.dtype(dtype) == jnp.bfloat16


def axes_param(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
               axes: Sequence[Optional[str]], dtype: DType) -> Array:
  """Creates a parameter annotated with logical axis names."""
  if len(shape) != len(axes):
    raise ValueError(f"{name}: shape {tuple(shape)} and axes {tuple(axes)} differ in rank")
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale (no bias, no mean subtraction)."""
  epsilon: float = 1e-6
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = axes_param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",),
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


class Embed(nn.Module):
  """Token embedding table [vocab, embed]; `attend` gives tied output logits."""
  num_embeddings: int
  features: int
  init_stddev: float = 1.0
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def setup(self):
    self.embedding = axes_param(self, "embedding", nn.initializers.normal(self.init_stddev),
                                (self.num_embeddings, self.features), ("vocab", "embed"),
                                self.param_dtype)

  def __call__(self, ids: Array) -> Array:
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    """Logits x @ embeddingᵀ, the table read as stored (a transposed view of it would leave
    XLA:CPU's bfloat16 path); float32 with bfloat16 compute."""
    logits = matmul(x.reshape(-1, x.shape[-1]), self.embedding, self.dtype, b_transposed=True)
    return logits.reshape(*x.shape[:-1], self.num_embeddings)


class Dense(nn.Module):
  """x[..., in] @ kernel[in, out] with logical axes for both dimensions."""
  features: int
  kernel_axes: tuple[str, str]
  init_scale: float = 1.0
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal")
    kernel = axes_param(self, "kernel", init, (x.shape[-1], self.features), self.kernel_axes,
                        self.param_dtype)
    return flat_matmul(x, kernel, dtype=self.dtype)


class GatedMlp(nn.Module):
  """act(x W0) * (x W1) then W2: SwiGLU (Llama) or gated-GELU (T5 v1.1)."""
  mlp_dim: int
  activation: str = "silu"
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    act = {"silu": jax.nn.silu,
           "gelu": lambda h: jax.nn.gelu(h, approximate=True)}[self.activation]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate = Dense(self.mlp_dim, ("embed", "mlp"), name="wi_0", **kw)(x)
    up = Dense(self.mlp_dim, ("embed", "mlp"), name="wi_1", **kw)(x)
    h = act(gate) * up
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return Dense(x.shape[-1], ("mlp", "embed"), name="wo", **kw)(h)


def rope_frequencies(head_dim: int, theta: float) -> np.ndarray:
  """Inverse frequencies theta^(-2i/d) for i < d/2 (Su et al., RoFormer)."""
  return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def rope_tables(positions: Optional[Array], length: int, head_dim: int,
                theta: float) -> tuple[Array, Array]:
  """cos and sin of the rotary angles, float32 [batch or 1, length, 1, head_dim].

  Computed once per forward pass and shared by every layer. Without explicit
  `positions` (0..length-1) they are constants: XLA:CPU otherwise fuses the
  cos/sin into each consumer and re-evaluates them for every head of every layer.
  """
  inv_freq = rope_frequencies(head_dim, theta).astype(np.float32)
  if positions is None:
    angles = np.arange(length, dtype=np.float32)[None, :, None] * inv_freq
    cos, sin = np.cos(angles), np.sin(angles)
  else:
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
  cos, sin = (jnp.concatenate([t, t], axis=-1)[:, :, None, :] for t in (cos, sin))
  return cos, sin


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotary embedding in the "rotate half" layout of Llama / transformers.

  x: [batch, length, heads, head_dim]; cos, sin from `rope_tables`.
  """
  half = x.shape[-1] // 2
  x32 = x.astype(jnp.float32)
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


def attention_mask(query_segments: Array, key_segments: Array, causal: bool,
                   query_positions: Optional[Array] = None,
                   key_positions: Optional[Array] = None,
                   bidirectional_query: Optional[Array] = None,
                   bidirectional_key: Optional[Array] = None) -> Array:
  """Boolean [batch, 1, q_len, k_len] mask: same non-zero segment and, if causal,
  key position <= query position (within a packed segment, positions restart).

  `bidirectional_*` (optional [batch, len] 0/1) lets prefix tokens see each
  other, as in T5's prefix LM; left out, attention is purely causal.
  """
  mask = (query_segments[:, :, None] == key_segments[:, None, :]) & (
      key_segments[:, None, :] != 0)
  if causal:
    if query_positions is None:
      query_positions = jnp.broadcast_to(jnp.arange(query_segments.shape[1]), query_segments.shape)
    if key_positions is None:
      key_positions = jnp.broadcast_to(jnp.arange(key_segments.shape[1]), key_segments.shape)
    visible = key_positions[:, None, :] <= query_positions[:, :, None]
    if bidirectional_query is not None:
      both_prefix = (bidirectional_query[:, :, None] > 0) & (bidirectional_key[:, None, :] > 0)
      visible = visible | both_prefix
    mask = mask & visible
  return mask[:, None, :, :]


class Attention(nn.Module):
  """Multi-head / grouped-query dot-product attention.

  Rotary embeddings are applied to queries / keys when `rope_q` / `rope_kv`
  (cos, sin tables from `rope_tables`) are given.
  With `decode=True` keys and values are appended to a cache (the "cache"
  variable collection, sized by the first call) and queries attend to every
  cached position up to their own, so one or several tokens can be fed per call.

  `causal_block` (> 0) promises that the mask never lets a query see a later key (causal
  self-attention, packed or not, without a bidirectional prefix): queries are then taken in
  blocks of that many and each block scores only the keys up to its end, about half the
  score and softmax work of the full square (on XLA:CPU the attention core runs 2x faster at
  512 tokens). Scores are laid out [batch, kv_heads, groups × queries, keys] so each
  product is one batched matmul per KV head.
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  scale_logits: bool = True
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  kernel_init_scale: float = 1.0
  causal_block: int = 0

  def _project(self, x: Array, heads: int, name: str, heads_axis: str) -> Array:
    scale = self.kernel_init_scale
    if name == "query" and not self.scale_logits:
      # No 1/sqrt(head_dim) on the logits (T5): fold it into the query's initial variance,
      # as T5X does, so attention logits start at the same scale.
      scale = scale / self.head_dim
    # fan_in = the embedding size (T5X's DenseGeneral), not embedding × heads.
    init = nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal", in_axis=0,
                                            out_axis=(1, 2))
    kernel = axes_param(self, name, init, (x.shape[-1], heads, self.head_dim),
                        ("embed", heads_axis, "kv"), self.param_dtype)
    return flat_matmul(x, kernel, dtype=self.dtype)

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Optional[Array],
               bias: Optional[Array] = None, rope_q: Optional[tuple[Array, Array]] = None,
               rope_kv: Optional[tuple[Array, Array]] = None, deterministic: bool = True,
               decode: bool = False) -> Array:
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    q = self._project(inputs_q, self.num_heads, "query", "heads")
    k = self._project(inputs_kv, self.num_kv_heads, "key", "kv_heads")
    v = self._project(inputs_kv, self.num_kv_heads, "value", "kv_heads")
    if rope_q is not None:
      q = apply_rope(q, *rope_q)
    if rope_kv is not None:
      k = apply_rope(k, *rope_kv)

    if decode:  # The cache's causal mask, narrowed by `mask` (e.g. padding keys) if given.
      k, v, cache_mask = self._update_cache(k, v)
      mask = cache_mask if mask is None or cache_mask is None else cache_mask & mask

    groups = self.num_heads // self.num_kv_heads
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    if self.scale_logits:
      q = q * (self.head_dim ** -0.5)
    q = q.reshape(b, lq, self.num_kv_heads, groups, self.head_dim).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv_heads, keys, head_dim]
    blocks = [(0, lq, lk)]  # (first query, end of queries, keys it may see)
    if self.causal_block and not decode and lq == lk and lq > self.causal_block:
      starts = range(0, lq, self.causal_block)
      ends = [min(s + self.causal_block, lq) for s in starts]
      blocks = [(s, end, end) for s, end in zip(starts, ends)]
    outs = []
    for start, end, keys in blocks:
      block_mask = None if mask is None else mask[..., start:end, :keys]
      block_bias = None if bias is None else bias[..., start:end, :keys]
      outs.append(self._attend(q[:, :, :, start:end], k[:, :, :keys], v[:, :, :keys],
                               block_mask, block_bias, deterministic))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, lq, self.num_heads, self.head_dim)

    init = nn.initializers.variance_scaling(self.kernel_init_scale, "fan_in", "truncated_normal",
                                            in_axis=(0, 1), out_axis=2)  # fan_in: heads × kv
    out_kernel = axes_param(self, "out", init, (self.num_heads, self.head_dim, inputs_q.shape[-1]),
                            ("heads", "kv", "embed"), self.param_dtype)
    return flat_matmul(out, out_kernel, contract=2, dtype=self.dtype)

  def _attend(self, q: Array, k: Array, v: Array, mask: Optional[Array], bias: Optional[Array],
              deterministic: bool) -> Array:
    """q [b, kv_heads, groups, queries, d], k and v [b, kv_heads, keys, d], mask
    [b or 1, 1, queries or 1, keys] and bias [b or 1, heads, queries, keys] (either None):
    softmax(q kᵀ + bias, masked) v [b, kv_heads, groups, queries, d], the softmax in float32.
    In bfloat16 without a bias or active dropout (the decoders' training and scoring):
    `mixed.attention`, whose written-out gradient saves the autodiff softmax's elementwise
    passes (a SmolLM2 judge step 6% faster, 10% less peak memory on XLA:CPU)."""
    if _is_bfloat16(self.dtype) and bias is None and (deterministic or not self.dropout_rate):
      return mixed.attention(q, k, v, None if mask is None else mask[:, :, None])
    b, kv, groups, lq, d = q.shape
    lk = k.shape[2]
    logits = matmul(q.reshape(b, kv, groups * lq, d), k, self.dtype, b_transposed=True)
    logits = logits.astype(jnp.float32).reshape(b, kv, groups, lq, lk)
    if bias is not None:
      logits = logits + bias.astype(jnp.float32).reshape(bias.shape[0], kv, groups, lq, lk)
    if mask is not None:
      logits = jnp.where(mask[:, :, None], logits, NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
    out = matmul(weights.reshape(b, kv, groups * lq, lk), v, self.dtype).astype(self.dtype)
    return out.reshape(b, kv, groups, lq, d)

  def _update_cache(self, k: Array, v: Array):
    """Writes k, v at the cache index; returns full caches and the causal mask."""
    initialized = self.has_variable("cache", "cached_key")
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:  # The first (init) call only sizes the cache.
      return k, v, None
    step = k.shape[1]
    i = index.value
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype),
                                                  (0, i, 0, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype),
                                                  (0, i, 0, 0))
    index.value = i + step
    max_len = cached_k.value.shape[1]
    query_pos = i + jnp.arange(step)
    mask = (jnp.arange(max_len)[None, :] <= query_pos[:, None])[None, None]
    return cached_k.value, cached_v.value, mask


def relative_position_bucket(relative_position: Array, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> Array:
  """T5's bucketing of relative positions (key position - query position).

  The formula of Mesh TensorFlow / transformers' `T5Attention._relative_position_bucket`:
  half of the buckets (of each direction, if bidirectional) hold exact
  distances, the rest logarithmically larger bins up to `max_distance`; farther
  distances share the last bucket. Unidirectional (causal) bucketing maps every
  positive relative position (a future key) to bucket 0.
  """
  rel = jnp.asarray(relative_position, jnp.int32)
  buckets = jnp.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (rel > 0).astype(jnp.int32) * num_buckets
    rel = jnp.abs(rel)
  else:
    rel = -jnp.minimum(rel, 0)
  max_exact = num_buckets // 2
  is_small = rel < max_exact
  # Float32 like the reference; max(rel, 1) only avoids log(0) on the exact branch.
  scaled = (jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / max_exact)
            / np.log(max_distance / max_exact) * (num_buckets - max_exact))
  if_large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
  return buckets + jnp.where(is_small, rel, if_large)


class RelativePositionBias(nn.Module):
  """T5 relative position bias [batch, heads, q_len, k_len] from positions.

  A learned [num_buckets, heads] table indexed by `relative_position_bucket`
  of key_position - query_position. Positions are [batch or 1, length] ints, so
  packed sequences (positions restarting at each segment) get per-segment
  relative distances.
  """
  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  bidirectional: bool = True
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, query_positions: Array, key_positions: Array) -> Array:
    table = axes_param(self, "embedding",
                       nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                       (self.num_buckets, self.num_heads), ("relpos_buckets", "heads"),
                       self.param_dtype)
    rel = key_positions[:, None, :] - query_positions[:, :, None]  # [b, q, k]
    buckets = relative_position_bucket(rel, self.bidirectional, self.num_buckets,
                                       self.max_distance)
    values = jnp.take(table.astype(self.dtype), buckets, axis=0)  # [b, q, k, heads]
    return jnp.transpose(values, (0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------
# Activation sharding: the residual stream split like the batch.
_ACTIVATION_SHARDING: contextvars.ContextVar = contextvars.ContextVar(
    "flame_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(sharding: Optional[jax.sharding.NamedSharding]) -> Iterator[None]:
  """While a step is traced in this context, `constrain_activations` pins every layer's
  output [batch, length, embed] to `sharding` (the batch split over the data-parallel axes,
  the rest replicated), as T5X and MaxText do. Without it GSPMD may follow the FSDP weights
  (`embed` split over `fsdp`) and gather the whole batch's activations on every chip."""
  token = _ACTIVATION_SHARDING.set(sharding)
  try:
    yield
  finally:
    _ACTIVATION_SHARDING.reset(token)


def constrain_activations(x: Array) -> Array:
  """`x` [batch, length, embed] sharded as `activation_sharding` says (unchanged outside
  that context, or when the batch does not divide over the data-parallel devices)."""
  sharding = _ACTIVATION_SHARDING.get()
  if sharding is None or x.ndim != 3:
    return x
  try:
    sharding.shard_shape(x.shape)  # Raises (a ValueError) when the batch does not divide.
  except ValueError:
    return x
  return jax.lax.with_sharding_constraint(x, sharding)


# A stack of identical layers: unrolled or scanned, optionally rematerialised.

# remat_policy name -> jax.checkpoint_policies attribute (None: no rematerialisation).
REMAT_POLICIES = {"none": None, "full": "nothing_saveable",
                  "dots": "checkpoint_dots_with_no_batch_dims"}


def check_remat_policy(owner: str, policy: str) -> None:
  if policy not in REMAT_POLICIES:
    raise ValueError(f"{owner}.remat_policy = {policy!r}; expected one of "
                     f"{sorted(REMAT_POLICIES)}")


def apply_stack(layer_cls, attributes: dict, num_layers: int, x: Array, args: tuple,
                scan: bool, remat_policy: str) -> Array:
  """`num_layers` layers of `layer_cls(**attributes)` applied to x (inside a compact module).

  Unrolled: submodules ``layers_{i}``. Scanned: one ``layers`` submodule run by `nn.scan`,
  parameters (and decode caches) stacked on a leading axis with logical name ``layers``; the
  layer is built with ``scanned=True`` and must then return (x, None). `args` are the same for
  every layer (masks, biases, encoder output). `remat_policy` names a `REMAT_POLICIES` entry.
  """
  cls = layer_cls
  if REMAT_POLICIES[remat_policy] is not None:
    policy = getattr(jax.checkpoint_policies, REMAT_POLICIES[remat_policy])
    cls = nn.remat(layer_cls, policy=policy, prevent_cse=not scan)
  if not scan:
    for i in range(num_layers):
      x = cls(**attributes, name=f"layers_{i}")(x, *args)
    return x
  scanned = nn.scan(cls, variable_axes={"params": 0, "cache": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast,) * len(args), length=num_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  x, _ = scanned(**attributes, scanned=True, name="layers")(x, *args)
  return x
