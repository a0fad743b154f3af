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

from flame.autorater import autorater, evaluate

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


def scorer(rater: autorater.Autorater, items: Sequence[evaluate.Item]
           ) -> Callable[[Any], dict[str, float]]:
  """params → {"dev/<category>": accuracy}, judged by `rater` with those params."""
  categories = list(dict.fromkeys(item.subset for item in items))

  def score(params) -> dict[str, float]:
    rater.params = params
    verdicts = rater.judge([item.request for item in items], swap=True)
    out = {}
    for category in categories:
      correct = [v.verdict == item.gold for v, item in zip(verdicts, items)
                 if item.subset == category]
      out[f"dev/{category}"] = sum(correct) / len(correct)
    return out
  return score
