"""Scanned layers and remat (DecoderConfig.scan_layers / remat_policy) against the unrolled
decoder, and checkpoints moving between the two parameter layouts."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flame.checkpoints import hf, imported, manager
from flame.models import decoder, scan, t5

UNROLLED = decoder.DecoderConfig(num_layers=3, tie_embeddings=False, dropout_rate=0.0)
SCANNED = dataclasses.replace(UNROLLED, scan_layers=True)
TOKENS = jnp.asarray(np.random.RandomState(0).randint(1, 259, (2, 10)))


def init(config):
  return jax.device_get(nn.meta.unbox(
      decoder.Decoder(config).init(jax.random.PRNGKey(0), TOKENS)["params"]))


def test_stack_and_unstack_are_exact_inverses():
  params = init(UNROLLED)
  stacked = scan.stack(params)
  assert scan.layout(params) == "unrolled" and scan.layout(stacked) == "scanned"
  assert "layers_0" not in stacked and stacked["layers"]["attention"]["query"].shape == (
      3, 64, 4, 16)
  np.testing.assert_array_equal(stacked["layers"]["mlp"]["wo"]["kernel"][2],
                                params["layers_2"]["mlp"]["wo"]["kernel"])
  back = scan.unstack(stacked)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)
  # The scanned model's own parameters have exactly the stacked structure and shapes.
  assert jax.tree_util.tree_map(np.shape, init(SCANNED)) == jax.tree_util.tree_map(
      np.shape, stacked)
  with pytest.raises(ValueError, match=r"layers \[0, 2\] are not numbered 0 … 1"):
    scan.stack({"layers_0": {"w": np.zeros(2)}, "layers_2": {"w": np.zeros(2)}})


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scanned_decoder_equals_the_unrolled_one_forward_and_backward(remat):
  params = init(UNROLLED)
  scanned = dataclasses.replace(SCANNED, remat_policy=remat)

  def loss(config, p):
    logits = decoder.Decoder(config).apply({"params": p}, TOKENS)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  want_loss, want_grads = jax.value_and_grad(lambda p: loss(UNROLLED, p))(params)
  got_loss, got_grads = jax.value_and_grad(lambda p: loss(scanned, p))(scan.stack(params))
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(scan.unstack(got_grads)),
                               jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=str(path))


def test_scanned_kv_cache_decoding_equals_the_unrolled_model():
  params = init(UNROLLED)
  prompts = np.array([[5, 6, 7, 8, 0], [9, 10, 0, 0, 0]])
  unrolled = decoder.DecoderOnlyModel(UNROLLED)
  scanned = decoder.DecoderOnlyModel(SCANNED)
  np.testing.assert_array_equal(
      np.asarray(scanned.decode(scan.stack(params), {"inputs": prompts}, 6)),
      np.asarray(unrolled.decode(params, {"inputs": prompts}, 6)))


def test_unknown_remat_policy_is_named():
  with pytest.raises(ValueError, match="remat_policy = 'some'; expected one of"):
    decoder.DecoderConfig(remat_policy="some")


def abstract(config):
  shapes = jax.eval_shape(lambda: nn.meta.unbox(
      decoder.Decoder(config).init(jax.random.PRNGKey(0), TOKENS)["params"]))
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=sharding), shapes)


@pytest.mark.parametrize("write,read", [(UNROLLED, SCANNED), (SCANNED, UNROLLED)])
def test_checkpoints_restore_across_layouts(tmp_path, write, read):
  params = init(UNROLLED)
  written = params if not write.scan_layers else scan.stack(params)
  imported.write_orbax(imported.ImportedModel(write, written, {"format": "test"}),
                       str(tmp_path / "ckpt"))
  restored = jax.device_get(manager.restore_params_from(str(tmp_path / "ckpt"), abstract(read)))
  want = scan.stack(params) if read.scan_layers else params
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(want)
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_hugging_face_export_of_scanned_parameters():
  params = init(UNROLLED)
  assert {k: v.tolist() for k, v in hf.hf_tensors_from_params(scan.stack(params),
                                                              SCANNED).items()} == {
      k: v.tolist() for k, v in hf.hf_tensors_from_params(params, UNROLLED).items()}


T5_UNROLLED = t5.T5Config(num_encoder_layers=2, num_decoder_layers=3, dropout_rate=0.0)
T5_SCANNED = dataclasses.replace(T5_UNROLLED, scan_layers=True, remat_policy="full")


def t5_params():
  return jax.device_get(nn.meta.unbox(t5.Transformer(T5_UNROLLED).init(
      jax.random.PRNGKey(1), TOKENS, TOKENS)["params"]))


@pytest.mark.slow  # 32 s; the scanned decoder's forward and backward are in the default suite
def test_scanned_t5_equals_the_unrolled_one():
  params = t5_params()
  stacked = scan.stack(params)
  assert stacked["encoder"]["layers"]["mlp"]["wo"]["kernel"].shape[0] == 2
  assert stacked["decoder"]["layers"]["cross_attention"]["query"].shape[0] == 3
  assert jax.tree_util.tree_map(np.shape, stacked) == jax.tree_util.tree_map(
      np.shape, jax.device_get(nn.meta.unbox(t5.Transformer(T5_SCANNED).init(
          jax.random.PRNGKey(1), TOKENS, TOKENS)["params"])))

  def loss(config, p):
    logits = t5.Transformer(config).apply({"params": p}, TOKENS, TOKENS)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  want_loss, want_grads = jax.value_and_grad(lambda p: loss(T5_UNROLLED, p))(params)
  got_loss, got_grads = jax.value_and_grad(lambda p: loss(T5_SCANNED, p))(stacked)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(scan.unstack(got_grads)),
                               jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=str(path))
  inputs = np.array([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0]])
  np.testing.assert_array_equal(
      np.asarray(t5.EncoderDecoderModel(T5_SCANNED).decode(stacked, {"inputs": inputs}, 5)),
      np.asarray(t5.EncoderDecoderModel(T5_UNROLLED).decode(params, {"inputs": inputs}, 5)))
  with pytest.raises(ValueError, match="T5Config.remat_policy = 'x'"):
    t5.T5Config(remat_policy="x")
