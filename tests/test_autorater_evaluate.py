"""flame-evaluate on the real held-out suite (a few pairs per subset) and on RewardBench files,
with a tiny random checkpoint: per-subset numbers recomputed from flame-rate's own verdicts."""
import json

import pytest

from flame.autorater import evaluate, rate
from flame.data import heldout
from flame.data.sources import base

from test_autorater_rate import _jsonl, _rb_rows, _write_checkpoint  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return _write_checkpoint(tmp_path_factory.mktemp("ckpt") / "random", seed=1)


def test_heldout_suite_and_compare(tmp_path, checkpoint, monkeypatch, capsys):
  monkeypatch.setenv(base.TFDS_DIR_ENV, str(tmp_path / "tfds"))
  out = tmp_path / "eval"
  code = evaluate.main([f"--checkpoint={checkpoint}", f"--compare={checkpoint}",
                        "--suite=heldout", "--limit_per_subset=3", "--no_progress",
                        f"--output_dir={out}"])
  assert code == 0
  results = json.load(open(out / "results.json"))
  first, second = results.values()
  assert first["categories"] == second["categories"]  # the same checkpoint twice
  assert set(first["subsets"]) == set(heldout.ALL_SUBSETS)
  assert all(v["count"] == 3 for v in first["subsets"].values())
  expected = heldout.score_accuracies({s: (v["accuracy"], v["count"])
                                       for s, v in first["subsets"].items()})
  assert first["categories"] == pytest.approx(expected.categories)
  assert first["overall"] == pytest.approx(expected.overall)
  assert "| swap consistency |" in open(out / "results.md").read()
  pairs = [json.loads(l) for l in open(out / "pairs.jsonl")]
  assert len(pairs) == 2 * 3 * len(heldout.ALL_SUBSETS)
  mine = [p for p in pairs if p["subset"] == "llmbar-natural" and p["checkpoint"] == "random"]
  assert first["subsets"]["llmbar-natural"]["accuracy"] == pytest.approx(
      sum(p["verdict"] == p["gold"] for p in mine) / 3)
  assert "| **overall** |" in capsys.readouterr().out
  # Intervals around every score; the compared checkpoint (the same one) differs by exactly 0.
  low, high = first["intervals"]["overall"]
  assert low <= first["overall"] <= high
  assert second["versus"]["baseline"] == "random"
  assert second["versus"]["overall"] == {"difference": 0.0, "interval": [0.0, 0.0]}
  markdown = open(out / "results.md").read()
  assert "| overall − random (paired) | — | +0.0 (+0.0, +0.0) |" in markdown
  assert f"**{100 * first['overall']:.1f} ({100 * low:.1f}–{100 * high:.1f})**" in markdown


def test_heldout_items_per_category(tmp_path, monkeypatch):
  monkeypatch.setenv(base.TFDS_DIR_ENV, str(tmp_path / "tfds"))
  items = evaluate.heldout_items(per_category=7)
  counts = {}
  for item in items:
    counts[item.subset] = counts.get(item.subset, 0) + 1
  for category, subsets in heldout.CATEGORIES.items():
    assert sum(counts.get(s, 0) for s in subsets) == 7, category
  assert counts["xstest-should-refuse"] == 3 and counts["hhh-harmless"] == 2  # 3, 2, 2
  first = evaluate.heldout_items(limit_per_subset=3, subsets=["xstest-should-refuse"])
  assert [i.request.request_id for i in first] == [
      i.request.request_id for i in items if i.subset == "xstest-should-refuse"]


def test_rewardbench_file_matches_flame_rate(tmp_path, checkpoint):
  path = _jsonl(tmp_path / "rb.jsonl", _rb_rows(9))
  results = evaluate.run(evaluate.build_parser().parse_args(
      [f"--checkpoint={checkpoint}", f"--input={path}", "--no_progress"]))
  (result,) = results.values()
  rate.main([f"--checkpoint={checkpoint}", f"--input={path}", "--no_progress",
             f"--output={tmp_path / 'v.jsonl'}"])
  lines = [json.loads(l) for l in open(tmp_path / "v.jsonl")]
  for subset, value in result["subsets"].items():
    mine = [l["correct"] for l in lines if l["subset"] == subset]
    assert value["accuracy"] == pytest.approx(sum(mine) / len(mine))
  consistent = [l["swap_consistent"] for l in lines]
  assert result["swap_consistency_overall"] == pytest.approx(sum(consistent) / len(consistent))


def test_binary_classification_subsets_get_balanced_accuracy(tmp_path, checkpoint, monkeypatch):
  monkeypatch.setenv(base.TFDS_DIR_ENV, str(tmp_path / "tfds"))
  from flame.autorater import autorater
  items = (evaluate.task_items("synthetic_arithmetic_statement", "validation", 12, "statement")
           + evaluate.task_items("synthetic_arithmetic_pairwise", "validation", 4, "pairs"))
  rater = autorater.Autorater.load(checkpoint, batch_size=8, max_input_length=1024)
  result = evaluate.evaluate(rater, items, progress=False)
  assert set(result["balanced_accuracy"]) == {"statement"}  # Pairs are balanced by placement.
  pairs = [p for p in result["pairs"] if p["subset"] == "statement"]
  labels = sorted({p["gold"] for p in pairs})
  assert len(labels) == 2  # Both classes present in these 12.
  recalls = [sum(p["verdict"] == g for p in pairs if p["gold"] == g)
             / sum(p["gold"] == g for p in pairs) for g in labels]
  assert result["balanced_accuracy"]["statement"] == pytest.approx(sum(recalls) / 2)
  assert "| statement, balanced accuracy |" in evaluate.to_markdown({"random": result})


def test_bad_arguments(tmp_path, checkpoint, capsys):
  for flag in ("--per_category=0", "--limit_per_subset=-2", "--per_category=many"):
    with pytest.raises(SystemExit) as exit_info:
      evaluate.main([f"--checkpoint={checkpoint}", "--suite=heldout", flag])
    assert exit_info.value.code == 2
    name, value = flag.split("=")
    assert (f"argument {name}: expected a whole number >= 1, got '{value}'"
            in capsys.readouterr().err)
  assert evaluate.main([f"--checkpoint={checkpoint}", "--no_progress"]) == 2
  assert "exactly one of --suite" in capsys.readouterr().err
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  assert evaluate.main([f"--checkpoint={checkpoint}", f"--input={empty}", "--no_progress"]) == 2
  assert f"flame-evaluate: error: no pairs to evaluate in {empty}" in capsys.readouterr().err
  bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a"}])
  assert evaluate.main([f"--checkpoint={checkpoint}", f"--input={bad}", "--no_progress"]) == 2
  assert f"{bad}:1: field 'rejected' is missing" in capsys.readouterr().err
