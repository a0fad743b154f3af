"""Hugging Face safetensors checkpoints in and out: Llama-family decoders and T5 v1.1.

`load_hf(directory)` reads a transformers model directory (``config.json``
plus ``model.safetensors`` or shards listed in ``model.safetensors.index.json``)
of a ``LlamaForCausalLM`` (``model_type: llama``) or a T5 v1.1 / Flan-T5
``T5ForConditionalGeneration`` (``model_type: t5``, gated-GELU) and returns an
`imported.ImportedModel` in our parameter layout (float32). Every name, shape
and dtype is checked from the safetensors headers before any tensor is read;
then tensors are read one at a time, so an import needs the memory of the
output plus the largest tensor. `save_hf(params, config, directory)` writes the
reverse: safetensors (sharded above `max_shard_bytes`, with an index),
``config.json`` and ``generation_config.json`` that transformers'
``from_pretrained`` loads; the directory appears only when complete.

Layout facts (transformers' modeling code, safetensors names):

- Linear weights are ``[out_features, in_features]``; ours are
  ``[in, (heads, head_dim) | out]`` kernels, so every projection is a
  transpose plus a reshape. Llama's q/k projections use the same
  "rotate half" RoPE layout as `layers.apply_rope`: no row permutation.
- Llama: ``model.embed_tokens.weight`` [vocab, embed]; ``lm_head.weight``
  [vocab, embed] is absent (or equal to the embedding) when
  ``tie_word_embeddings`` is true.
- T5: ``shared.weight`` is the one input embedding;
  ``encoder.embed_tokens.weight`` / ``decoder.embed_tokens.weight``, when
  present, must equal it. The relative position bias lives only in block 0 of
  each stack (``…block.0.layer.0.SelfAttention.relative_attention_bias``).
  v1.1 has an untied ``lm_head.weight`` and no ``d_model**-0.5`` rescaling of
  the decoder output: released v1.1 configs say ``tie_word_embeddings:
  false``; transformers 5.x writes ``tie_word_embeddings: true`` with
  ``scale_decoder_outputs: false`` and still stores ``lm_head.weight`` when it
  differs from ``shared.weight`` (it then loads it untied). A config that
  implies rescaling (the original T5 recipe) is refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import threading
from typing import Any, Callable, Mapping, Optional

import numpy as np

from flame.checkpoints import imported, safetensors_file
from flame.models import scan
from flame import files as file_utils

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 << 30  # 2 GiB

# safetensors dtypes we read (converted to float32).
SUPPORTED_DTYPES = ("F32", "F16", "BF16", "F64")
# HF tensors that transformers itself ignores on load (no parameter in the model).
IGNORED_TENSORS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
# Files copied from a Hugging Face directory by `copy_tokenizer_files`.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.jinja")


class HFCheckpointError(ValueError):
  """A Hugging Face checkpoint cannot be converted: unsupported, incomplete or inconsistent."""


# ---- configs ------------------------------------------------------------------------------

def _require(cfg: Mapping[str, Any], key: str, where: str) -> Any:
  if key not in cfg or cfg[key] is None:
    raise HFCheckpointError(f"{where}: missing required field {key!r}")
  return cfg[key]


def _refuse(where: str, field: str, value: Any, supported: str):
  raise HFCheckpointError(f"{where}: unsupported {field}={value!r} (supported: {supported})")


def _llama_config(cfg: Mapping[str, Any], where: str):
  from flame.models import decoder  # pylint: disable=import-outside-toplevel

  act = cfg.get("hidden_act", "silu")
  if act != "silu":
    _refuse(where, "hidden_act", act, "'silu'")
  for field in ("attention_bias", "mlp_bias"):
    if cfg.get(field, False):
      _refuse(where, field, cfg[field], "false (our decoder has no biases)")
  scaling = cfg.get("rope_scaling")
  rope_params = cfg.get("rope_parameters") or {}
  if scaling not in (None, {}) and (not isinstance(scaling, Mapping) or scaling.get(
      "rope_type", scaling.get("type")) != "default"):
    _refuse(where, "rope_scaling", scaling, "null (plain RoPE)")
  rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
  if rope_type != "default":
    _refuse(where, "rope_parameters.rope_type", rope_type, "'default' (plain RoPE)")
  partial = rope_params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    _refuse(where, "partial_rotary_factor", partial, "1.0")
  emb = int(_require(cfg, "hidden_size", where))
  heads = int(_require(cfg, "num_attention_heads", where))
  head_dim = cfg.get("head_dim") or emb // heads
  theta = rope_params.get("rope_theta", cfg.get("rope_theta", 10000.0))
  return decoder.DecoderConfig(
      vocab_size=int(_require(cfg, "vocab_size", where)), emb_dim=emb,
      num_layers=int(_require(cfg, "num_hidden_layers", where)), num_heads=heads,
      num_kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=int(head_dim),
      mlp_dim=int(_require(cfg, "intermediate_size", where)), rope_theta=float(theta),
      norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def t5_scales_decoder_output(cfg: Mapping[str, Any]) -> bool:
  """Whether transformers multiplies the T5 decoder output by d_model**-0.5 for `cfg`."""
  if "scale_decoder_outputs" in cfg:
    return bool(cfg["scale_decoder_outputs"])
  return cfg.get("tie_word_embeddings", True) is not False


def _t5_config(cfg: Mapping[str, Any], where: str):
  from flame.models import t5  # pylint: disable=import-outside-toplevel

  proj = cfg.get("feed_forward_proj", "relu")
  if proj != "gated-gelu":
    _refuse(where, "feed_forward_proj", proj, "'gated-gelu' (T5 v1.1 / Flan-T5)")
  act = cfg.get("dense_act_fn", "gelu_new")
  if act not in ("gelu_new", "gelu_pytorch_tanh"):
    _refuse(where, "dense_act_fn", act, "'gelu_new' (tanh GELU)")
  if cfg.get("is_gated_act", True) is not True:
    _refuse(where, "is_gated_act", cfg["is_gated_act"], "true")
  if t5_scales_decoder_output(cfg):
    raise HFCheckpointError(
        f"{where}: tie_word_embeddings={cfg.get('tie_word_embeddings', '<absent: true>')!r} with "
        f"scale_decoder_outputs={cfg.get('scale_decoder_outputs', '<absent>')!r} means a tied "
        "head and d_model**-0.5 decoder-output scaling (the original T5 recipe); flame's T5 "
        "v1.1 has an untied head and no scaling (supported: tie_word_embeddings=false, or "
        "scale_decoder_outputs=false)")
  if cfg.get("is_encoder_decoder", True) is not True:
    _refuse(where, "is_encoder_decoder", cfg["is_encoder_decoder"], "true")
  layers = int(_require(cfg, "num_layers", where))
  return t5.T5Config(
      vocab_size=int(_require(cfg, "vocab_size", where)), emb_dim=int(_require(cfg, "d_model",
                                                                               where)),
      num_heads=int(_require(cfg, "num_heads", where)), num_encoder_layers=layers,
      num_decoder_layers=int(cfg.get("num_decoder_layers") or layers),
      head_dim=int(_require(cfg, "d_kv", where)), mlp_dim=int(_require(cfg, "d_ff", where)),
      dropout_rate=float(cfg.get("dropout_rate", 0.1)),
      relative_attention_num_buckets=int(cfg.get("relative_attention_num_buckets", 32)),
      relative_attention_max_distance=int(cfg.get("relative_attention_max_distance", 128)),
      norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-6)))


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "t5": "T5ForConditionalGeneration"}


def config_from_hf(cfg: Mapping[str, Any], where: str = CONFIG_FILE):
  """`DecoderConfig` (model_type llama) or `T5Config` (model_type t5) from a config.json dict."""
  model_type = cfg.get("model_type")
  if model_type not in _ARCHITECTURES:
    _refuse(where, "model_type", model_type, "'llama' (LlamaForCausalLM), 't5' (T5 v1.1 "
            "T5ForConditionalGeneration)")
  archs = cfg.get("architectures") or [_ARCHITECTURES[model_type]]
  if _ARCHITECTURES[model_type] not in archs:
    _refuse(where, "architectures", archs, repr([_ARCHITECTURES[model_type]]))
  return (_llama_config if model_type == "llama" else _t5_config)(cfg, where)


def _dtype_name(dtype: Any) -> str:
  return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[
      np.dtype(dtype).name]


def hf_config_from(config, dtype: Any = "float32", extra: Optional[Mapping[str, Any]] = None
                   ) -> dict[str, Any]:
  """config.json for our config; `extra` (e.g. token ids from an imported config.json) may
  fill the fields our config does not determine (token ids, max_position_embeddings)."""
  from flame.models import decoder, t5  # pylint: disable=import-outside-toplevel

  extra = dict(extra or {})
  name = _dtype_name(dtype)
  if isinstance(config, decoder.DecoderConfig):
    c = config
    out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "vocab_size": c.vocab_size, "hidden_size": c.emb_dim,
           "intermediate_size": c.mlp_dim, "num_hidden_layers": c.num_layers,
           "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
           "head_dim": c.head_dim, "hidden_act": "silu", "rms_norm_eps": c.norm_epsilon,
           "rope_theta": c.rope_theta,  # transformers 4.x
           "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},  # 5.x
           "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
           "attention_dropout": 0.0, "tie_word_embeddings": c.tie_embeddings,
           "max_position_embeddings": int(extra.get("max_position_embeddings") or 2048),
           "initializer_range": 0.02, "use_cache": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
      if extra.get(key) is not None:
        out[key] = extra[key]
  elif isinstance(config, t5.T5Config):
    c = config
    if c.num_heads * c.head_dim <= 0:
      raise HFCheckpointError(f"bad T5 config {c}")
    out = {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
           "vocab_size": c.vocab_size, "d_model": c.emb_dim, "d_kv": c.head_dim,
           "d_ff": c.mlp_dim, "num_layers": c.num_encoder_layers,
           "num_decoder_layers": c.num_decoder_layers, "num_heads": c.num_heads,
           "relative_attention_num_buckets": c.relative_attention_num_buckets,
           "relative_attention_max_distance": c.relative_attention_max_distance,
           "dropout_rate": c.dropout_rate, "layer_norm_epsilon": c.norm_epsilon,
           "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
           "is_encoder_decoder": True,
           # Untied head, no decoder-output scaling (transformers 4.x and 5.x read it so).
           "tie_word_embeddings": False, "scale_decoder_outputs": False,
           "initializer_factor": 1.0, "use_cache": True,
           "pad_token_id": extra.get("pad_token_id", 0), "eos_token_id": extra.get(
               "eos_token_id", 1),
           "decoder_start_token_id": extra.get("decoder_start_token_id", 0)}
  else:
    raise HFCheckpointError(f"no Hugging Face layout for {type(config).__name__}")
  out["dtype"] = name  # transformers 5.x
  out["torch_dtype"] = name  # transformers 4.x
  return out


def generation_config_from(hf_config: Mapping[str, Any]) -> Optional[dict[str, Any]]:
  keys = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
  out = {k: hf_config[k] for k in keys if hf_config.get(k) is not None}
  return out or None


# ---- tensor mapping -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One HF tensor ↔ one of our parameters."""
  name: str  # HF name
  path: tuple[str, ...]  # our parameter path
  hf_shape: tuple[int, ...]
  ours_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _linear(name, path, ours_shape, in_dims: int = 1):
  """HF [out, in] weight ↔ our kernel `ours_shape` = [in dims..., out dims...]."""
  in_size = int(np.prod(ours_shape[:in_dims]))
  out_size = int(np.prod(ours_shape[in_dims:]))
  return TensorSpec(name, path, (out_size, in_size), tuple(ours_shape),
                    lambda w: w.T.reshape(ours_shape),
                    lambda p: np.asarray(p).reshape(in_size, out_size).T)


