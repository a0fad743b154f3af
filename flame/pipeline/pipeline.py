"""``flame-pipeline``: from data to a merged autorater, one command, one report.

    flame-pipeline [--gin_file=pipelines/quickstart.gin] [--work_dir=/tmp/flame_pipeline] \\
      [--stages=prepare,vanilla,...] [--gin.PipelineSettings.vanilla_steps=400 ...]

(``python -m flame.pipeline.pipeline`` is the same.) The stages, each calling the library
function behind an entry point, each resumable and skipped when done (`flame.pipeline.runner`):

  prepare    the mixture's tasks from the real collection (mirror or download) and the
             synthetic controlled tasks, prepared and counted; the random initial checkpoint
  vanilla    `flame.train`: the vanilla autorater, examples-proportional (capped), from the
             initial checkpoint, keeping the partial checkpoint tail-patching starts from
  tailpatch  `flame.tailpatch.run` on every task from the partial checkpoint, then
             `flame.tailpatch.analyze`: gains per target category and mixture weights
  optimised  `flame.train`: FLAMe-Opt, from the initial checkpoint on those weights, the same
             steps as the vanilla run; the compute accounting of both
  experts    `flame.train`: capability experts fine-tuned from the vanilla autorater, and the
             multitask baseline (the union of their data, the same total steps)
  merge      `merging.merge.merge`: the first k experts (k = 2 … all) with every method
  evaluate   `flame.autorater.evaluate` of every model: the held-out suite and the experts'
             held-in tasks, both orders of each pair
  report     WORK_DIR/report.md (+ figures/*.png): tables, figures and the seed's two claims

`PipelineSettings` (gin) says what each stage does; gin_configs/pipelines/quickstart.gin runs on a
laptop's CPU in minutes with the tiny byte-level decoder, pipelines/smollm2.gin on
SmolLM2-135M-Instruct.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Mapping, Optional, Sequence

if __name__ == "__main__":
  from flame.pipeline import pipeline as _importable
  _importable.console_main()

import gin

from flame import cli, compile_cache, files, gin_utils
from flame.pipeline import runner

DEFAULT_GIN = "pipelines/quickstart.gin"
MIXTURE_PREFIX = "flame_pipeline_"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PipelineSettings:
  """What the pipeline does (gin: ``PipelineSettings.vanilla_steps = 400`` …).

  tasks: the vanilla mixture's training tasks (FLAMe task names; synthetic ones included).
  model_gin, model_bindings: the model (a gin_configs/models file and bindings over it).
  vocabulary: the tasks' vocabulary ("bytes", "smollm2", ...).
  initial_checkpoint: start from this checkpoint (e.g. an imported SmolLM2) instead of
    random parameters written by `prepare`.
  feature_lengths, batch_size, learning_rate, cap, pack: every training run's.
  vanilla_steps, partial_steps: the vanilla (and optimised) run's steps; tail-patching starts
    from the checkpoint at partial_steps.
  patch_steps, patch_eval_points, dev_limit, categories: tail-patch runs (`PipelineSettings` of
    flame.tailpatch.run: steps, eval_points, limit_per_task, categories).
  experts: expert name -> its training tasks (held-in tasks: those with labels).
  expert_steps, expert_learning_rate: each expert's fine-tuning; the multitask baseline
    trains on all experts' tasks for expert_steps x number of experts steps.
  merge_methods: method -> its settings (`merging.spec` parameters); weights are 1.0.
  heldout_per_subset, heldin_per_task: evaluation examples (both orders of each pair).
  eval_batch_size, eval_input_length: the autorater's batch and input budget when judging.
  dtype: what every training run, tail-patch and evaluation computes in ("float32", or
    "bfloat16": bf16 matmuls over float32 parameters and optimizer state, float32 softmax,
    norms and loss).
  seed: every training run's and merge's seed.
  """
  tasks: Sequence[str] = gin.REQUIRED
  experts: Mapping[str, Sequence[str]] = gin.REQUIRED
  categories: Mapping[str, Sequence[str]] = gin.REQUIRED
  model_gin: str = "models/decoder_tiny.gin"
  model_bindings: Sequence[str] = ()
  vocabulary: str = "bytes"
  initial_checkpoint: Optional[str] = None
  feature_lengths: Mapping[str, int] = dataclasses.field(
      default_factory=lambda: {"inputs": 512, "targets": 32})
  batch_size: int = 16
  learning_rate: float = 3e-3
  cap: int = 2 ** 16
  pack: bool = True
  vanilla_steps: int = 200
  partial_steps: int = 100
  patch_steps: int = 20
  patch_eval_points: int = 2
  dev_limit: int = 48
  expert_steps: int = 100
  expert_learning_rate: float = 1e-3
  merge_methods: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=lambda: {
      "linear": {}, "task_arithmetic": {"lam": 1.0}, "ties": {"density": 0.2, "lam": 1.0},
      "dare_ties": {"density": 0.5, "lam": 1.0}})
  heldout_per_subset: int = 32
  heldin_per_task: int = 32
  eval_batch_size: int = 16
  eval_input_length: Optional[int] = None
  dtype: str = "float32"
  seed: int = 0

  def __post_init__(self):
    from flame.models import base  # pylint: disable=import-outside-toplevel
    base.check_compute_dtype(self.dtype, "PipelineSettings.dtype")


# ---------------------------------------------------------------------------------------------
# Where things go.


def _under_work_dir(name: str) -> property:
  return property(lambda self: os.path.join(self.work_dir, name),
                  doc=f"WORK_DIR/{name}")


@dataclasses.dataclass(frozen=True)
class Paths:
  """Every output's place under the work folder."""
  work_dir: str
  initial = _under_work_dir("initial")
  vanilla = _under_work_dir("vanilla")
  tailpatch = _under_work_dir("tailpatch")
  optimised = _under_work_dir("optimised")
  multitask = _under_work_dir("multitask")

  def expert(self, name: str) -> str:
    return os.path.join(self.work_dir, "experts", name)

  def merged(self, method: str, k: int) -> str:
    return os.path.join(self.work_dir, "merges", f"{method}_{k}")

  def evaluation(self, model: str) -> str:
    return os.path.join(self.work_dir, "eval", f"{model.replace('/', '_')}.json")


