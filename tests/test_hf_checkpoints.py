"""Hugging Face safetensors import/export (flame/checkpoints/hf.py) and flame-convert."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the hf extra (torch) is not installed")
transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not "
                                   "installed")
pytest.importorskip("safetensors", reason="the hf extra (safetensors) is not installed")
from safetensors.numpy import load_file, save_file  # noqa: E402

from flame import cli  # noqa: E402
from flame.checkpoints import convert, hf, imported, manager  # noqa: E402
from flame.models import decoder, t5  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 259


# ---- reference models -----------------------------------------------------------------------

def _randomize_norms(model, scale_names=("layernorm", "layer_norm", "norm.weight")):
  """Non-trivial norm scales and relative position biases (init leaves them at 1 / tiny)."""
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if any(s in name for s in scale_names):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif "relative_attention_bias" in name:
        p.copy_(torch.randn(p.shape, generator=gen))


def _make_llama(tied: bool):
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=500.0,
      rms_norm_eps=1e-5, tie_word_embeddings=tied, max_position_embeddings=64)
  torch.manual_seed(0 if tied else 1)
  model = transformers.LlamaForCausalLM(config).float().eval()
  _randomize_norms(model)
  return model


def _make_t5(variant: str):
  """variant: 'untied' (transformers 5.x config: tie true, scale false, lm_head stored),
  'untied_v11_config' (released v1.1 config: tie_word_embeddings false),
  'tied_unscaled' (transformers 5.x default: lm_head tied to shared, not stored)."""
  config = transformers.T5Config(
      vocab_size=VOCAB, d_model=32, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
      d_kv=8, feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False,
      relative_attention_num_buckets=16, relative_attention_max_distance=40)
  torch.manual_seed(2)
  model = transformers.T5ForConditionalGeneration(config).float().eval()
  assert not model.config.scale_decoder_outputs
  _randomize_norms(model)
  if variant != "tied_unscaled":
    with torch.no_grad():
      model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.2)
  if variant == "untied_v11_config":
    model.config.tie_word_embeddings = False
  return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """{name: (directory written by save_pretrained, the transformers model)}."""
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for name, model in (("llama_tied", _make_llama(True)), ("llama_untied", _make_llama(False)),
                      ("t5_untied", _make_t5("untied")),
                      ("t5_untied_v11_config", _make_t5("untied_v11_config")),
                      ("t5_tied_unscaled", _make_t5("tied_unscaled"))):
    model.save_pretrained(root / name)
    out[name] = (str(root / name), model)
  return out


def _llama_tokens():
  return np.random.RandomState(6).randint(0, VOCAB, (2, 12))


def _t5_tokens():
  rng = np.random.RandomState(7)
  enc = rng.randint(2, VOCAB, (2, 11))
  enc[0, 7:] = 0
  dec = np.concatenate([np.zeros((2, 1), int), rng.randint(2, VOCAB, (2, 8))], axis=1)
  return enc, dec


def hf_logits(model) -> np.ndarray:
  with torch.no_grad():
    if isinstance(model, transformers.T5ForConditionalGeneration):
      enc, dec = _t5_tokens()
      enc = torch.tensor(enc)
      return model(input_ids=enc, attention_mask=(enc != 0).long(),
                   decoder_input_ids=torch.tensor(dec)).logits.numpy()
    return model(torch.tensor(_llama_tokens())).logits.numpy()


def our_logits(config, params) -> np.ndarray:
  if isinstance(config, t5.T5Config):
    enc, dec = _t5_tokens()
    return np.asarray(t5.Transformer(config).apply({"params": params}, jnp.asarray(enc),
                                                   jnp.asarray(dec)))
  return np.asarray(decoder.Decoder(config).apply({"params": params},
                                                  jnp.asarray(_llama_tokens())))


def _assert_same_params(a, b):
  fa, fb = imported.flatten(jax.device_get(a)), imported.flatten(jax.device_get(b))
  assert sorted(fa) == sorted(fb)
  for path in fa:
    assert np.asarray(fa[path]).dtype == np.asarray(fb[path]).dtype, path
    np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]), err_msg=str(path))


def _run_cli(*args):
  convert.main([*args, "--no_progress"])


# ---- parity ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama_tied", "llama_untied"])
def test_llama_logits_match_transformers(hf_dirs, name):
  directory, model = hf_dirs[name]
  loaded = hf.load_hf(directory)
  c = loaded.config
  assert (c.num_heads, c.num_kv_heads, c.head_dim, c.rope_theta) == (4, 2, 8, 500.0)
  assert c.tie_embeddings == (name == "llama_tied")
  assert ("logits_dense" in loaded.params) == (name == "llama_untied")
  expected = hf_logits(model)
  ours = our_logits(c, loaded.params)
  assert np.abs(expected).max() > 0.1
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
  src = loaded.source
  assert src["format"] == "hf-safetensors" and src["directory"] == directory
  assert [f["name"] for f in src["files"]] == ["model.safetensors"]
  assert len(src["files"][0]["sha256"]) == 64


@pytest.mark.parametrize("name", ["t5_untied", "t5_untied_v11_config", "t5_tied_unscaled"])
def test_t5_logits_match_transformers(hf_dirs, name):
  directory, model = hf_dirs[name]
  loaded = hf.load_hf(directory)
  assert loaded.config.num_decoder_layers == 3 and loaded.config.mlp_dim == 48
  assert loaded.config.relative_attention_num_buckets == 16
  expected = hf_logits(model)
  ours = our_logits(loaded.config, loaded.params)
  assert np.abs(expected).max() > 1.0
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
  head = loaded.params["decoder"]["logits_dense"]["kernel"]
  shared = loaded.params["token_embedder"]["embedding"]
  assert np.array_equal(head, shared.T) == (name == "t5_tied_unscaled")


# ---- round trips ------------------------------------------------------------------------------

def _random_params(config, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda x: rng.normal(0, 0.5, x.shape).astype(np.float32),
                                convert.abstract_params(config))


ROUND_TRIP_CONFIGS = {
    "llama_untied": decoder.DecoderConfig(vocab_size=300, emb_dim=24, num_layers=2, num_heads=3,
                                          num_kv_heads=1, head_dim=8, mlp_dim=40,
                                          rope_theta=1e5, tie_embeddings=False),
    "t5": t5.T5Config(vocab_size=300, emb_dim=24, num_heads=3, num_encoder_layers=1,
                      num_decoder_layers=2, head_dim=8, mlp_dim=40, dropout_rate=0.1),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_CONFIGS))
def test_orbax_to_hf_to_orbax_is_bit_identical(tmp_path, name):
  config = ROUND_TRIP_CONFIGS[name]
  params = _random_params(config)
  start = tmp_path / "start"
  if name == "t5":  # A checkpoint as flame.train writes it: config fields as strings.
    checkpointer = manager.Checkpointer(start, async_save=False)
    checkpointer.save(7, {"params": params}, {"model": "EncoderDecoderModel", "config": {
        k: str(v) for k, v in vars(config).items()}}, force=True)
    checkpointer.close()
  else:  # An imported checkpoint: typed config fields and a class name.
    imported.write_orbax(imported.ImportedModel(config, params, {"format": "test"}), str(start))
  _run_cli(f"--from=orbax:{start}", f"--to=hf:{tmp_path / 'hf'}")
  _run_cli(f"--from=hf:{tmp_path / 'hf'}", f"--to=orbax:{tmp_path / 'back'}")
  restored_config, restored, meta = convert.read_orbax(str(tmp_path / "back"))
  assert restored_config == config
  _assert_same_params(restored, params)
  assert meta["source"]["format"] == "hf-safetensors"
  assert os.path.isfile(tmp_path / "back" / "model.gin")


@pytest.mark.parametrize("name", ["llama_untied", "llama_tied", "t5_untied_v11_config"])
def test_hf_to_orbax_to_hf_gives_the_same_logits_in_transformers(tmp_path, hf_dirs, name):
  directory, model = hf_dirs[name]
  _run_cli(f"--from=hf:{directory}", f"--to=orbax:{tmp_path / 'orbax'}")
  _run_cli(f"--from=orbax:{tmp_path / 'orbax'}", f"--to=hf:{tmp_path / 'out'}")
  cls = (transformers.T5ForConditionalGeneration if name.startswith("t5")
         else transformers.AutoModelForCausalLM)
  reloaded = cls.from_pretrained(tmp_path / "out").eval()
  np.testing.assert_array_equal(hf_logits(reloaded), hf_logits(model))
  written = json.load(open(tmp_path / "out" / "config.json"))
  original = json.load(open(os.path.join(directory, "config.json")))
  for key in ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings"):
    assert written.get(key) == original.get(key), key


def test_sharded_output_loads_in_transformers(tmp_path, hf_dirs):
  directory, model = hf_dirs["llama_untied"]
  loaded = hf.load_hf(directory)
  out = tmp_path / "sharded"
  hf.save_hf(loaded.params, loaded.config, str(out), max_shard_bytes=40_000)
  shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  index = json.load(open(out / hf.INDEX_FILE))
  assert set(index["weight_map"].values()) == set(shards)
  total = 0
  for shard in shards:
    tensors = load_file(str(out / shard))
    assert sum(t.nbytes for t in tensors.values()) <= 40_000 or len(tensors) == 1
    assert {k for k, v in index["weight_map"].items() if v == shard} == set(tensors)
    total += sum(t.nbytes for t in tensors.values())
  assert index["metadata"]["total_size"] == total
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  np.testing.assert_array_equal(hf_logits(reloaded), hf_logits(model))
  _assert_same_params(hf.load_hf(str(out)).params, loaded.params)  # Sharded input too.


def test_bfloat16_output(tmp_path, hf_dirs):
  directory, model = hf_dirs["llama_tied"]
  loaded = hf.load_hf(directory)
  hf.save_hf(loaded.params, loaded.config, str(tmp_path / "bf16"), dtype="bfloat16")
  assert json.load(open(tmp_path / "bf16" / "config.json"))["dtype"] == "bfloat16"
  back = hf.load_hf(str(tmp_path / "bf16"))
  assert back.source["dtypes"] == ["BF16"]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").eval()
  assert reloaded.dtype == torch.bfloat16
  np.testing.assert_allclose(our_logits(back.config, back.params), hf_logits(model), atol=0.1)


def test_cli_end_to_end_in_subprocesses(tmp_path, hf_dirs):
  directory, model = hf_dirs["t5_untied"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  orbax_dir, out = tmp_path / "orbax", tmp_path / "out"
  first = subprocess.run(
      [sys.executable, "-m", "flame.checkpoints.convert", f"--from=hf:{directory}",
       f"--to=orbax:{orbax_dir}"], capture_output=True, text=True, cwd=REPO, env=env,
      timeout=120)
  assert first.returncode == 0, first.stderr[-3000:]
  gin_path = str(orbax_dir / "model.gin")
  assert f"model gin: {gin_path}" in first.stdout
  # stderr is a pipe, not a terminal: no tqdm bar redrawn into it (a quick read logs nothing).
  assert "\r" not in first.stderr and "read tensors" not in first.stderr
  second = subprocess.run(
      [sys.executable, "-m", "flame.checkpoints.convert", f"--from=orbax:{orbax_dir}/0",
       f"--to=hf:{out}", "--max_shard_size=20KB"], capture_output=True, text=True, cwd=REPO,
      env=env, timeout=120)
  assert second.returncode == 0, second.stderr[-3000:]
  assert os.path.isfile(out / hf.INDEX_FILE)
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
  np.testing.assert_array_equal(hf_logits(reloaded), hf_logits(model))
  # The model gin builds the imported model's config.
  import gin  # pylint: disable=import-outside-toplevel
  gin.parse_config_files_and_bindings([gin_path], [])
  assert t5.T5Config() == hf.load_hf(directory).config


def test_model_gin_for_a_decoder_parses(tmp_path):
  config = ROUND_TRIP_CONFIGS["llama_untied"]
  path = convert.write_model_gin(config, str(tmp_path), "test")
  import gin  # pylint: disable=import-outside-toplevel
  gin.parse_config_files_and_bindings([path], [])
  assert decoder.DecoderConfig() == config


def test_trained_meta_strings_parse_back():
  config = decoder.DecoderConfig(vocab_size=49152, rope_theta=1e5, norm_epsilon=1e-5,
                                 tie_embeddings=False, dtype=jnp.bfloat16)
  meta = {"model": "DecoderOnlyModel", "config": {k: str(v) for k, v in vars(config).items()}}
  parsed = convert.config_from_meta(meta)
  assert parsed == decoder.DecoderConfig(vocab_size=49152, rope_theta=1e5, norm_epsilon=1e-5,
                                         tie_embeddings=False, dtype="bfloat16")
  for rate in (None, 0.0, 0.25):  # Optional[float]: None survives meta and gin as None
    config = decoder.DecoderConfig(attention_dropout_rate=rate)
    assert convert.config_from_meta({"config": imported.config_dict(config)}) == config
    as_strings = {k: str(v) for k, v in imported.config_dict(config).items()}
    assert convert.config_from_meta({"config": as_strings}) == config
    assert f"attention_dropout_rate = {rate!r}" in convert.model_gin(config, "/c")
  with pytest.raises(convert.ConvertError, match="no model config"):
    convert.config_from_meta({"step": 3})
  with pytest.raises(convert.ConvertError, match="num_layers"):
    convert.config_from_meta({"model": "DecoderOnlyModel", "config": {"num_layers": "two"}})


def test_params_round_trip_through_hf_tensors():
  for config in ROUND_TRIP_CONFIGS.values():
    params = _random_params(config, seed=3)
    tensors = hf.hf_tensors_from_params(params, config)
    _assert_same_params(hf.params_from_tensors(tensors, config), params)


# ---- bad input --------------------------------------------------------------------------------

def _copy(hf_dirs, name, tmp_path) -> str:
  target = tmp_path / "bad_src"
  shutil.copytree(hf_dirs[name][0], target)
  return str(target)


def _rewrite_tensors(directory, change):
  path = os.path.join(directory, "model.safetensors")
  tensors = load_file(path)
  change(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def _rewrite_config(directory, change):
  path = os.path.join(directory, "config.json")
  cfg = json.load(open(path))
  change(cfg)
  json.dump(cfg, open(path, "w"))


def _expect_cli_error(tmp_path, source, *patterns):
  out = tmp_path / "out"
  with pytest.raises(cli.expected_errors()) as raised:  # flame-convert exits 2 on these
    _run_cli(f"--from=hf:{source}", f"--to=orbax:{out}")
  message = str(raised.value)
  for pattern in patterns:
    assert pattern in message, (pattern, message)
  assert not out.exists()
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # No staging left.
  return message


def test_missing_tensor_is_named(tmp_path, hf_dirs):
  src = _copy(hf_dirs, "llama_untied", tmp_path)
  _rewrite_tensors(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  _expect_cli_error(tmp_path, src, "missing tensor", "'model.layers.1.mlp.up_proj.weight'",
                    "not in model.safetensors")


def test_untied_head_missing_is_named(tmp_path, hf_dirs):
  src = _copy(hf_dirs, "t5_untied_v11_config", tmp_path)
  _rewrite_tensors(src, lambda t: t.pop("lm_head.weight"))
  _expect_cli_error(tmp_path, src, "missing tensor", "'lm_head.weight'")


def test_shape_mismatch_names_tensor_expected_and_actual(tmp_path, hf_dirs):
  src = _copy(hf_dirs, "llama_tied", tmp_path)
  _rewrite_tensors(src, lambda t: t.update({
      "model.layers.0.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)}))
  _expect_cli_error(tmp_path, src, "'model.layers.0.self_attn.k_proj.weight'",
                    "shape (32, 32)", "expected (16, 32)", "model.safetensors")


def test_unmapped_tensor_is_named(tmp_path, hf_dirs):
  src = _copy(hf_dirs, "llama_tied", tmp_path)
  _rewrite_tensors(src, lambda t: t.update({
      "model.layers.0.self_attn.q_proj.bias": np.zeros((32,), np.float32)}))
  _expect_cli_error(tmp_path, src, "'model.layers.0.self_attn.q_proj.bias'", "no place")


def test_tied_head_that_differs_is_refused(tmp_path, hf_dirs):
  src = _copy(hf_dirs, "llama_tied", tmp_path)
  _rewrite_tensors(src, lambda t: t.update({"lm_head.weight": np.ones((VOCAB, 32), np.float32)}))
  _expect_cli_error(tmp_path, src, "'lm_head.weight'", "model.embed_tokens.weight",
                    "tie_word_embeddings")


def test_unsupported_dtype_is_named(tmp_path, hf_dirs):
  src = _copy(hf_dirs, "llama_tied", tmp_path)
  _rewrite_tensors(src, lambda t: t.update({
      "model.norm.weight": np.ones((32,), np.int8)}))
  _expect_cli_error(tmp_path, src, "'model.norm.weight'", "dtype I8")


@pytest.mark.parametrize("field,value,patterns", [
    ("model_type", "mistral", ["model_type='mistral'", "llama"]),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, ["rope_scaling"]),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4}, ["rope_parameters.rope_type"]),
    ("attention_bias", True, ["attention_bias=True"]),
    ("hidden_act", "gelu", ["hidden_act='gelu'"]),
])
def test_unsupported_llama_config_is_named(tmp_path, hf_dirs, field, value, patterns):
  src = _copy(hf_dirs, "llama_tied", tmp_path)
  _rewrite_config(src, lambda c: c.update({field: value}))
  _expect_cli_error(tmp_path, src, "config.json", *patterns)


@pytest.mark.parametrize("changes,patterns", [
    ({"feed_forward_proj": "relu"}, ["feed_forward_proj='relu'", "gated-gelu"]),
    ({"tie_word_embeddings": True, "scale_decoder_outputs": True}, ["scale_decoder_outputs"]),
])
def test_unsupported_t5_config_is_named(tmp_path, hf_dirs, changes, patterns):
  src = _copy(hf_dirs, "t5_untied", tmp_path)
  _rewrite_config(src, lambda c: c.update(changes))
  _expect_cli_error(tmp_path, src, *patterns)


def test_failed_export_leaves_no_output(tmp_path, hf_dirs, monkeypatch):
  loaded = hf.load_hf(hf_dirs["llama_untied"][0])
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  calls = []
  real = safetensors.numpy.save_file

  def failing(*args, **kwargs):
    calls.append(args[1])
    if len(calls) == 2:
      assert os.path.isfile(calls[0])  # The first shard was written (to staging).
      raise OSError("disk full (simulated)")
    return real(*args, **kwargs)

  monkeypatch.setattr(safetensors.numpy, "save_file", failing)
  with pytest.raises(OSError, match="disk full"):
    hf.save_hf(loaded.params, loaded.config, str(tmp_path / "out"), max_shard_bytes=40_000)
  assert len(calls) == 2
  assert os.listdir(tmp_path) == []  # No output, and the staging directory is gone.
  # Bad parameters are refused before anything is written.
  bad = imported.unflatten({k: v for k, v in imported.flatten(loaded.params).items()
                            if k != ("final_norm", "scale")})
  with pytest.raises(hf.HFCheckpointError, match="final_norm/scale"):
    hf.save_hf(bad, loaded.config, str(tmp_path / "out"))
  assert os.listdir(tmp_path) == []


def test_existing_output_is_refused(tmp_path, hf_dirs):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("x")
  with pytest.raises(cli.expected_errors(), match="not empty"):
    _run_cli(f"--from=hf:{hf_dirs['llama_tied'][0]}", f"--to=orbax:{tmp_path / 'out'}")
  assert os.listdir(tmp_path / "out") == ["keep.txt"]
