"""Orbax checkpoints of the train state, with resume and resharding.

Layout: ``DIR/<step>/params`` (the plain nested parameter dict — the one
format trainer, importers and merging share), ``DIR/<step>/opt_state`` and
``DIR/<step>/meta`` (JSON: step, model config, source). Saves are async and
atomic (Orbax writes to a temporary directory and renames it when complete),
so a killed run never leaves a checkpoint that looks finished; `keep` newest
checkpoints are retained.

Restores take abstract arrays carrying the *target* shardings, so a
checkpoint written on one mesh restores onto any other.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax
import numpy as np

from flame import errors, lazy_imports
from flame.models import scan

ocp = lazy_imports.lazy_import("orbax.checkpoint")

ITEMS = ("params", "opt_state", "meta")


class CheckpointError(errors.InputError, RuntimeError):
  """A checkpoint is missing, incomplete or does not match the model."""


def storage_error_text(error: BaseException) -> str:
  """One line for an error Orbax or TensorStore raised reading a checkpoint: its type and the
  first line of its message, without TensorStore's multi-line spec dump."""
  text = str(error).splitlines()[0] if str(error) else ""
  for dump in (" See full TensorStore details", " [tensorstore_spec="):
    text = text.split(dump)[0]
  return f"{type(error).__name__}: {text}"