def _same(name, path, shape):
  return TensorSpec(name, path, tuple(shape), tuple(shape), lambda w: w,
                    lambda p: np.asarray(p))


def _embedding_transposed(name, path, vocab, emb):
  """HF [vocab, embed] head ↔ our [embed, vocab] logits kernel."""
  return TensorSpec(name, path, (vocab, emb), (emb, vocab), lambda w: w.T,
                    lambda p: np.asarray(p).T)


def _llama_specs(c) -> list[TensorSpec]:
  e, h, kv, d, m = c.emb_dim, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim
  specs = [_same("model.embed_tokens.weight", ("token_embedder", "embedding"),
                 (c.vocab_size, e))]
  for i in range(c.num_layers):
    p, o = f"model.layers.{i}.", (f"layers_{i}",)
    specs += [
        _same(p + "input_layernorm.weight", o + ("pre_attention_norm", "scale"), (e,)),
        _linear(p + "self_attn.q_proj.weight", o + ("attention", "query"), (e, h, d)),
        _linear(p + "self_attn.k_proj.weight", o + ("attention", "key"), (e, kv, d)),
        _linear(p + "self_attn.v_proj.weight", o + ("attention", "value"), (e, kv, d)),
        _linear(p + "self_attn.o_proj.weight", o + ("attention", "out"), (h, d, e), 2),
        _same(p + "post_attention_layernorm.weight", o + ("pre_mlp_norm", "scale"), (e,)),
        _linear(p + "mlp.gate_proj.weight", o + ("mlp", "wi_0", "kernel"), (e, m)),
        _linear(p + "mlp.up_proj.weight", o + ("mlp", "wi_1", "kernel"), (e, m)),
        _linear(p + "mlp.down_proj.weight", o + ("mlp", "wo", "kernel"), (m, e))]
  specs.append(_same("model.norm.weight", ("final_norm", "scale"), (e,)))
  if not c.tie_embeddings:
    specs.append(_embedding_transposed("lm_head.weight", ("logits_dense", "kernel"),
                                       c.vocab_size, e))
  return specs


