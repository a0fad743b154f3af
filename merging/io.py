"""Streaming merge of checkpoints in batches of parameters, written incrementally.

Inputs are checkpoints in our layout (`flame.checkpoints.manager`), each given as ``DIR``
(latest step) or ``DIR/<step>``, or Hugging Face safetensors folders (`HFSource`: config.json
plus safetensors, read tensor by tensor with `flame.checkpoints.hf`'s name and shape checks);
the two kinds mix freely when their parameters match. The output is an Orbax checkpoint, or
with ``output_format="hf"`` a safetensors folder (`merging.staged_hf`); from HF folders into
one, tensors stay in transformers' layout throughout. `stream_merge`:

  1. reads every checkpoint's `params` metadata (keys, shapes, dtypes; no arrays) and refuses
     a missing key, an extra key or a different shape, naming the checkpoint, the key and
     both shapes, before anything is written (dtypes may differ; compute is float32);
  2. for global trimming (`MergeSpec.global_trim`), streams the task vectors through
     `merging.topk` (two extra passes per threshold array) to get the model-wide thresholds;
  3. cuts the parameters, in key order, into batches of up to half of `memory_budget` bytes
     (inputs of every checkpoint plus the output; `plan_batches`), and for each batch: reads
     it from the base and every expert (one Orbax partial restore per checkpoint, placed with
     the target sharding; the checkpoints in parallel), merges each parameter
     (`merging.spec.merge_tensor`) and writes the batch (one Orbax save). I/O overlaps the
     merging (`_Pipeline`): the next batch is read while this one is merged, and the merged
     one is written in the background while the next is merged;
  4. finalizes: the output appears as ``OUTPUT_DIR/<step>/{params, meta}`` by one rename.

Host memory therefore follows the budget (plus one parameter's merge temporaries), not the
model: few large Orbax calls instead of one per parameter, and never the whole model.

The output is atomic and resumable (`merging.staged_checkpoint`): a killed merge leaves no
step directory Orbax would list, and rerunning the same merge resumes after the parameters
already written.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import itertools
import logging
import math
import os
import sys
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np
from etils import epath

from flame import distributed, files, lazy_imports, progress
from flame.checkpoints import convert, hf, imported, manager
from merging import host_select, spec as spec_lib, staged_checkpoint, staged_hf

ocp = lazy_imports.lazy_import("orbax.checkpoint")

Key = tuple[str, ...]
ShardingFn = Callable[[Key, tuple[int, ...]], jax.sharding.Sharding]

_MAX_PROBLEMS = 10


class MergeInputError(ValueError):
  """The checkpoints to merge do not have the same parameters (keys and shapes)."""


# ---------------------------------------------------------------------------------------------
# Sources.


@dataclasses.dataclass(frozen=True)
class Source:
  """One input checkpoint: where it is and its parameters' shapes and dtypes."""
  path: str  # as given, made absolute
  directory: str  # the Checkpointer directory
  step: int
  shapes: dict[Key, jax.ShapeDtypeStruct]

  @property
  def location(self) -> str:
    """The checkpoint step folder (recorded in the merge's plan and meta)."""
    return os.path.join(self.directory, str(self.step))

  @property
  def params_dir(self) -> str:
    return os.path.join(self.location, "params")

  def tensor_name(self, key: Key) -> Optional[str]:  # pylint: disable=unused-argument
    return None

  def meta(self) -> dict:
    """The checkpoint's meta item (model config, source), {} when it has none."""
    checkpointer = manager.Checkpointer(self.directory, read_only=True)
    try:
      return checkpointer.restore_meta(self.step)
    except manager.CheckpointError as e:
      logging.warning("%s has no readable meta (%s); the merged meta records no model config",
                      self.location, e)
      return {}
    finally:
      checkpointer.close()

  def reader(self, hf_layout: bool = False) -> "ParameterReader":
    if hf_layout:
      raise ValueError(f"{self.location} is an Orbax checkpoint: no Hugging Face layout")
    return ParameterReader(self)


