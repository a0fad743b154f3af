"""Tests of the T5 v1.1 encoder-decoder (flame/models/t5.py), on the tiny config."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flame.checkpoints import hf as hf_checkpoints
from flame.models import base, layers, t5

REPO = pathlib.Path(__file__).resolve().parents[1]
LENGTHS = {"inputs": 12, "targets": 10}
SIZES = ["tiny", "small", "base", "large", "xl", "xxl"]


@pytest.fixture(scope="module")
def model():
  return t5.EncoderDecoderModel(t5.t5_1_1_config("tiny", dropout_rate=0.0))


def _key(seed):
  # XLA:CPU compiles threefry random bits slowly (init, dropout); rbg keeps the tests quick.
  return jax.random.key(seed, impl="rbg")


@pytest.fixture(scope="module")
def params(model):
  return jax.jit(lambda rng: model.init_params(rng, 2, LENGTHS))(_key(0))


@pytest.fixture(scope="module")
def logits_fn(model):
  return jax.jit(model.logits)


def _batch(rng, b=2, inputs_len=12, targets_len=10, vocab=259, pad_from=(9, 12)):
  """Random encoder tokens (padded with 0 from pad_from[i]) and decoder inputs starting with 0."""
  enc = rng.integers(2, vocab, size=(b, inputs_len)).astype(np.int32)
  for i, start in enumerate(pad_from[:b]):
    enc[i, start:] = 0
  targets = rng.integers(2, vocab, size=(b, targets_len)).astype(np.int32)
  dec_in = np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], axis=1)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
          "decoder_target_tokens": targets,
          "decoder_loss_weights": np.ones((b, targets_len), np.int32)}


# ---- 1. shapes, parameter tree, published sizes ---------------------------------------------

def _expected_tree(c):
  e, h, d, m, v, nb = c.emb_dim, c.num_heads, c.head_dim, c.mlp_dim, c.vocab_size, 32
  attn = {"query": (e, h, d), "key": (e, h, d), "value": (e, h, d), "out": (h, d, e)}
  mlp = {"wi_0": {"kernel": (e, m)}, "wi_1": {"kernel": (e, m)}, "wo": {"kernel": (m, e)}}
  norm = {"scale": (e,)}
  enc = {f"layers_{i}": {"pre_attention_norm": norm, "attention": attn, "pre_mlp_norm": norm,
                         "mlp": mlp} for i in range(c.num_encoder_layers)}
  enc.update(relpos_bias={"embedding": (nb, h)}, final_norm=norm)
  dec = {f"layers_{i}": {"pre_self_attention_norm": norm, "self_attention": attn,
                         "pre_cross_attention_norm": norm, "cross_attention": attn,
                         "pre_mlp_norm": norm, "mlp": mlp} for i in range(c.num_decoder_layers)}
  dec.update(relpos_bias={"embedding": (nb, h)}, final_norm=norm,
             logits_dense={"kernel": (e, v)})
  return {"token_embedder": {"embedding": (v, e)}, "encoder": enc, "decoder": dec}


def test_shapes_and_param_tree(model, params, logits_fn):
  batch = _batch(np.random.default_rng(0))
  logits = logits_fn(params, batch)
  assert logits.shape == (2, LENGTHS["targets"], 259) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  shapes = jax.tree_util.tree_map(lambda x: tuple(x.shape), params)
  assert shapes == _expected_tree(model.config)
  assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == model.config.num_params()
  assert model.model_feature_shapes(2, LENGTHS) == {
      "encoder_input_tokens": (2, 12), "decoder_input_tokens": (2, 10),
      "decoder_target_tokens": (2, 10), "decoder_loss_weights": (2, 10)}
  packed = model.model_feature_shapes(2, LENGTHS, packed=True)
  assert packed["encoder_segment_ids"] == packed["encoder_positions"] == (2, 12)
  assert packed["decoder_segment_ids"] == packed["decoder_positions"] == (2, 10)
  # Logical axes (for partitioning).
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), 1, LENGTHS))["params"]
  axes = lambda x: x.names
  assert axes(boxed["encoder"]["relpos_bias"]["embedding"]) == ("relpos_buckets", "heads")
  assert axes(boxed["decoder"]["relpos_bias"]["embedding"]) == ("relpos_buckets", "heads")
  assert axes(boxed["decoder"]["logits_dense"]["kernel"]) == ("embed", "vocab")
  assert axes(boxed["token_embedder"]["embedding"]) == ("vocab", "embed")


def _hf_param_count(c):
  """transformers' parameter count for the same shapes (lm_head counted even if HF ties it)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hc = transformers.T5Config(vocab_size=c.vocab_size, d_model=c.emb_dim, d_ff=c.mlp_dim,
                             num_layers=c.num_encoder_layers,
                             num_decoder_layers=c.num_decoder_layers, num_heads=c.num_heads,
                             d_kv=c.head_dim, feed_forward_proj="gated-gelu",
                             tie_word_embeddings=False)
  with torch.device("meta"):
    m = transformers.T5ForConditionalGeneration(hc)
  n = sum(p.numel() for p in m.parameters())  # Unique tensors.
  # transformers 5.x ties lm_head to the shared embedding even for v1.1 configs; the released
  # v1.1 checkpoints have a separate lm_head, so count it as its own tensor.
  if m.lm_head.weight is m.shared.weight:
    n += m.lm_head.weight.numel()
  return n