def _t5_specs(c) -> list[TensorSpec]:
  e, h, d, m = c.emb_dim, c.num_heads, c.head_dim, c.mlp_dim

  def attention(prefix, ours):
    return [_linear(f"{prefix}.{hf}.weight", ours + (name,), (e, h, d))
            for name, hf in (("query", "q"), ("key", "k"), ("value", "v"))] + [
                _linear(f"{prefix}.o.weight", ours + ("out",), (h, d, e), 2)]

  def mlp(prefix, ours):
    return [_linear(f"{prefix}.DenseReluDense.wi_0.weight", ours + ("wi_0", "kernel"), (e, m)),
            _linear(f"{prefix}.DenseReluDense.wi_1.weight", ours + ("wi_1", "kernel"), (e, m)),
            _linear(f"{prefix}.DenseReluDense.wo.weight", ours + ("wo", "kernel"), (m, e))]

  def norm(name, ours):
    return _same(name, ours + ("scale",), (e,))

  buckets = c.relative_attention_num_buckets
  specs = [_same("shared.weight", ("token_embedder", "embedding"), (c.vocab_size, e))]
  for stack, n in (("encoder", c.num_encoder_layers), ("decoder", c.num_decoder_layers)):
    specs.append(_same(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                       (stack, "relpos_bias", "embedding"), (buckets, h)))
    for i in range(n):
      p, o = f"{stack}.block.{i}.layer", (stack, f"layers_{i}")
      if stack == "encoder":
        specs += ([norm(f"{p}.0.layer_norm.weight", o + ("pre_attention_norm",))]
                  + attention(f"{p}.0.SelfAttention", o + ("attention",))
                  + [norm(f"{p}.1.layer_norm.weight", o + ("pre_mlp_norm",))]
                  + mlp(f"{p}.1", o + ("mlp",)))
      else:
        specs += ([norm(f"{p}.0.layer_norm.weight", o + ("pre_self_attention_norm",))]
                  + attention(f"{p}.0.SelfAttention", o + ("self_attention",))
                  + [norm(f"{p}.1.layer_norm.weight", o + ("pre_cross_attention_norm",))]
                  + attention(f"{p}.1.EncDecAttention", o + ("cross_attention",))
                  + [norm(f"{p}.2.layer_norm.weight", o + ("pre_mlp_norm",))]
                  + mlp(f"{p}.2", o + ("mlp",)))
    specs.append(norm(f"{stack}.final_layer_norm.weight", (stack, "final_norm")))
  specs.append(_embedding_transposed("lm_head.weight", ("decoder", "logits_dense", "kernel"),
                                     c.vocab_size, e))
  return specs


