"""flame-judge: the SmolLM2 judge story at a tiny size (tiny decoder, a few steps, real data
and held-out suite from the mirror), its refusals before any training, and the recipe's gin."""
import io
import json
import os

import gin
import jax
import pytest

from flame import gin_utils, trainer
from flame.models import decoder
from flame.pipeline import judge, pipeline, runner

TINY_GIN = ["models/decoder_tiny.gin", "flame/flame.gin"]


def tiny_bindings(initial):
  return [
      "TRAIN_STEPS = 4", "BATCH_SIZE = 8",
      "TASK_FEATURE_LENGTHS = {'inputs': 512, 'targets': 32}",
      "mixtures.register_mixture.tasks = ['synthetic_arithmetic_pairwise']",
      "mixtures.register_mixture.exclude_builders = []",
      f"judge.JudgeSettings.initial_checkpoint = {initial!r}",
      "judge.JudgeSettings.rm_steps = 2", "judge.JudgeSettings.curve_points = 2",
      "judge.JudgeSettings.dev_tasks = ['synthetic_arithmetic_pairwise']",
      "judge.JudgeSettings.dev_per_task = 6", "judge.JudgeSettings.heldout_per_category = 4",
      "judge.JudgeSettings.eval_input_length = 512", "judge.JudgeSettings.eval_batch_size = 8"]


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
  return pipeline.write_initial(["models/decoder_tiny.gin"], [], 0,
                                str(tmp_path_factory.mktemp("initial") / "tiny"))