def checkpoint_of(model_dir: str) -> str:
  """A training run's checkpoints folder (its latest step is the model)."""
  return os.path.join(model_dir, "checkpoints")


# ---------------------------------------------------------------------------------------------
# Training runs: flame.train with gin, as a user runs it.


def training_bindings(settings: PipelineSettings, model_dir: str, steps: int, mixture: str,
                      mixture_bindings: Mapping[str, Any], init_from: str,
                      learning_rate: Optional[float] = None,
                      checkpoint_every: Optional[int] = None) -> list[str]:
  """The gin bindings of one training run over runs/train.gin + the model's gin file."""
  return [
      f"MODEL_DIR = {model_dir!r}", f"TRAIN_STEPS = {steps}",
      f"BATCH_SIZE = {settings.batch_size}",
      f"LEARNING_RATE = {learning_rate or settings.learning_rate}",
      f"TASK_FEATURE_LENGTHS = {dict(settings.feature_lengths)!r}",
      "MIXTURE_OR_TASK_NAME = @mixtures.register_mixture()",
      f"mixtures.register_mixture.name = {MIXTURE_PREFIX + mixture!r}",
      f"mixtures.register_mixture.vocabulary = {settings.vocabulary!r}",
      "mixtures.register_mixture.exclude_builders = []",
      *[f"mixtures.register_mixture.{k} = {v!r}" for k, v in mixture_bindings.items()],
      f"train.init_params_from = {init_from!r}", f"train.seed = {settings.seed}",
      f"train.pack = {settings.pack}",
      f"train.checkpoint_every = {checkpoint_every or steps}", "train.keep_checkpoints = None",
      "train.progress_bar = False", "train.log_every = 10",
      *settings.model_bindings, *gin_utils.compute_dtype_bindings(settings.dtype)]


def gin_files(settings: PipelineSettings) -> list[str]:
  return ["runs/train.gin", settings.model_gin, "pipelines/training_run.gin"]


