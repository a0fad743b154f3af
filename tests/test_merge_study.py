"""flame-merge-study at a tiny size (tiny decoder, a few steps, real data and held-out suite
from the mirror): experts, multitask baseline, merges, evaluation and the normalised report
checked against a NumPy recomputation from the saved verdicts; refusals before any training."""
import io
import json
import os

import numpy as np
import pytest

from flame.checkpoints import convert, imported
from flame.pipeline import merge_study, pipeline, runner
from merging import evaluate as merge_eval

TINY_GIN = ["models/decoder_tiny.gin", "flame/flame.gin"]
SETTINGS = "merge_study.MergeStudySettings"


def tiny_bindings(initial, **settings):
  chosen = {"experts": {"pairs": ["synthetic_arithmetic_pairwise"],
                        "statements": ["synthetic_arithmetic_statement"]},
            "heldin": {"pairs": ["synthetic_arithmetic_pairwise"],
                       "statements": ["synthetic_arithmetic_statement"]},
            "methods": {"linear": {}, "ties": {"density": 0.2}},
            "heldout_per_category": 8, "heldin_per_task": 10, "eval_input_length": 512,
            "resamples": 200, "initial_checkpoint": initial, **settings}
  return ["TRAIN_STEPS = 3", "BATCH_SIZE = 8",
          "TASK_FEATURE_LENGTHS = {'inputs': 512, 'targets': 32}",
          "mixtures.register_mixture.exclude_builders = []",
          # The tiny model file has no initial checkpoint of its own; SmolLM2's gin binds this.
          "train.init_params_from = %SMOLLM2_CHECKPOINT",
          *[f"{SETTINGS}.{k} = {v!r}" for k, v in chosen.items()]]


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
  return pipeline.write_initial(["models/decoder_tiny.gin"], [], 0,
                                str(tmp_path_factory.mktemp("initial") / "tiny"))


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, initial):
  work_dir = str(tmp_path_factory.mktemp("study"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("FLAME_TFDS_DIR", str(tmp_path_factory.mktemp("tfds")))
    out = io.StringIO()
    records = merge_study.run(TINY_GIN, tiny_bindings(initial), work_dir, out=out)
    yield work_dir, records, out.getvalue()


def restore(path):
  return convert.read_orbax(path)[1]


@pytest.mark.slow
def test_tiny_study_trains_merges_and_evaluates(tiny_study, initial):
  work_dir, records, printed = tiny_study
  assert list(records) == list(merge_study.STAGE_NAMES)
  for i, name in enumerate(records, 1):
    assert f"[{i}/6] {name} done in " in printed
  summaries = runner.summaries(records)
  assert {n: r["steps"] for n, r in summaries["experts"].items()} == {"pairs": 3, "statements": 3}
  assert summaries["multitask"]["steps"] == 6
  assert summaries["multitask"]["tasks"] == ["synthetic_arithmetic_pairwise",
                                             "synthetic_arithmetic_statement"]
  assert sorted(summaries["merge"]) == ["linear_2", "ties_2"]
  # The merges are of the experts' last checkpoints over the base the experts started from.
  a = restore(os.path.join(work_dir, "experts", "pairs", "checkpoints", "3"))
  b = restore(os.path.join(work_dir, "experts", "statements", "checkpoints", "3"))
  base = restore(initial)
  linear = restore(summaries["merge"]["linear_2"]["checkpoint"])
  ties = restore(summaries["merge"]["ties_2"]["checkpoint"])
  flat = lambda tree: {k: np.asarray(v, np.float64) for k, v in imported.flatten(tree).items()}
  a, b, base, linear, ties = map(flat, (a, b, base, linear, ties))
  assert sorted(linear) == sorted(a)
  moved = 0
  for key in a:
    np.testing.assert_allclose(linear[key], (a[key] + b[key]) / 2, rtol=1e-6, atol=1e-7)
    # TIES keeps at most 20% of each task vector: most entries are the base's.
    kept = np.mean(ties[key] != base[key])
    assert kept <= 0.41, key
    moved += np.any(a[key] != base[key])
  assert moved > 0.5 * len(a)  # The experts trained from the base, and say so.
  assert convert.read_orbax(os.path.join(work_dir, "experts", "pairs", "checkpoints", "3"))[2][
      "fine_tuned_from"] == os.path.join(initial, "0")
  assert set(os.listdir(os.path.join(work_dir, "eval"))) == {
      "base.json", "expert_pairs.json", "expert_statements.json", "multitask.json",
      "merge_linear_2.json", "merge_ties_2.json"}


def reference_normalised(work_dir, model, groups, heldin):
  """Held-in and held-out normalised scores recomputed from the saved verdicts: subset
  accuracies by counting, held-out categories as the evaluation recorded them."""
  def load(name):
    with open(os.path.join(work_dir, "eval", name.replace("/", "_") + ".json")) as f:
      return json.load(f)
  def accuracy(result, subset):
    hits = [p["correct"] for p in result["pairs"] if p["subset"] == subset]
    return sum(hits) / len(hits)
  mine, base = load(model), load("base")
  held_in = np.mean([np.mean([accuracy(mine, t) / accuracy(load(f"expert/{g}"), t)
                              for t in heldin[g]]) for g in groups])
  ratios = [mine["categories"][c] / base["categories"][c] for c in base["categories"]]
  return held_in, float(np.mean(ratios)), mine, base


@pytest.mark.slow
def test_normalised_scores_match_a_recomputation_from_the_verdicts(tiny_study):
  work_dir, _, _ = tiny_study
  with open(os.path.join(work_dir, "summary.json")) as f:
    summary = json.load(f)
  heldin = summary["heldin"]
  assert summary["heldout_categories"] == ["Chat", "Chat Hard", "Safety", "Reasoning"]
  for model in ("merge/linear_2", "merge/ties_2", "multitask", "expert/pairs", "base"):
    row = summary["models"][model]
    held_in, held_out, mine, base = reference_normalised(work_dir, model, list(heldin), heldin)
    assert row["held_in"]["score"] == pytest.approx(held_in, nan_ok=True)
    assert row["held_out"]["score"] == pytest.approx(held_out, nan_ok=True)
    # The same numbers as merging.evaluate's (the library the pipeline's report uses).
    experts = {g: {t: summary["models"][f"expert/{g}"]["raw"][t] for t in heldin[g]}
               for g in heldin}
    bench = merge_eval.Benchmark(held_in=heldin, held_out={c: [c] for c in base["categories"]},
                                 expert_scores=experts, base_scores=base["categories"])
    scores = {**{t: summary["models"][model]["raw"][t] for g in heldin for t in heldin[g]},
              **mine["categories"]}
    if all(v > 0 for v in base["categories"].values()):
      expected = merge_eval.normalized_scores(scores, bench)
      assert row["held_in"]["score"] == pytest.approx(expected.held_in)
      assert row["held_out"]["score"] == pytest.approx(expected.held_out)
    for key in ("held_in", "held_out"):
      low, high = row[key]["interval"]
      if np.isfinite(row[key]["score"]) and np.isfinite(low):
        assert low - 1e-9 <= row[key]["score"] <= high + 1e-9, (model, key)
  # Experts normalise their own tasks to exactly 1; the paired differences are differences.
  assert summary["models"]["expert/pairs"]["held_in"]["score"] <= 2.0
  for model in ("merge/linear_2", "base"):
    versus = summary["models"][model]["versus_multitask"]["held_out"]
    assert versus["difference"] == pytest.approx(
        summary["models"][model]["held_out"]["score"]
        - summary["models"]["multitask"]["held_out"]["score"], nan_ok=True)
  report = open(os.path.join(work_dir, "report.md"), encoding="utf-8").read()
  assert "| merge/ties_2 |" in report and "held-out − multitask" in report
  with open(os.path.join(work_dir, "figures", "merged_vs_experts.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_rerun_redoes_no_training_merge_or_evaluation(tiny_study, initial):
  work_dir, records, _ = tiny_study
  os.remove(runner.record_path(work_dir, "evaluate"))  # as if killed after the evaluations
  saved = {name: os.path.getmtime(os.path.join(work_dir, "eval", name))
           for name in os.listdir(os.path.join(work_dir, "eval"))}
  out = io.StringIO()
  again = merge_study.run(TINY_GIN, tiny_bindings(initial), work_dir, out=out)
  assert out.getvalue().count("done earlier") == 5
  assert {name: os.path.getmtime(os.path.join(work_dir, "eval", name)) for name in saved} == saved
  assert again["evaluate"]["summary"] == records["evaluate"]["summary"]


@pytest.mark.parametrize("settings, message", [
    ({"experts": {"a": ["synthetic_arithmetic_pairwise"]},
      "heldin": {"a": ["synthetic_arithmetic_pairwise"]}}, "names 1 expert"),
    ({"experts": {"a": ["synthetic_arithmetic_pairwise"],
                  "b": ["synthetic_arithmetic_pairwise", "truthfulqa_truthfulness"]},
      "heldin": {"a": ["synthetic_arithmetic_pairwise"], "b": ["truthfulqa_truthfulness"]}},
     "task 'synthetic_arithmetic_pairwise' is in both 'a' and 'b'"),
    ({"experts": {"a": ["synthetic_arithmetic_pairwise"], "b": ["no_such_task"]}},
     r"experts\['b'\]: unknown FLAMe task 'no_such_task'"),
    ({"heldin": {"pairs": ["synthetic_arithmetic_statement"],
                 "statements": ["synthetic_arithmetic_statement"]}},
     r"heldin\['pairs'\]: 'synthetic_arithmetic_statement' is not one of the expert's"),
    ({"heldin": {"pairs": ["synthetic_arithmetic_pairwise"]}}, "heldin names experts"),
    ({"experts": {"pairs": ["synthetic_arithmetic_pairwise"],
                  "ratings": ["unieval_sfres_overall"]},
      "heldin": {"pairs": ["synthetic_arithmetic_pairwise"], "ratings": ["unieval_sfres_overall"]}},
     "'unieval_sfres_overall' has no labels"),
    ({"methods": {"linear": {}, "tie": {}}}, r"unknown method\(s\) \['tie'\]"),
    ({"heldout_per_category": 0}, "heldout_per_category = 0: expected a whole number"),
    ({"dtype": "fp8"}, "MergeStudySettings.dtype"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, initial, settings,
                                                            message):
  with pytest.raises(ValueError, match=message):
    merge_study.run(TINY_GIN, tiny_bindings(initial, **settings), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_missing_or_foreign_base_is_refused_before_training(tmp_path, initial):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=f"initial checkpoint {missing} does not exist: "
                     "set MergeStudySettings.initial_checkpoint"):
    merge_study.run(TINY_GIN, tiny_bindings(missing), str(tmp_path / "a"))
  assert not os.path.exists(tmp_path / "a" / "experts")
  with pytest.raises(ValueError, match=r"is not the recipe's model \(SmolLM2-135M\): "
                     r"vocab_size 259 \(the recipe's model: 49152\)"):
    merge_study.run([merge_study.DEFAULT_GIN],
                    [f"{SETTINGS}.initial_checkpoint = {initial!r}"], str(tmp_path / "b"))
  assert not os.path.exists(tmp_path / "b" / "experts")


def test_the_smollm2_merging_recipe_parses():
  study = merge_study.configure([merge_study.DEFAULT_GIN], [], "/tmp/w")
  assert study.expert_steps == 16 and study.multitask_steps == 48
  assert list(study.settings.experts) == ["safety", "factuality", "math"]
  assert len(study.models()) == 1 + 3 + 1 + 2 * 4