def tensor_specs(config) -> list[TensorSpec]:
  """Every HF tensor of `config`'s model, in a stable order, with its mapping."""
  from flame.models import decoder, t5  # pylint: disable=import-outside-toplevel

  if isinstance(config, decoder.DecoderConfig):
    return _llama_specs(config)
  if isinstance(config, t5.T5Config):
    return _t5_specs(config)
  raise HFCheckpointError(f"no Hugging Face layout for {type(config).__name__}")


def _aliases(config) -> dict[str, str]:
  """Optional HF tensors that are copies of another one: {name: source name}.

  They are read only to check that they equal their source.
  """
  from flame.models import decoder  # pylint: disable=import-outside-toplevel

  if isinstance(config, decoder.DecoderConfig):
    return {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_embeddings else {}
  return {"encoder.embed_tokens.weight": "shared.weight",
          "decoder.embed_tokens.weight": "shared.weight"}


def _t5_head_may_be_tied(config, hf_config: Optional[Mapping[str, Any]]) -> bool:
  from flame.models import t5  # pylint: disable=import-outside-toplevel

  return (isinstance(config, t5.T5Config) and hf_config is not None
          and hf_config.get("tie_word_embeddings", True) is not False
          and not t5_scales_decoder_output(hf_config))


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
  shape: tuple[int, ...]
  dtype: str  # safetensors dtype name: F32, BF16, …
  file: str


def _plan(config, tensors: Mapping[str, _TensorInfo], hf_config: Optional[Mapping[str, Any]],
          where: str, files: str = "the given tensors"
          ) -> tuple[list[TensorSpec], dict[str, str], list[str], bool]:
  """Checks names, shapes and dtypes; returns (specs, aliases to check, ignored, head_from_shared).

  Raises `HFCheckpointError` naming the file and tensor on any mismatch.
  """
  specs = tensor_specs(config)
  by_name = {s.name: s for s in specs}
  aliases = _aliases(config)
  head_from_shared = False
  if "lm_head.weight" not in tensors and _t5_head_may_be_tied(config, hf_config):
    by_name.pop("lm_head.weight")  # transformers ties it to shared.weight.
    head_from_shared = True
  ignored = [n for n in tensors if n in IGNORED_TENSORS]
  for name, info in tensors.items():
    if name in by_name or name in ignored:
      expected = by_name[name].hf_shape if name in by_name else None
    elif name in aliases:
      expected = by_name[aliases[name]].hf_shape
    else:
      raise HFCheckpointError(
          f"{where}: tensor {name!r} (in {info.file}) has no place in our "
          f"{type(config).__name__} model ({_describe(config)}); it is not converted")
    if info.dtype not in SUPPORTED_DTYPES:
      raise HFCheckpointError(f"{where}: tensor {name!r} (in {info.file}) has dtype {info.dtype}; "
                              f"supported: {', '.join(SUPPORTED_DTYPES)}")
    if expected is not None and tuple(info.shape) != tuple(expected):
      raise HFCheckpointError(f"{where}: tensor {name!r} (in {info.file}) has shape "
                              f"{tuple(info.shape)}, expected {tuple(expected)} for "
                              f"{_describe(config)}")
  missing = [n for n in by_name if n not in tensors]
  if missing:
    raise HFCheckpointError(f"{where}: missing tensor{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(repr(n) for n in missing[:8])}"
                            f"{f' and {len(missing) - 8} more' if len(missing) > 8 else ''}"
                            f" (not in {files}), needed by {_describe(config)}")
  present_aliases = {n: aliases[n] for n in tensors if n in aliases}
  return list(by_name.values()), present_aliases, ignored, head_from_shared


def _describe(config) -> str:
  from flame.models import decoder  # pylint: disable=import-outside-toplevel

  if isinstance(config, decoder.DecoderConfig):
    return (f"Llama config: {config.num_layers} layers, width {config.emb_dim}, "
            f"{config.num_heads} heads / {config.num_kv_heads} KV heads of {config.head_dim}, "
            f"MLP {config.mlp_dim}, vocab {config.vocab_size}, "
            f"{'tied' if config.tie_embeddings else 'untied'} embeddings")
  return (f"T5 config: {config.num_encoder_layers}+{config.num_decoder_layers} layers, width "
          f"{config.emb_dim}, {config.num_heads} heads of {config.head_dim}, MLP "
          f"{config.mlp_dim}, vocab {config.vocab_size}")


def _convert_tensors(config, tensors: Mapping[str, _TensorInfo],
                     read: Callable[[str], np.ndarray], plan: tuple, where: str,
                     progress: bool = False) -> dict:
  """Our parameters from the tensors `_plan` checked (`plan` is its result)."""
  specs, aliases, _, head_from_shared = plan
  flat: dict[tuple[str, ...], np.ndarray] = {}
  by_name = {s.name: s for s in specs}
  order = [s.name for s in specs] + sorted(aliases)
  bar = _progress(len(order), progress, "read tensors")
  try:
    for name in order:
      w = np.asarray(read(name))
      w = w.astype(np.float32, copy=False) if w.dtype != np.float32 else w
      if name in aliases:
        source = by_name[aliases[name]]
        if not np.array_equal(source.to_hf(flat[source.path]), w):
          raise HFCheckpointError(
              f"{where}: tensor {name!r} (in {tensors[name].file}) differs from "
              f"{aliases[name]!r}, which it must equal (tied weights"
              f"{'; tie_word_embeddings is true' if name == 'lm_head.weight' else ''})")
      else:
        spec = by_name[name]
        flat[spec.path] = np.ascontiguousarray(spec.to_ours(w), dtype=np.float32)
      del w
      bar.update(1)
  finally:
    bar.close()
  if head_from_shared:
    flat[("decoder", "logits_dense", "kernel")] = np.ascontiguousarray(
        flat[("token_embedder", "embedding")].T)
  return imported.unflatten(flat)


def params_from_tensors(tensors: Mapping[str, Any], config,
                        hf_config: Optional[Mapping[str, Any]] = None) -> dict:
  """Our parameters from in-memory HF tensors (e.g. a transformers ``state_dict()`` as numpy).

  Same checks as `load_hf`: every tensor mapped, none missing, shapes match,
  tied copies equal.
  """
  arrays = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
            for k, v in tensors.items()}
  names = {"float32": "F32", "float16": "F16", "float64": "F64", "bfloat16": "BF16"}
  infos = {k: _TensorInfo(tuple(a.shape), names.get(a.dtype.name, a.dtype.name), "<memory>")
           for k, a in arrays.items()}
  plan = _plan(config, infos, hf_config, "tensors")
  return _convert_tensors(config, infos, arrays.__getitem__, plan, "tensors")