@dataclasses.dataclass(frozen=True)
class HFSource:
  """One input given as a Hugging Face safetensors folder (read tensor by tensor)."""
  path: str
  opened: hf.HFDirectory
  shapes: dict[Key, jax.ShapeDtypeStruct]

  @property
  def location(self) -> str:
    return self.path

  def tensor_name(self, key: Key) -> Optional[str]:
    return self.opened.tensor_name(key)

  def hf_shape(self, key: Key) -> tuple[int, ...]:
    """The shape of the tensor holding `key` (transformers' layout)."""
    return self.opened.hf_shape(key)

  def meta(self) -> dict:
    """What `flame-convert --from=hf:` would record: the source folder and the model config."""
    return {"source": hf.source_description(self.opened, with_sha256=False),
            "config": imported.config_dict(self.opened.config)}

  def reader(self, hf_layout: bool = False) -> "HFParameterReader":
    return HFParameterReader(self, hf_layout)


def open_checkpoint(path: str) -> "Source | HFSource":
  """Resolves `path` and reads its parameter metadata (no arrays are read): an Orbax
  checkpoint (``DIR`` or ``DIR/<step>``) or a Hugging Face folder (it has a config.json)."""
  path = os.path.abspath(os.fspath(path)).rstrip("/")
  if os.path.isfile(os.path.join(path, hf.CONFIG_FILE)):
    opened = hf.open_hf(path)
    return HFSource(path=path, opened=opened, shapes={
        key: jax.ShapeDtypeStruct(shape, dtype)
        for key, (shape, dtype) in opened.parameters().items()})
  directory, step = manager.resolve_step(path)
  params_dir = os.path.join(directory, str(step), "params")
  if not os.path.isdir(params_dir):
    raise manager.CheckpointError(f"checkpoint {path} has no params item at {params_dir}")
  try:
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(params_dir)).tree
  except Exception as e:  # Orbax raises many types; name the checkpoint.
    raise manager.CheckpointError(f"cannot read the parameter metadata of {params_dir}: "
                                  f"{manager.storage_error_text(e)} (its files are damaged or "
                                  "incomplete: copy the checkpoint again or merge another "
                                  "step)") from e
  shapes = {}
  for key, leaf in imported.flatten(tree).items():
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      raise manager.CheckpointError(f"{params_dir}: parameter {spec_lib.parameter_name(key)!r} "
                                    f"is not an array ({type(leaf).__name__})")
    shapes[tuple(key)] = jax.ShapeDtypeStruct(tuple(leaf.shape), np.dtype(leaf.dtype))
  if not shapes:
    raise manager.CheckpointError(f"{params_dir} holds no parameters")
  return Source(path=path, directory=directory, step=step, shapes=shapes)


def _shape(value: Any) -> tuple[int, ...]:
  return tuple(np.shape(value))  # Arrays and jax.ShapeDtypeStructs alike.


def check_same_parameters(reference: tuple[str, dict[Key, Any]],
                          others: Sequence[tuple[str, dict[Key, Any]]],
                          tensor_names: Optional[dict[str, Callable[[Key], Optional[str]]]] = None
                          ) -> list[Key]:
  """Sorted keys of `reference` after checking every other (label, {key: shape-like}) has the
  same keys and shapes; raises MergeInputError listing each mismatch with both labels.

  `tensor_names` maps a label to the file-format name of a key (a Hugging Face input's tensor
  names), added to the messages about that input.
  """
  ref_label, ref_shapes = reference
  tensor_names = tensor_names or {}

  def name(key: Key, *labels: str) -> str:
    extra = [f"{tensor_names[label](key)!r} in {label}" for label in labels
             if label in tensor_names and tensor_names[label](key)]
    return (f"{spec_lib.parameter_name(key)!r}"
            + (f" (tensor {', '.join(extra)})" if extra else ""))

  problems = []
  for label, shapes in others:
    for key in sorted(set(ref_shapes) - set(shapes)):
      problems.append(f"{label} has no parameter {name(key, ref_label)} "
                      f"(shape {_shape(ref_shapes[key])} in {ref_label})")
    for key in sorted(set(shapes) - set(ref_shapes)):
      problems.append(f"{label} has parameter {name(key, label)} (shape "
                      f"{_shape(shapes[key])}) that {ref_label} does not have")
    for key in sorted(set(shapes) & set(ref_shapes)):
      if _shape(shapes[key]) != _shape(ref_shapes[key]):
        problems.append(f"parameter {name(key, label, ref_label)} has shape "
                        f"{_shape(shapes[key])} in {label} but "
                        f"{_shape(ref_shapes[key])} in {ref_label}")
  if problems:
    more = len(problems) - _MAX_PROBLEMS
    raise MergeInputError("checkpoints do not match:\n  " + "\n  ".join(
        problems[:_MAX_PROBLEMS]) + (f"\n  ... and {more} more" if more > 0 else ""))
  return sorted(ref_shapes)


