"""A params checkpoint written a batch of parameters at a time, visible only when complete.

Parameters are written into the hidden staging directory ``OUTPUT_DIR/.merge-<step>-partial``
(Orbax never lists it as a step: not a number). Each batch is saved as an Orbax checkpoint of
those leaves whose OCDBT store is moved into the staged `params` directory; then a small JSON
record (the batch's parameter indices and PyTree metadata entries) marks it done. `finalize`
writes the PyTree metadata of all parameters, lets Orbax merge the per-batch OCDBT stores into
one (as it does for the per-host stores of a multi-host save), adds the `meta` item and the step metadata, and renames
the staged step to ``OUTPUT_DIR/<step>``: a normal checkpoint of our layout
(`flame.checkpoints.manager`). Every step up to that rename can be redone, so a merge killed at
any point leaves no step directory, and rerunning it resumes after the parameters already
written; staging with a different plan (another merge into the same place) is discarded.

Orbax's experimental `partial.save`/`finalize` (0.12.8) does the same but rereads all earlier
pieces on each save and merges metadata in O(P^2)-O(P^3) time in the number of parameters
(minutes at a few hundred), hence this linear version.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from typing import Any, Sequence

import jax
from etils import epath

from flame import distributed, lazy_imports
from flame.checkpoints import imported
from merging import spec as spec_lib

ocp = lazy_imports.lazy_import("orbax.checkpoint")

Key = tuple[str, ...]
_PROCESS_PREFIX = "ocdbt.process_"  # Orbax's per-process OCDBT store prefix.


def _write_json(path: str, value: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f)
  os.replace(tmp, path)


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


def staging_dir(output_dir: str, step: int) -> str:
  """Where an unfinished merge into ``output_dir/<step>`` lives (not a step name to Orbax)."""
  return os.path.join(os.path.abspath(output_dir), f".merge-{step}-partial")


def check_output_dir(output_dir: str) -> None:
  """Refuses an output folder that holds anything but merge outputs (step folders of params
  checkpoints, their staging, config.gin): a training run, a training checkpoint or a
  user's files are never written into."""
  if not os.path.isdir(output_dir):
    if os.path.lexists(output_dir):
      raise FileExistsError(f"output_dir {output_dir} exists and is not a folder")
    return
  names = os.listdir(output_dir)
  foreign = sorted(n for n in names if not (n.isdigit() or n == "config.gin"
                                            or (n.startswith(".merge-") and n.endswith("-partial"))))
  if foreign:
    raise FileExistsError(f"output_dir {output_dir} holds {foreign[:6]}, which a merge did not "
                          "write (a training run or other files); merge into a new or empty "
                          "folder")
  trained = sorted(n for n in names if n.isdigit()
                   and os.path.exists(os.path.join(output_dir, n, "opt_state")))
  if trained:
    raise FileExistsError(f"output_dir {output_dir} holds training checkpoints (steps "
                          f"{trained} have optimizer state); merge into a new or empty folder")


