"""Held-in / held-out normalised scores (merging/evaluate.py) against values computed by hand."""
import dataclasses

import pytest

from merging import evaluate

BENCHMARK = evaluate.Benchmark(
    held_in={"QA": ["q1", "q2"], "NLI": ["n1"]},
    held_out={"coref": ["c1", "c2"], "wsd": ["w1"]},
    expert_scores={"qa_expert": {"q1": 0.8, "q2": 0.5}, "nli_expert": {"n1": 0.9}},
    base_scores={"c1": 0.5, "c2": 0.4, "w1": 0.6})
MERGED = {"q1": 0.6, "q2": 0.5, "n1": 0.45, "c1": 0.6, "c2": 0.3, "w1": 0.6, "unused": 0.1}


def test_normalised_scores_by_hand():
  s = evaluate.normalized_scores(MERGED, BENCHMARK)
  # q1 0.6/0.8 = 0.75, q2 0.5/0.5 = 1 -> QA 0.875; n1 0.45/0.9 = 0.5 -> NLI 0.5.
  assert s.held_in_tasks == pytest.approx({"q1": 0.75, "q2": 1.0, "n1": 0.5})
  assert s.held_in_categories == pytest.approx({"QA": 0.875, "NLI": 0.5})
  assert s.held_in == pytest.approx(0.6875)  # Mean over categories, not tasks (0.75).
  # c1 0.6/0.5 = 1.2, c2 0.3/0.4 = 0.75 -> coref 0.975; w1 0.6/0.6 = 1 -> wsd 1.
  assert s.held_out_tasks == pytest.approx({"c1": 1.2, "c2": 0.75, "w1": 1.0})
  assert s.held_out_categories == pytest.approx({"coref": 0.975, "wsd": 1.0})
  assert s.held_out == pytest.approx(0.9875)
  assert evaluate.NormalizedScores.from_json(s.to_json()) == s


def test_empty_sides_are_none():
  held_in_only = evaluate.Benchmark(held_in={"NLI": ["n1"]},
                                    expert_scores={"nli_expert": {"n1": 0.9}})
  s = evaluate.normalized_scores(MERGED, held_in_only)
  assert s.held_in == pytest.approx(0.5) and s.held_out is None and s.held_out_categories == {}


@pytest.mark.parametrize("change, message", [
    (dict(expert_scores={"qa_expert": {"q1": 0.8, "q2": 0.5}}), r"task 'n1' has no reference"),
    (dict(base_scores={"c1": 0.5, "c2": 0.0, "w1": 0.6}), r"task 'c2': the base model score is 0"),
    (dict(expert_scores={"a": {"q1": 0.8, "q2": 0.5, "n1": 0.9}, "b": {"n1": 0.7}}),
     r"task 'n1' has scores from two experts, 'a' and 'b'"),
    (dict(expert_scores={"qa_expert": {"q1": 0.0, "q2": 0.5}, "nli_expert": {"n1": 0.9}}),
     r"task 'q1': the expert 'qa_expert' score is 0"),
    (dict(held_out={"coref": []}), r"category 'coref' has no tasks"),
])
def test_clear_errors(change, message):
  with pytest.raises(ValueError, match=message):
    evaluate.normalized_scores(MERGED, dataclasses.replace(BENCHMARK, **change))


def test_missing_merged_score():
  merged = {k: v for k, v in MERGED.items() if k != "w1"}
  with pytest.raises(ValueError, match="no score of the merged model for task 'w1'"):
    evaluate.normalized_scores(merged, BENCHMARK)


def test_markdown_table():
  s = evaluate.normalized_scores(MERGED, BENCHMARK)
  only_in = evaluate.normalized_scores(MERGED, evaluate.Benchmark(
      held_in={"NLI": ["n1"]}, expert_scores={"e": {"n1": 0.45}}))
  table = evaluate.markdown_table([("ties | λ=1", s), ("average", only_in)], digits=2)
  assert table.splitlines() == [
      "| setting | held-in | held-out | QA (in) | NLI (in) | coref (out) | wsd (out) |",
      "|---|---:|---:|---:|---:|---:|---:|",
      "| ties \\| λ=1 | 68.75 | 98.75 | 87.50 | 50.00 | 97.50 | 100.00 |",
      "| average | 100.00 | – | – | 100.00 | – | – |",
  ]


def test_series_by_method_by_hand():
  records = [
      {"method": "ties", "num_experts": 4, "held_in": 0.8, "held_out": 1.0},
      {"method": "ties", "num_experts": 2, "held_in": 0.9, "held_out": 1.1},
      {"method": "ties", "num_experts": 2, "held_in": 0.7, "held_out": 1.3},
      {"method": "average", "num_experts": 2, "held_in": 0.5, "held_out": 0.9},
  ]
  series = evaluate.series_by_method(records)
  ties = series["ties"]
  assert list(ties.num_experts) == [2, 4]
  assert list(ties.held_in_mean) == pytest.approx([0.8, 0.8])
  assert list(ties.held_in_std) == pytest.approx([0.1, 0.0])  # population std of 0.9, 0.7
  assert list(ties.held_out_mean) == pytest.approx([1.2, 1.0])
  assert list(series["average"].held_out_std) == [0.0]


def test_plot_writes_png(tmp_path):
  records = [{"method": m, "num_experts": n, "held_in": 0.9 - 0.05 * n, "held_out": 1 + 0.01 * n}
             for m in ("ties", "average") for n in (2, 4, 8)]
  path = evaluate.plot_vs_num_experts(records, str(tmp_path / "experts.png"),
                                      baselines={"multitask": (0.95, 1.02)}, title="tiny")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="no records"):
    evaluate.plot_vs_num_experts([], str(tmp_path / "empty.png"))
