"""Tail-patch runs: fine-tune a partial checkpoint on one training task alone, score targets.

    python -m flame.tailpatch.run --gin_file=models/decoder_tiny.gin \\
      --gin_file=flame/flame.gin --init=/tmp/flame/checkpoints/2000 \\
      --out_dir=/tmp/tailpatch --all     # or --task_index=3, --task=NAME, --list

The tasks are those of the vanilla mixture (``settings.mixture``, by default the gin's
MIXTURE_OR_TASK_NAME), sorted by name; ``--task_index=i`` runs the i-th (one job per task on a
grid), ``--task=NAME`` one by name, ``--all`` every one in turn. A patch run is an ordinary
`flame.train.train` run (the same gin: model, mesh, optimizer, batch size, feature lengths)
plus ``tailpatch/tailpatch.gin`` (a constant learning rate; appended by the runner) with
MODEL_DIR ``OUT/tasks/<task>``, the task alone as its data, ``init_params_from`` the
checkpoint and `settings.steps` steps; the target categories (`flame.tailpatch.categories`,
dev split) are scored every ``steps / eval_points`` steps, and once on the unpatched
checkpoint (``OUT/baseline.json``, step 0 of every curve).

Output, each file written atomically: ``OUT/results/<task>.json`` with the curve per
category (steps, accuracies), the examples and tokens the patch trained on and the init
checkpoint it started from. Idempotent: a task with a result file is skipped; a killed task
resumes from its own checkpoints (`train` replays the same batches), so its result equals an
uninterrupted run's. A result file or baseline from another init checkpoint, or with other
categories or steps, is refused, never mixed in. Patch checkpoints are deleted once the
result is written unless `settings.keep_checkpoints`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Mapping, Optional, Sequence

if __name__ == "__main__":
  from flame.tailpatch import run as _importable
  sys.exit(_importable.main())

import gin

from flame import cli, distributed, files, gin_utils, plot, train
from flame.autorater import autorater
from flame.checkpoints import convert, manager
# mixtures registers its configurables here, before any gin file is parsed: a gin file that
# does not import it would otherwise fail once the config is locked.
from flame.data import mixtures, tasks as flame_tasks
from flame.models import base, decoder, t5  # noqa: F401  (register their configurables before gin locks)
from flame.tailpatch import analyze, categories as categories_lib

RESULT_VERSION = 1


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Settings:
  """What a tail-patch grid does (gin: ``Settings.steps = 100`` …).

  mixture: the vanilla mixture; its tasks are the ones patched.
  steps: patch steps per task (FLAMe: up to 3,000).
  eval_points: the categories are scored every steps / eval_points steps (and at step 0).
  categories: category -> training tasks whose dev split scores it.
  limit_per_task: dev examples per task (the first by id); 200 because below ~200 pairs per
    category the ratings order tasks little better than chance (docs/tailpatch.md).
  judge_batch_size, max_input_length: the autorater's (see `flame.autorater.autorater`).
  keep_checkpoints: keep each patch's checkpoints after its result is written.
  dtype: compute dtype of the patch runs and their scoring ("float32", "bfloat16"; None: the
    model's gin setting for training, the init checkpoint's for scoring); `--dtype`.
  continue_optimizer: start each patch from the init checkpoint's optimizer state too (Adam's
    moments: the patch continues the vanilla run on one task) rather than a fresh one, whose
    first steps move every parameter by about the learning rate whatever its gradient.
  """
  mixture: str = gin.REQUIRED
  steps: int = 100
  eval_points: int = 4
  categories: Mapping[str, Sequence[str]] = dataclasses.field(
      default_factory=lambda: dict(categories_lib.DEFAULT_CATEGORIES))
  limit_per_task: int = 200
  judge_batch_size: int = 8
  max_input_length: int = 1024
  keep_checkpoints: bool = False
  dtype: Optional[str] = None
  continue_optimizer: bool = False

  def __post_init__(self):
    if self.steps < 1 or self.eval_points < 1 or self.steps % self.eval_points:
      raise ValueError(f"Settings.steps={self.steps} must be a positive multiple of "
                       f"Settings.eval_points={self.eval_points}")
    object.__setattr__(self, "categories", categories_lib.check(self.categories))
    if self.dtype is not None:
      base.check_compute_dtype(self.dtype, "Settings.dtype")

  def identity(self) -> dict[str, Any]:
    """What a result must share with this grid to belong to it."""
    identity = {"steps": self.steps, "eval_points": self.eval_points,
                "categories": {c: list(t) for c, t in self.categories.items()},
                "limit_per_task": self.limit_per_task}
    if self.continue_optimizer:  # absent when off: results written before it still match
      identity["continue_optimizer"] = True
    return identity


TAILPATCH_GIN = "tailpatch/tailpatch.gin"


def configure(gin_files: Sequence[str], bindings: Sequence[str] = ()) -> Settings:
  """Parses the vanilla run's gin files plus TAILPATCH_GIN and `bindings`; returns the
  Settings, with the TRAIN_STEPS macro bound to Settings.steps (MODEL_DIR is set per patch)."""
  gin_utils.parse(list(gin_files) + [TAILPATCH_GIN], bindings, finalize=False)
  settings = Settings()  # pylint: disable=no-value-for-parameter
  for binding in gin_utils.compute_dtype_bindings(settings.dtype):
    gin.parse_config(binding)
  gin.bind_parameter("TRAIN_STEPS/macro.value", settings.steps)
  gin.bind_parameter("MODEL_DIR/macro.value", "set-per-task-by-flame.tailpatch.run")
  gin.finalize()
  return settings


def resolve_init(path: str) -> str:
  """The absolute ``…/checkpoints/<step>`` directory a checkpoint path names."""
  try:
    checkpointer, step = convert.checkpoint_step(path)
  except manager.CheckpointError as e:
    raise FileNotFoundError(f"--init={path}: no checkpoint step found ({e})") from e
  return os.path.join(checkpointer.directory, str(step))


def mixture_tasks(mixture: str) -> list[str]:
  """The seqio task names of a mixture (or the task itself), sorted."""
  try:
    return sorted(mixtures.rates(mixture))
  except ValueError as e:
    raise ValueError(f"Settings.mixture={mixture!r}: not a registered seqio mixture or task "
                     "(import its module, e.g. from a gin file)") from e


def flame_name(seqio_task: str) -> str:
  """``flame_<task>_<vocabulary>`` -> ``<task>``."""
  return flame_tasks.info(seqio_task).task


class Grid:
  """The tail-patch runs of one init checkpoint under one output folder."""

  def __init__(self, settings: Settings, init: str, out_dir: str):
    self.settings, self.init, self.out_dir = settings, resolve_init(init), out_dir
    self.tasks = mixture_tasks(settings.mixture)
    self._rater = None
    self._items = None

  # ---- files -------------------------------------------------------------------------------
  def result_path(self, task: str) -> str:
    return os.path.join(self.out_dir, "results", f"{flame_name(task)}.json")

  def _check_belongs(self, path: str, record: Mapping[str, Any]) -> None:
    if record.get("init") != self.init:
      raise ValueError(f"{path} was made from init checkpoint {record.get('init')!r}, not "
                       f"{self.init!r}: use another --out_dir or delete it")
    for key, value in self.settings.identity().items():
      if record.get(key) != value:
        raise ValueError(f"{path} has {key}={record.get(key)!r} but this grid has "
                         f"{key}={value!r}: use another --out_dir or delete it")

  def _read(self, path: str) -> Optional[dict]:
    if not os.path.exists(path):
      return None
    with open(path, encoding="utf-8") as f:
      try:
        record = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON result file ({e})") from e
    self._check_belongs(path, record)
    return record

  def _write(self, path: str, record: Mapping[str, Any]) -> None:
    """Process 0 writes; every process waits until it has (they all read it next)."""
    if distributed.is_leader():
      files.write_text_atomically(path, json.dumps(record, indent=1) + "\n")
    distributed.barrier(f"tailpatch-wrote:{path}")

  # ---- scoring -----------------------------------------------------------------------------
  def _scorer(self):
    if self._rater is None:
      self._rater = autorater.Autorater.load(
          self.init, dtype=self.settings.dtype, batch_size=self.settings.judge_batch_size,
          max_input_length=self.settings.max_input_length)
      self._items = categories_lib.dev_items(self.settings.categories,
                                             self.settings.limit_per_task)
    return categories_lib.scorer(self._rater, self._items)

  def baseline(self) -> dict:
    """The unpatched checkpoint's category scores (computed once, ``OUT/baseline.json``)."""
    path = os.path.join(self.out_dir, "baseline.json")
    record = self._read(path)
    if record is None:
      score = self._scorer()
      scores = score(self._rater.params)
      counts = {c: sum(i.subset == c for i in self._items) for c in self.settings.categories}
      record = {"version": RESULT_VERSION, "init": self.init, **self.settings.identity(),
                "dev": {c: scores[f"dev/{c}"] for c in self.settings.categories},
                "dev_debiased": {c: scores[f"dev_debiased/{c}"]
                                 for c in self.settings.categories},
                "dev_examples": counts}
      self._write(path, record)
      rules = analyze.Rules()
      weak = {c: v for c, v in record["dev"].items()
              if v < rules.chance + rules.competence_margin - analyze.EPS}
      if weak:
        logging.warning(
            "the checkpoint to patch is near chance on %s: patches will mostly measure how "
            "far each task moves an uncalibrated judge; a later checkpoint of the vanilla run "
            "rates tasks better (docs/tailpatch.md)",
            ", ".join(f"{c} ({100 * v:.1f}%)" for c, v in weak.items()))
    return record

  # ---- patching ----------------------------------------------------------------------------
  def task_of(self, index: Optional[int] = None, name: Optional[str] = None) -> str:
    if index is not None:
      if not 0 <= index < len(self.tasks):
        raise ValueError(f"--task_index={index}: the mixture {self.settings.mixture!r} has "
                         f"{len(self.tasks)} tasks (0 to {len(self.tasks) - 1})")
      return self.tasks[index]
    for task in self.tasks:
      if name in (task, flame_name(task)):
        return task
    raise ValueError(f"--task={name!r} is not a task of the mixture {self.settings.mixture!r}; "
                     f"its tasks: {[flame_name(t) for t in self.tasks]}")

  def patch(self, task: str) -> dict:
    """Runs (or resumes, or skips) the patch on `task`; returns its result."""
    path = self.result_path(task)
    record = self._read(path)
    if record is not None:
      logging.info("%s: done already (%s)", task, path)
      return record
    baseline = self.baseline()
    settings = self.settings
    model_dir = os.path.join(self.out_dir, "tasks", flame_name(task))
    every = settings.steps // settings.eval_points
    start = time.time()
    _, metrics = train.train(model_dir=model_dir, mixture_or_task_name=task,
                             train_steps=settings.steps, init_params_from=self.init,
                             init_optimizer_state=settings.continue_optimizer,
                             eval_every=every, checkpoint_every=every,
                             eval_fn=self._scorer())
    distributed.barrier(f"tailpatch-trained:{model_dir}")  # process 0 wrote the metrics
    rows = [r for r in plot.read_metrics(os.path.join(model_dir, "eval", "metrics.jsonl"))
            if any(k.startswith("dev/") for k in r)]
    expected = list(range(every, settings.steps + 1, every))
    if [r["step"] for r in rows] != expected:
      raise RuntimeError(f"{model_dir}/eval/metrics.jsonl has dev scores at steps "
                         f"{[r['step'] for r in rows]}, expected {expected}")
    record = {"version": RESULT_VERSION, "task": flame_name(task), "seqio_task": task,
              "init": self.init, **settings.identity(), "steps_evaluated": [0] + expected,
              "dev": {c: [baseline["dev"][c]] + [r[f"dev/{c}"] for r in rows]
                      for c in settings.categories},
              **({"dev_debiased": {
                  c: [baseline["dev_debiased"][c]] + [r[f"dev_debiased/{c}"] for r in rows]
                  for c in settings.categories}} if "dev_debiased" in baseline else {}),
              "dev_examples": baseline["dev_examples"],
              "examples": int(metrics["examples_seen"]), "tokens": int(metrics["tokens_seen"]),
              "seconds": round(time.time() - start, 1)}
    self._write(path, record)
    if not settings.keep_checkpoints and distributed.is_leader():
      shutil.rmtree(os.path.join(model_dir, "checkpoints"), ignore_errors=True)
    return record


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="flame-tailpatch", description=__doc__.split("\n\n")[0])
  p.add_argument("--init", required=True, help="the partial vanilla checkpoint to patch")
  p.add_argument("--out_dir", required=True)
  which = p.add_mutually_exclusive_group(required=True)
  which.add_argument("--task_index", type=int, help="the i-th task of the mixture (sorted)")
  which.add_argument("--task", help="a task of the mixture, by FLAMe or seqio name")
  which.add_argument("--all", action="store_true", help="every task of the mixture in turn")
  which.add_argument("--list", action="store_true", help="print the tasks with their indices")
  cli.add_dtype_flag(p)
  p.add_argument("--debug", action="store_true")
  distributed.add_flags(p)
  return p


