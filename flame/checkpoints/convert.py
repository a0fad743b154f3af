"""``flame-convert``: model checkpoints between GGUF, Hugging Face safetensors and Orbax.

::

  python -m flame.checkpoints.convert --from=gguf:FILE   --to=orbax:DIR
  python -m flame.checkpoints.convert --from=hf:HF_DIR   --to=orbax:DIR
  python -m flame.checkpoints.convert --from=orbax:DIR[/STEP] --to=hf:HF_DIR [--dtype=bfloat16]

(or ``flame-convert …``). An import (gguf / hf → orbax) writes a params-only
Orbax checkpoint at step 0 (`imported.write_orbax`) plus ``DIR/model.gin``,
the gin bindings of the model it holds, and prints that path: add it as a
``--gin_file`` of ``flame-train`` with ``--gin.train.init_params_from=DIR`` to
fine-tune from the checkpoint. An export (orbax → hf) rebuilds the model
config from the checkpoint's meta — the one an import stored, or the
``{field: str(value)}`` dict ``flame.train`` stores — restores the parameters
onto one device and writes a directory transformers' ``from_pretrained``
loads (`hf.save_hf`). gguf / hf → hf works too (no Orbax in between).
Outputs are written atomically: a failed conversion leaves no output directory.
Jax runs on CPU unless ``JAX_PLATFORMS`` is set.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Any, Mapping, Optional, Sequence

if __name__ == "__main__":
  # `python -m flame.checkpoints.convert` runs this file as __main__; run the importable
  # module instead so that anything registered at import (gin) is registered once.
  from flame.checkpoints import convert as _importable
  _importable.console_main()

from flame import cli, files

KINDS_FROM = ("gguf", "hf", "orbax")
KINDS_TO = ("orbax", "hf")
MODEL_GIN = "model.gin"
_DTYPE = re.compile(r"(bfloat16|float16|float32|float64)")


class ConvertError(ValueError):
  """A conversion cannot be done as asked (bad location, unknown config, …)."""


def parse_location(text: str, kinds: Sequence[str], flag: str) -> tuple[str, str]:
  """'hf:/path' → ('hf', '/path'), with kinds checked."""
  kind, sep, path = text.partition(":")
  if not sep or kind not in kinds or not path:
    raise ConvertError(f"{flag}={text!r}: expected KIND:PATH with KIND one of {', '.join(kinds)}")
  return kind, os.path.abspath(os.path.expanduser(path))


# ---- model configs from checkpoint meta ---------------------------------------------------

def _config_classes() -> dict[str, type]:
  from flame.models import decoder, t5  # pylint: disable=import-outside-toplevel
  return {"DecoderConfig": decoder.DecoderConfig, "T5Config": t5.T5Config}


_MODEL_TO_CONFIG = {"DecoderOnlyModel": "DecoderConfig", "EncoderDecoderModel": "T5Config"}


def _parse_field(cls_name: str, field: dataclasses.Field, value: Any) -> Any:
  kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
  text = value if isinstance(value, str) else None
  try:
    if kind == "bool":
      if isinstance(value, bool):
        return value
      if text in ("True", "true", "1"):
        return True
      if text in ("False", "false", "0"):
        return False
      raise ValueError(value)
    if kind == "int":
      if isinstance(value, bool):
        raise ValueError(value)
      return int(value)
    if kind == "float":
      return float(value)
    if kind == "Optional[float]":
      return None if value in (None, "None") else float(value)
  except (TypeError, ValueError):
    raise ConvertError(f"{cls_name}.{field.name}: cannot read {value!r} as {kind}") from None
  if field.name in ("dtype", "param_dtype") and text is not None:
    match = _DTYPE.search(text)  # "bfloat16", "<class 'jax.numpy.bfloat16'>", "dtype('float32')"
    return match.group(1) if match else text
  return value


def config_from_fields(cls_name: str, fields: Mapping[str, Any]):
  """A `DecoderConfig` / `T5Config` from its fields as stored in checkpoint meta.

  Values may be typed (an import's `imported.config_dict`) or the strings
  ``flame.train`` writes (``str(value)``: "64", "1e-05", "True", "float32").
  """
  classes = _config_classes()
  if cls_name not in classes:
    raise ConvertError(f"unknown model config class {cls_name!r}; known: {sorted(classes)}")
  cls = classes[cls_name]
  known = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(fields) - set(known) - {"class"})
  if unknown:
    raise ConvertError(f"checkpoint meta has {cls_name} fields {unknown} that this version of "
                       f"flame does not know")
  return cls(**{name: _parse_field(cls_name, known[name], value)
                for name, value in fields.items() if name in known})


def config_from_meta(meta: Mapping[str, Any], where: str = "checkpoint"):
  """The model config an Orbax checkpoint's meta describes (imported or trained)."""
  fields = meta.get("config")
  if not isinstance(fields, Mapping) or not fields:
    raise ConvertError(f"{where}: its meta has no model config (keys: {sorted(meta)}); only "
                       "checkpoints written by flame-convert / flame.checkpoints.imported or by "
                       "flame.train can be exported")
  cls_name = fields.get("class") or _MODEL_TO_CONFIG.get(meta.get("model"))
  if cls_name is None:
    raise ConvertError(f"{where}: meta names model {meta.get('model')!r}; exportable: "
                       f"{sorted(_MODEL_TO_CONFIG)}")
  return config_from_fields(cls_name, fields)


def abstract_params(config) -> Any:
  """Shapes and dtypes of the model's parameters (no allocation), placed on one device (in a
  multi-process job, replicated on every device: `manager.default_placement`)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flame.checkpoints import manager  # pylint: disable=import-outside-toplevel
  from flame.models import decoder, t5  # pylint: disable=import-outside-toplevel

  tokens = jnp.zeros((1, 1), jnp.int32)
  if isinstance(config, decoder.DecoderConfig):
    init = lambda rng: decoder.Decoder(config).init(rng, tokens)  # noqa: E731
  elif isinstance(config, t5.T5Config):
    init = lambda rng: t5.Transformer(config).init(rng, tokens, tokens)  # noqa: E731
  else:
    raise ConvertError(f"no model for {type(config).__name__}")
  boxed = jax.eval_shape(init, jax.random.PRNGKey(0))["params"]
  sharding = manager.default_placement()
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), nn.meta.unbox(boxed))


def _checkpoint_location(path: str, step: Optional[int]) -> tuple[str, Optional[int]]:
  """(checkpoint directory, step) from DIR, DIR/<step> or a MODEL_DIR holding checkpoints/."""
  path = path.rstrip("/")
  base, last = os.path.split(path)
  if last.isdigit() and os.path.isdir(os.path.join(path, "params")):
    if step is not None and step != int(last):
      raise ConvertError(f"--step={step} contradicts the checkpoint path {path}")
    return base, int(last)
  nested = os.path.join(path, "checkpoints")
  if os.path.isdir(nested) and not any(n.isdigit() for n in os.listdir(path)):
    return nested, step  # A flame.train MODEL_DIR.
  return path, step


def checkpoint_step(path: str, step: Optional[int] = None):
  """(read-only Checkpointer, step) of DIR, DIR/<step> or a MODEL_DIR; the latest step unless
  one is given. A missing folder or step raises `manager.CheckpointError` naming it."""
  from flame.checkpoints import manager  # pylint: disable=import-outside-toplevel
  directory, step = _checkpoint_location(os.path.abspath(path), step)
  checkpointer = manager.Checkpointer(directory, read_only=True)
  return checkpointer, checkpointer._step_or_latest(step)  # pylint: disable=protected-access


def read_orbax(path: str, step: Optional[int] = None):
  """(config, params as numpy, meta) of an Orbax checkpoint (latest step unless given)."""
  import jax  # pylint: disable=import-outside-toplevel

  checkpointer, step = checkpoint_step(path, step)
  meta = checkpointer.restore_meta(step)
  config = config_from_meta(meta, os.path.join(checkpointer.directory, str(step)))
  params = checkpointer.restore_params(abstract_params(config), step)
  return config, jax.device_get(params), meta


# ---- gin ----------------------------------------------------------------------------------

def _gin_value(value: Any) -> str:
  if value is None:
    return "None"
  if isinstance(value, bool):
    return "True" if value else "False"
  if isinstance(value, (int, float)):
    return repr(value)
  return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def model_gin(config, checkpoint_dir: str, source: str = "") -> str:
  """Gin bindings that build the model `config` describes (MODEL = …)."""
  from flame.models import decoder  # pylint: disable=import-outside-toplevel

  if isinstance(config, decoder.DecoderConfig):
    module, model, cls = "flame.models.decoder", "decoder.DecoderOnlyModel", "decoder.DecoderConfig"
  else:
    module, model, cls = "flame.models.t5", "t5.EncoderDecoderModel", "t5.T5Config"
  gin_path = os.path.join(checkpoint_dir, MODEL_GIN)
  lines = [f"# The model of the Orbax checkpoint {checkpoint_dir}",
           f"# ({source})," if source else "#", "# written by flame-convert. Fine-tune from it:",
           f"#   flame-train --gin_file=RUN.gin --gin_file={gin_path} \\",
           f"#     --gin.train.init_params_from={checkpoint_dir} --gin.MODEL_DIR=…",
           "# The vocabulary is the model class's default (bytes) unless bound to the",
           "# checkpoint's tokenizer, e.g. for SmolLM2 (after `import flame.tokenizers`):",
           f"#   {model}.vocabulary = @tokenizers.smollm2_vocabulary()",
           f"import {module}", "", f"MODEL = @{model}()", f"{model}.config = @{cls}()"]
  lines += [f"{cls}.{f.name} = {_gin_value(getattr(config, f.name))}"
            for f in dataclasses.fields(config)]
  return "\n".join(lines) + "\n"


def write_model_gin(config, checkpoint_dir: str, source: str = "") -> str:
  path = os.path.join(checkpoint_dir, MODEL_GIN)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(model_gin(config, checkpoint_dir, source))
  os.replace(tmp, path)
  return path


# ---- the command --------------------------------------------------------------------------

def _load(kind: str, path: str, args):
  """(config, params, source dict) from a gguf / hf / orbax location."""
  if kind == "gguf":
    from flame.checkpoints import gguf  # pylint: disable=import-outside-toplevel
    import inspect  # pylint: disable=import-outside-toplevel
    kwargs = ({"with_sha256": not args.no_sha256}
              if "with_sha256" in inspect.signature(gguf.load_gguf).parameters else {})
    model = gguf.load_gguf(path, **kwargs)
    return model.config, model.params, model.source
  if kind == "hf":
    from flame.checkpoints import hf  # pylint: disable=import-outside-toplevel
    model = hf.load_hf(path, with_sha256=not args.no_sha256, progress=not args.no_progress)
    return model.config, model.params, model.source
  config, params, meta = read_orbax(path, args.step)
  return config, params, meta.get("source") if isinstance(meta.get("source"), dict) else None


def _describe_source(kind: str, path: str) -> str:
  return f"imported from {kind}:{path}"


def _check_output(path: str):
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise FileExistsError(f"{path} exists and is not empty; choose a new output directory")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="flame-convert",
      description="Model checkpoints between GGUF, Hugging Face safetensors and Orbax.",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="examples:\n"
             "  flame-convert --from=hf:./SmolLM2-135M --to=orbax:/tmp/smollm2\n"
             "  flame-convert --from=orbax:/tmp/run/checkpoints/300 --to=hf:/tmp/run_hf\n")
  parser.add_argument("--from", dest="source", required=True,
                      help="gguf:FILE | hf:DIR (config.json + safetensors) | "
                           "orbax:DIR[/STEP] (a checkpoint dir, one step, or a flame.train "
                           "MODEL_DIR)")
  parser.add_argument("--to", dest="target", required=True, help="orbax:DIR | hf:DIR (new)")
  parser.add_argument("--step", type=int, default=None,
                      help="orbax source: the step to export (default: latest)")
  parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                      help="hf output: stored dtype (default: the parameters' own, float32)")
  parser.add_argument("--max_shard_size", default="2GiB",
                      help="hf output: largest safetensors shard (default 2GiB; e.g. 500MB)")
  parser.add_argument("--tokenizer_from", default=None,
                      help="hf output: copy tokenizer files from this HF directory (default: "
                           "the imported HF source directory if it still exists; 'none' to "
                           "skip)")
  parser.add_argument("--no_sha256", action="store_true",
                      help="gguf / hf source: skip hashing the source files for the meta")
  parser.add_argument("--no_progress", action="store_true", help="no progress bars")
  return parser


def convert(args) -> dict[str, Any]:
  """Runs one conversion; returns what it wrote."""
  from flame.checkpoints import hf, imported  # pylint: disable=import-outside-toplevel

  src_kind, src = parse_location(args.source, KINDS_FROM, "--from")
  dst_kind, dst = parse_location(args.target, KINDS_TO, "--to")
  if src_kind == dst_kind == "orbax":
    raise ConvertError("--from and --to are both orbax; nothing to convert")
  tokenizer_from = args.tokenizer_from if (args.tokenizer_from or "none").lower() != "none" else None
  files.check_output("--to", dst, [("--from", src), ("--tokenizer_from", tokenizer_from)])
  if args.step is not None and src_kind != "orbax":
    raise ConvertError("--step applies to an orbax source only")
  max_shard = files.parse_size(args.max_shard_size, '--max_shard_size')
  _check_output(dst)  # Before any work.

  config, params, source = _load(src_kind, src, args)
  written: dict[str, Any] = {"output": dst, "config": config}
  if dst_kind == "orbax":
    imported.write_orbax(imported.ImportedModel(config, params, source), dst)
    written["gin"] = write_model_gin(config, dst, _describe_source(src_kind, src))
  else:
    hf_source = source if (source or {}).get("format") == "hf-safetensors" else {}
    hf.save_hf(params, config, dst, max_shard_bytes=max_shard, dtype=args.dtype,
               extra_config=hf_source.get("hf_config"),
               generation_config=hf_source.get("generation_config"),
               progress=not args.no_progress)
    tokenizer_dir = args.tokenizer_from
    if tokenizer_dir is None and hf_source.get("directory"):
      tokenizer_dir = hf_source["directory"] if os.path.isdir(hf_source["directory"]) else None
    if tokenizer_dir and tokenizer_dir.lower() != "none":
      written["tokenizer_files"] = hf.copy_tokenizer_files(tokenizer_dir, dst)
  return written


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Command line entry point: converts, prints what it wrote and returns `convert`'s dict."""
  args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
  # Conversion is host work: keep jax off accelerators (which a training job may hold)
  # unless JAX_PLATFORMS says otherwise. No effect if jax is already initialised.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  written = convert(args)
  config = written["config"]
  print(f"wrote {written['output']} ({type(config).__name__}: "
        + ", ".join(f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config)
                    if f.name not in ("dtype", "param_dtype")) + ")")
  if "gin" in written:
    print(f"model gin: {written['gin']}")
  if written.get("tokenizer_files"):
    print(f"tokenizer files: {', '.join(written['tokenizer_files'])}")
  return written


def console_main() -> None:
  """`flame-convert`: exit 0 after a conversion, 2 on an expected error (see `flame.cli`)."""
  cli.console("flame-convert", main)