def train_run(settings: PipelineSettings, model_dir: str, steps: int, mixture: str,
              mixture_bindings: Mapping[str, Any], init_from: str, **kwargs) -> dict:
  """Trains (or resumes, or finds finished) one run; returns its final metrics and compute."""
  from flame import train  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  gin_utils.parse(gin_files(settings), training_bindings(
      settings, model_dir, steps, mixture, mixture_bindings, init_from, **kwargs))
  train.train()  # pylint: disable=no-value-for-parameter
  gin.clear_config()
  return {"model_dir": model_dir, "steps": steps, **seen(model_dir)}


def seen(model_dir: str) -> dict:
  """Examples and tokens a run trained on (its latest checkpoint's meta)."""
  from flame.tailpatch import analyze  # pylint: disable=import-outside-toplevel
  return analyze.checkpoint_seen(checkpoint_of(model_dir))


# ---------------------------------------------------------------------------------------------
# Stages.


def prepare(settings: PipelineSettings, paths: Paths) -> dict:
  """Prepares and counts the mixture's tasks, writes the initial checkpoint."""
  import seqio  # pylint: disable=import-outside-toplevel
  from flame.data import mixtures  # pylint: disable=import-outside-toplevel
  name = mixtures.register_mixture(name=MIXTURE_PREFIX + "vanilla", tasks=list(settings.tasks),
                                   vocabulary=settings.vocabulary, exclude_builders=[],
                                   cap=settings.cap)
  mixture = seqio.get_mixture_or_task(name)
  rates = {task.name: float(mixture.get_rate(task)) for task in mixture.tasks}
  examples = {task.name: int(task.num_input_examples("train") or 0) for task in mixture.tasks}
  for task in mixture.tasks:  # The tasks' own checks (inputs hold the instructions, targets
    # the verdict) now, not minutes later in the first training run.
    next(iter(task.get_dataset(dict(settings.feature_lengths), split="train", shuffle=False)))
  initial = settings.initial_checkpoint or write_initial(
      [settings.model_gin], settings.model_bindings, settings.seed, paths.initial)
  return {"mixture": name, "rates": rates, "train_examples": examples, "initial": initial}


def write_initial(model_gin_files: Sequence[str], bindings: Sequence[str], seed: int,
                  path: str) -> str:
  """Random parameters (seed `seed`) of the gin files' %MODEL as a checkpoint at `path`; an
  existing `path` is kept (a rerun finds the same initial checkpoint)."""
  import copy  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flame.checkpoints import imported  # pylint: disable=import-outside-toplevel
  if os.path.isdir(path):
    return path
  gin.clear_config()
  gin_utils.parse(list(model_gin_files), list(bindings))
  model = copy.deepcopy(gin.query_parameter("%MODEL"))
  gin.clear_config()
  params = jax.tree_util.tree_map(np.array, jax.device_get(model.init_params(
      jax.random.PRNGKey(seed), 1, {"inputs": 8, "targets": 8})))
  return imported.write_orbax(imported.ImportedModel(model.module.config, params,
                                                     {"format": "random", "seed": seed}), path)


def vanilla(settings: PipelineSettings, paths: Paths, initial: str) -> dict:
  return train_run(settings, paths.vanilla, settings.vanilla_steps, "vanilla",
                   {"tasks": list(settings.tasks), "cap": settings.cap}, initial,
                   checkpoint_every=settings.partial_steps)


def tailpatch_bindings(settings: PipelineSettings) -> list[str]:
  patch = "flame.tailpatch.run.Settings"
  categories = {k: list(v) for k, v in settings.categories.items()}
  return [f"{patch}.steps = {settings.patch_steps}",
          f"{patch}.eval_points = {settings.patch_eval_points}",
          f"{patch}.limit_per_task = {settings.dev_limit}",
          f"{patch}.categories = {categories!r}",
          f"{patch}.max_input_length = {eval_length(settings)}",
          f"{patch}.dtype = {settings.dtype!r}"]


