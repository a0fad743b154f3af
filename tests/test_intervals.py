"""Bootstrap intervals of judge scores: the resampled accounting against a per-resample loop
over `rewardbench.report`, coverage against the normal approximation, paired differences."""
import numpy as np
import pytest

from flame.autorater import intervals, rewardbench
from flame.data import heldout


def _items(rng, sizes, p=0.6):
  subsets = [s for s, n in sizes.items() for _ in range(n)]
  return subsets, (rng.random(len(subsets)) < p).astype(float)


def test_resampled_scores_match_report_of_each_resample():
  rng = np.random.default_rng(0)
  sizes = {"hhh-helpful": 7, "hhh-other": 5, "llmbar-natural": 9, "xstest-should-refuse": 4,
           "synthetic-math": 6}
  subsets, correct = _items(rng, sizes)
  correct[3] = 0.5  # an unparsable generative answer
  draws = intervals.stratified_draws(subsets, 5, seed=3)
  scores = intervals.resampled_scores(subsets, correct, heldout.CATEGORIES, draws)
  for r in range(5):  # the slow way: build resample r's item list and score it
    rows = np.concatenate([draws[s][r] for s in sizes])
    assert sorted(subsets[i] for i in rows) == sorted(subsets)  # each subset keeps its size
    expected = rewardbench.report(rewardbench.subset_accuracies(
        [subsets[i] for i in rows], [correct[i] for i in rows]), heldout.CATEGORIES)
    assert scores["overall"][r] == pytest.approx(expected.overall, abs=1e-12)
    for category, value in expected.categories.items():
      assert scores[category][r] == pytest.approx(value, abs=1e-12)


def test_one_subset_interval_matches_normal_approximation():
  rng = np.random.default_rng(1)
  subsets, correct = _items(rng, {"llmbar-natural": 400})
  got = intervals.score_intervals(subsets, correct, heldout.CATEGORIES, resamples=4000)
  p = correct.mean()
  half = 1.96 * np.sqrt(p * (1 - p) / len(correct))
  assert got["Chat Hard"] == pytest.approx([p - half, p + half], abs=0.01)
  assert got["overall"] == got["Chat Hard"]  # one category: overall is its score


def test_intervals_are_seeded():
  rng = np.random.default_rng(2)
  subsets, correct = _items(rng, {"hhh-helpful": 30, "llmbar-natural": 30})
  assert (intervals.score_intervals(subsets, correct, heldout.CATEGORIES, seed=5) ==
          intervals.score_intervals(subsets, correct, heldout.CATEGORIES, seed=5))


def test_paired_difference():
  rng = np.random.default_rng(3)
  subsets, base = _items(rng, {"hhh-helpful": 200, "llmbar-natural": 200}, p=0.5)
  same = intervals.paired_difference(subsets, base, base, heldout.CATEGORIES)
  assert same["overall"] == {"difference": 0.0, "interval": [0.0, 0.0]}
  better = base.copy()
  names = np.asarray(subsets)
  for subset in ("hhh-helpful", "llmbar-natural"):  # 20 of each subset's 200 turned right
    better[np.flatnonzero((base == 0) & (names == subset))[:20]] = 1.0
  got = intervals.paired_difference(subsets, better, base, heldout.CATEGORIES)
  assert got["Chat"]["difference"] == pytest.approx(0.1)
  assert got["Chat Hard"]["difference"] == pytest.approx(0.1)
  assert got["overall"]["difference"] == pytest.approx(0.1)  # the mean of the categories
  low, high = got["overall"]["interval"]
  assert 0.05 < low < 0.1 < high < 0.15
  # Unpaired, each judge's own overall interval is about ±5 points wide: they would overlap.
  # Paired, only which flipped pairs are drawn varies: about ±3 points.
  alone = intervals.score_intervals(subsets, better, heldout.CATEGORIES)["overall"]
  assert high - low < 0.7 * (alone[1] - alone[0])


def test_mean_interval_and_bad_input():
  values = np.r_[np.ones(30), np.zeros(70)]
  low, high = intervals.mean_interval(values, resamples=4000)
  assert low == pytest.approx(0.3 - 1.96 * np.sqrt(0.21 / 100), abs=0.015)
  assert high == pytest.approx(0.3 + 1.96 * np.sqrt(0.21 / 100), abs=0.015)
  with pytest.raises(ValueError, match="no values"):
    intervals.mean_interval([])
  with pytest.raises(ValueError, match="resamples=0"):
    intervals.score_intervals(["a"], [1.0], resamples=0)
  with pytest.raises(ValueError, match="2 correctness values for 3 items"):
    intervals.resampled_scores(["a", "a", "b"], [1.0, 0.0], None,
                               intervals.stratified_draws(["a", "a", "b"], 2, 0))