def hf_tensors_from_params(params: Mapping[str, Any], config) -> dict[str, np.ndarray]:
  """The HF state dict (numpy, [out, in] weights) of our parameters; the inverse of
  `params_from_tensors`."""
  flat = imported.flatten(scan.to_layout(params, "unrolled"))  # HF layers are unrolled.
  _check_params(flat, config)
  return {s.name: np.ascontiguousarray(s.to_hf(np.asarray(flat[s.path])))
          for s in tensor_specs(config)}


def _check_params(flat: Mapping[tuple[str, ...], Any], config):
  specs = tensor_specs(config)
  expected = {s.path: s.ours_shape for s in specs}
  for path, value in flat.items():
    if path not in expected:
      raise HFCheckpointError(f"parameter {'/'.join(path)} has no Hugging Face tensor in "
                              f"{_describe(config)}")
    if tuple(np.shape(value)) != expected[path]:
      raise HFCheckpointError(f"parameter {'/'.join(path)} has shape {tuple(np.shape(value))}, "
                              f"expected {expected[path]} for {_describe(config)}")
  missing = [p for p in expected if p not in flat]
  if missing:
    raise HFCheckpointError(f"parameters missing for {_describe(config)}: "
                            f"{', '.join('/'.join(p) for p in missing[:8])}")