def tailpatch(settings: PipelineSettings, paths: Paths, initial: str) -> dict:
  """Patches every task from the partial checkpoint, analyses, writes the weights."""
  from flame.tailpatch import analyze, run  # pylint: disable=import-outside-toplevel
  partial = os.path.join(checkpoint_of(paths.vanilla), str(settings.partial_steps))
  gin.clear_config()
  bindings = training_bindings(settings, "set-per-task", settings.vanilla_steps, "vanilla",
                               {"tasks": list(settings.tasks), "cap": settings.cap}, initial)
  patch_settings = run.configure(gin_files(settings), bindings + tailpatch_bindings(settings))
  run.run(patch_settings, run.build_parser().parse_args(
      [f"--init={partial}", f"--out_dir={paths.tailpatch}", "--all"]))
  gin.clear_config()
  analysis, _ = analyze.run(paths.tailpatch, analyze.Rules())
  return {"partial": partial, "order": analysis.order, "weights": analysis.weights,
          "gains": analysis.gains, "totals": analysis.totals, "baseline": analysis.baseline,
          "not_competent": analysis.not_competent,
          "small_dev": analysis.small_dev,
          "weights_file": os.path.join(paths.tailpatch, "analysis", "weights.tsv")}


def optimised(settings: PipelineSettings, paths: Paths, initial: str) -> dict:
  """FLAMe-Opt: from the initial checkpoint on the tail-patch weights, the vanilla run's
  steps; then the compute of tail-patching + this run against the vanilla run."""
  from flame.tailpatch import analyze  # pylint: disable=import-outside-toplevel
  weights = os.path.join(paths.tailpatch, "analysis", "weights.tsv")
  result = train_run(settings, paths.optimised, settings.vanilla_steps, "optimised",
                     {"weights_file": weights, "tasks": None}, initial)
  _, accounting = analyze.run(paths.tailpatch, analyze.Rules(), checkpoint_of(paths.vanilla),
                              checkpoint_of(paths.optimised))
  return dict(result, compute=accounting)


def experts(settings: PipelineSettings, paths: Paths) -> dict:
  """Each expert from the vanilla autorater on its tasks; the multitask baseline on all."""
  base = checkpoint_of(paths.vanilla)
  out = {}
  for name, tasks in settings.experts.items():
    out[name] = train_run(settings, paths.expert(name), settings.expert_steps, f"expert_{name}",
                          {"tasks": list(tasks), "cap": settings.cap}, base,
                          learning_rate=settings.expert_learning_rate)
  union = sorted({t for tasks in settings.experts.values() for t in tasks})
  out["multitask"] = train_run(settings, paths.multitask,
                               settings.expert_steps * len(settings.experts), "multitask",
                               {"tasks": union, "cap": settings.cap}, base,
                               learning_rate=settings.expert_learning_rate)
  return out


def merge(settings: PipelineSettings, paths: Paths) -> dict:
  """The first k experts merged with every method, k = 2 … all (streamed, flame-merge)."""
  from merging import merge as merge_lib  # pylint: disable=import-outside-toplevel
  names = list(settings.experts)
  out = {}
  for k in range(2, len(names) + 1):
    for method, params in settings.merge_methods.items():
      target = paths.merged(method, k)
      if not os.path.isdir(os.path.join(target, "0")):
        merge_lib.merge(checkpoint_of(paths.vanilla),
                        [checkpoint_of(paths.expert(n)) for n in names[:k]], target, method,
                        method_params=dict(params), seed=settings.seed, progress_bar=False,
                        overwrite=True)
      out[f"{method}_{k}"] = {"method": method, "num_experts": k, "experts": names[:k],
                              "params": dict(params), "checkpoint": os.path.join(target, "0")}
  return out


def eval_length(settings: PipelineSettings) -> int:
  return settings.eval_input_length or int(settings.feature_lengths["inputs"])


def heldin_tasks(settings: PipelineSettings) -> dict[str, list[str]]:
  """Expert -> its tasks that can be scored by accuracy (those with labels)."""
  from flame.data import sources  # pylint: disable=import-outside-toplevel
  specs = sources.task_specs()
  return {name: [t for t in tasks if specs[t][1].labels] for name, tasks in
          settings.experts.items()}