@pytest.fixture(scope="module")
def tiny_story(tmp_path_factory, initial):
  work_dir = str(tmp_path_factory.mktemp("judge"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("FLAME_TFDS_DIR", str(tmp_path_factory.mktemp("tfds")))
    out = io.StringIO()
    records = judge.run(TINY_GIN, tiny_bindings(initial), work_dir, out=out)
    yield work_dir, records, out.getvalue()


@pytest.mark.slow
def test_tiny_story_trains_judges_and_reports(tiny_story):
  work_dir, records, printed = tiny_story
  assert list(records) == list(judge.STAGE_NAMES)
  for i, name in enumerate(records, 1):
    assert f"[{i}/6] {name} done in " in printed
  summaries = runner.summaries(records)
  assert summaries["flame"]["steps"] == 4 and summaries["flame_rm"]["steps"] == 2
  assert summaries["flame_rm"]["start"].endswith(os.path.join("flame", "checkpoints", "4"))
  assert sorted(os.listdir(os.path.join(work_dir, "flame", "checkpoints"))) == ["2", "4"]
  points = summaries["curve"]["points"]
  assert [p["step"] for p in points] == [0, 2, 4]
  assert points[0]["examples_seen"] == 0 < points[1]["examples_seen"] < points[2]["examples_seen"]
  assert summaries["curve"]["pairs"] == 6
  for p in points:
    assert p["interval"][0] <= p["accuracy"] <= p["interval"][1]
  models = summaries["heldout"]["models"]
  assert list(models) == list(judge.MODELS)
  for name, result in models.items():
    assert set(result["categories"]) == {"Chat", "Chat Hard", "Safety", "Reasoning"}, name
    # 4 pairs per category spread over its subsets (Chat Hard: five subsets get 1,1,1,1,0).
    assert sum(n for s, n in result["pairs"].items() if s.startswith("llmbar")) == 4
    assert result["intervals"]["overall"][0] <= result["overall"] <= result["intervals"]["overall"][1]
  assert "versus" not in models["zero-shot"]
  for name in ("FLAMe", "FLAMe-RM"):
    versus = models[name]["versus"]
    assert versus["baseline"] == "zero-shot"
    assert versus["overall"]["difference"] == pytest.approx(
        models[name]["overall"] - models["zero-shot"]["overall"])
  report = open(os.path.join(work_dir, "report.md"), encoding="utf-8").read()
  assert "| overall − zero-shot (paired) |" in report and "## Time per stage" in report
  assert "(figures/learning_curve.png)" in report
  with open(os.path.join(work_dir, "figures", "learning_curve.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_rerun_redoes_no_training_or_evaluation(tiny_story, initial):
  work_dir, records, _ = tiny_story
  os.remove(runner.record_path(work_dir, "heldout"))  # as if killed after the evaluations
  saved = {name: os.path.getmtime(os.path.join(work_dir, "eval", name))
           for name in os.listdir(os.path.join(work_dir, "eval"))}
  out = io.StringIO()
  again = judge.run(TINY_GIN, tiny_bindings(initial), work_dir, out=out)
  assert out.getvalue().count("done earlier") == 5
  assert {name: os.path.getmtime(os.path.join(work_dir, "eval", name)) for name in saved} == saved
  assert (json.dumps(again["heldout"]["summary"], sort_keys=True) ==
          json.dumps(records["heldout"]["summary"], sort_keys=True))


@pytest.mark.slow
def test_rerun_with_other_settings_is_refused_and_changes_nothing(tiny_story, initial):
  work_dir, _, _ = tiny_story
  listing = sorted(os.listdir(work_dir))
  with open(os.path.join(work_dir, "settings.json"), encoding="utf-8") as f:
    settings = f.read()
  with pytest.raises(ValueError, match=r"holds stages \(import, flame.*\) made with other "
                     r"settings: gin: \['TRAIN_STEPS = 4'\] -> \['TRAIN_STEPS = 6'\]\. Use a new "
                     r"--work_dir"):
    judge.run(TINY_GIN, tiny_bindings(initial) + ["TRAIN_STEPS = 6"], work_dir)
  assert sorted(os.listdir(work_dir)) == listing
  with open(os.path.join(work_dir, "settings.json"), encoding="utf-8") as f:
    assert f.read() == settings


def test_missing_or_foreign_initial_checkpoint_is_refused_before_training(tmp_path, initial):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=f"initial checkpoint {missing} does not exist"):
    judge.run(TINY_GIN, tiny_bindings(missing), str(tmp_path / "a"))
  assert not os.path.exists(tmp_path / "a" / "flame")
  # The real recipe (SmolLM2-135M) pointed at the tiny decoder's checkpoint.
  with pytest.raises(ValueError, match=r"is not the recipe's model \(SmolLM2-135M\): "
                     r"vocab_size 259 \(the recipe's model: 49152\), num_layers 2"):
    judge.run([judge.DEFAULT_GIN], [f"judge.JudgeSettings.initial_checkpoint = {initial!r}"],
              str(tmp_path / "b"))
  assert not os.path.exists(tmp_path / "b" / "flame")
  # The right model, the wrong vocabulary for it.
  with pytest.raises(ValueError, match="VOCABULARY 'smollm2' has 49152 ids but the initial "
                     "checkpoint .* embeds 259"):
    judge.run(TINY_GIN, tiny_bindings(initial) + ["VOCABULARY = 'smollm2'"],
              str(tmp_path / "c"))
  assert not os.path.exists(tmp_path / "c" / "flame")


def test_bad_settings_are_refused(tmp_path, initial):
  with pytest.raises(ValueError, match="JudgeSettings.rm_steps = 0: expected a whole number"):
    judge.configure(TINY_GIN, tiny_bindings(initial) + ["judge.JudgeSettings.rm_steps = 0"],
                    str(tmp_path))
  with pytest.raises(ValueError, match="curve_points = 5 is more than TRAIN_STEPS = 4"):
    judge.configure(TINY_GIN, tiny_bindings(initial) + ["judge.JudgeSettings.curve_points = 5"],
                    str(tmp_path))
  with pytest.raises(ValueError, match="JudgeSettings.dtype"):
    judge.configure(TINY_GIN, tiny_bindings(initial) + ["judge.JudgeSettings.dtype = 'fp8'"],
                    str(tmp_path))


def test_the_smollm2_judge_recipe_parses():
  story = judge.configure([judge.DEFAULT_GIN], [], "/tmp/w")
  assert story.train_steps == 150 and story.settings.curve_points == 5
  assert story.curve_steps() == [30, 60, 90, 120, 150]
  config, vocabulary = judge.recipe_model_config(story)
  assert (config.vocab_size, config.num_layers, vocabulary) == (49152, 30, "smollm2")


def test_the_recipe_trains_smollm2s_top_8_layers_and_final_norm():
  """train.trainable_params against SmolLM2-135M's parameter count per layer, from its shape
  (9 query and 3 key/value heads of 64, width 576, SwiGLU 1536, two norms per layer)."""
  story = judge.configure([judge.DEFAULT_GIN], [], "/tmp/w")
  gin_utils.parse(story.gin_files, [*story.bindings, "MODEL_DIR = '/tmp/w'",
                                    "SMOLLM2_CHECKPOINT = '/tmp/w'"], finalize=False)
  try:
    patterns = gin.query_parameter("train.trainable_params")
    model = decoder.DecoderOnlyModel()  # pylint: disable=no-value-for-parameter
  finally:
    gin.clear_config()
  abstract = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0), 1,
                                                      {"inputs": 8, "targets": 8}))
  trainable = trainer.count_trainable(abstract, trainer.trainable_mask(abstract, patterns))
  total = sum(x.size for x in jax.tree_util.tree_leaves(abstract))
  per_layer = 576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536 + 2 * 576
  assert trainable == 8 * per_layer + 576
  assert total == 30 * per_layer + 576 + 49152 * 576