class ParameterReader:
  """Reads parameters of one checkpoint, many per call (one Orbax partial restore)."""

  def __init__(self, source: Source):
    self.source = source
    self._checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())

  def read(self, keys: Sequence[Key], shardings: Sequence[jax.sharding.Sharding],
           rows: Optional[Sequence[Optional[Rows]]] = None) -> list[jax.Array]:
    """Parameters `keys` in their stored dtypes, placed with `shardings`, in order (whole:
    row ranges are planned for Hugging Face sources only)."""
    if rows is not None and any(r is not None for r in rows):
      raise ValueError("row ranges are read from Hugging Face folders only")
    stored = [self.source.shapes[k] for k in keys]
    item = imported.unflatten({k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
                               for k, s, sh in zip(keys, stored, shardings)})
    restore_args = imported.unflatten({k: ocp.ArrayRestoreArgs(
        sharding=sh, global_shape=s.shape, dtype=s.dtype)
        for k, s, sh in zip(keys, stored, shardings)})
    try:
      restored = self._checkpointer.restore(
          epath.Path(self.source.params_dir),
          args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                      partial_restore=True))
    except Exception as e:  # Orbax/tensorstore raise many types; name what failed.
      names = [spec_lib.parameter_name(k) for k in keys]
      raise manager.CheckpointError(
          f"cannot read parameter{'s' if len(names) > 1 else ''} "
          f"{', '.join(map(repr, names[:5]))}{' …' if len(names) > 5 else ''} from "
          f"{self.source.params_dir}: {manager.storage_error_text(e)} (its files are damaged or "
          "incomplete: copy the checkpoint again or merge another step)") from e
    flat = imported.flatten(restored)
    return [flat[k] for k in keys]

  def close(self):
    self._checkpointer.close()


class HFParameterReader:
  """Reads parameters of a Hugging Face folder, one safetensors tensor at a time: in our
  layout, or with `hf_layout` as stored (a merge from HF folders into one needs no
  transposes: every method is elementwise or ranks whole tensors)."""

  def __init__(self, source: HFSource, hf_layout: bool = False):
    self.source, self.hf_layout = source, hf_layout

  def read(self, keys: Sequence[Key], shardings: Sequence[jax.sharding.Sharding],
           rows: Optional[Sequence[Optional[Rows]]] = None) -> list[jax.Array]:
    """Parameters `keys` in their stored dtypes, placed with `shardings`, in order; with
    `rows` (hf_layout only), rows [start, stop) of the first axis where not None."""
    values = []
    for key, sharding, key_rows in zip(keys, shardings, rows or [None] * len(keys)):
      try:
        if key_rows is not None and not self.hf_layout:
          raise ValueError("row ranges are read in transformers' layout only")
        value = (self.source.opened.read_tensor(self.source.tensor_name(key), key_rows)
                 if self.hf_layout else self.source.opened.read_parameter(key))
      except Exception as e:  # safetensors raises several types; name what failed.
        raise hf.HFCheckpointError(
            f"cannot read tensor {self.source.tensor_name(key)!r} from {self.source.path}: "
            f"{type(e).__name__}: {e}") from e
      values.append(jax.device_put(value, sharding))
    return values

  def close(self):
    self.source.opened.close()


# ---------------------------------------------------------------------------------------------
# Batches under a memory budget.

