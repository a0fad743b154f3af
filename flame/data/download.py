"""Public data files: upstream address + sha256, found in a mirror or a cache.

`resolve("truthfulqa_judge/finetune_truth_dev.jsonl")` returns a local path to
the verified file, looking in order at

1. the mirror folder (``FLAME_DATA_MIRROR`` or `set_mirror_dir`), e.g. a
   byte-identical copy of the upstream files for offline machines;
2. the cache (``FLAME_DATA_CACHE``, default ``~/.cache/flame/data``);
3. the upstream address, downloaded into the cache (atomically) when online.

Every file is checked against its recorded sha256; a mismatch is refused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import urllib.request
from typing import Optional

MIRROR_ENV = "FLAME_DATA_MIRROR"
CACHE_ENV = "FLAME_DATA_CACHE"


@dataclasses.dataclass(frozen=True)
class RemoteFile:
  repo: str  # owner/name on GitHub
  commit: str
  path: str  # inside the repository
  sha256: str
  license: str

  @property
  def url(self) -> str:
    return f"https://raw.githubusercontent.com/{self.repo}/{self.commit}/{self.path}"


_TRUTHFULQA = ("yizhongw/truthfulqa_reeval", "2de12d7832345d6bf97bc9050bdae48c50e67bf0")

# Local name (relative to the mirror root) → upstream file.
FILES: dict[str, RemoteFile] = {
    "truthfulqa_judge/finetune_truth_train.jsonl": RemoteFile(
        *_TRUTHFULQA, "data/finetune_truth_train.jsonl",
        "6b57271582f6a877fdd869ee604581d3694b6193e9a8e307f3695836f0b10d15", "Apache-2.0"),
    "truthfulqa_judge/finetune_truth_dev.jsonl": RemoteFile(
        *_TRUTHFULQA, "data/finetune_truth_dev.jsonl",
        "4469a6a91f23a2d98eff26d0d8464970b278b2f9cfc80b132fe807ef06932810", "Apache-2.0"),
}

_mirror_override: Optional[str] = None


class DataFileError(RuntimeError):
  """A data file is unknown, unavailable or fails its checksum."""


def set_mirror_dir(path: Optional[str]) -> None:
  global _mirror_override
  _mirror_override = path


def mirror_dir() -> Optional[str]:
  return _mirror_override or os.environ.get(MIRROR_ENV)


def cache_dir() -> str:
  return os.environ.get(CACHE_ENV, os.path.join(os.path.expanduser("~"), ".cache", "flame",
                                                "data"))


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _verified(path: str, name: str, remote: RemoteFile) -> str:
  actual = sha256_of(path)
  if actual != remote.sha256:
    raise DataFileError(f"{path}: sha256 {actual} does not match the recorded {remote.sha256} "
                        f"for {name} ({remote.url}); the file is corrupt or a different version")
  return path


def _download(url: str, dest: str) -> None:
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".partial-")
  try:
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
      for chunk in iter(lambda: response.read(1 << 20), b""):
        out.write(chunk)
    os.replace(tmp, dest)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def resolve(name: str) -> str:
  """Local, checksum-verified path of the registered file `name`."""
  if name not in FILES:
    raise DataFileError(f"unknown data file {name!r}; registered: {sorted(FILES)}")
  remote = FILES[name]
  mirror = mirror_dir()
  if mirror and os.path.exists(os.path.join(mirror, name)):
    return _verified(os.path.join(mirror, name), name, remote)
  cached = os.path.join(cache_dir(), name)
  if os.path.exists(cached):
    return _verified(cached, name, remote)
  try:
    _download(remote.url, cached)
  except OSError as e:
    where = f"the mirror {mirror} has no {name} and " if mirror else "no mirror is set and "
    raise DataFileError(
        f"data file {name} is not available: {where}downloading {remote.url} failed ({e}). "
        f"Either set {MIRROR_ENV} to a folder holding {name} (e.g. ../shared/data/raw), or "
        f"go online so it can be downloaded into {cache_dir()}") from e
  return _verified(cached, name, remote)