def models(settings: PipelineSettings, paths: Paths, records: Mapping[str, dict]) -> dict[str, str]:
  """Every model to evaluate: name -> checkpoint."""
  out = {"vanilla": checkpoint_of(paths.vanilla), "optimised": checkpoint_of(paths.optimised)}
  out.update({f"expert/{n}": checkpoint_of(paths.expert(n)) for n in settings.experts})
  out["multitask"] = checkpoint_of(paths.multitask)
  out.update({f"merge/{key}": r["checkpoint"]
              for key, r in records["merge"]["summary"].items()})
  return out


def evaluate(settings: PipelineSettings, paths: Paths, records: Mapping[str, dict]) -> dict:
  """Judges every model on the held-out suite and the held-in tasks; one JSON per model."""
  from flame.autorater import autorater, evaluate as evaluate_lib  # pylint: disable=import-outside-toplevel
  from flame.data import heldout  # pylint: disable=import-outside-toplevel
  items = evaluate_lib.heldout_items(settings.heldout_per_subset, tuple(heldout.SUBSET_TASKS))
  for tasks in heldin_tasks(settings).values():
    for task in tasks:
      items += evaluate_lib.task_items(task, "validation", settings.heldin_per_task, task)
  out = {}
  for name, checkpoint in models(settings, paths, records).items():
    path = paths.evaluation(name)
    if not os.path.exists(path):
      rater = autorater.Autorater.load(checkpoint, dtype=settings.dtype,
                                       batch_size=settings.eval_batch_size,
                                       max_input_length=eval_length(settings))
      result = evaluate_lib.evaluate(rater, items, True, heldout.CATEGORIES)
      result.pop("pairs")
      files.write_text_atomically(path, json.dumps(result, indent=1) + "\n")
      del rater
    with open(path, encoding="utf-8") as f:
      result = json.load(f)
    out[name] = {"accuracy": {s: v["accuracy"] for s, v in result["subsets"].items()},
                 "categories": result["categories"], "overall": result["overall"],
                 "swap_consistency": result.get("swap_consistency_overall"),
                 "examples": {s: v["count"] for s, v in result["subsets"].items()}}
  return out


def build_stages(settings: PipelineSettings, paths: Paths) -> list[runner.Stage]:
  def record(name):
    return runner.read_record(paths.work_dir, name)["summary"]

  def estimate(steps_fn):
    """Seconds from the vanilla run's pace (seconds per step, start-up included)."""
    def fn(done):
      if "vanilla" not in done:
        return None
      pace = done["vanilla"]["seconds"] / settings.vanilla_steps
      return pace * steps_fn()
    return fn

  num_tasks, num_experts = len(settings.tasks), len(settings.experts)
  return [
      runner.Stage("prepare", "prepare and count the mixture's tasks, write the initial "
                   "checkpoint", lambda: prepare(settings, paths)),
      runner.Stage("vanilla", f"train the vanilla autorater, {settings.vanilla_steps} steps",
                   lambda: vanilla(settings, paths, record("prepare")["initial"]),
                   needs=("prepare",)),
      runner.Stage("tailpatch", f"tail-patch {num_tasks} tasks, {settings.patch_steps} steps "
                   f"each, from step {settings.partial_steps}",
                   lambda: tailpatch(settings, paths, record("prepare")["initial"]),
                   # x3: each short patch run also starts up and scores the dev categories.
                   estimate(lambda: num_tasks * settings.patch_steps * 3),
                   needs=("prepare", "vanilla")),
      runner.Stage("optimised", f"train FLAMe-Opt on the tail-patch weights, "
                   f"{settings.vanilla_steps} steps",
                   lambda: optimised(settings, paths, record("prepare")["initial"]),
                   estimate(lambda: settings.vanilla_steps), needs=("prepare", "tailpatch")),
      runner.Stage("experts", f"fine-tune {num_experts} experts and the multitask baseline",
                   lambda: experts(settings, paths),
                   estimate(lambda: 2 * num_experts * settings.expert_steps),
                   needs=("vanilla",)),
      runner.Stage("merge", f"merge 2..{num_experts} experts with "
                   f"{', '.join(settings.merge_methods)}", lambda: merge(settings, paths),
                   needs=("vanilla", "experts")),
      runner.Stage("evaluate", "judge every model on the held-out suite and held-in tasks",
                   lambda: evaluate(settings, paths, all_records(settings, paths)),
                   needs=("vanilla", "optimised", "experts", "merge")),
      runner.Stage("report", "write report.md and the figures",
                   lambda: write_report(settings, paths),
                   needs=("prepare", "tailpatch", "optimised", "evaluate")),
  ]


