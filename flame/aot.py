"""Ahead-of-time compile of the train step for a TPU topology, on any machine.

``python -m flame.aot --gin_file=F [--gin.NAME=VALUE …] --topology=v5e:4x4
[--chips_per_host_bounds=2,2,1] [--num_slices=1] [--hbm_gib=16] [--json]``
(or ``flame-aot …``) reads the same gin files as ``flame.train``, builds the
run's Partitioner over the *compile-only* devices of the named TPU topology,
lowers and compiles the real train step (`Trainer.compile_train_step`) for the
abstract train state and batch, and prints how much HBM it needs per chip and
whether that fits. No TPU, data, checkpoint or parameter allocation is needed.
`compile_for_topology(...)` is the library entry point; it returns the report
as a dict.

Only the pieces of the ``train`` bindings that shape the step are read:
model, optimizer_factory, learning_rate_fn, task_feature_lengths, batch_size,
num_microbatches, seed and partitioner (`Partitioner.mesh_shape`,
`axis_names`, `rules`; the devices are replaced by the topology's).
MODEL_DIR and MIXTURE_OR_TASK_NAME may stay unbound.

Requirements and environment
  * libtpu must be installed (``pip install -e ".[tpu]"``); it supplies the TPU
    compiler. Without it the CLI exits with that hint.
  * The TPU topology API (`jax.experimental.topologies.get_topology_desc`)
    loads libtpu as a compile-only PJRT plugin, independently of the backends
    JAX initialises, so it works both with JAX_PLATFORMS unset and with
    ``JAX_PLATFORMS=cpu`` (also with ``XLA_FLAGS=--xla_force_host_platform_
    device_count=8``). The small host-side bits (PRNG key, init shapes) run on
    the default CPU backend. Do *not* set ``JAX_PLATFORMS=tpu`` on a machine
    without TPU chips: the default backend then cannot start.
  * On a machine without TPU chips libtpu logs harmless complaints about
    ``TPU_WORKER_HOSTNAMES``/``TPU_ACCELERATOR_TYPE``; `topology_devices` sets
    ``TPU_WORKER_HOSTNAMES=localhost`` before libtpu loads (only when no chip is
    attached and the variable is unset) to silence the first. The remaining
    "Failed to find host bounds for accelerator type" line is harmless.

Numbers: `compiled.memory_analysis()` is per device (one TPU core as JAX sees
it; on v4 JAX uses the "megacore" chip config, one device per chip, which is
the default here too). total = arguments + outputs - aliased (donated state)
+ temporaries + generated code.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import re
import sys
import time
from typing import Any, Mapping, Optional, Sequence

if __name__ == "__main__":  # As flame.aot: a gin file's `import flame.aot` finds this module
  from flame import aot as _importable  # instead of registering tpu_slice a second time.
  _importable.console_main()

import gin

from flame import cli, errors

INSTALL_HINT = 'TPU AOT compilation needs libtpu: pip install -e ".[tpu]"'

# HBM per chip, by topology-name prefix (the part before ':').
HBM_GIB_PER_CHIP = {"v5e": 16.0, "v5litepod": 16.0, "v4": 32.0, "v5p": 95.0, "v6e": 32.0}

GIB = 1024 ** 3


class TopologyError(errors.InputError, RuntimeError):
  """libtpu is missing or the topology cannot be described."""


def _topology_prefix(topology: str) -> str:
  return topology.split(":", 1)[0].strip().lower()


def hbm_gib_for(topology: str) -> Optional[float]:
  return HBM_GIB_PER_CHIP.get(_topology_prefix(topology))


def libtpu_available() -> bool:
  try:
    from jax._src import cloud_tpu_init
    return cloud_tpu_init.get_tpu_library_path() is not None
  except Exception:  # pragma: no cover - private API moved
    import importlib.util
    return importlib.util.find_spec("libtpu") is not None


def _quiet_libtpu_without_chips() -> None:
  """Without attached chips libtpu logs an error about TPU_WORKER_HOSTNAMES; avoid it."""
  try:
    from jax._src import hardware_utils
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
      os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  except Exception:  # pragma: no cover - private API moved
    pass


def topology_devices(topology: str, chips_per_host_bounds: Optional[Sequence[int]] = None,
                     num_slices: int = 1, chip_config_name: Optional[str] = None) -> list:
  """Compile-only devices of a TPU topology such as ``v5e:4x4`` or ``v4:2x2x2``."""
  if not libtpu_available():
    raise TopologyError(f"libtpu not installed. {INSTALL_HINT}")
  _quiet_libtpu_without_chips()
  from jax.experimental import topologies
  if chip_config_name is None:
    # JAX runs v4 as megacore (one device per chip); "default" would give 2 per chip.
    chip_config_name = "megacore" if _topology_prefix(topology) == "v4" else "default"
  kwargs: dict[str, Any] = {"num_slices": int(num_slices)}
  if chips_per_host_bounds:
    kwargs["chips_per_host_bounds"] = tuple(int(b) for b in chips_per_host_bounds)
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                        chip_config_name=chip_config_name, **kwargs)
  except Exception as e:  # JaxRuntimeError, RuntimeError ("TPU support not installed"), ...
    raise TopologyError(
        f"cannot create TPU topology {topology!r} ({kwargs}, chip config "
        f"{chip_config_name!r}): {type(e).__name__}: {e}\nCheck the name (e.g. v5e:2x2, "
        f"v5e:4x4, v4:2x2x2, v5p:2x2x2, v6e:2x2) and that libtpu is installed and matches "
        f"jax. {INSTALL_HINT}") from e
  return list(desc.devices)


def _num_chips(devices) -> int:
  chips = set()
  for d in devices:
    inner = getattr(d, "wrapped", d)  # multi-slice devices wrap the per-slice ones
    coords = tuple(getattr(inner, "coords", (getattr(d, "id", None),)))
    chips.add((getattr(d, "slice_index", 0), coords))
  return len(chips)


# ---- what train() would be called with -------------------------------------
def _train_fn():
  from flame import train as train_lib
  return train_lib.train


def train_arguments_from_gin() -> dict[str, Any]:
  """The `train` arguments that shape the step, resolved from the parsed gin config.

  Returns model, optimizer (built), learning_rate_fn, task_feature_lengths,
  batch_size, num_microbatches, seed, `partitioner_ref` (the unevaluated
  binding of `train.partitioner`, or None) and loss_positions — nothing else is evaluated, so
  data, MODEL_DIR etc. may stay unbound.
  """
  import gin
  from flame import optimizers, train as train_lib

  train = _train_fn()
  try:
    bound = gin.get_bindings(train, resolve_references=False)
  except Exception:  # No binding at all for train.
    bound = {}
  defaults = {n: p.default for n, p in inspect.signature(train).parameters.items()}

  def value(name):
    if name in bound:
      resolved = copy.deepcopy(bound[name])  # evaluates gin references and macros
    else:
      resolved = defaults[name]
    if resolved is gin.REQUIRED:
      raise ValueError(f"train.{name} is required: bind it (or its macro) in the gin files "
                       f"or with --gin.NAME=VALUE")
    return resolved

  learning_rate_fn = value("learning_rate_fn")
  optimizer_factory = value("optimizer_factory") or optimizers.adamw
  return {
      "model": value("model"),
      "optimizer": optimizer_factory(learning_rate=learning_rate_fn),
      "learning_rate_fn": learning_rate_fn,
      "task_feature_lengths": dict(value("task_feature_lengths")),
      "batch_size": int(value("batch_size")),
      "num_microbatches": int(value("num_microbatches")),
      "seed": int(value("seed")),
      "partitioner_ref": bound.get("partitioner"),
      "loss_positions": train_lib.resolve_loss_positions(
          value("loss_positions_per_row"), dict(value("task_feature_lengths")),
          bool(value("pack"))),
  }


def _unwrap_macros(value):
  """`%MACRO` → what the macro is bound to (repeatedly); other values unchanged."""
  import gin
  for _ in range(32):
    if not (isinstance(value, gin.config.ConfigurableReference)
            and value.configurable.selector == "gin.macro"):
      return value
    value = gin.query_parameter("/".join(value.scopes) + "/gin.macro.value")
  raise ValueError("train.partitioner: macro chain too deep")


def build_partitioner(partitioner_ref, devices):
  """The run's Partitioner (mesh_shape/axis_names/rules from gin) over `devices`."""
  import gin
  from flame import partitioning
  ref = _unwrap_macros(partitioner_ref)
  if ref is None:
    return partitioning.Partitioner(devices=devices)
  if isinstance(ref, gin.config.ConfigurableReference) and ref.evaluate:
    # `@partitioning.Partitioner()` (possibly scoped): call it in its scope with our devices.
    return ref.scoped_configurable_fn(devices=devices)
  raise ValueError(f"train.partitioner = {partitioner_ref!r}: flame.aot needs it bound to a "
                   "call such as @partitioning.Partitioner() (or left unbound) so it can "
                   "rebuild it over the topology's devices")