def _progress(total: int, enabled: bool, desc: str):
  """Progress over `total` tensors: a bar on a terminal, log lines in a log."""
  from flame import progress  # pylint: disable=import-outside-toplevel
  return progress.bar(total, desc, "tensor", enabled)


# ---- reading ------------------------------------------------------------------------------

def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except json.JSONDecodeError as e:
    raise HFCheckpointError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(value, dict):
    raise HFCheckpointError(f"{path}: expected a JSON object")
  return value


def _safetensors_files(directory: str) -> list[str]:
  index = os.path.join(directory, INDEX_FILE)
  if os.path.isfile(index):
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise HFCheckpointError(f"{index} has no weight_map")
    files = sorted(set(weight_map.values()))
    for f in files:
      if os.path.basename(f) != f or not os.path.isfile(os.path.join(directory, f)):
        raise HFCheckpointError(f"{index} lists shard {f!r}, which is not a file in {directory}")
    return files
  if os.path.isfile(os.path.join(directory, SINGLE_FILE)):
    return [SINGLE_FILE]
  present = sorted(f for f in os.listdir(directory) if f.endswith((".safetensors", ".bin", ".pt")))
  raise HFCheckpointError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}"
                          f"{f' (found {present}; only safetensors are read)' if present else ''}")


_NUMPY_DTYPES = safetensors_file.DTYPE_NAMES


class HFDirectory:
  """A transformers safetensors directory opened for reading, tensor by tensor.

  `open_hf` checks config.json, the index and every tensor's name, shape and dtype from the
  safetensors headers; no tensor data is read until `read_tensor` / `read_parameter`.
  """

  def __init__(self, directory: str, hf_config: dict, config, files: list[str],
               tensors: dict[str, "_TensorInfo"]):
    self.directory, self.hf_config, self.config = directory, hf_config, config
    self.files, self.tensors = files, tensors
    self._handles: dict[str, Any] = {}
    self._lock = threading.Lock()
    described = files[0] if len(files) == 1 else f"any of the {len(files)} shards in {INDEX_FILE}"
    self.plan = _plan(config, tensors, hf_config, directory, described)
    self.specs, _, self.ignored, self.head_from_shared = self.plan
    # Our parameter path -> (its mapping, the HF tensor holding it).
    self._parameters = {s.path: (s, s.name) for s in self.specs}
    if self.head_from_shared:
      head = next(s for s in tensor_specs(config) if s.name == "lm_head.weight")
      self._parameters[head.path] = (head, "shared.weight")

  def read_tensor(self, name: str, rows: Optional[tuple[int, int]] = None) -> np.ndarray:
    """HF tensor `name` as stored (numpy; bfloat16 via ml_dtypes), or rows [start, stop) of
    its first axis, read with positioned reads into a fresh array: no memory map stays
    behind, so memory holds only what the caller keeps."""
    info = self.tensors[name]
    with self._lock:
      if info.file not in self._handles:
        self._handles[info.file] = safetensors_file.SafetensorsReader(
            os.path.join(self.directory, info.file))
      handle = self._handles[info.file]
    try:
      return handle.read(name, rows)
    except safetensors_file.SafetensorsError as e:
      raise HFCheckpointError(str(e)) from e

  def parameters(self) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """{our parameter path: (our shape, stored dtype)} of every parameter the tensors hold."""
    import ml_dtypes  # pylint: disable=import-outside-toplevel  # registers bfloat16
    del ml_dtypes
    return {path: (spec.ours_shape, np.dtype(_NUMPY_DTYPES[self.tensors[name].dtype]))
            for path, (spec, name) in self._parameters.items()}

  def tensor_name(self, path: tuple[str, ...]) -> Optional[str]:
    """The HF tensor that holds our parameter `path` (None if none does)."""
    return self._parameters[path][1] if path in self._parameters else None

  def hf_shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(self._parameters[path][0].hf_shape)

  def read_parameter(self, path: tuple[str, ...]) -> np.ndarray:
    """Our parameter `path` in our layout and the stored dtype (one tensor read)."""
    spec, name = self._parameters[path]
    return np.ascontiguousarray(spec.to_ours(self.read_tensor(name)))

  def close(self):
    with self._lock:
      for handle in self._handles.values():
        handle.close()
      self._handles.clear()


