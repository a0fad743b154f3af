"""merging.lineage: experts fine-tuned from another model than the base are refused before the
merge writes anything; experts from the base, a copy of it, or a chain of fine-tunes from it
are merged; records that cannot be followed give a warning."""
import logging
import os
import shutil

import numpy as np
import pytest

from flame.checkpoints import imported, manager
from merging import io, lineage, merge as merge_lib

SHAPES = {("embed", "embedding"): (16, 8), ("layer", "kernel"): (8, 8), ("norm", "scale"): (8,)}


def save(directory, flat, step=0, start=None):
  checkpointer = manager.Checkpointer(str(directory), async_save=False)
  meta = {"fine_tuned_from": start} if start else {}
  checkpointer.save(step, {"params": imported.unflatten(flat)}, meta, force=True)
  checkpointer.wait()
  checkpointer.close()
  return os.path.join(str(directory), str(step))


def model(seed):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def nudged(params, seed):
  rng = np.random.default_rng(seed)
  return {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}


@pytest.fixture()
def bases(tmp_path):
  a, b = model(0), model(1)  # Same shapes, other weights: two different pretrained models.
  return {"a": save(tmp_path / "base_a", a), "b": save(tmp_path / "base_b", b),
          "params_a": a, "params_b": b}


def test_expert_from_another_base_is_refused_before_writing(tmp_path, bases):
  good = save(tmp_path / "good", nudged(bases["params_a"], 2), 10, bases["a"])
  foreign = save(tmp_path / "foreign", nudged(bases["params_b"], 3), 10, bases["b"])
  out = tmp_path / "merged"
  with pytest.raises(io.MergeInputError, match=(
      rf"expert #1 {foreign} was fine-tuned from {bases['b']} \(its checkpoint meta\), not "
      rf"from the base {bases['a']}: .* Merge over {bases['b']}, or over a copy of it")):
    merge_lib.merge(os.path.dirname(bases["a"]), [good, foreign], str(out), "ties",
                    method_params={"density": 0.5}, progress_bar=False)
  assert not out.exists()
  # Over the base both started from, the same pair of models merges.
  other = save(tmp_path / "other", nudged(bases["params_a"], 4), 10, bases["a"])
  merge_lib.merge(bases["a"], [good, other], str(out), "ties", method_params={"density": 0.5},
                  progress_bar=False)
  assert manager.Checkpointer(str(out), read_only=True).all_steps() == [0]


def test_copy_of_the_base_and_chains_of_fine_tunes_are_accepted(tmp_path, bases):
  copy = str(tmp_path / "copy")
  shutil.copytree(os.path.dirname(bases["a"]), copy)
  stage1 = save(tmp_path / "stage1", nudged(bases["params_a"], 5), 5, bases["a"])
  stage2 = save(tmp_path / "stage2", nudged(bases["params_a"], 6), 9, stage1)
  assert lineage.starts(stage2) == ([stage1, bases["a"]], True)
  lineage.check_same_base(copy, [stage2, stage1])  # By content: the copy is the base.
  lineage.check_same_base(bases["a"], [stage2])  # Two fine-tunes from the base.
  with pytest.raises(io.MergeInputError, match=rf"fine-tuned from {stage1} .* \(where its chain "
                     rf"of fine-tunes starts: {stage1} <- {bases['a']}"):
    lineage.check_same_base(bases["b"], [stage2])


def test_unrecorded_or_vanished_starts(tmp_path, bases, caplog):
  imported_model = save(tmp_path / "import", nudged(bases["params_b"], 7))  # No record.
  lineage.check_same_base(bases["a"], [imported_model])
  gone = str(tmp_path / "deleted" / "3")
  orphan = save(tmp_path / "orphan", nudged(bases["params_a"], 8), 4, gone)
  with caplog.at_level(logging.WARNING):
    lineage.check_same_base(bases["a"], [orphan])
  assert f"was fine-tuned from {gone}, which is gone: cannot confirm" in caplog.text


def test_training_records_where_it_started(tmp_path):
  """flame.train writes the resolved start (DIR/<step>) into every checkpoint's meta."""
  from flame.pipeline import pipeline
  initial = pipeline.write_initial(["models/decoder_tiny.gin"], [], 0, str(tmp_path / "init"))
  pipeline_settings = pipeline.PipelineSettings(
      tasks=["synthetic_arithmetic_statement"], experts={"a": [], "b": []}, categories={},
      batch_size=8, feature_lengths={"inputs": 512, "targets": 32})
  pipeline.train_run(pipeline_settings, str(tmp_path / "run"), 2, "lineage",
                     {"tasks": ["synthetic_arithmetic_statement"]}, initial)
  checkpointer = manager.Checkpointer(str(tmp_path / "run" / "checkpoints"), read_only=True)
  assert checkpointer.restore_meta(2)["fine_tuned_from"] == os.path.join(initial, "0")
  assert lineage.starts(str(tmp_path / "run" / "checkpoints" / "2"))[0] == [
      os.path.join(initial, "0")]