class Staging:
  """The bookkeeping of an output written in batches: a hidden staging folder holding
  `plan.json` (what is being written), one JSON record per finished batch (its parameter
  indices) under ``done/``, and JSON state. Staging left by a killed run with an equal plan is
  resumed; anything else there is discarded. `folders` (besides ``done/``) are created fresh.

  In a multi-process job (the folder shared by every process) process 0 alone opens, records
  and assembles; the others wait for it at barriers and read its records.
  """

  def __init__(self, staging: str, keys: Sequence[Key], plan: dict, folders: Sequence[str]):
    self.staging = staging
    self.keys = [tuple(k) for k in keys]
    self._index = {k: i for i, k in enumerate(self.keys)}
    self._records = os.path.join(self.staging, "done")
    if distributed.is_leader():
      self._done = self._open(json.loads(json.dumps(plan)), [self._records, *folders])
    distributed.barrier(f"staging-open:{self.staging}")
    if not distributed.is_leader():
      self._done = self._read_done()

  def _open(self, plan: dict, folders: Sequence[str]) -> set[int]:
    plan_path = os.path.join(self.staging, "plan.json")
    if (os.path.exists(plan_path) and _read_json(plan_path) == plan and
        all(os.path.isdir(f) for f in folders)):
      done = self._read_done()
      logging.info("resuming the merge in %s: %d of %d parameters already written",
                   self.staging, len(done), len(self.keys))
      return done
    if os.path.exists(self.staging):
      logging.info("discarding %s: left by a different or unfinished merge", self.staging)
      shutil.rmtree(self.staging)
    for directory in folders:
      os.makedirs(directory)
    _write_json(plan_path, plan)
    return set()

  def _read_done(self) -> set[int]:
    return {index for name in os.listdir(self._records) if name.endswith(".json")
            for index in _read_json(os.path.join(self._records, name))["indices"]}

  def done(self, key: Key) -> bool:
    return self._index[tuple(key)] in self._done

  @property
  def num_done(self) -> int:
    return len(self._done)

  def discard_if_empty(self) -> None:
    """Removes the staging folder when nothing was recorded in it (no batch, no state): a merge
    that fails before its first write (a damaged input) leaves nothing behind, while partial
    progress stays for a rerun to resume."""
    if not distributed.is_leader() or self._done or not os.path.isdir(self.staging):
      return
    state = [n for n in os.listdir(self.staging) if n.endswith(".json") and n != "plan.json"]
    if not state:
      _remove(self.staging)

  def load_state(self, name: str) -> Any:
    """A JSON value stored with `save_state` in this staging (None if absent)."""
    path = os.path.join(self.staging, name + ".json")
    return _read_json(path) if os.path.exists(path) else None

  def save_state(self, name: str, value: Any) -> None:
    if distributed.is_leader():
      _write_json(os.path.join(self.staging, name + ".json"), value)

  def _record(self, name: str, record: dict) -> None:
    """Marks a batch done (its record names its parameter `indices`; process 0 writes it)."""
    if distributed.is_leader():
      _write_json(os.path.join(self._records, name + ".json"), record)
    self._done.update(record["indices"])

  def _records_in_order(self) -> list[tuple[str, dict]]:
    return [(name[:-len(".json")], _read_json(os.path.join(self._records, name)))
            for name in sorted(os.listdir(self._records)) if name.endswith(".json")]

  def _check_complete(self, final: str) -> None:
    missing = [spec_lib.parameter_name(k) for k, i in self._index.items() if i not in self._done]
    if missing:
      raise RuntimeError(f"cannot finalize {final}: {len(missing)} parameters not written, "
                         f"e.g. {missing[:3]}")


