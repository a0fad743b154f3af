"""The GGUF file format (llama.cpp's): a reader with errors that name the file, and metadata.

A file format, not a checkpoint: `flame.tokenizers` reads a GGUF's tokenizer through this
module, `flame.checkpoints.gguf` its weights.
"""
from __future__ import annotations

import os
from typing import Any

REQUIRED = object()


class GGUFError(ValueError):
  """A GGUF file cannot be imported: unreadable, unsupported or inconsistent."""


def open_reader(path: str):
  """A `gguf.GGUFReader` for `path`, with errors that name the file."""
  import gguf  # pylint: disable=import-outside-toplevel

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no GGUF file at {path}")
  try:
    reader = gguf.GGUFReader(path, "r")
  except Exception as e:  # the reader raises ValueError, IndexError, KeyError, … on bad bytes
    raise GGUFError(f"cannot read GGUF file {path} (truncated or corrupt?): "
                    f"{type(e).__name__}: {e}") from e
  size = os.path.getsize(path)
  for tensor in reader.tensors:
    end = tensor.data_offset + tensor.n_bytes
    if tensor.data.nbytes != tensor.n_bytes or end > size:
      raise GGUFError(f"cannot read GGUF file {path} (truncated or corrupt?): tensor "
                      f"{tensor.name!r} needs bytes {tensor.data_offset}..{end} but the file has "
                      f"{size} bytes")
  return reader


def field_value(reader, key: str, default: Any = REQUIRED) -> Any:
  """The value of metadata `key` (scalars, strings, lists), or `default` if absent."""
  field = reader.get_field(key)
  if field is None:
    if default is REQUIRED:
      raise GGUFError(f"GGUF file {reader.data.filename} has no metadata key {key!r}")
    return default
  try:
    return field.contents()
  except Exception as e:
    raise GGUFError(f"GGUF file {reader.data.filename}: cannot decode metadata {key!r}: "
                    f"{type(e).__name__}: {e}") from e