def default_placement() -> jax.sharding.Sharding:
  """Where a leaf restored without a sharding goes: the first device, or in a multi-process
  job every device (replicated), so each process holds it."""
  if jax.process_count() == 1:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("devices",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _abstract(tree):
  """Shape, dtype and target sharding of every leaf. A leaf without a sharding gets
  `default_placement` rather than the one recorded in the checkpoint, whose devices may
  belong to another job (another mesh, another process count): the stored arrays are then
  resharded onto this job's devices, not refused."""
  placement = default_placement()
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, "sharding", None) or placement), tree)


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for {params, opt_state, meta}."""

  def __init__(self, directory: str, keep: Optional[int] = 3, save_every: int = 1,
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(os.fspath(directory))
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f"no checkpoint directory at {self.directory}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every, create=not read_only,
        enable_async_checkpointing=async_save, read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Mapping[str, Any], meta: Optional[dict] = None,
           force: bool = False) -> bool:
    """Starts an async save of `state`; returns whether it saved.

    `state` holds "params" and, for a train state, "opt_state"; a params-only
    checkpoint (an imported or merged model) restores with `restore_params`.
    """
    items = {"params": ocp.args.StandardSave(state["params"]),
             "meta": ocp.args.JsonSave(dict(meta or {}, step=int(step)))}
    if "opt_state" in state:
      items["opt_state"] = ocp.args.StandardSave(state["opt_state"])
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()

  def _step_or_latest(self, step: Optional[int]) -> int:
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint found in {self.directory}")
    if step is None:
      return max(steps)
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                            f"available steps: {sorted(steps)}")
    return step

  def _restore(self, step: int, **items):
    where = os.path.join(self.directory, str(step))
    if "params" in items:
      differences = param_differences(os.path.join(where, "params"), items["params"].item)
      if differences:
        raise CheckpointError(
            f"checkpoint {where} holds parameters of another model than the one configured "
            f"({len(differences)} differences): " + "; ".join(differences[:12])
            + ("; …" if len(differences) > 12 else "") + ". The checkpoint is intact: "
            "configure the model it was written for (its meta holds the config), or start "
            "from another checkpoint.")
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax/tensorstore raise many types; name the checkpoint.
      earlier = sorted(s for s in self.all_steps() if s < step)
      hint = (f" Earlier steps here: {earlier}; to resume from one, move {where} aside "
              "(nothing needs deleting)." if earlier else "")
      raise CheckpointError(
          f"cannot restore checkpoint {where} (items {sorted(items)}): "
          f"{storage_error_text(e)}{hint}") from e

  def restore(self, abstract_state: Mapping[str, Any], step: Optional[int] = None
              ) -> dict[str, Any]:
    """Full train state at `step` (default: latest), placed as `abstract_state` says."""
    step = self._step_or_latest(step)
    restored = self._restore(
        step, params=ocp.args.StandardRestore(_abstract(abstract_state["params"])),
        opt_state=ocp.args.StandardRestore(_abstract(abstract_state["opt_state"])))
    return {"step": jax.device_put(jax.numpy.asarray(step, jax.numpy.int32),
                                   abstract_state["step"].sharding),
            "params": restored["params"], "opt_state": restored["opt_state"]}

  def restore_params(self, abstract_params: Any, step: Optional[int] = None) -> Any:
    """Only the parameters (e.g. to fine-tune from another run's checkpoint).

    A checkpoint whose layer stack has the other layout (scanned ``layers/…`` vs unrolled
    ``layers_{i}/…``, `flame.models.scan`) is converted: read onto the host in its own
    layout, restacked, then placed as `abstract_params` says."""
    step = self._step_or_latest(step)
    wanted = scan.layout(abstract_params)
    stored = stored_layout(os.path.join(self.directory, str(step), "params"))
    if wanted and stored and wanted != stored:
      host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
      other = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                    sharding=host),
                                     scan.to_layout(_abstract(abstract_params), stored))
      restored = self._restore(step, params=ocp.args.StandardRestore(other))["params"]
      converted = scan.to_layout(jax.device_get(restored), wanted)
      return jax.tree_util.tree_map(
          lambda value, target: jax.device_put(value, getattr(target, "sharding", None)),
          converted, abstract_params)
    return self._restore(step, params=ocp.args.StandardRestore(_abstract(abstract_params)))[
        "params"]

  def restore_opt_state(self, abstract_opt_state: Any, step: Optional[int] = None) -> Any:
    """Only the optimizer state (e.g. Adam's moments, to continue a run on new data); a
    checkpoint of another optimizer or parameter set is a CheckpointError naming it."""
    step = self._step_or_latest(step)
    try:
      return self._restore(step, opt_state=ocp.args.StandardRestore(
          _abstract(abstract_opt_state)))["opt_state"]
    except (CheckpointError, ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f"{self.directory}/{step}: its optimizer state does not fit this run's optimizer "
          f"(same optimizer and trainable parameters needed to continue it): {e}") from e

  def restore_meta(self, step: Optional[int] = None) -> dict:
    step = self._step_or_latest(step)
    return dict(self._restore(step, meta=ocp.args.JsonRestore())["meta"])


def _flat_shapes(tree) -> dict[str, tuple]:
  return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path):
          tuple(getattr(leaf, "shape", ()))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def stored_layout(params_dir: str) -> Optional[str]:
  """The layer-stack layout ("scanned" / "unrolled") of a stored params item, None if it has
  none or its metadata cannot be read."""
  try:
    stored = ocp.StandardCheckpointer().metadata(params_dir)
  except Exception:  # pylint: disable=broad-except
    return None
  tree = getattr(stored, "item_metadata", stored)
  return None if tree is None else scan.layout(tree)  # None: damaged; the restore says how


def param_differences(params_dir: str, abstract_params: Any) -> list[str]:
  """How the parameters stored in `params_dir` differ from `abstract_params`: each missing,
  unexpected or differently shaped parameter, named with both shapes. Empty when they match
  (or when no stored metadata can be read; the restore then reports what it finds)."""
  try:
    stored = ocp.StandardCheckpointer().metadata(params_dir)
  except Exception:  # pylint: disable=broad-except
    return []
  have = _flat_shapes(getattr(stored, "item_metadata", stored))
  if not have:  # No readable parameter metadata: a damaged checkpoint, not another model.
    return []
  want = _flat_shapes(abstract_params)
  out = [f"{k}: checkpoint {have[k]} vs model {want[k]}" for k in sorted(have.keys() & want.keys())
         if have[k] != want[k]]
  out += [f"{k}: model {want[k]} is not in the checkpoint" for k in sorted(want.keys() - have.keys())]
  out += [f"{k}: checkpoint {have[k]} is not in the model" for k in sorted(have.keys() - want.keys())]
  return out


def resolve_step(path: str) -> tuple[str, int]:
  """(Checkpointer directory, step) of a checkpoint given as ``DIR`` (its latest step) or
  ``DIR/<step>``; CheckpointError when there is none."""
  path = os.path.abspath(os.fspath(path)).rstrip("/")
  parent, last = os.path.split(path)
  if last.isdigit() and os.path.isdir(os.path.join(path, "params")):
    return parent, int(last)
  checkpointer = Checkpointer(path, read_only=True)
  try:
    step = checkpointer.latest_step()
  finally:
    checkpointer.close()
  if step is None:
    raise CheckpointError(f"no checkpoint found in {path}")
  return path, step


def restore_params_from(path: str, abstract_params: Any) -> Any:
  """Params of a checkpoint given as ``DIR`` (latest step) or ``DIR/<step>``."""
  path = os.path.abspath(os.fspath(path))
  base, last = os.path.split(path.rstrip("/"))
  if last.isdigit() and os.path.isdir(os.path.join(path, "params")):
    return Checkpointer(base, read_only=True).restore_params(abstract_params, int(last))
  return Checkpointer(path, read_only=True).restore_params(abstract_params)


def restore_opt_state_from(path: str, abstract_opt_state: Any) -> Any:
  """Optimizer state of a checkpoint given as ``DIR`` (latest step) or ``DIR/<step>``."""
  directory, step = resolve_step(path)
  return Checkpointer(directory, read_only=True).restore_opt_state(abstract_opt_state, step)