DEFAULT_MEMORY_BUDGET = 2 * 1024 ** 3
OUTPUT_FORMATS = ("orbax", "hf")


def plan_batches(keys: Sequence[Key], cost: Callable[[Key], int], budget: int,
                 what: str = "") -> list[list[Key]]:
  """`keys` in order, cut into consecutive batches of total `cost` <= budget / 2.

  Two batches are in memory at once (one merged while the next is read, and the merged
  outputs of one written while the next is merged), so a batch gets half the budget. A
  parameter that alone costs more than that is an error naming it.
  """
  limit = budget // 2
  batches: list[list[Key]] = []
  used = limit + 1
  for key in keys:
    need = cost(key)
    if need > limit:
      raise ValueError(
          f"--memory_budget {files.format_size(budget)} is too small for parameter "
          f"{spec_lib.parameter_name(key)!r}, which needs {files.format_size(need)}{what} in memory "
          f"twice over (a batch being merged and the next being read); give at least "
          f"{files.format_size(2 * need)}")
    if used + need > limit:
      batches.append([])
      used = 0
    batches[-1].append(key)
    used += need
  return batches


Rows = tuple[int, int]  # rows [start, stop) of a parameter's first axis
Piece = tuple[Key, Optional[Rows]]  # a whole parameter (None), or a row range of it


def plan_pieces(keys: Sequence[Key], cost: Callable[[Key], int], budget: int,
                shape_of: Callable[[Key], tuple[int, ...]],
                splittable: Callable[[Key], bool], what: str = "") -> list[list[Piece]]:
  """Batches as `plan_batches`, except that a parameter too large for half the budget is
  cut, when `splittable`, into row ranges that fit, each its own batch. A budget below one
  row of it (or below a parameter that cannot be cut) is an error naming the parameter."""
  limit = budget // 2
  whole = [k for k in keys if cost(k) <= limit or not splittable(k)]
  batches = [[(k, None) for k in batch] for batch in plan_batches(whole, cost, budget, what)]
  for key in sorted(set(keys) - set(whole), key=list(keys).index):
    rows = shape_of(key)[0]
    per_row = -(-cost(key) // rows)
    step = limit // per_row
    if step < 1:
      raise ValueError(
          f"--memory_budget {files.format_size(budget)} is below one row range of parameter "
          f"{spec_lib.parameter_name(key)!r}: a row needs {files.format_size(per_row)}{what} "
          f"twice over; give at least {files.format_size(2 * per_row)}")
    batches.extend([[(key, (start, min(start + step, rows)))]
                    for start in range(0, rows, step)])
  order = {key: i for i, key in enumerate(keys)}
  return sorted(batches, key=lambda batch: (order[batch[0][0]], batch[0][1] or (0, 0)))


# ---------------------------------------------------------------------------------------------
# Target shardings.


def default_sharding() -> ShardingFn:
  """One device in a single process; in a multi-process job, each parameter split over every
  device of the job (`largest_dim_sharding`), so each process reads and writes its shards."""
  if jax.process_count() == 1:
    return single_device_sharding()
  return largest_dim_sharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("devices",)))


def single_device_sharding() -> ShardingFn:
  """Every parameter whole on the first device (the default)."""
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return lambda key, shape: sharding


def largest_dim_sharding(mesh: jax.sharding.Mesh) -> ShardingFn:
  """Each parameter's largest dimension divisible by the mesh size is split over all mesh
  axes (FSDP-style); a parameter with no such dimension is replicated."""
  axes = tuple(mesh.axis_names)

  def sharding_for(key: Key, shape: tuple[int, ...]) -> jax.sharding.Sharding:
    for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
      if shape[dim] % mesh.size == 0:
        spec = [None] * len(shape)
        spec[dim] = axes
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return sharding_for


# ---------------------------------------------------------------------------------------------
# The streaming merge.