def test_published_sizes():
  small = t5.t5_1_1_config("small")
  assert (small.vocab_size, small.emb_dim, small.num_heads, small.head_dim, small.mlp_dim,
          small.num_encoder_layers, small.num_decoder_layers) == (32128, 512, 6, 64, 1024, 8, 8)
  abstract = jax.eval_shape(
      lambda: t5.EncoderDecoderModel(small).init(jax.random.PRNGKey(0), 1, {"inputs": 4,
                                                                             "targets": 4}))
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract["params"]))
  assert count == small.num_params() == 76_961_152
  expected = {"tiny": 230_784, "small": 76_961_152, "base": 247_577_856,
              "large": 783_150_080, "xl": 2_849_757_184, "xxl": 11_135_332_352}
  for size in SIZES:
    assert t5.t5_1_1_config(size).num_params() == expected[size], size
  assert t5.t5_1_1_config("xl", dropout_rate=0.0).dropout_rate == 0.0
  with pytest.raises(ValueError, match="small"):
    t5.t5_1_1_config("medium")


@pytest.mark.parametrize("size", SIZES)
def test_param_count_matches_transformers(size):
  c = t5.t5_1_1_config(size)
  assert c.num_params() == _hf_param_count(c)


# ---- 2. numerical parity with transformers --------------------------------------------------

@pytest.fixture(scope="module")
def hf_pair(model):
  """A random tiny transformers T5 v1.1 (untied head, fp32, eval) and our params copied from it."""
  torch = pytest.importorskip("torch", reason="torch is needed for the transformers parity test")
  transformers = pytest.importorskip("transformers",
                                     reason="transformers is needed for the parity test")
  c = model.config
  hc = transformers.T5Config(vocab_size=c.vocab_size, d_model=c.emb_dim, d_ff=c.mlp_dim,
                             num_layers=c.num_encoder_layers,
                             num_decoder_layers=c.num_decoder_layers, num_heads=c.num_heads,
                             d_kv=c.head_dim, feed_forward_proj="gated-gelu",
                             dropout_rate=0.0, tie_word_embeddings=False,
                             relative_attention_num_buckets=c.relative_attention_num_buckets,
                             relative_attention_max_distance=c.relative_attention_max_distance,
                             layer_norm_epsilon=c.norm_epsilon)
  torch.manual_seed(0)
  hf = transformers.T5ForConditionalGeneration(hc).float().eval()
  with torch.no_grad():
    if hf.lm_head.weight is hf.shared.weight:  # transformers 5.x ties it; v1.1 does not.
      hf.lm_head.weight = torch.nn.Parameter(torch.empty_like(hf.shared.weight))
    hf.lm_head.weight.normal_(0.0, c.emb_dim ** -0.5)
    for name, p in hf.named_parameters():
      if "layer_norm" in name:  # Non-trivial norm scales and position biases.
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif "relative_attention_bias" in name:
        p.normal_(0.0, 1.0)
  assert not getattr(hf.config, "scale_decoder_outputs", False)
  # The Hugging Face ↔ flame tensor mapping of flame/checkpoints/hf.py.
  return hf, hf_checkpoints.params_from_tensors(hf.state_dict(), c)


