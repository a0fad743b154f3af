"""A Hugging Face safetensors model written a batch of parameters at a time, visible only when
complete (`flame-merge --output_format=hf`).

The same contract as `merging.staged_checkpoint.StagedCheckpoint` (which writes Orbax): each
batch becomes one safetensors file in the hidden staging folder ``.<name>.merge-partial`` next
to the output, marked done by a small JSON record once the file is complete; `finalize` names
the files ``model-0000i-of-0000N.safetensors`` (or ``model.safetensors`` when there is one),
writes the index, ``config.json``, ``generation_config.json``, the base's tokenizer files and
``flame_merge.json`` (what was merged, and how), and renames the folder into place. A killed
merge leaves no output folder; rerunning the same merge resumes after the batches written.
Parameters are converted to transformers' names and layout on the way (`flame.checkpoints.hf`).
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Optional, Sequence

import numpy as np

from flame.checkpoints import hf, safetensors_file
from merging import spec as spec_lib, staged_checkpoint
from merging.staged_checkpoint import _remove, _write_json

Key = tuple[str, ...]
MERGE_RECORD = "flame_merge.json"


def staging_dir(output_dir: str) -> str:
  output_dir = os.path.abspath(output_dir).rstrip("/")
  parent, name = os.path.split(output_dir)
  return os.path.join(parent, f".{name}.merge-partial")


def check_output_dir(output_dir: str, overwrite: bool = False) -> None:
  """An HF output folder must be new or empty; with `overwrite`, it may be an HF model folder
  (replaced when the merge is complete). Anything else is never written into."""
  if not os.path.lexists(output_dir):
    return
  if not os.path.isdir(output_dir):
    raise FileExistsError(f"output_dir {output_dir} exists and is not a folder")
  if not os.listdir(output_dir):
    return
  if not overwrite:
    raise FileExistsError(f"output_dir {output_dir} exists and is not empty; pass --overwrite "
                          "to replace a Hugging Face model folder there")
  if not hf.is_hf_directory(output_dir):
    raise FileExistsError(f"output_dir {output_dir} holds files that are not a Hugging Face "
                          f"model ({sorted(os.listdir(output_dir))[:6]}); --overwrite replaces "
                          "only a model folder; merge into a new or empty folder")


class StagedHFModel(staged_checkpoint.Staging):
  """Writes merged parameters of model `config` as a transformers safetensors folder.

  `plan` (JSON-ready) identifies the merge: staging with an equal plan is resumed, anything
  else there is discarded. `keys` must be exactly the parameters of `config` (checked here,
  before anything is written), stored as `dtype`; values come in our layout, or with
  `hf_layout` in transformers' (then only cast).
  """

  def __init__(self, output_dir: str, keys: Sequence[Key], plan: dict, config,
               dtype: np.dtype, overwrite: bool = False,
               extra_config: Optional[dict] = None, tokenizer_from: Optional[str] = None,
               hf_layout: bool = False):
    self.final = os.path.abspath(output_dir).rstrip("/")
    self.overwrite = overwrite
    self._specs = {s.path: s for s in hf.tensor_specs(config)}
    unmapped = [spec_lib.parameter_name(k) for k in keys if tuple(k) not in self._specs]
    missing = ["/".join(p) for p in self._specs if p not in {tuple(k) for k in keys}]
    if unmapped or missing:
      raise hf.HFCheckpointError(
          f"cannot write the merge as a Hugging Face model ({hf._describe(config)}): "  # pylint: disable=protected-access
          + "; ".join(filter(None, [
              f"parameters without a tensor: {unmapped[:6]}" if unmapped else "",
              f"tensors without a parameter: {missing[:6]}" if missing else ""])))
    self.dtype = np.dtype(dtype)
    self.hf_config = hf.hf_config_from(config, self.dtype, extra_config)
    self.tokenizer_from = tokenizer_from
    self.hf_layout = hf_layout  # `write` gets tensors in transformers' layout already
    self._rows_writer: Optional[safetensors_file.SafetensorsWriter] = None
    staging = staging_dir(self.final)
    self._parts = os.path.join(staging, "parts")
    super().__init__(staging, keys, plan, [self._parts])

  def _hf_tensor(self, key: Key, value) -> tuple[str, np.ndarray]:
    spec = self._specs[tuple(key)]
    value = np.asarray(value)
    return spec.name, (value if self.hf_layout else spec.to_hf(value)).astype(self.dtype,
                                                                          copy=False)

  def _part(self, key: Key) -> tuple[str, str]:
    name = f"{self._index[tuple(key)]:06d}"
    return name, os.path.join(self._parts, name + ".safetensors")

  def write(self, keys: Sequence[Key], values: Sequence[Any]) -> None:
    """Writes a batch as one safetensors file; it counts once its record exists."""
    tensors = dict(self._hf_tensor(k, v) for k, v in zip(keys, values))
    name, path = self._part(keys[0])
    writer = safetensors_file.SafetensorsWriter(
        path + ".tmp", {n: (t.dtype, t.shape) for n, t in tensors.items()}, {"format": "pt"})
    for tensor, value in tensors.items():
      writer.write(tensor, value)
    writer.close()
    os.replace(path + ".tmp", path)
    self._record(name, {"indices": [self._index[tuple(k)] for k in keys],
                        "tensors": {n: int(t.nbytes) for n, t in tensors.items()}})

  def write_rows(self, key: Key, rows: tuple[int, int], total_rows: int, value: Any) -> None:
    """Rows [start, stop) of one parameter written a row range at a time (transformers'
    layout only), into a file of its own; it counts once its last rows are written. Row
    ranges come in order; a merge resumed mid-parameter starts it again from row 0."""
    if not self.hf_layout:
      raise ValueError("row ranges are written in transformers' layout only")
    spec = self._specs[tuple(key)]
    name, path = self._part(key)
    if rows[0] == 0:
      shape = (total_rows,) + tuple(np.shape(value)[1:])
      self._rows_writer = safetensors_file.SafetensorsWriter(
          path + ".tmp", {spec.name: (self.dtype, shape)}, {"format": "pt"})
    self._rows_writer.write(spec.name, np.asarray(value).astype(self.dtype, copy=False),
                            start_row=rows[0])
    if rows[1] == total_rows:
      self._rows_writer.close()
      self._rows_writer = None
      os.replace(path + ".tmp", path)
      nbytes = total_rows * int(np.prod(np.shape(value)[1:])) * self.dtype.itemsize
      self._record(name, {"indices": [self._index[tuple(key)]], "tensors": {spec.name: nbytes}})

  def finalize(self, meta: dict) -> str:
    """Assembles the folder and renames it to the output (atomic); returns its path."""
    self._check_complete(self.final)
    model = os.path.join(self.staging, "model")
    _remove(model)  # From an interrupted finalize.
    os.makedirs(model)
    records = self._records_in_order()
    count = len(records)
    weight_map, total = {}, 0
    for i, (part, record) in enumerate(records):
      file_name = (hf.SINGLE_FILE if count == 1
                   else f"model-{i + 1:05d}-of-{count:05d}.safetensors")
      for tensor, nbytes in record["tensors"].items():
        weight_map[tensor] = file_name
        total += nbytes
      os.link(os.path.join(self._parts, part + ".safetensors"), os.path.join(model, file_name))
    if count > 1:
      _write_json(os.path.join(model, hf.INDEX_FILE),
                  {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(os.path.join(model, hf.CONFIG_FILE), self.hf_config)
    generation = hf.generation_config_from(self.hf_config)
    if generation:
      _write_json(os.path.join(model, hf.GENERATION_CONFIG_FILE), generation)
    if self.tokenizer_from:
      hf.copy_tokenizer_files(self.tokenizer_from, model)
    _write_json(os.path.join(model, MERGE_RECORD), meta)
    umask = os.umask(0o022)
    os.umask(umask)
    for name in os.listdir(model):
      os.chmod(os.path.join(model, name), 0o666 & ~umask)  # safetensors writes 0600 files.
    if os.path.isdir(self.final):
      if os.listdir(self.final) and not self.overwrite:
        raise FileExistsError(f"{self.final} appeared while merging; pass --overwrite to "
                              "replace it")
      shutil.rmtree(self.final)
    os.rename(model, self.final)
    shutil.rmtree(self.staging)
    return self.final

  def close(self):
    pass
