"""Decoder-only (Llama-family) model: shapes, masking, packing, KV-cache decoding, parity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flame.checkpoints import hf as hf_checkpoints
from flame.models import base, decoder

CONFIG = decoder.DecoderConfig(vocab_size=259, emb_dim=32, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8, mlp_dim=64)


@pytest.fixture(scope="module")
def model_and_params():
  model = decoder.DecoderOnlyModel(CONFIG)
  return model, model.init_params(jax.random.PRNGKey(0), 2, {"inputs": 8, "targets": 8})


def forward(model, params, tokens, **kw):
  return np.asarray(model.module.apply({"params": params}, jnp.asarray(tokens), **kw))


def test_shapes_and_param_count(model_and_params):
  model, params = model_and_params
  tokens = np.random.RandomState(0).randint(1, 259, (3, 11))
  assert forward(model, params, tokens).shape == (3, 11, 259)
  assert params["layers_0"]["attention"]["query"].shape == (32, 4, 8)
  assert params["layers_0"]["attention"]["key"].shape == (32, 2, 8)
  assert "logits_dense" not in params  # tied embeddings
  counted = sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert counted == CONFIG.num_params()


def test_smollm2_shape_parameter_count():
  """SmolLM2-135M has 134,515,008 parameters (published model card / safetensors)."""
  cfg = decoder.DecoderConfig(vocab_size=49152, emb_dim=576, num_layers=30, num_heads=9,
                              num_kv_heads=3, head_dim=64, mlp_dim=1536, rope_theta=100000.0)
  model = decoder.DecoderOnlyModel(cfg)
  shapes = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0), 1,
                                                    {"inputs": 4, "targets": 4}))
  assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes)) == 134_515_008
  assert cfg.num_params() == 134_515_008


def test_future_tokens_do_not_change_past_logits(model_and_params):
  model, params = model_and_params
  tokens = np.random.RandomState(1).randint(1, 259, (2, 10))
  changed = tokens.copy()
  changed[:, 6:] = np.random.RandomState(2).randint(1, 259, (2, 4))
  a, b = forward(model, params, tokens), forward(model, params, changed)
  np.testing.assert_allclose(a[:, :6], b[:, :6], rtol=1e-5, atol=1e-5)
  assert not np.allclose(a[:, 6:], b[:, 6:])


def test_packed_segments_do_not_see_each_other(model_and_params):
  model, params = model_and_params
  rng = np.random.RandomState(3)
  first, second = rng.randint(1, 259, 5), rng.randint(1, 259, 7)
  packed = np.concatenate([first, second])[None]
  segments = np.array([[1] * 5 + [2] * 7])
  positions = np.array([list(range(5)) + list(range(7))])
  logits = forward(model, params, packed, segment_ids=jnp.asarray(segments),
                   positions=jnp.asarray(positions))
  np.testing.assert_allclose(logits[0, :5], forward(model, params, first[None])[0],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[0, 5:], forward(model, params, second[None])[0],
                             rtol=1e-5, atol=1e-5)


def test_kv_cache_steps_equal_full_forward(model_and_params):
  model, params = model_and_params
  tokens = jnp.asarray(np.random.RandomState(4).randint(1, 259, (2, 9)))
  full = forward(model, params, tokens)
  cache = model.zeros_like_shapes(model._cache_shapes(tokens))
  # A 4-token chunk then single tokens: both paths through the cache.
  logits, mutated = model.module.apply({"params": params, "cache": cache}, tokens[:, :4],
                                       positions=jnp.broadcast_to(jnp.arange(4), (2, 4)),
                                       decode=True, mutable=["cache"])
  np.testing.assert_allclose(np.asarray(logits), full[:, :4], rtol=1e-4, atol=1e-4)
  cache = mutated["cache"]
  for t in range(4, 9):
    logits, mutated = model.module.apply({"params": params, "cache": cache}, tokens[:, t:t + 1],
                                         positions=jnp.full((2, 1), t), decode=True,
                                         mutable=["cache"])
    cache = mutated["cache"]
    np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, t], rtol=1e-4, atol=1e-4)


def test_greedy_decode_equals_naive_full_forward_loop(model_and_params):
  model, params = model_and_params
  prompts = np.array([[5, 6, 7, 8, 0], [9, 10, 0, 0, 0]])
  got = np.asarray(model.decode(params, {"inputs": prompts}, 6))
  for row, length in zip(range(2), (4, 2)):
    sequence = [0] + list(prompts[row, :length])  # decode prepends BOS id 0 like training
    for _ in range(6):
      sequence.append(int(np.argmax(forward(model, params, np.array([sequence]))[0, -1])))
    expected = np.asarray(base.mask_after_eos(jnp.array(sequence[length + 1:]), 1))
    np.testing.assert_array_equal(got[row], expected)


def test_score_is_target_log_likelihood(model_and_params):
  model, params = model_and_params
  rng = np.random.RandomState(5)
  targets = rng.randint(1, 259, (2, 6))
  inputs = np.concatenate([np.zeros((2, 1), int), targets[:, :-1]], axis=1)
  weights = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
  batch = {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
           "decoder_loss_weights": weights}
  logits = forward(model, params, inputs).astype(np.float64)
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                              keepdims=True)) - logits.max(-1, keepdims=True)
  expected = [sum(log_probs[b, t, targets[b, t]] for t in range(6) if weights[b, t])
              for b in range(2)]
  np.testing.assert_allclose(np.asarray(model.score(params, batch)), expected, rtol=1e-5)


def test_bidirectional_prefix_lets_inputs_see_later_inputs():
  cfg = decoder.DecoderConfig(vocab_size=259, emb_dim=32, num_layers=1, num_heads=2,
                              num_kv_heads=2, head_dim=8, mlp_dim=32, bidirectional_prefix=True)
  model = decoder.DecoderOnlyModel(cfg)
  params = model.init_params(jax.random.PRNGKey(1), 1, {"inputs": 4, "targets": 4})
  tokens = np.array([[3, 4, 5, 6, 7, 8]])
  changed = np.array([[3, 4, 9, 6, 7, 8]])
  prefix = jnp.asarray([[1, 1, 1, 0, 0, 0]])
  a = forward(model, params, tokens, prefix_mask=prefix)
  b = forward(model, params, changed, prefix_mask=prefix)
  assert not np.allclose(a[0, 0], b[0, 0])  # position 0 sees prefix position 2


def test_matches_transformers_llama():
  torch = pytest.importorskip("torch", reason="the hf extra (torch) is not installed")
  transformers = pytest.importorskip("transformers", reason="transformers is not installed")
  hf_config = transformers.LlamaConfig(
      vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10000.0,
      rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=64)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(hf_config).eval()
  e, h, kv, d = 32, 4, 2, 8
  cfg = decoder.DecoderConfig(vocab_size=259, emb_dim=e, num_layers=2, num_heads=h,
                              num_kv_heads=kv, head_dim=d, mlp_dim=64)
  # The Hugging Face ↔ flame tensor mapping of flame/checkpoints/hf.py (also tested through
  # safetensors files in tests/test_hf_checkpoints.py).
  params = hf_checkpoints.params_from_tensors(hf.state_dict(), cfg)
  assert params["layers_0"]["attention"]["key"].shape == (e, kv, d)
  model = decoder.DecoderOnlyModel(cfg)
  tokens = np.random.RandomState(6).randint(0, 259, (2, 12))
  ours = forward(model, params, tokens)
  with torch.no_grad():
    theirs = hf(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block", [4, 5])
def test_causal_query_blocks_equal_the_full_square(block):
  """Packed causal attention (two segments, padding) of 13 tokens in query blocks against the
  full square: outputs and gradients at the real tokens (a padding query sees no key at all:
  its output is an average over whichever keys its block holds, and nothing reads it)."""
  from flame.models import layers  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 13, 32)), jnp.float32)
  segments = jnp.asarray([[1] * 5 + [2] * 6 + [0] * 2, [1] * 13])
  positions = jnp.asarray([list(range(5)) + list(range(6)) + [0, 0], list(range(13))])
  mask = layers.attention_mask(segments, segments, True, positions, positions)
  rope = layers.rope_tables(positions, 13, 8, 10000.0)
  full, blocked = (layers.Attention(4, 2, 8, causal_block=b) for b in (0, block))
  params = full.init(jax.random.PRNGKey(0), x, x, mask)

  def out(module, x):
    return module.apply(params, x, x, mask, rope_q=rope, rope_kv=rope) * (segments > 0)[..., None]
  np.testing.assert_allclose(out(blocked, x), out(full, x), rtol=1e-5, atol=1e-6)
  grads = [jax.grad(lambda x, m=m: jnp.sum(out(m, x) ** 2))(x) for m in (full, blocked)]
  np.testing.assert_allclose(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_attention_dropout_rate_is_its_own_setting():
  """dropout_rate drops residual/MLP activations; attention_dropout_rate (None: the same rate)
  the attention probabilities. Same dropout key: None and an equal explicit rate agree, 0 for
  attention alone differs from both, and 0 for both is the deterministic forward."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  tokens = jnp.asarray(np.random.RandomState(1).randint(1, 259, (2, 9)))
  params = decoder.DecoderOnlyModel(CONFIG).init_params(jax.random.PRNGKey(0), 2,
                                                       {"inputs": 8, "targets": 8})

  def logits(rate, attention_rate):
    model = decoder.DecoderOnlyModel(dataclasses.replace(
        CONFIG, dropout_rate=rate, attention_dropout_rate=attention_rate))
    return forward(model, params, tokens, deterministic=False,
                   rngs={"dropout": jax.random.PRNGKey(3)})
  same = logits(0.3, None)
  np.testing.assert_array_equal(same, logits(0.3, 0.3))
  assert np.abs(same - logits(0.3, 0.0)).max() > 1e-3
  np.testing.assert_allclose(logits(0.0, 0.0), forward(decoder.DecoderOnlyModel(CONFIG), params,
                                                       tokens), rtol=1e-6, atol=1e-6)
  # Attention dropout alone changes the output too (it reaches the probabilities).
  assert np.abs(logits(0.0, 0.3) - logits(0.0, 0.0)).max() > 1e-3
