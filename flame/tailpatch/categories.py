"""Target categories of tail-patch runs, scored on a dev split kept apart from reporting.

FLAMe-Opt-RM measured each patch on RewardBench's categories, the very numbers it then
reported. Here a category is a set of *training* tasks whose ``validation`` split is the dev
set: those examples are never trained on (the split is by source row, see
`flame.data.sources.base`) and never part of the held-out suite (`flame.data.heldout`) that
final results are reported on, so the mixture is not chosen on the numbers it is judged by.

A category's score is the accuracy of the judge's verdicts over all its dev examples (up to
`limit_per_task` per task, the first by example id), pairs scored in both orders. Only tasks
with labels (pairwise, classification) can be in a category.

``DEFAULT_CATEGORIES`` mirror RewardBench's sections with the collection's tasks:

==========  ==========================================================================
Chat        mt_bench_human_preference, llmeval2_preference (open-ended chat preferences)
Chat Hard   faireval_preference, pandalm_preference (close, adversarially hard pairs)
Safety      hh_rlhf_harmlessness
Reasoning   synthetic_arithmetic_pairwise (worked solutions, `flame.data.synthetic`)
==========  ==========================================================================

``SYNTHETIC_CATEGORIES`` are the controlled experiment's (`benchmarks/tailpatch_synthetic.py`).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from flame.autorater import autorater, evaluate, judgments
from flame.data import format

Categories = Mapping[str, Sequence[str]]  # category -> training tasks

DEV_SPLIT = "validation"
DEFAULT_CATEGORIES: dict[str, tuple[str, ...]] = {
    "Chat": ("mt_bench_human_preference", "llmeval2_preference"),
    "Chat Hard": ("faireval_preference", "pandalm_preference"),
    "Safety": ("hh_rlhf_harmlessness",),
    "Reasoning": ("synthetic_arithmetic_pairwise",),
}
SYNTHETIC_CATEGORIES: dict[str, tuple[str, ...]] = {
    "Reasoning": ("synthetic_arithmetic_pairwise",),
    "Strings": ("synthetic_string_order",),
}


def check(categories: Categories) -> dict[str, tuple[str, ...]]:
  """`categories` as a dict of tuples; an empty one, or a task twice, raises naming it."""
  if not categories:
    raise ValueError("no target categories given")
  out, seen = {}, {}
  for category, tasks in categories.items():
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    if not tasks:
      raise ValueError(f"target category {category!r} has no tasks")
    for task in tasks:
      if task in seen:
        raise ValueError(f"task {task!r} is in target categories {seen[task]!r} and "
                         f"{category!r}; a dev example must count for one category")
      seen[task] = category
    out[str(category)] = tasks
  return out


def dev_items(categories: Categories, limit_per_task: int = 200) -> list[evaluate.Item]:
  """The dev examples of every category (each item's `subset` is its category)."""
  return [item for category, tasks in check(categories).items() for task in tasks
          for item in evaluate.task_items(task, DEV_SPLIT, limit_per_task, category)]


def pair_scores(rater: autorater.Autorater, items: Sequence[evaluate.Item]
                ) -> tuple[list[int], list[float]]:
  """Per dev item: 1 where the judge's verdict is the gold label, and the gold label's
  log-odds against the likeliest other label (its "margin"); for a pair, both from its two
  orders: the verdict from their averaged probabilities, the margin averaged.

  A position bias adds the same amount to the log-odds of whichever response is first, so it
  raises one order's log-odds of the gold response and lowers the other's by as much: a
  pair's margin is free of it, where the verdict (the orders' probabilities averaged) is not
  quite. A classification item has one order and no position to cancel.
  """
  requests = [item.request for item in items]
  pairwise = [i for i, r in enumerate(requests) if r.spec.kind == format.TaskKind.PAIRWISE]
  first = rater.judge(requests, swap=False)
  swapped = dict(zip(pairwise, rater.judge([requests[i].swapped() for i in pairwise],
                                           swap=False)))
  correct, margins = [], []
  for i, (item, a) in enumerate(zip(items, first)):
    labels = list(a.probabilities)
    log_a = np.log(np.maximum([a.probabilities[label] for label in labels], 1e-300))
    gold = labels.index(item.gold)
    if i not in swapped:
      correct.append(int(a.verdict == item.gold))
      margins.append(float(log_a[gold] - np.delete(log_a, gold).max()))
      continue
    b = swapped[i]
    log_b = np.log(np.maximum([b.probabilities[label] for label in labels], 1e-300))
    correct.append(int(judgments.pairwise(labels, log_a, log_b).verdict == item.gold))
    other = 1 - gold  # a pair has two labels; swapped, the gold response is under the other
    margins.append(float(log_a[gold] - log_a[other] + log_b[other] - log_b[gold]) / 2)
  return correct, margins


def debiased(margins: Sequence[float]) -> float:
  """The mean over pairs of sigmoid(margin): 50% for a judge with no preference, rising with
  how far (not only how often) it prefers the gold response, whatever its position bias."""
  return float(np.mean(1.0 / (1.0 + np.exp(-np.asarray(margins, np.float64)))))


def scorer(rater: autorater.Autorater, items: Sequence[evaluate.Item]
           ) -> Callable[[Any], dict[str, float]]:
  """params → {"dev/<category>": accuracy, "dev_debiased/<category>": `debiased` score},
  judged by `rater` with those params."""
  categories = list(dict.fromkeys(item.subset for item in items))

  def score(params) -> dict[str, float]:
    rater.params = params
    correct, margins = pair_scores(rater, items)
    out = {}
    for category in categories:
      mine = [i for i, item in enumerate(items) if item.subset == category]
      out[f"dev/{category}"] = sum(correct[i] for i in mine) / len(mine)
      out[f"dev_debiased/{category}"] = debiased([margins[i] for i in mine])
    return out
  return score
