"""Gin flags: ``--gin_file=F`` (repeatable) and ``--gin.NAME=VALUE`` overrides.

Gin files are found as given, else relative to the package's `gin_configs/`
folder (so ``--gin_file=quickstart.gin`` and
``--gin_file=models/decoder_tiny.gin`` work from anywhere). Gin's own
``include`` statements search the same folder. ``VALUE`` is a gin literal or
reference (``3``, ``'text'``, ``@f()``, ``%MACRO``); a bare word that is not
one, such as a path, is taken as a string. Unknown names fail at parse time
with gin's message, before any work is done.
"""
from __future__ import annotations

import ast
import logging
import os
import sys
from typing import Optional, Sequence

import gin

from flame import files

GIN_CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "gin_configs")


def find_gin_file(name: str) -> str:
  for candidate in (name, os.path.join(GIN_CONFIGS_DIR, name)):
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  raise FileNotFoundError(f"gin file {name!r} not found as a path or under {GIN_CONFIGS_DIR}")


def split_flags(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
  """(gin files, gin bindings, other args) from a command line."""
  files, bindings, rest = [], [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg == "--gin_file" and i + 1 < len(args):
      files.append(args[i + 1])
      i += 1
    elif arg.startswith("--gin_file="):
      files.append(arg.split("=", 1)[1])
    elif arg.startswith("--gin."):
      name, sep, value = arg[len("--gin."):].partition("=")
      if not sep:
        raise ValueError(f"{arg}: expected --gin.NAME=VALUE")
      bindings.append((name, value))
    else:
      rest.append(arg)
    i += 1
  return files, [_binding(n, v) for n, v in bindings], rest


def _binding(name: str, value: str) -> str:
  text = value.strip()
  if text.startswith(("@", "%")):
    return f"{name} = {text}"
  try:
    ast.literal_eval(text)
    return f"{name} = {text}"
  except (ValueError, SyntaxError):
    return f"{name} = {value!r}"


class _QuietIncludeSearch(logging.Filter):
  """Gin logs an error for every search-path miss of an include; drop those."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Path not found")


logging.getLogger().addFilter(_QuietIncludeSearch())


def parse(gin_files: Sequence[str], bindings: Sequence[str] = (),
          finalize: bool = True) -> None:
  gin.add_config_file_search_path(GIN_CONFIGS_DIR)
  try:
    gin.parse_config_files_and_bindings([find_gin_file(f) for f in gin_files], list(bindings),
                                        finalize_config=finalize)
  except OSError as e:  # gin's "Unable to open file: X. Searched config paths: …" (an include)
    if isinstance(e, FileNotFoundError) or "Unable to open file" not in str(e):
      raise
    raise FileNotFoundError(f"gin include: {' '.join(str(e).split())}") from None


def parse_command_line(argv: Optional[Sequence[str]] = None) -> list[str]:
  """Parses gin flags from argv; returns the remaining arguments."""
  files, bindings, rest = split_flags(sys.argv[1:] if argv is None else argv)
  if not files:
    raise ValueError("at least one --gin_file=FILE is required (see gin_configs/)")
  parse(files, bindings)
  return rest


def write_operative_config(model_dir: str) -> str:
  """Writes the bindings gin has used so far to MODEL_DIR/config.gin (atomic)."""
  os.makedirs(model_dir, exist_ok=True)
  path = os.path.join(model_dir, "config.gin")
  files.write_text_atomically(path, gin.operative_config_str())
  return path


def compute_dtype_bindings(dtype: Optional[str]) -> list[str]:
  """Gin bindings that make every model compute in `dtype` ("float32", "bfloat16"; None:
  none), decoder-only and T5 alike; parameters keep their float32 `param_dtype`."""
  if dtype is None:
    return []
  from flame.models import base, decoder, t5  # pylint: disable=import-outside-toplevel
  base.check_compute_dtype(dtype)
  return [f"{cls.__module__}.{cls.__name__}.dtype = {dtype!r}"
          for cls in (decoder.DecoderConfig, t5.T5Config)]
