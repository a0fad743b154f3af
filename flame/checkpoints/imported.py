"""A model read from an outside format, and writing it as an Orbax checkpoint.

Importers (`gguf.py`, `hf.py`) return an `ImportedModel`: the model config
(`DecoderConfig` or `T5Config`), the parameters as the plain nested dict of
numpy arrays our models use, and a description of the source (file, sha256
when known, format). `write_orbax` stores it as a params-only checkpoint at
step 0 that `train.init_params_from` and `Checkpointer.restore_params` read.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import tempfile
from typing import Any, Mapping

import numpy as np

from flame.checkpoints import manager


@dataclasses.dataclass
class ImportedModel:
  config: Any  # flame.models.decoder.DecoderConfig | flame.models.t5.T5Config
  params: dict  # plain nested dict of np.ndarray, our parameter layout
  source: dict  # e.g. {"format": "gguf", "file": ..., "sha256": ...}


def config_dict(config: Any) -> dict[str, Any]:
  """JSON-ready fields of a model config plus its class name (checkpoint meta).

  dtypes are stored by name ("bfloat16"); other non-JSON values as str().
  """
  def plain(name: str, value: Any) -> Any:
    if value is None or isinstance(value, (int, float, bool, str)):
      return value
    if name.endswith("dtype"):
      return np.dtype(value).name
    return str(value)
  return {"class": type(config).__name__,
          **{k: plain(k, v) for k, v in dataclasses.asdict(config).items()}}


STAGING_PREFIX = ".import-"
OWNER_FILE = "owner.json"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale_staging(parent: str) -> list[str]:
  """Removes the staging folders of imports killed on this host (their process is gone);
  returns them. Folders of live imports, or of other hosts, are left alone."""
  removed = []
  for name in os.listdir(parent) if os.path.isdir(parent) else []:
    path = os.path.join(parent, name)
    if not name.startswith(STAGING_PREFIX) or not os.path.isdir(path):
      continue
    try:
      with open(os.path.join(path, OWNER_FILE), encoding="utf-8") as f:
        owner = json.load(f)
    except (OSError, ValueError):
      continue  # not ours to judge
    if owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1))):
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
  return removed


def write_orbax(model: ImportedModel, directory: str, step: int = 0) -> str:
  """Writes a params-only checkpoint to `directory`/<step>, atomically.

  The checkpoint is first written to a temporary sibling directory and moved
  into place only when complete, so a failure leaves nothing behind; the
  staging folder of an import killed earlier is removed by the next one.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and os.listdir(directory):
    raise FileExistsError(f"{directory} exists and is not empty; choose a new output directory")
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  remove_stale_staging(parent)
  staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent)
  with open(os.path.join(staging, OWNER_FILE), "w", encoding="utf-8") as f:
    json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
  try:
    checkpointer = manager.Checkpointer(os.path.join(staging, "ckpt"), async_save=False)
    meta = {"source": model.source, "config": config_dict(model.config)}
    checkpointer.save(step, {"params": model.params}, meta, force=True)
    checkpointer.wait()
    checkpointer.close()
    if os.path.exists(directory):
      os.rmdir(directory)
    os.replace(os.path.join(staging, "ckpt"), directory)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return directory


def flatten(params: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...],
                                                                             np.ndarray]:
  """{('layers_0', 'attention', 'query'): array, …} from the nested dict."""
  flat = {}
  for key, value in params.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  nested: dict = {}
  for path, value in flat.items():
    node = nested
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return nested