def all_records(settings: PipelineSettings, paths: Paths) -> dict[str, dict]:
  stages = build_stages(settings, paths)
  return {s.name: r for s in stages if (r := runner.read_record(paths.work_dir, s.name))}


def write_report(settings: PipelineSettings, paths: Paths) -> dict:
  from flame.pipeline import report  # pylint: disable=import-outside-toplevel
  return report.write(settings, paths, runner.summaries(all_records(settings, paths)),
                      heldin_tasks(settings))


# ---------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="flame-pipeline", description=__doc__.split("\n\n")[0],
                              epilog="gin: --gin_file=pipelines/smollm2.gin "
                              "--gin.PipelineSettings.vanilla_steps=400")
  p.add_argument("--work_dir", default="/tmp/flame_pipeline",
                 help="every output; rerunning with the same folder resumes")
  p.add_argument("--stages", help="comma-separated subset of the stages (default: all): "
                 "prepare,vanilla,tailpatch,optimised,experts,merge,evaluate,report")
  p.add_argument("--debug", action="store_true", help="tracebacks for expected errors")
  return p


def configure(gin_files_: Sequence[str], bindings: Sequence[str]) -> PipelineSettings:
  gin.clear_config()
  gin_utils.parse(list(gin_files_) or [DEFAULT_GIN], bindings)
  settings = PipelineSettings()  # pylint: disable=no-value-for-parameter
  gin.clear_config()
  unknown = [t for tasks in settings.experts.values() for t in tasks if t not in settings.tasks]
  if unknown:
    logging.info("expert tasks outside the vanilla mixture: %s", unknown)
  if settings.vanilla_steps % settings.partial_steps:
    raise ValueError(f"PipelineSettings.vanilla_steps = {settings.vanilla_steps} must be a "
                     f"multiple of PipelineSettings.partial_steps = {settings.partial_steps}")
  if len(settings.experts) < 2:
    raise ValueError(f"PipelineSettings.experts names {len(settings.experts)} expert(s); merging needs "
                     "at least 2")
  return settings


def enable_compilation_cache(work_dir: str) -> None:
  """Every training run and evaluation compiles the same few programs: keep them on disk."""
  compile_cache.enable(os.path.join(work_dir, "xla_cache"))


def run(gin_files_: Sequence[str], bindings: Sequence[str], work_dir: str,
        stage_names: Optional[Sequence[str]] = None, out=sys.stdout) -> dict[str, dict]:
  """Runs the pipeline (library entry point); returns every stage's record."""
  settings = configure(gin_files_, bindings)
  paths = Paths(os.path.abspath(work_dir))
  stages = build_stages(settings, paths)
  chosen = runner.select(stages, stage_names, paths.work_dir)  # Before the first write.
  os.makedirs(paths.work_dir, exist_ok=True)
  enable_compilation_cache(paths.work_dir)
  runner.keep_settings(paths.work_dir, dataclasses.asdict(settings), [s.name for s in stages])
  return runner.run_stages(paths.work_dir, stages, chosen, out)


def main(argv: Optional[Sequence[str]] = None) -> str:
  gin_files_, bindings, args, names = runner.command_line(argv, build_parser())
  records = run(gin_files_, bindings, args.work_dir, names)
  return runner.report_path(args.work_dir, records)


def console_main() -> None:
  """`flame-pipeline`: exit 0 when done, 2 on an expected error (see `flame.cli`)."""
  cli.console("flame-pipeline", main)
