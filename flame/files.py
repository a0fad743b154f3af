"""Small file helpers shared across the project: atomic text writes, JSON-lines reads."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any


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