def is_hf_directory(path: str) -> bool:
  """Whether `path` looks like a transformers model directory (config.json + safetensors)."""
  return (os.path.isfile(os.path.join(path, CONFIG_FILE))
          and (os.path.isfile(os.path.join(path, SINGLE_FILE))
               or os.path.isfile(os.path.join(path, INDEX_FILE))))


def open_hf(directory: str) -> HFDirectory:
  """Opens a transformers Llama / T5 v1.1 safetensors directory (headers checked, no data).

  Raises `HFCheckpointError` (a ValueError) naming the file, tensor, field, expected and
  actual shape.
  """
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel

  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no Hugging Face model directory at {directory}")
  config_path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise HFCheckpointError(f"{directory} has no {CONFIG_FILE}")
  hf_config = _read_json(config_path)
  config = config_from_hf(hf_config, config_path)
  files = _safetensors_files(directory)

  tensors: dict[str, _TensorInfo] = {}
  for fname in files:
    path = os.path.join(directory, fname)
    try:
      with safe_open(path, framework="numpy") as f:
        for key in f.keys():
          if key in tensors:
            raise HFCheckpointError(f"tensor {key!r} is in both {tensors[key].file} and {fname}")
          sl = f.get_slice(key)
          tensors[key] = _TensorInfo(tuple(int(x) for x in sl.get_shape()), str(sl.get_dtype()),
                                     fname)
    except HFCheckpointError:
      raise
    except Exception as e:  # safetensors raises SafetensorError, OSError, … on bad bytes.
      raise HFCheckpointError(f"cannot read safetensors file {path} (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from e
  if len(files) > 1 or os.path.isfile(os.path.join(directory, INDEX_FILE)):
    weight_map = _read_json(os.path.join(directory, INDEX_FILE))["weight_map"]
    for key, fname in weight_map.items():
      if key not in tensors or tensors[key].file != fname:
        actual = "not in any shard" if key not in tensors else f"in {tensors[key].file}"
        raise HFCheckpointError(f"{os.path.join(directory, INDEX_FILE)} says tensor {key!r} is "
                                f"in {fname}, but it is {actual}")
    unlisted = sorted(set(tensors) - set(weight_map))
    if unlisted:
      raise HFCheckpointError(f"{os.path.join(directory, INDEX_FILE)} does not list tensors "
                              f"{unlisted[:8]} found in the shards")
  return HFDirectory(directory, hf_config, config, files, tensors)


def source_description(opened: HFDirectory, with_sha256: bool = True) -> dict:
  """The `source` record of a checkpoint made from `opened` (files, sizes, sha256, configs)."""
  directory = opened.directory
  generation_path = os.path.join(directory, GENERATION_CONFIG_FILE)
  return {
      "format": "hf-safetensors", "directory": directory,
      "files": [{"name": f, "bytes": os.path.getsize(os.path.join(directory, f)),
                 "sha256": file_utils.sha256_of(os.path.join(directory, f)) if with_sha256 else None}
                for f in opened.files],
      "model_type": opened.hf_config.get("model_type"),
      "dtypes": sorted({t.dtype for t in opened.tensors.values()}),
      "ignored_tensors": opened.ignored,
      "hf_config": opened.hf_config,
      "generation_config": _read_json(generation_path) if os.path.isfile(generation_path)
                           else None}


def load_hf(directory: str, with_sha256: bool = True, progress: bool = False
            ) -> imported.ImportedModel:
  """Reads a transformers Llama / T5 v1.1 safetensors directory as float32 parameters.

  Raises `HFCheckpointError` (a ValueError) naming the file, tensor, field,
  expected and actual shape, before reading any tensor data.
  """
  opened = open_hf(directory)
  try:
    params = _convert_tensors(opened.config, opened.tensors, opened.read_tensor, opened.plan,
                              opened.directory, progress)
  finally:
    opened.close()
  return imported.ImportedModel(config=opened.config, params=params,
                                source=source_description(opened, with_sha256))


# ---- writing ------------------------------------------------------------------------------

def _shard_groups(names_and_bytes: list[tuple[str, int]], max_shard_bytes: int
                  ) -> list[list[str]]:
  groups: list[list[str]] = [[]]
  size = 0
  for name, nbytes in names_and_bytes:
    if groups[-1] and size + nbytes > max_shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append(name)
    size += nbytes
  return groups


def _target_dtype(dtype: Any):
  if dtype is None:
    return None
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
  table = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
           "bfloat16": np.dtype(ml_dtypes.bfloat16)}
  if name not in table:
    raise HFCheckpointError(f"unsupported output dtype {dtype!r}; supported: {sorted(table)}")
  return table[name]