class StagedCheckpoint(Staging):
  """A params checkpoint written in batches of parameters; visible only after `finalize`.

  `plan` (JSON-ready) identifies the merge: staging left by a killed run with an equal plan is
  resumed, anything else there is discarded. `keys` fixes each parameter's index.
  """

  def __init__(self, output_dir: str, step: int, keys: Sequence[Key], plan: dict,
               overwrite: bool = False):
    self.output_dir = os.path.abspath(output_dir)
    self.step = int(step)
    self.final = os.path.join(self.output_dir, str(self.step))
    self.overwrite = overwrite
    staging = staging_dir(self.output_dir, self.step)
    self._params = os.path.join(staging, "step", "params")
    self._tmp = os.path.join(staging, "tmp")
    self._saver = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    super().__init__(staging, keys, plan, [self._params, self._tmp])

  def write(self, keys: Sequence[Key], values: Sequence[jax.Array]) -> None:
    """Saves a batch of parameters with one Orbax save (blocking); they count as written once
    the batch's record exists. The batch is named by its first parameter's index."""
    indices = [self._index[tuple(k)] for k in keys]
    name = f"{indices[0]:06d}"
    # The batch's OCDBT stores, one per process that wrote shards, keep distinct names.
    store = os.path.join(self._params, f"{_PROCESS_PREFIX}{indices[0]}p")
    leaf_dir = os.path.join(self._tmp, name)
    if distributed.is_leader():
      for stale in glob.glob(os.path.join(self._tmp, name + "*")) + glob.glob(store + "*"):
        _remove(stale)  # Left by a run killed while writing this batch.
    distributed.barrier(f"merge-write:{self.staging}:{name}")
    self._saver.save(epath.Path(leaf_dir), args=ocp.args.StandardSave(
        imported.unflatten({tuple(k): v for k, v in zip(keys, values)})))
    if not distributed.is_leader():
      self._done.update(indices)
      return
    record = dict(_leaf_record(leaf_dir), indices=indices)
    stores = sorted(glob.glob(os.path.join(leaf_dir, _PROCESS_PREFIX + "*")))
    if not stores:
      raise RuntimeError(f"Orbax wrote no OCDBT store in {leaf_dir}")
    for i, written in enumerate(stores):
      os.rename(written, store + (str(i) if i else ""))
    self._record(name, record)
    shutil.rmtree(leaf_dir)

  def finalize(self, meta: dict) -> str:
    """Assembles the staged parameters into ``OUTPUT_DIR/<step>`` (atomic rename)."""
    distributed.barrier(f"merge-written:{self.staging}")
    if distributed.is_leader():
      self._check_complete(self.final)
      self._assemble_params()
    self._write_meta(dict(meta, step=self.step))
    if distributed.is_leader():
      if os.path.exists(self.final):
        if not self.overwrite:
          raise FileExistsError(f"{self.final} appeared while merging; pass overwrite=True to "
                                "replace it")
        shutil.rmtree(self.final)
      os.rename(os.path.join(self.staging, "step"), self.final)
      shutil.rmtree(self.staging)
    distributed.barrier(f"merge-final:{self.staging}")
    return self.final

  def _assemble_params(self) -> None:
    """Writes the PyTree metadata of all parameters and merges their OCDBT stores."""
    for derived in ("_METADATA", "_sharding", "manifest.ocdbt", "d", "array_metadatas"):
      _remove(os.path.join(self._params, derived))  # From an interrupted finalize.
    tree_metadata, shardings, array_metadatas, header = {}, {}, {}, None
    for _, record in self._records_in_order():
      header = header or record["header"]
      tree_metadata.update(record["tree_metadata"])
      shardings.update(record["sharding"])
      for process_file, entries in record["array_metadatas"].items():
        array_metadatas.setdefault(process_file, []).extend(entries)
    _write_json(os.path.join(self._params, "_METADATA"),
                {"tree_metadata": tree_metadata, **header, "custom_metadata": None})
    if shardings:
      _write_json(os.path.join(self._params, "_sharding"), shardings)
    if array_metadatas:
      os.makedirs(os.path.join(self._params, "array_metadatas"))
      for process_file, entries in array_metadatas.items():
        _write_json(os.path.join(self._params, "array_metadatas", process_file),
                    {"array_metadatas": entries})
    ocp.PyTreeCheckpointHandler(use_zarr3=bool(header.get("use_zarr3", False))).finalize(
        epath.Path(self._params))

  def _write_meta(self, meta: dict) -> None:
    """The meta item and the step metadata, written by Orbax next to a scratch step (a save
    every process takes part in; process 0 moves the files)."""
    scratch = os.path.join(self.staging, "scratch")
    if distributed.is_leader():
      _remove(scratch)
    distributed.barrier(f"merge-meta:{self.staging}")
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    scratch_manager = ocp.CheckpointManager(scratch, options=options, item_names=("meta",))
    scratch_manager.save(self.step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta)),
                         force=True)
    scratch_manager.wait_until_finished()
    scratch_manager.close()
    if not distributed.is_leader():
      return
    written = os.path.join(scratch, str(self.step))
    step_dir = os.path.join(self.staging, "step")
    for name in os.listdir(written):
      _remove(os.path.join(step_dir, name))
      os.rename(os.path.join(written, name), os.path.join(step_dir, name))
    step_metadata_path = os.path.join(step_dir, "_CHECKPOINT_METADATA")
    step_metadata = _read_json(step_metadata_path)
    step_metadata.setdefault("item_handlers", {})["params"] = (
        ocp.StandardCheckpointHandler.typestr())
    _write_json(step_metadata_path, step_metadata)
    shutil.rmtree(scratch)

  def close(self):
    self._saver.close()


def _leaf_record(leaf_dir: str) -> dict:
  """The PyTree metadata pieces of a one-leaf Orbax checkpoint, to be merged at finalize."""
  metadata = _read_json(os.path.join(leaf_dir, "_METADATA"))
  sharding_path = os.path.join(leaf_dir, "_sharding")
  arrays_dir = os.path.join(leaf_dir, "array_metadatas")
  return {
      "tree_metadata": metadata["tree_metadata"],
      "header": {k: v for k, v in metadata.items() if k not in ("tree_metadata",
                                                                 "custom_metadata")},
      "sharding": _read_json(sharding_path) if os.path.exists(sharding_path) else {},
      "array_metadatas": {name: _read_json(os.path.join(arrays_dir, name))["array_metadatas"]
                          for name in (os.listdir(arrays_dir) if os.path.isdir(arrays_dir)
                                       else ())},
  }