def release_freed_buffers() -> None:
  """Makes glibc return freed parameter-sized buffers to the OS (Linux; no-op elsewhere).

  glibc raises its mmap threshold after large blocks are freed, so later blocks of that size
  come from heaps that keep their memory: a long stream of parameter-sized buffers then grows
  the resident set with the number of parameters read. A fixed 128 KiB threshold (the
  default's starting value, `mallopt(M_MMAP_THRESHOLD)`) keeps large buffers on mmap.
  """
  if not sys.platform.startswith("linux"):
    return
  try:
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
  except (OSError, AttributeError):
    logging.info("mallopt is unavailable; freed buffers may stay in the process")


def _progress(total: int, desc: str, enabled: bool):
  """Progress over parameters (a bar on a terminal, log lines in a log), advanced with
  `update`."""
  return progress.bar(total, desc, "param", enabled and distributed.is_leader(), leave=False)


def stream_merge(spec: spec_lib.MergeSpec, base: Optional[str], experts: Sequence[str],
                 output_dir: str, *, step: int = 0, out_dtype=None,
                 sharding_fn: Optional[ShardingFn] = None, overwrite: bool = False,
                 extra_meta: Optional[dict] = None, progress_bar: bool = True,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 output_format: str = "orbax") -> str:
  """Merges checkpoint `base` and `experts` with `spec` into ``output_dir/<step>``.

  Args:
    spec: the method and its settings (`merging.spec.MergeSpec`).
    base: the base checkpoint (``DIR`` or ``DIR/<step>``, or a Hugging Face safetensors
      folder); None only for `linear`.
    experts: the expert checkpoints (Orbax or Hugging Face, mixed freely when their parameters
      match), in the order of `spec.weights`.
    output_dir: a Checkpointer directory; the merge becomes its step `step`. With
      `output_format="hf"`, the Hugging Face model folder to write (`step` is unused).
    out_dtype: dtype of every merged parameter (default: the base's, per parameter; without
      a base, the first expert's).
    sharding_fn: (key, shape) -> target sharding of reads and merge (default: one device).
    overwrite: replace an existing ``output_dir/<step>`` (else refused before any work).
    extra_meta: recorded in the output meta under "merge" (e.g. the mergekit config).
    memory_budget: bytes of parameters in flight (inputs read and outputs not yet written);
      parameters move in batches of up to half of it (`plan_batches`). The merge kernels'
      float32 temporaries for one parameter come on top.
    output_format: "orbax" (our checkpoint layout) or "hf" (transformers safetensors, one
      file per batch, with config.json from the base's model config).

  Returns:
    The path of the merged checkpoint step, ``output_dir/<step>`` (with "hf", `output_dir`).
  """
  if output_format not in OUTPUT_FORMATS:
    raise ValueError(f"output_format={output_format!r}; expected one of {OUTPUT_FORMATS}")
  if isinstance(experts, (str, os.PathLike)):
    raise TypeError(f"experts must be a list of checkpoint paths, got the string {experts!r}")
  spec.validate(len(experts))
  if jax.process_count() > 1 and output_format == "hf":
    raise ValueError("--output_format=hf is written by one process; in a multi-process job "
                     "merge into an Orbax checkpoint (the default) and export it with "
                     "flame-convert")
  release_freed_buffers()
  if base is None and spec.entry.uses_base:
    raise ValueError(f"{spec.method} needs a base checkpoint")
  base_source = open_checkpoint(base) if base is not None else None
  expert_sources = [open_checkpoint(path) for path in experts]
  sources = ([base_source] if base_source else []) + expert_sources
  labels = ([f"base {base_source.path}"] if base_source else []) + [
      f"expert #{i} {s.path}" for i, s in enumerate(expert_sources)]
  keys = check_same_parameters(
      (labels[0], sources[0].shapes), list(zip(labels[1:], [s.shapes for s in sources[1:]])),
      {label: s.tensor_name for label, s in zip(labels, sources) if isinstance(s, HFSource)})
  for label, source in zip(labels, sources):
    logging.info("%s: %s, %d parameters", label, source.location, len(source.shapes))
  reference = sources[0]
  reference_meta = reference.meta()
  # HF folders in and out: merge in transformers' layout (no transposes on either side).
  hf_layout = output_format == "hf" and all(isinstance(s, HFSource) for s in sources)
  shape_of = reference.hf_shape if hf_layout else (lambda k: tuple(reference.shapes[k].shape))
  if output_format == "hf":
    final = os.path.abspath(output_dir)
    staged_hf.check_output_dir(final, overwrite)
  else:
    final = os.path.join(os.path.abspath(output_dir), str(step))
    if os.path.exists(final) and not overwrite:
      raise FileExistsError(f"{final} already exists; pass overwrite=True (--overwrite) to "
                            "replace it")
  out_dtypes = {k: np.dtype(out_dtype if out_dtype is not None else reference.shapes[k].dtype)
                for k in keys}

  def cost(key: Key) -> int:
    size = math.prod(reference.shapes[key].shape)
    return size * (sum(np.dtype(s.shapes[key].dtype).itemsize for s in sources)
                   + out_dtypes[key].itemsize)

  what = f" ({len(sources)} inputs and the output)"
  # Row ranges: HF folders in and out (transformers' layout, where rows are contiguous), a
  # method that is elementwise once the per-tensor thresholds are known.
  splittable = (lambda key: hf_layout and not spec.global_trim
                and spec.method in spec_lib.ROW_SPLITTABLE and len(shape_of(key)) >= 1
                and shape_of(key)[0] >= 2)
  batches = plan_pieces(keys, cost, memory_budget, shape_of, splittable, what)
  sharding_fn = sharding_fn or default_sharding()
  entries = sum(math.prod(reference.shapes[k].shape) for k in keys)
  logging.info("merging %d parameters (%d entries) of %d experts with %s into %s, in batches "
               "of up to %s", len(keys), entries, len(expert_sources), spec.method, final,
               files.format_size(memory_budget // 2))
  plan = {"spec": spec.describe(), "step": int(step),
          "sources": [s.location for s in sources], "has_base": base_source is not None,
          "parameters": [[spec_lib.parameter_name(k), list(reference.shapes[k].shape),
                          [np.dtype(s.shapes[k].dtype).name for s in sources],
                          out_dtypes[k].name] for k in keys], "layout": "batches",
          "format": output_format, "hf_layout": hf_layout}
  output_dir_existed = os.path.exists(output_dir)
  if output_format == "hf":
    output = _hf_output(reference, reference_meta, final, keys, plan, out_dtypes, overwrite,
                        hf_layout)
  else:
    output = staged_checkpoint.StagedCheckpoint(output_dir, step, keys, plan,
                                                overwrite=overwrite)
  readers = [s.reader(hf_layout) for s in sources]
  pool = _executor(len(readers), "merge-read")
  try:
    def read(batch: Sequence[Piece], with_base: bool):
      """The batch's pieces from every checkpoint, the checkpoints read in parallel (a
      thread each)."""
      keys_, rows = [k for k, _ in batch], [r for _, r in batch]
      shardings = [sharding_fn(k, shape_of(k)) for k in keys_]
      chosen = readers if with_base or not base_source else readers[1:]
      values = [f.result() for f in [pool.submit(r.read, keys_, shardings, rows)
                                     for r in chosen]]
      if with_base and base_source:
        return values[0], values[1:]
      return None, values

    thresholds = None
    if spec.global_trim:
      thresholds = output.load_state("thresholds")
      if thresholds is None:
        thresholds = _global_thresholds(spec, batches, read, entries, len(expert_sources),
                                        progress_bar)
        output.save_state("thresholds", [t.tolist() for t in thresholds])
      thresholds = tuple(np.asarray(t, np.float32) for t in thresholds)
      logging.info("global thresholds: %s", [t.tolist() for t in thresholds])

    todo = plan_pieces([k for k in keys if not output.done(k)], cost, memory_budget,
                       shape_of, splittable, what)
    cut = {}  # split parameter -> its per-tensor thresholds (None: the method has none)
    for key in dict.fromkeys(b[0][0] for b in todo if b[0][1] is not None):
      pieces = [b[0] for b in todo if b[0][0] == key]
      cut[key] = (None if thresholds is not None or spec.entry.magnitude_ranks is None
                  else _split_thresholds(spec, read, pieces, math.prod(shape_of(key)),
                                         len(expert_sources)))
    with _Pipeline(read, output) as pipeline, _progress(
        len(keys) - output.num_done, f"merge ({spec.method})", progress_bar) as bar:
      for batch, (base_values, expert_values) in pipeline.prefetched(
          todo, spec.entry.uses_base):
        merged = []
        for i, (key, rows) in enumerate(batch):
          merged.append(spec_lib.merge_tensor(
              spec, spec_lib.parameter_name(key),
              None if base_values is None else base_values[i],
              [values[i] for values in expert_values],
              thresholds=thresholds if rows is None else cut[key],
              out_dtype=out_dtypes[key]))
        del base_values, expert_values
        (key, rows), = batch[:1]
        if rows is None:
          pipeline.write(output.write, [k for k, _ in batch], merged)
          bar.update(len(batch))
        else:
          pipeline.write(output.write_rows, key, rows, shape_of(key)[0], merged[0])
          bar.update(int(rows[1] == shape_of(key)[0]))
        del merged

    meta = {k: v for k, v in reference_meta.items() if k not in ("step", "merge")}
    meta["merge"] = dict(spec.describe(), base=base_source.location if base_source else None,
                         experts=[s.location for s in expert_sources],
                         out_dtype=None if out_dtype is None else np.dtype(out_dtype).name,
                         thresholds=None if thresholds is None else
                         [t.tolist() for t in thresholds], **(extra_meta or {}))
    path = output.finalize(meta)
  except BaseException:
    pool.shutdown()
    output.discard_if_empty()
    if not output_dir_existed and distributed.is_leader():
      _remove_if_empty(output_dir)
    raise
  finally:
    pool.shutdown()
    output.close()
    for reader in readers:
      reader.close()
  logging.info("wrote the merged checkpoint %s", path)
  return path


def _remove_if_empty(folder: str) -> None:
  """Removes `folder` if it exists and holds nothing."""
  with contextlib.suppress(OSError):
    os.rmdir(folder)


def _hf_output(reference, reference_meta: dict, final: str, keys: Sequence[Key], plan: dict,
               out_dtypes: dict[Key, np.dtype], overwrite: bool,
               hf_layout: bool) -> staged_hf.StagedHFModel:
  """The staged Hugging Face folder of a merge: the reference input's model config (an HF
  input's config.json, or the model config in an Orbax checkpoint's meta) and one dtype."""
  dtypes = sorted({d.name for d in out_dtypes.values()})
  if len(dtypes) != 1:
    raise ValueError(f"--output_format=hf stores one dtype, but the merged parameters would be "
                     f"{dtypes} (the base's own); choose one with dtype: in the YAML or "
                     "merge.out_dtype")
  if isinstance(reference, HFSource):
    config, extra, tokenizer_from = (reference.opened.config, reference.opened.hf_config,
                                     reference.path)
  else:
    config = convert.config_from_meta(reference_meta, reference.location)
    source = reference_meta.get("source") or {}
    extra = source.get("hf_config")
    directory = source.get("directory")
    tokenizer_from = directory if isinstance(directory, str) and os.path.isdir(directory) else None
  return staged_hf.StagedHFModel(final, keys, plan, config, np.dtype(dtypes[0]),
                                 overwrite=overwrite, extra_config=extra,
                                 tokenizer_from=tokenizer_from, hf_layout=hf_layout)


class _InlineExecutor:
  """`submit` runs the call at once on this thread (an executor without threads)."""

  def submit(self, fn, *args) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    try:
      future.set_result(fn(*args))
    except BaseException as e:  # pylint: disable=broad-except
      future.set_exception(e)
    return future

  def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
    del wait, cancel_futures


def _executor(threads: int, name: str):
  """Threads for overlapped I/O in one process. In a multi-process job every call runs in
  turn on the main thread: Orbax's restores and saves synchronise the processes with device
  collectives, which must be launched in the same order on every process (from threads they
  interleave differently, and the job stops on a barrier-name mismatch)."""
  if jax.process_count() > 1:
    return _InlineExecutor()
  return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix=name)


class _Pipeline(contextlib.AbstractContextManager):
  """Overlaps I/O with merging: the next batch is read while this one is merged, and a merged
  batch is written in the background while the next is merged.

  At most two batches' inputs and two merged batches are alive at once, which is what
  `plan_batches` sizes batches for. Writes stay in order on one thread; leaving the context
  waits for the last one (and re-raises its error).
  """

  def __init__(self, read: Callable,
               output: Optional["staged_checkpoint.StagedCheckpoint"] = None):
    self._read, self._output = read, output
    self._reader = _executor(1, "merge-next")
    self._writer = _executor(1, "merge-write")
    self._pending_write: Optional[concurrent.futures.Future] = None

  def prefetched(self, batches: Sequence[Sequence[Key]], with_base: bool
                 ) -> Iterator[tuple[Sequence[Key], tuple]]:
    """(batch, read(batch)) for each batch in order, the next one already in flight."""
    upcoming = self._reader.submit(self._read, batches[0], with_base) if batches else None
    for i, batch in enumerate(batches):
      current = upcoming.result()
      upcoming = (self._reader.submit(self._read, batches[i + 1], with_base)
                  if i + 1 < len(batches) else None)
      yield batch, current
      del current

  def write(self, write: Callable, *args) -> None:
    """`write(*args)` on the writer thread, after the previous write has finished."""
    self._wait_for_write()
    self._pending_write = self._writer.submit(write, *args)

  def _wait_for_write(self) -> None:
    if self._pending_write is not None:
      pending, self._pending_write = self._pending_write, None
      pending.result()

  def __exit__(self, *exc_info):
    try:
      self._wait_for_write()
    finally:
      self._reader.shutdown(wait=True, cancel_futures=True)
      self._writer.shutdown(wait=True)
    return False


class _PiecesMagnitudes:
  """|τ| of one parameter read a row range at a time (a `merging.host_select` source)."""

  def __init__(self, read: Callable, pieces: Sequence[Piece], size: int):
    self.read, self.pieces, self.size = read, pieces, size

  def _source(self, piece: Piece):
    base, experts = self.read([piece], True)
    return host_select.TaskVectorMagnitudes(
        np.asarray(base[0]), [np.asarray(values[0]) for values in experts])

  def sample(self) -> np.ndarray:
    return self._source(self.pieces[len(self.pieces) // 2]).sample()

  def chunks(self) -> Iterator[np.ndarray]:
    for piece in self.pieces:
      yield from self._source(piece).chunks()


def _split_thresholds(spec, read: Callable, pieces: Sequence[Piece], entries: int,
                      num_experts: int) -> tuple[np.ndarray, ...]:
  """Per-tensor trimming thresholds of a parameter merged in row ranges (exact, as if whole:
  its row ranges are read once more, twice where a sampled bracket misses)."""
  source = _PiecesMagnitudes(read, pieces, entries)
  return tuple(host_select.kth_largest(source, ranks)
               for ranks in spec_lib.trim_ranks(spec, entries, num_experts))


def _global_thresholds(spec, batches: Sequence[Sequence[Piece]], read, entries: int,
                       num_experts: int, progress_bar: bool) -> tuple[np.ndarray, ...]:
  """Model-wide trimming thresholds from streamed task vectors (`merging.topk`); the batches
  hold whole parameters (global trimming never cuts row ranges)."""
  passes = itertools.count(1)
  total = sum(len(b) for b in batches)

  def task_vectors() -> Iterator[tuple[str, jax.Array]]:
    with _Pipeline(read, None) as pipeline, _progress(
        total, f"trim thresholds, pass {next(passes)}", progress_bar) as bar:
      for batch, (base_values, expert_values) in pipeline.prefetched(batches, True):
        for i, (key, _) in enumerate(batch):
          vectors = spec_lib.task_vectors(base_values[i], [v[i] for v in expert_values])
          yield spec_lib.parameter_name(key), vectors
          del vectors
          bar.update(1)
        del base_values, expert_values

  logging.info("computing global trimming thresholds over %d entries per expert", entries)
  return spec_lib.global_thresholds(spec, task_vectors, entries, num_experts)