def test_logits_match_transformers(hf_pair, logits_fn):
  import torch
  hf, params = hf_pair
  batch = _batch(np.random.default_rng(1), b=3, inputs_len=12, targets_len=10,
                 pad_from=(7, 12, 3))
  # Long inputs reach the logarithmic relative-position buckets too.
  long_batch = _batch(np.random.default_rng(2), b=2, inputs_len=160, targets_len=140,
                      pad_from=(150, 160))
  for b in (batch, long_batch):
    enc = torch.tensor(b["encoder_input_tokens"], dtype=torch.long)
    dec = torch.tensor(b["decoder_input_tokens"], dtype=torch.long)
    with torch.no_grad():
      expected = hf(input_ids=enc, attention_mask=(enc != 0).long(), decoder_input_ids=dec,
                    decoder_attention_mask=torch.ones_like(dec)).logits.numpy()
    ours = np.asarray(logits_fn(params, b))
    assert np.abs(expected).max() > 1.0  # Non-degenerate logits.
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)


def test_relative_position_bucket_matches_transformers():
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from transformers.models.t5.modeling_t5 import T5Attention
  rel = np.arange(-600, 601)
  for bidirectional in (True, False):
    for num_buckets, max_distance in ((32, 128), (16, 40)):
      expected = T5Attention._relative_position_bucket(
          torch.tensor(rel), bidirectional, num_buckets, max_distance).numpy()
      ours = layers.relative_position_bucket(jnp.asarray(rel), bidirectional, num_buckets,
                                             max_distance)
      np.testing.assert_array_equal(np.asarray(ours), expected)


# ---- 3. masking: causality, padding, packing ------------------------------------------------

def test_decoder_is_causal(params, logits_fn):
  batch = _batch(np.random.default_rng(3))
  base_logits = np.asarray(logits_fn(params, batch))
  k = 6
  changed = dict(batch, decoder_input_tokens=batch["decoder_input_tokens"].copy())
  changed["decoder_input_tokens"][:, k] = (changed["decoder_input_tokens"][:, k] + 7) % 250 + 2
  new_logits = np.asarray(logits_fn(params, changed))
  np.testing.assert_allclose(new_logits[:, :k], base_logits[:, :k], rtol=1e-5, atol=1e-5)
  assert np.abs(new_logits[:, k:] - base_logits[:, k:]).max() > 1e-2


def test_encoder_padding_is_ignored(params, logits_fn):
  batch = _batch(np.random.default_rng(4), pad_from=(8, 5))
  base_logits = np.asarray(logits_fn(params, batch))
  # More trailing padding: same logits.
  longer = dict(batch, encoder_input_tokens=np.pad(batch["encoder_input_tokens"],
                                                   ((0, 0), (0, 9))))
  np.testing.assert_allclose(logits_fn(params, longer), base_logits, rtol=1e-5, atol=1e-5)
  # Garbage tokens in positions whose given segment id is 0: same logits.
  seg = (batch["encoder_input_tokens"] != 0).astype(np.int32)
  garbage = batch["encoder_input_tokens"].copy()
  garbage[seg == 0] = 77
  masked = dict(batch, encoder_input_tokens=garbage, encoder_segment_ids=seg)
  np.testing.assert_allclose(logits_fn(params, masked), base_logits, rtol=1e-5, atol=1e-5)
  # ...whereas the same garbage as real tokens (no segment ids) changes them.
  unmasked = dict(batch, encoder_input_tokens=garbage)
  assert np.abs(np.asarray(logits_fn(params, unmasked)) - base_logits).max() > 1e-2


