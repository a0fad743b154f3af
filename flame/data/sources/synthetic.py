"""Generated judge tasks with known ground truth (`flame.data.synthetic`), as TFDS builders.

No data files (``FILES = ()``): examples are generated, deterministically, from a size and a
seed held in the builder config.

* ``flame_synthetic`` (training): one config per synthetic training task (target, helpful,
  neutral and label-flipped tasks; see `flame.data.synthetic`), each with ``size`` =
  DEFAULT_SIZE examples and ``seed`` = 0, split into train/validation by a hash of the
  example's context (a flipped copy lands in the same split as its original) with the usual
  position-swap augmentation of pairwise train examples. Other sizes and seeds:
  ``tfds.builder("flame_synthetic", config=synthetic_config(task, size, seed))`` (a seqio
  ``TfdsDataSource`` takes it as ``tfds_builder_kwargs={"config": …}``); such a config is
  named ``<task>-n<size>-seed<seed>`` so each gets its own prepared folder.
* ``flame_lexicon`` (training): the tasks of `flame.data.lexicon` (banned-word judgments),
  built the same way with LEXICON_SIZE examples each (release LEXICON_RELEASE); their held-out
  pairs (`lexicon.heldout_examples`) are scored directly by the experiment that uses them, not
  as a held-out builder of the evaluation suite.
* ``flame_synthetic_heldout`` (held out, split ``test``): task ``synthetic_math_heldout``,
  the evaluation suite's Reasoning subset: HELDOUT_SIZE arithmetic pairs from a problem range
  disjoint from the training tasks' (addends 500-999 vs 10-499) and its own seed.
"""
from __future__ import annotations

import json
from typing import Optional

import tensorflow_datasets as tfds

from flame.data import format, lexicon, synthetic
from flame.data.sources import base

DEFAULT_SIZE = 2000
# The lexicon's tasks are bigger: their dev split (10%, ~600 pairs) is what tail-patching
# scores the target category on, and at ~200 pairs its +-3.5-point standard error was as big
# as the gains a rating has to order (docs/tailpatch.md).
LEXICON_SIZE = 6000
# Each release a new version, so no stale folder of an earlier release is reused.
LEXICON_RELEASE = "1.2.0"
GENERATED = "generated"  # the Row.file of generated examples


class SyntheticConfig(base.TaskConfig):
  """A synthetic task config: the task's spec plus the generated set's size and seed."""

  def __init__(self, spec: format.TaskSpec, size: int, seed: int, name: Optional[str] = None):
    super().__init__(spec)
    if int(size) != size or size < 1 or int(seed) != seed:
      raise ValueError(f"synthetic config {spec.name!r}: size must be a positive integer and "
                       f"seed an integer, got size={size!r}, seed={seed!r}")
    self.size, self.seed = int(size), int(seed)
    self.name = name or spec.name
    self.description += f"; generated: size {self.size}, seed {self.seed}"


def synthetic_config(task: str, size: int, seed: int = 0) -> SyntheticConfig:
  """A custom config of `flame_synthetic`: `size` examples of `task` drawn with `seed`."""
  if task not in synthetic.ROLES:
    raise ValueError(f"unknown synthetic training task {task!r}; expected one of "
                     f"{sorted(synthetic.ROLES)}")
  return SyntheticConfig(synthetic.SPECS[task], size, seed, name=f"{task}-n{size}-seed{seed}")


def _rows(examples):
  for index, example in enumerate(examples):
    yield base.Row(GENERATED, f"record {index}", example)


def _generated_upstream(builder) -> list[dict]:
  """No upstream file: the examples are generated here, free of third-party terms."""
  config = builder.builder_config
  return [{"generator": "flame.data.synthetic", "task": builder.spec.name,
           "size": getattr(config, "size", None), "seed": getattr(config, "seed", None),
           "license": "generated (no third-party data)"}]


def _converted(row):
  example = row.data
  yield base.Converted(example, group=json.dumps(dict(example.context), sort_keys=True))


class FlameSynthetic(base.SourceBuilder):
  """Builder ``flame_synthetic`` (training): the synthetic tasks, sized and seeded."""

  TASKS = synthetic.TRAINING_TASKS
  DESCRIPTION = __doc__
  HOMEPAGE = "https://arxiv.org/abs/2407.10817"
  generate = staticmethod(synthetic.generate)

  def rows(self, paths):
    del paths
    config = self.builder_config
    yield from _rows(self.generate(self.spec.name, config.size, config.seed))

  def convert(self, row):
    return _converted(row)

  def upstream(self):
    return _generated_upstream(self)


FlameSynthetic.BUILDER_CONFIGS = [SyntheticConfig(spec, DEFAULT_SIZE, 0)
                                  for spec in FlameSynthetic.TASKS]


class FlameLexicon(FlameSynthetic):
  """Builder ``flame_lexicon`` (training): the banned-word tasks of `flame.data.lexicon`."""

  TASKS = lexicon.TRAINING_TASKS
  generate = staticmethod(lexicon.generate)
  VERSION = tfds.core.Version(LEXICON_RELEASE)
  RELEASE_NOTES = {base.RELEASE: "First release: 2,000 examples per task.",
                   "1.1.0": f"{LEXICON_SIZE} examples per task (~600 dev pairs).",
                   LEXICON_RELEASE: "The helpful task is lexicon_answers (one-word answers to "
                                    "other prompts) in place of lexicon_sentences."}


FlameLexicon.BUILDER_CONFIGS = [SyntheticConfig(spec, LEXICON_SIZE, 0)
                                for spec in FlameLexicon.TASKS]


class FlameSyntheticHeldout(base.SourceBuilder):
  """Builder ``flame_synthetic_heldout`` (held out): the Reasoning subset."""

  TASKS = (synthetic.HELDOUT_MATH,)
  HELD_OUT = True
  DESCRIPTION = __doc__
  HOMEPAGE = "https://arxiv.org/abs/2407.10817"

  def rows(self, paths):
    del paths
    yield from _rows(synthetic.heldout_examples())

  def convert(self, row):
    return _converted(row)

  def upstream(self):
    return _generated_upstream(self)