def run(settings: Settings, args) -> list[dict]:
  files.check_output("--out_dir", args.out_dir, [("--init", args.init)])
  grid = Grid(settings, args.init, args.out_dir)
  if args.list:
    for i, task in enumerate(grid.tasks):
      print(f"{i}\t{flame_name(task)}")
    return []
  if args.all:
    chosen = grid.tasks
  else:
    chosen = [grid.task_of(args.task_index, args.task)]
  out = []
  for n, task in enumerate(chosen, 1):
    logging.info("tail-patch %d/%d: %s", n, len(chosen), task)
    out.append(grid.patch(task))
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  cli.setup_logging()
  gin_files, bindings, rest = gin_utils.split_flags(argv)
  args = build_parser().parse_args(rest)

  def body():
    distributed.initialize_from(args)
    dtype = [] if args.dtype is None else [f"{Settings.__module__}.Settings.dtype = {args.dtype!r}"]
    return run(configure(gin_files, list(bindings) + dtype), args)
  return cli.run("flame-tailpatch", body,
                 lambda results: "\n".join(f"{r['task']}: " + ", ".join(
                     f"{c} {v[0]:.3f}→{v[-1]:.3f}" for c, v in r["dev"].items())
                                           for r in results), args.debug)


def console_main() -> None:
  sys.exit(main())
