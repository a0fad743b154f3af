"""Merge entry point: ``python -m merging.merge`` (console script ``flame-merge``).

Two ways to say what to merge:

  gin (T5X-style; one file per method in gin_configs/merging/)::

    python -m merging.merge --gin_file=merging/ties.gin \\
      --gin.BASE=/ckpt/base --gin.EXPERTS="['/ckpt/a', '/ckpt/b']" \\
      --gin.OUTPUT_DIR=/ckpt/merged [--gin.DENSITY=0.1 --gin.LAMBDA=1.5 --gin.WEIGHTS=[...]]

  a mergekit-style YAML (`merging.mergekit_config`)::

    python -m merging.merge --config=merge.yml --output_dir=/ckpt/merged

Both end in `merge()`, which streams the checkpoints parameter by parameter
(`merging.io.stream_merge`) into ``OUTPUT_DIR/<step>`` (step 0 by default), a params-only
checkpoint that `Checkpointer.restore_params` and `train.init_params_from` read; its meta
records the base's model config and the merge (method, settings, weights, sources).
`merge_params` is the same merge on in-memory parameter dicts (for small models and sweeps).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Mapping, Optional, Sequence

import gin
import numpy as np

from flame import cli, compile_cache, distributed, files, gin_utils, partitioning
from flame.checkpoints import imported
from merging import io, lineage, mergekit_config, spec as spec_lib, staged_checkpoint, staged_hf

if __name__ == "__main__":
  # `python -m merging.merge` runs this file as __main__; run the importable module instead
  # so gin registers each configurable once, under merging.merge.
  from merging import merge as _importable
  _importable.console_main()


def merge_params(base_params: Optional[Mapping[str, Any]],
                 expert_params_list: Sequence[Mapping[str, Any]], method: str, weights=None,
                 global_trim: bool = False, seed: int = 0, out_dtype=None,
                 **method_params) -> dict:
  """Merges nested parameter dicts in memory, parameter by parameter, as `merge` does.

  base_params: the base model's parameters (None only for `linear`); expert_params_list: one
  nested dict per expert with the same keys and shapes; `method`, `weights`, `global_trim`,
  `seed` and `method_params` (density, lam, ...) as in `merging.spec.MergeSpec`. Returns the
  merged nested dict (jax arrays; dtype `out_dtype`, default the base's per parameter).
  """
  spec = spec_lib.make_spec(method, weights, method_params, global_trim, seed)
  spec.validate(len(expert_params_list))
  if base_params is None and spec.entry.uses_base:
    raise ValueError(f"{method} needs the base model's parameters")
  flat_base = None if base_params is None else imported.flatten(base_params)
  flat_experts = [imported.flatten(params) for params in expert_params_list]
  labelled = ([("the base", flat_base)] if flat_base is not None else []) + [
      (f"expert #{i}", flat) for i, flat in enumerate(flat_experts)]
  keys = io.check_same_parameters(labelled[0], labelled[1:])
  thresholds = None
  if global_trim:
    def task_vectors():
      for key in keys:
        yield spec_lib.parameter_name(key), spec_lib.task_vectors(
            flat_base[key], [flat[key] for flat in flat_experts])
    entries = sum(int(np.size(flat_base[key])) for key in keys)
    thresholds = spec_lib.global_thresholds(spec, task_vectors, entries, len(flat_experts))
  return imported.unflatten({
      key: spec_lib.merge_tensor(spec, spec_lib.parameter_name(key),
                                 None if flat_base is None else flat_base[key],
                                 [flat[key] for flat in flat_experts], thresholds=thresholds,
                                 out_dtype=out_dtype)
      for key in keys})


@gin.configurable
def merge(base: Optional[str], experts: Sequence[str], output_dir: str, method: str,
          weights: Optional[Sequence[float]] = None,
          method_params: Optional[Mapping[str, Any]] = None, global_trim: bool = False,
          seed: int = 0, out_dtype: Optional[str] = None, step: int = 0,
          mesh_shape: Optional[Sequence[int]] = None,
          mesh_axis_names: Optional[Sequence[str]] = None, overwrite: bool = False,
          progress_bar: bool = True, extra_meta: Optional[dict] = None,
          memory_budget: Any = io.DEFAULT_MEMORY_BUDGET, output_format: str = "orbax") -> str:
  """Merges checkpoints into ``output_dir/<step>``; returns that path.

  Args:
    base: base checkpoint, ``DIR`` (latest step) or ``DIR/<step>``, or a Hugging Face
      safetensors folder; None only for linear.
    experts: expert checkpoints, Orbax or Hugging Face (same parameters as the base).
    output_dir: where the merged checkpoint goes (a Checkpointer directory; with
      output_format "hf", the model folder itself).
    method: a `merging.methods.METHODS` name (ties, dare_ties, task_arithmetic, ...).
    weights: one weight per expert (see the method's docstring; None = all 1.0).
    method_params: the method's settings, e.g. {"density": 0.2, "lam": 1.0}.
    global_trim: TIES/Breadcrumbs trimming over the whole model instead of per tensor.
    seed: seed of DARE/DELLA masks.
    out_dtype: dtype of the merged parameters ("bfloat16", ...; default: the base's).
    step: the output step number.
    mesh_shape, mesh_axis_names: a device mesh (one -1 entry takes the remaining devices;
      names default to axis_0, ...) over all of whose devices each parameter's largest
      divisible dimension is sharded while merging (None: everything on one device).
    overwrite: replace an existing ``output_dir/<step>``.
    progress_bar: show tqdm bars over parameters (and threshold passes).
    extra_meta: more JSON to record under meta["merge"].
    memory_budget: bytes (or "2GiB", "512MB") of parameters in flight; they are read, merged
      and written in batches of up to half of it, so peak host memory follows the budget.
    output_format: "orbax" (a params checkpoint) or "hf" (a transformers safetensors folder
      that `from_pretrained` loads; config.json from the base's model config).
  """
  spec = spec_lib.make_spec(method, weights, method_params, global_trim, seed)
  spec.validate(len(experts))  # Settings first: a refused merge writes nothing.
  memory_budget = files.parse_size(memory_budget, "--memory_budget (merge.memory_budget)")
  if len(experts) == 1 and spec.entry.magnitude_ranks is not None:
    logging.warning("%s with one expert: the sign election has nothing to resolve; this is "
                    "the expert's trimmed task vector added to the base", method)
  if output_format not in io.OUTPUT_FORMATS:
    raise ValueError(f"output_format={output_format!r} (--output_format); expected one of "
                     f"{', '.join(io.OUTPUT_FORMATS)}")
  files.check_output("--output_dir (merge.output_dir)", output_dir,
                     [("base", base)] + [(f"expert {i + 1}", e) for i, e in enumerate(experts)])
  if output_format == "hf":
    staged_hf.check_output_dir(output_dir, overwrite)
  else:
    staged_checkpoint.check_output_dir(output_dir)
  sharding_fn = None
  if mesh_shape is not None:
    names = mesh_axis_names or tuple(f"axis_{i}" for i in range(len(mesh_shape)))
    mesh = partitioning.make_mesh(mesh_shape, names)
    logging.info("merging on mesh %s", dict(mesh.shape))
    sharding_fn = io.largest_dim_sharding(mesh)
  lineage.check_same_base(base, list(experts))
  return io.stream_merge(spec, base, list(experts), output_dir, step=step,
                         out_dtype=out_dtype, sharding_fn=sharding_fn, overwrite=overwrite,
                         extra_meta=extra_meta, progress_bar=progress_bar,
                         memory_budget=memory_budget, output_format=output_format)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="flame-merge", description="Merge fine-tuned Orbax checkpoints (see merging/).",
      epilog="Gin: --gin_file=merging/ties.gin --gin.BASE=... --gin.EXPERTS=\"[...]\" "
             "--gin.OUTPUT_DIR=...  mergekit: --config=merge.yml --output_dir=DIR")
  parser.add_argument("--config", help="mergekit-style YAML (instead of --gin_file)")
  parser.add_argument("--output_dir", help="output directory (required with --config)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing OUTPUT_DIR/<step>")
  parser.add_argument("--seed", type=int, help="seed of DARE/DELLA masks")
  parser.add_argument("--global_trim", action="store_true",
                      help="with --config: TIES/Breadcrumbs trimming over the whole model")
  parser.add_argument("--mesh_shape", help="with --config: e.g. 8 or 2,4 (default: 1 device)")
  parser.add_argument("--memory_budget",
                      help="bytes of parameters in flight, e.g. 4GiB (default 2GiB); "
                      "parameters move in batches of up to half of it")
  parser.add_argument("--output_format", choices=io.OUTPUT_FORMATS,
                      help="orbax (default: OUTPUT_DIR/<step>, our checkpoint) or hf (OUTPUT_DIR "
                      "becomes a transformers safetensors folder)")
  parser.add_argument("--compile_cache", metavar="DIR",
                      help="keep compiled merge kernels in DIR for the next merge (default: "
                      f"${compile_cache.ENV} or ~/.cache/flame/xla; 'off' to disable)")
  parser.add_argument("--no_progress_bar", action="store_true")
  distributed.add_flags(parser)
  return parser


def main(argv: Optional[Sequence[str]] = None) -> str:
  """Command line entry point (`flame-merge`); prints and returns the merged step's path."""
  files, bindings, rest = gin_utils.split_flags(sys.argv[1:] if argv is None else argv)
  args = _parser().parse_args(rest)
  cli.setup_logging()
  if args.output_format == "hf" and (args.multihost or (args.num_processes or 1) > 1):
    # Before joining: the peers would otherwise wait for a job that is refused anyway.
    raise cli.UsageError("--output_format=hf is written by one process; in a multi-process "
                         "job merge into an Orbax checkpoint (the default) and export it with "
                         "flame-convert")
  compile_cache.enable(args.compile_cache)
  distributed.initialize_from(args)
  path = _run(args, files, bindings)
  print(path)
  return path


def console_main() -> None:
  """`flame-merge`: exit 0 after a merge (the path is printed once, by `main`), 2 on an
  expected error (see `flame.cli`), with ``--debug`` its traceback."""
  cli.console("flame-merge", main)


def _run(args: argparse.Namespace, files: list[str], bindings: list[str]) -> str:
  overrides: dict[str, Any] = {}
  if args.overwrite:
    overrides["overwrite"] = True
  if args.seed is not None:
    overrides["seed"] = args.seed
  if args.no_progress_bar:
    overrides["progress_bar"] = False
  if args.memory_budget:
    overrides["memory_budget"] = args.memory_budget
  if args.output_format:
    overrides["output_format"] = args.output_format
  if args.config:
    if files or bindings:
      raise cli.UsageError("--config (mergekit YAML) and --gin_file/--gin.* cannot be combined")
    if not args.output_dir:
      raise cli.UsageError("--output_dir is required with --config")
    kwargs = dict(mergekit_config.load(args.config), **overrides)
    if args.global_trim:
      kwargs["global_trim"] = True
    if args.mesh_shape:
      kwargs["mesh_shape"] = tuple(int(d) for d in args.mesh_shape.split(","))
    return merge(output_dir=args.output_dir, **kwargs)
  if not files:
    raise cli.UsageError("give --gin_file=merging/<method>.gin (see gin_configs/merging/) or "
                     "--config=merge.yml")
  if args.global_trim or args.mesh_shape:
    raise cli.UsageError("with gin, set merge.global_trim / merge.mesh_shape as --gin.* flags")
  if args.output_dir:  # Bindings, not a keyword: gin requires the method files' OUTPUT_DIR.
    bindings = [*bindings, f"OUTPUT_DIR = {args.output_dir!r}",
                f"merge.output_dir = {args.output_dir!r}"]
  gin_utils.parse(files, bindings)
  path = merge(**overrides)
  # Next to the step folders of an Orbax output; inside a Hugging Face output folder.
  hf_output = os.path.isfile(os.path.join(path, staged_hf.hf.CONFIG_FILE))
  if distributed.is_leader():
    gin_utils.write_operative_config(path if hf_output else os.path.dirname(path))
  return path