def test_packed_examples_are_isolated(params, logits_fn):
  rng = np.random.default_rng(5)
  examples = [(rng.integers(2, 259, 5), rng.integers(2, 259, 4)),
              (rng.integers(2, 259, 3), rng.integers(2, 259, 5))]
  inputs_len, targets_len = LENGTHS["inputs"], LENGTHS["targets"]
  names = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions",
           "decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
           "decoder_positions", "decoder_loss_weights")
  alone = {k: np.zeros((2, inputs_len if k.startswith("encoder") else targets_len), np.int32)
           for k in names}
  packed = {k: v.copy() for k, v in alone.items()}
  spans = [[], []]
  for row, order in enumerate([(0, 1), (1, 0)]):  # Row 0 packs A then B, row 1 B then A.
    ei = di = 0
    for seg, i in enumerate(order, start=1):
      inp, tgt = examples[i]
      dec_in = np.concatenate([[0], tgt[:-1]])
      enc_span, dec_span = slice(ei, ei + len(inp)), slice(di, di + len(tgt))
      for batch, es, ds, s in ((packed, enc_span, dec_span, seg),
                               (alone, slice(0, len(inp)), slice(0, len(tgt)), 1)):
        if batch is alone and row:
          continue
        r = row if batch is packed else i
        batch["encoder_input_tokens"][r, es] = inp
        batch["encoder_segment_ids"][r, es] = s
        batch["encoder_positions"][r, es] = np.arange(len(inp))
        batch["decoder_input_tokens"][r, ds] = dec_in
        batch["decoder_target_tokens"][r, ds] = tgt
        batch["decoder_segment_ids"][r, ds] = s
        batch["decoder_positions"][r, ds] = np.arange(len(tgt))
        batch["decoder_loss_weights"][r, ds] = 1
      spans[row].append((i, dec_span))
      ei, di = ei + len(inp), di + len(tgt)
  alone_logits = np.asarray(logits_fn(params, alone))
  packed_logits = np.asarray(logits_fn(params, packed))
  for row in range(2):
    for i, span in spans[row]:
      np.testing.assert_allclose(packed_logits[row, span], alone_logits[i, :span.stop - span.start],
                                 rtol=1e-4, atol=1e-4, err_msg=f"row {row} example {i}")
  # With one segment per row (no packing information) the second example sees the first.
  merged = dict(packed, encoder_segment_ids=np.minimum(packed["encoder_segment_ids"], 1),
                decoder_segment_ids=np.minimum(packed["decoder_segment_ids"], 1))
  mixed = np.asarray(logits_fn(params, merged))
  i, span = spans[0][1]
  assert np.abs(mixed[0, span] - alone_logits[i, :span.stop - span.start]).max() > 1e-2


# ---- 4. decoding with the KV cache ----------------------------------------------------------

def test_cached_decoder_steps_match_full_forward(model, params, logits_fn):
  batch = _batch(np.random.default_rng(6), pad_from=(6, 12))
  full = np.asarray(logits_fn(params, batch))
  module = model.module
  enc = jnp.asarray(batch["encoder_input_tokens"])
  seg = (enc != 0).astype(jnp.int32)
  encoded = jax.jit(lambda p: module.apply({"params": p}, enc, seg,
                                           method=t5.Transformer.encode))(params)
  dec = jnp.asarray(batch["decoder_input_tokens"])
  b, length = dec.shape
  cache = model.zeros_like_shapes(model._cache_shapes(
      encoded, seg, dec, max_decode_length=length, method=t5.Transformer.decode))

  @jax.jit
  def step(cache, token, t):
    logits, mutated = module.apply(
        {"params": params, "cache": cache}, encoded, seg, token,
        decoder_positions=jnp.full((b, 1), t, jnp.int32), decode=True,
        max_decode_length=length, method=t5.Transformer.decode, mutable=["cache"])
    return logits[:, 0], mutated["cache"]

  for t in range(length):
    logits, cache = step(cache, dec[:, t:t + 1], t)
    np.testing.assert_allclose(logits, full[:, t], rtol=1e-4, atol=1e-4, err_msg=f"step {t}")


def test_greedy_decode_matches_naive(model, params):
  rng = np.random.default_rng(7)
  inputs = rng.integers(2, 259, size=(3, 9)).astype(np.int32)
  inputs[0, 6:] = 0
  inputs[2, 2:] = 0
  max_len = 8
  decoded = np.asarray(jax.jit(lambda p, x: model.decode(p, {"inputs": x}, max_len))(
      params, inputs))

  @jax.jit
  def full_logits(p, dec_in):
    return model.logits(p, {"encoder_input_tokens": inputs, "decoder_input_tokens": dec_in})

  tokens = np.zeros((3, max_len + 1), np.int32)  # Starts with the decoder start id 0.
  for t in range(max_len):
    logits = np.asarray(full_logits(params, tokens[:, :max_len]))
    tokens[:, t + 1] = logits[:, t].argmax(-1)
  naive = np.asarray(base.mask_after_eos(jnp.asarray(tokens[:, 1:]), model.vocabulary.eos_id))
  assert decoded.shape == (3, max_len)
  np.testing.assert_array_equal(decoded, naive)
  assert len(np.unique(naive)) > 3  # A non-trivial output.