def save_hf(params: Mapping[str, Any], config, directory: str,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: Any = None,
            extra_config: Optional[Mapping[str, Any]] = None,
            generation_config: Optional[Mapping[str, Any]] = None,
            progress: bool = False) -> str:
  """Writes `params` as a transformers model directory; returns its path.

  `dtype` (None: the parameters' own, else float32 / bfloat16 / float16) is
  the stored dtype. Tensors are grouped in order into shards of at most
  `max_shard_bytes` (a larger tensor gets a shard of its own); more than one
  shard adds ``model.safetensors.index.json``. Everything is written to a
  temporary sibling directory that is renamed into place when complete, so a
  failure leaves no `directory` behind. `directory` must not exist or be empty.
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
    raise FileExistsError(f"{directory} exists and is not empty; choose a new output directory")
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  target = _target_dtype(dtype)
  flat = imported.flatten(scan.to_layout(params, "unrolled"))  # HF layers are unrolled.
  _check_params(flat, config)  # Before writing anything.
  specs = tensor_specs(config)
  stored_dtypes = {np.dtype(target or np.asarray(flat[s.path]).dtype) for s in specs}
  if len(stored_dtypes) != 1:
    raise HFCheckpointError(f"parameters have mixed dtypes {sorted(map(str, stored_dtypes))}; "
                            "pass dtype= to store them in one")
  stored = stored_dtypes.pop()
  hf_config = hf_config_from(config, stored, extra_config)
  itemsize = stored.itemsize
  groups = _shard_groups([(s.name, int(np.prod(s.hf_shape)) * itemsize) for s in specs],
                         max_shard_bytes)
  by_name = {s.name: s for s in specs}
  n = len(groups)
  file_names = ([SINGLE_FILE] if n == 1 else
                [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])

  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  umask = os.umask(0o022)
  os.umask(umask)
  file_mode = 0o666 & ~umask
  staging = tempfile.mkdtemp(prefix=".hf-export-", dir=parent)
  try:
    out = os.path.join(staging, "model")
    os.mkdir(out)
    weight_map, total = {}, 0
    bar = _progress(len(specs), progress, "write tensors")
    for fname, group in zip(file_names, groups):
      shard = {}
      for name in group:
        spec = by_name[name]
        w = spec.to_hf(np.asarray(flat[spec.path]))
        shard[name] = np.ascontiguousarray(w.astype(stored, copy=False))
        total += shard[name].nbytes
        weight_map[name] = fname
        bar.update(1)
      save_file(shard, os.path.join(out, fname), metadata={"format": "pt"})
      del shard
      os.chmod(os.path.join(out, fname), file_mode)  # safetensors writes 0600 files.
    bar.close()
    if n > 1:
      with open(os.path.join(out, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2,
                  sort_keys=True)
    with open(os.path.join(out, CONFIG_FILE), "w", encoding="utf-8") as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)
    generation = dict(generation_config) if generation_config else generation_config_from(
        hf_config)
    if generation:
      with open(os.path.join(out, GENERATION_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(generation, f, indent=2, sort_keys=True)
    if os.path.isdir(directory):
      os.rmdir(directory)  # Empty (checked above).
    os.replace(out, directory)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return directory


def copy_tokenizer_files(source_dir: str, directory: str) -> list[str]:
  """Copies the tokenizer files of a Hugging Face directory that exist; returns their names."""
  copied = []
  for name in TOKENIZER_FILES:
    path = os.path.join(source_dir, name)
    if os.path.isfile(path):
      shutil.copy2(path, os.path.join(directory, name))
      copied.append(name)
  return copied

