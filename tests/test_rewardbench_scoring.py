"""RewardBench accounting (flame/autorater/rewardbench.py) against hand-computed values."""
import pytest

from flame.autorater import rewardbench as rb
from flame.data import heldout


def test_categories_weight_subsets_by_count_and_balance_math_with_code():
  subsets = {"alpacaeval-easy": (1.0, 100), "mt-bench-easy": (0.5, 28),
             "llmbar-natural": (0.6, 100), "xstest-should-refuse": (0.9, 154),
             "math-prm": (0.8, 447), "hep-go": (0.5, 164), "hep-rust": (0.7, 164)}
  r = rb.report(subsets)
  assert r.categories["Chat"] == pytest.approx((100 * 1.0 + 28 * 0.5) / 128)
  assert r.categories["Chat Hard"] == pytest.approx(0.6)
  # math-prm counts as 164 + 164 = 328 examples, as much as the code subsets together.
  assert r.categories["Reasoning"] == pytest.approx((328 * 0.8 + 164 * 0.5 + 164 * 0.7) / 656)
  assert r.overall == pytest.approx(sum(r.categories.values()) / 4)


def test_math_without_code_and_code_without_math():
  assert rb.report({"math-prm": (0.8, 447)}).categories["Reasoning"] == pytest.approx(0.8)
  r = rb.report({"hep-go": (0.5, 10), "hep-js": (1.0, 30)})
  assert r.categories["Reasoning"] == pytest.approx((5 + 30) / 40)


def test_prior_sets_weigh_half():
  subsets = {"alpacaeval-easy": (0.9, 10), "llmbar-natural": (0.5, 10),
             "donotanswer": (0.7, 10), "hep-python": (0.6, 10),
             "anthropic_helpful": (0.6, 50), "shp": (0.8, 20)}
  r = rb.report(subsets)
  assert r.categories["Prior Sets"] == pytest.approx(0.7)  # plain mean of its subsets
  assert r.overall == pytest.approx((2 * (0.9 + 0.5 + 0.7 + 0.6) + 0.7) / 9)


def test_unknown_subsets_reported_not_scored_and_heldout_categories():
  r = rb.report({"my-subset": (0.3, 5), "hhh-helpful": (1.0, 3), "hhh-other": (0.0, 1)},
                heldout.CATEGORIES)
  assert r.categories == {"Chat": pytest.approx(0.75)}
  assert r.subsets["my-subset"] == (0.3, 5)
  assert rb.report({"my-subset": (0.3, 5)}).overall is None


def test_subset_accuracies_and_balanced_accuracy():
  acc = rb.subset_accuracies(["a", "a", "b", "a"], [1, 0, 0.5, 1])
  assert acc == {"a": (pytest.approx(2 / 3), 3), "b": (0.5, 1)}
  with pytest.raises(ValueError, match="not in"):
    rb.subset_accuracies(["a"], [2])
  # 3 "yes" (2 right), 1 "no" (right): (2/3 + 1) / 2.
  assert rb.balanced_accuracy(["yes", "yes", "yes", "no"],
                              ["yes", "no", "yes", "no"]) == pytest.approx(5 / 6)