# ---- the compile -----------------------------------------------------------
def _bytes_per_device(abstract_tree) -> int:
  import jax
  total = 0
  for leaf in jax.tree_util.tree_leaves(abstract_tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


def compile_for_topology(gin_files: Sequence[str], bindings: Sequence[str] = (),
                         topology: str = "v5e:2x2",
                         chips_per_host_bounds: Optional[Sequence[int]] = None,
                         num_slices: int = 1, hbm_gib: Optional[float] = None,
                         chip_config_name: Optional[str] = None,
                         parse_gin: bool = True) -> dict[str, Any]:
  """Parses the gin config, AOT-compiles the train step for `topology`, returns a report.

  `bindings` are gin binding strings (``"NAME = VALUE"``, see
  `gin_utils.split_flags`). With `parse_gin=False` the already-parsed config
  is used. Raises `TopologyError` when libtpu is absent or the topology is
  invalid. Byte counts are per device (= per chip except on multi-core chip
  configs).
  """
  import jax
  from flame import gin_utils, trainer as trainer_lib

  devices = topology_devices(topology, chips_per_host_bounds, num_slices, chip_config_name)
  if parse_gin:
    gin.clear_config()
    gin_utils.parse(gin_files, bindings, finalize=False)
  args = train_arguments_from_gin()
  partitioner = build_partitioner(args["partitioner_ref"], devices)
  model = args["model"]
  trainer = trainer_lib.Trainer(model, args["optimizer"], partitioner, args["learning_rate_fn"],
                                args["num_microbatches"], args["seed"], args["loss_positions"])
  batch_size, lengths = args["batch_size"], args["task_feature_lengths"]
  dp = partitioner.data_parallel_size()
  if batch_size % (dp * args["num_microbatches"]):
    raise ValueError(f"batch_size={batch_size} must be divisible by data-parallel size {dp} "
                     f"× num_microbatches {args['num_microbatches']}")

  start = time.perf_counter()
  abstract, lowered = trainer.lower_train_step(batch_size, lengths)
  memory, flops, out_of_memory = None, None, None
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    out_of_memory = hbm_out_of_memory(str(e))
    if out_of_memory is None:
      raise
    compiled = None
  compile_seconds = time.perf_counter() - start

  if compiled is not None:
    mem = compiled.memory_analysis()
    memory = {
        "argument": int(mem.argument_size_in_bytes),
        "output": int(mem.output_size_in_bytes),
        "alias": int(mem.alias_size_in_bytes),
        "temp": int(mem.temp_size_in_bytes),
        "generated_code": int(mem.generated_code_size_in_bytes),
    }
    memory["total"] = (memory["argument"] + memory["output"] - memory["alias"]
                       + memory["temp"] + memory["generated_code"])
    try:
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      flops = float(cost.get("flops")) if cost and cost.get("flops") is not None else None
    except Exception:  # cost analysis is best effort
      pass

  num_devices = len(devices)
  num_chips = _num_chips(devices)
  devices_per_chip = max(1, num_devices // max(num_chips, 1))
  chip_hbm = hbm_gib if hbm_gib is not None else hbm_gib_for(topology)
  device_hbm = None if chip_hbm is None else chip_hbm / devices_per_chip
  mesh = partitioner.mesh
  return {
      "topology": topology,
      "num_slices": int(num_slices),
      "device_kind": devices[0].device_kind,
      "num_devices": num_devices,
      "num_chips": num_chips,
      "mesh_shape": {str(k): int(v) for k, v in mesh.shape.items()},
      "model": type(model).__name__,
      "num_params": int(sum(math.prod(x.shape)
                            for x in jax.tree_util.tree_leaves(abstract["params"]))),
      "batch_size": batch_size,
      "task_feature_lengths": {k: int(v) for k, v in lengths.items()},
      "num_microbatches": args["num_microbatches"],
      "param_bytes_per_device": _bytes_per_device(abstract["params"]),
      "state_bytes_per_device": _bytes_per_device(abstract),
      "memory_bytes_per_device": memory,
      "flops_per_device": flops,
      "hbm_gib_per_device": device_hbm,
      "fits": (False if out_of_memory else None if device_hbm is None
               else bool(memory["total"] <= device_hbm * GIB)),
      "out_of_memory": out_of_memory,
      "compile_seconds": round(compile_seconds, 2),
  }


_HBM_OOM = re.compile(r"memory required for ([\w ]+?) \(([\d.]+)([KMGT])\) exceeds available HBM "
                      r"\(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def hbm_out_of_memory(message: str) -> Optional[dict[str, Any]]:
  """What the TPU compiler said when the step does not fit HBM ({what, required, available}
  in bytes), None for any other compile error."""
  if "RESOURCE_EXHAUSTED" not in message:
    return None
  found = _HBM_OOM.search(message)
  if not found:
    return {"what": message.strip().splitlines()[0][:300], "required": None, "available": None}
  what, need, need_unit, have, have_unit = found.groups()
  return {"what": what, "required": int(float(need) * _UNITS[need_unit]),
          "available": int(float(have) * _UNITS[have_unit])}


def format_report(report: Mapping[str, Any]) -> str:
  m = report["memory_bytes_per_device"]
  gib = lambda b: f"{b / GIB:.3f} GiB ({b / 2**20:,.1f} MiB)"  # noqa: E731
  oom = report.get("out_of_memory")
  mesh = " × ".join(f"{k}={v}" for k, v in report["mesh_shape"].items())
  lines = [
      f"topology        {report['topology']} ({report['device_kind']}), "
      f"{report['num_slices']} slice(s)",
      f"chips           {report['num_chips']} ({report['num_devices']} devices)",
      f"mesh            {mesh}",
      f"model           {report['model']}, {report['num_params']:,} parameters; batch "
      f"{report['batch_size']} × {report['task_feature_lengths']}, "
      f"{report['num_microbatches']} micro-batch(es)",
      f"per chip        params {gib(report['param_bytes_per_device'])}, train state "
      f"{gib(report['state_bytes_per_device'])}",
  ]
  if oom:
    needed = (f"{oom['what']} need {gib(oom['required'])} of {gib(oom['available'])}"
              if oom["required"] is not None else oom["what"])
    lines.append(f"fits            NO: the TPU compiler ran out of HBM ({needed})")
    lines.append(f"compile         {report['compile_seconds']:.1f} s")
    return "\n".join(lines)
  lines += [
      f"  arguments     {gib(m['argument'])}",
      f"  outputs       {gib(m['output'])} (aliased with arguments: {gib(m['alias'])})",
      f"  temporaries   {gib(m['temp'])}",
      f"  generated code {gib(m['generated_code'])}",
      f"  total         {gib(m['total'])}",
  ]
  if report["fits"] is None:
    lines.append("fits            unknown HBM size for this topology (pass --hbm_gib)")
  else:
    lines.append(f"fits            {'yes' if report['fits'] else 'NO'} "
                 f"(HBM {report['hbm_gib_per_device']:g} GiB per device)")
  lines.append(f"compile         {report['compile_seconds']:.1f} s")
  return "\n".join(lines)


@gin.configurable(module="flame.aot")
def tpu_slice(topology: Optional[str] = None,
              chips_per_host_bounds: Optional[Sequence[int]] = None,
              num_slices: int = 1) -> dict[str, Any]:
  """The TPU slice a partitioning gin file is written for (``gin_configs/partitioning/
  v5e_16.gin`` binds ``tpu_slice.topology = "v5e:4x4"``): flame-aot's default --topology,
  --chips_per_host_bounds and --num_slices. Training ignores it."""
  return {"topology": topology, "chips_per_host_bounds": chips_per_host_bounds,
          "num_slices": num_slices}


def _parse_bounds(text: Optional[str]) -> Optional[tuple[int, ...]]:
  if not text:
    return None
  try:
    return tuple(int(x) for x in text.replace("x", ",").split(","))
  except ValueError:
    raise cli.UsageError(f"--chips_per_host_bounds={text!r}: expected e.g. 2,2,1") from None


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  from flame import gin_utils
  argv = list(sys.argv[1:] if argv is None else argv)
  files, bindings, rest = gin_utils.split_flags(argv)
  parser = argparse.ArgumentParser(
      prog="flame-aot", description="AOT-compile the train step for a TPU topology and "
      "report its memory per chip. Also takes --gin_file=F and --gin.NAME=VALUE.")
  parser.add_argument("--topology", default=None,
                      help="e.g. v5e:4x4, v4:4x4x4, v5p:4x4x4 (default: the tpu_slice of a "
                      "gin_configs/partitioning/<slice>.gin file)")
  parser.add_argument("--chips_per_host_bounds", default=None, help="e.g. 2,2,1")
  parser.add_argument("--num_slices", type=int, default=None)
  parser.add_argument("--chip_config_name", default=None,
                      help="libtpu chip config (default: megacore for v4, else default)")
  parser.add_argument("--hbm_gib", type=float, default=None,
                      help="HBM per chip in GiB (default by topology prefix: "
                      + ", ".join(f"{k} {v:g}" for k, v in HBM_GIB_PER_CHIP.items()) + ")")
  parser.add_argument("--json", action="store_true", help="print the report as JSON only")
  opts = parser.parse_args(rest)
  if not files:
    raise cli.UsageError("at least one --gin_file=FILE is required (see gin_configs/)")
  if not libtpu_available():
    raise TopologyError(f"libtpu not installed. {INSTALL_HINT}")
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and "cpu" not in platforms.lower().split(","):
    try:
      from jax._src import hardware_utils
      chips = hardware_utils.num_available_tpu_chips_and_device_id()[0]
    except Exception:  # pragma: no cover - private API moved
      chips = 1
    if chips == 0:
      raise TopologyError(f"JAX_PLATFORMS={platforms!r} but this machine has no TPU "
                       "chips; unset JAX_PLATFORMS or set it to cpu (the topology is "
                       "compile-only and needs no TPU)")
  gin.clear_config()
  gin_utils.parse(files, bindings, finalize=False)
  target = tpu_slice()
  topology = opts.topology or target["topology"]
  if not topology:
    raise cli.UsageError("no topology: pass --topology=v5e:4x4 (or include a "
                         "gin_configs/partitioning/<slice>.gin file, which names its slice)")
  # A --topology flag brings its own bounds and slices; otherwise the slice file's apply.
  slice_defaults = {"chips_per_host_bounds": None, "num_slices": 1} if opts.topology else target
  bounds = _parse_bounds(opts.chips_per_host_bounds) or slice_defaults["chips_per_host_bounds"]
  num_slices = opts.num_slices or slice_defaults["num_slices"]
  report = compile_for_topology(files, bindings, topology, bounds, num_slices, opts.hbm_gib,
                                opts.chip_config_name, parse_gin=False)
  print(json.dumps(report, indent=1) if opts.json else format_report(report), flush=True)
  return report


def console_main() -> None:
  """`flame-aot`: exit 0 after the report, 2 on an expected error (see `flame.cli`)."""
  cli.console("flame-aot", main)