def test_greedy_decode_matches_transformers_generate(hf_pair, model):
  import torch
  hf, params = hf_pair
  rng = np.random.default_rng(8)
  inputs = rng.integers(2, 259, size=(2, 7)).astype(np.int32)
  inputs[1, 4:] = 0
  max_len = 6
  ours = np.asarray(jax.jit(lambda p: model.decode(p, {"inputs": inputs}, max_len))(params))
  enc = torch.tensor(inputs, dtype=torch.long)
  with torch.no_grad():
    out = hf.generate(input_ids=enc, attention_mask=(enc != 0).long(), max_new_tokens=max_len,
                      do_sample=False, num_beams=1, decoder_start_token_id=0,
                      eos_token_id=model.vocabulary.eos_id, pad_token_id=0).numpy()[:, 1:]
  expected = np.zeros((2, max_len), np.int32)
  expected[:, :out.shape[1]] = out
  np.testing.assert_array_equal(ours, expected)


# ---- 5. training -----------------------------------------------------------------------------

def _mean_loss(logits, batch):
  log_probs = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
  ll = np.take_along_axis(np.asarray(log_probs), batch["decoder_target_tokens"][..., None], -1)
  weights = batch["decoder_loss_weights"]
  return float(-(ll[..., 0] * weights).sum() / weights.sum())


def test_dropout_only_with_rng(params, logits_fn):
  model = t5.EncoderDecoderModel(t5.t5_1_1_config("tiny", dropout_rate=0.1))
  batch = _batch(np.random.default_rng(9))
  drop_logits = jax.jit(model.logits)
  a = np.asarray(drop_logits(params, batch, _key(2)))
  b = np.asarray(drop_logits(params, batch, _key(3)))
  assert np.abs(a - b).max() > 1e-3
  # Without an rng the logits are those of the dropout-free model.
  np.testing.assert_allclose(drop_logits(params, batch), logits_fn(params, batch),
                             rtol=1e-6, atol=1e-6)


def test_loss_falls(model, params, logits_fn):
  batch = _batch(np.random.default_rng(10), pad_from=(12, 6))
  batch["decoder_loss_weights"][1, 7:] = 0
  opt = optax.adam(3e-3)

  @jax.jit
  def train(params):
    def step(carry, _):
      params, state = carry
      (loss, _), grads = jax.value_and_grad(model.loss, has_aux=True)(params, batch)
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), loss
    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=15)
    return params, losses

  initial = _mean_loss(logits_fn(params, batch), batch)
  trained, losses = train(params)
  final = _mean_loss(logits_fn(trained, batch), batch)
  np.testing.assert_allclose(losses[0], initial, rtol=1e-5)  # model.loss agrees.
  assert np.isfinite(final) and final < 0.5 * initial, (initial, final)


# ---- gin ---------------------------------------------------------------------------------------

@gin.configurable("t5_test_model_holder")
def _model_holder(model=gin.REQUIRED):
  return model


@pytest.mark.parametrize("size", SIZES)
def test_gin_configs(size):
  path = REPO / "gin_configs" / "models" / f"t5_1_1_{size}.gin"
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings([str(path)], ["t5_test_model_holder.model = %MODEL"])
    built = _model_holder()
  finally:
    gin.clear_config()
  assert isinstance(built, t5.EncoderDecoderModel)
  expected = t5.t5_1_1_config(size)
  if size == "tiny":
    expected = t5.t5_1_1_config(size, dropout_rate=0.0)
  assert built.config == expected


def test_query_init_folds_in_the_missing_logit_scaling_like_t5x():
  """T5 attention has no 1/sqrt(head_dim) on its logits; T5X initialises the query kernel
  with variance 1/(fan_in * head_dim) instead of 1/fan_in (keys, values: 1/fan_in, fan_in the
  embedding size; the output: 1/(heads * head_dim)). The decoder-only model scales its logits
  and keeps 1/fan_in for the query."""
  emb, heads, head_dim = 256, 8, 64
  def kernels(scale_logits):
    module = layers.Attention(heads, heads, head_dim, scale_logits=scale_logits)
    x = jnp.zeros((1, 2, emb))
    return nn.meta.unbox(module.init(jax.random.PRNGKey(0), x, x, None))["params"]
  t5_like, scaled = kernels(False), kernels(True)
  for name, expected in (("query", (emb * head_dim) ** -0.5), ("key", emb ** -0.5),
                         ("value", emb ** -0.5), ("out", (heads * head_dim) ** -0.5)):
    std = float(np.std(np.asarray(t5_like[name], np.float64)))
    assert std == pytest.approx(expected, rel=0.02), name
  assert float(np.std(np.asarray(scaled["query"], np.float64))) == pytest.approx(emb ** -0.5,
                                                                                 rel=0.02)
