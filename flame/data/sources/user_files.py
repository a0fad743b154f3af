"""Builders over a user's own local file instead of a registered download.

A registered source names its files in ``FILES`` (upstream address and sha256 in
`flame.data.download`) and its tasks in ``TASKS``. A user-file builder has neither: its
builder config (a `UserFileConfig`) carries the task spec, the file's path and, optionally,
the sha256 the file must have. ``BUILDER_CONFIGS`` is empty, so every use passes a config::

  tfds.builder("flame_jsonl_pairwise", config=JsonlPairwiseConfig(name="my_prefs",
               path="prefs.jsonl", capability="quality"), data_dir=...)

When preparing, the file's sha256 is computed and, if the config gives one, compared: a
mismatch is refused (`download.DataFileError`). The path, the sha256 actually read and the
license the config states go into ``info.metadata["upstream"]``. A prepared dataset is
identified by the config's name and the release, as for every TFDS builder: a file changed
after preparing is refused (its sha256 differs from the recorded one); prepare into a fresh
data_dir (or give the config a new name). Reading a prepared
dataset back needs the same config, or ``tfds.builder_from_directory``.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from flame import files
from flame.data import download, format
from flame.data.sources import base

USER_FILE = "user_file"  # The key of the file in the `paths` given to `rows`.
UNSPECIFIED_LICENSE = "unspecified (user data)"


class UserFileConfig(base.TaskConfig):
  """A task whose examples come from the local file `path` (checked against `sha256`)."""

  def __init__(self, spec: format.TaskSpec, path: str | os.PathLike, sha256: Optional[str] = None,
               license: str = UNSPECIFIED_LICENSE):  # pylint: disable=redefined-builtin
    super().__init__(spec)
    self.path = os.fspath(path)
    self.sha256 = sha256.strip().lower() if sha256 else None
    self.license = license


def verified_path(path: str, expected_sha256: Optional[str]) -> tuple[str, str]:
  """(path, its sha256); refuses a missing file or one whose sha256 is not the expected."""
  if not os.path.isfile(path):
    raise download.DataFileError(f"{path}: no such file")
  actual = files.sha256_of(path)
  if expected_sha256 and actual != expected_sha256:
    raise download.DataFileError(f"{path}: sha256 {actual} does not match the expected "
                                 f"{expected_sha256} given in the builder config; the file "
                                 "changed or is a different version")
  return path, actual


class UserFileBuilder(base.SourceBuilder):
  """Base of the builders over a user's file; subclasses read ``paths[USER_FILE]``."""

  def __init__(self, **kwargs):
    config = kwargs.get("config")
    if not isinstance(config, UserFileConfig):
      raise ValueError(f"builder {self.name!r} reads a user's file: pass config=<a "
                       f"UserFileConfig naming the task and the path>, got {config!r}")
    self._source: dict[str, Any] = {"path": os.path.abspath(config.path),
                                    "sha256": config.sha256, "license": config.license}
    super().__init__(**kwargs)

  @property
  def user_config(self) -> UserFileConfig:
    return self.builder_config

  def upstream(self) -> list[dict[str, Any]]:
    return [self._source]  # The same dict: `_local_files` records the sha256 it reads.

  def download_and_prepare(self, *args, **kwargs):
    """Prepares once; a file that changed since (its sha256 differs from the one recorded
    when the dataset was prepared) is refused rather than served stale."""
    if self.data_path.exists():
      recorded = next((entry.get("sha256") for entry in self.info.metadata.get("upstream", [])
                       if entry.get("path") == self._source["path"]), None)
      if recorded and os.path.isfile(self._source["path"]):
        current = files.sha256_of(self._source["path"])
        if current != recorded:
          raise download.DataFileError(
              f"{self._source['path']} changed since its dataset was prepared in "
              f"{self.data_path} (sha256 {recorded[:12]}… then, {current[:12]}… now): prepare "
              "it into a fresh data_dir, or give the config a new name")
    return super().download_and_prepare(*args, **kwargs)

  def _local_files(self, dl_manager) -> dict[str, str]:
    path, sha256 = verified_path(self.user_config.path, self.user_config.sha256)
    self._source["sha256"] = sha256
    return {USER_FILE: path}
