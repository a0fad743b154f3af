"""The held-out evaluation suite, laid out and scored like RewardBench (Lambert et al., 2024).

Layout: category → subsets → FLAMe task (a held-out builder config, split ``test``):

==========  =======================  ==============================  =============================
category    subset                   task                            source
==========  =======================  ==============================  =============================
Chat        hhh-helpful              hhh_helpful                     BIG-bench HHH (sources.hhh)
Chat        hhh-other                hhh_other                       BIG-bench HHH
Chat Hard   llmbar-natural           llmbar_natural                  LLMBar (sources.llmbar)
Chat Hard   llmbar-adver-neighbor    llmbar_adver_neighbor           LLMBar
Chat Hard   llmbar-adver-GPTInst     llmbar_adver_gptinst            LLMBar
Chat Hard   llmbar-adver-GPTOut      llmbar_adver_gptout             LLMBar
Chat Hard   llmbar-adver-manual      llmbar_adver_manual             LLMBar
Safety      xstest-should-refuse     xstest_should_refuse            XSTest v2 (sources.xstest)
Safety      xstest-should-respond    xstest_should_respond           XSTest v2
Safety      hhh-harmless             hhh_harmless                    BIG-bench HHH
Reasoning   synthetic-math           synthetic_math_heldout          flame.data.synthetic
==========  =======================  ==============================  =============================

RewardBench's Chat uses AlpacaEval and MT-Bench, its Safety also refusals-* and donotanswer,
its Reasoning math-prm and HumanEvalPack; none of those is mirrored here, so Chat is drawn
from BIG-bench HHH (helpful, other), Safety adds HHH harmless to XSTest (whose mirrored v2
has 8 should-refuse and 44 should-respond pairs: too few for a category's interval alone),
and Reasoning is a generated arithmetic subset. The HHH honest subset is an extra subset
(`EXTRA_SUBSETS`), scored per subset but in no category.

Sizes (pairs): Chat 102, Chat Hard 419, Safety 110, Reasoning 300 (generated; more on
request). `allot` spreads a per-category budget over a category's subsets.

Scoring (RewardBench's ``calculate_scores_per_section``): a subset's accuracy is the mean of
its examples' correctness (1 right, 0 wrong; a generative judge's unparsable answer counts
0.5); a category's score is the example-count-weighted mean of its subsets' accuracies (so
every example of the category weighs the same); overall is the plain mean of the category
scores (RewardBench without its prior-sets category). Categories with no scored subset are
left out of the overall and listed as missing.

Pairwise held-out examples put the chosen response at A or B by `balance_positions`: by the
rank of a hash of the example id within the subset, so each subset's gold labels are balanced
(half A, half B, the odd one A) and fixed across runs; the generated Reasoning subset is
placed by its seeded generator (`flame.data.synthetic`).
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Mapping, Optional, Sequence

from flame.data import format

CATEGORIES: dict[str, tuple[str, ...]] = {
    "Chat": ("hhh-helpful", "hhh-other"),
    "Chat Hard": ("llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"),
    "Safety": ("xstest-should-refuse", "xstest-should-respond", "hhh-harmless"),
    "Reasoning": ("synthetic-math",),
}
SUBSET_TASKS: dict[str, str] = {
    "hhh-helpful": "hhh_helpful",
    "hhh-other": "hhh_other",
    "llmbar-natural": "llmbar_natural",
    "llmbar-adver-neighbor": "llmbar_adver_neighbor",
    "llmbar-adver-GPTInst": "llmbar_adver_gptinst",
    "llmbar-adver-GPTOut": "llmbar_adver_gptout",
    "llmbar-adver-manual": "llmbar_adver_manual",
    "xstest-should-refuse": "xstest_should_refuse",
    "xstest-should-respond": "xstest_should_respond",
    "hhh-harmless": "hhh_harmless",
    "synthetic-math": "synthetic_math_heldout",
}
EXTRA_SUBSETS: dict[str, str] = {"hhh-honest": "hhh_honest"}
ALL_SUBSETS: dict[str, str] = {**SUBSET_TASKS, **EXTRA_SUBSETS}
TASK_SUBSETS: dict[str, str] = {task: subset for subset, task in ALL_SUBSETS.items()}
SUBSET_CATEGORY: dict[str, str] = {subset: category for category, subsets in CATEGORIES.items()
                                   for subset in subsets}


def allot(sizes: Mapping[str, int], budget: int) -> dict[str, int]:
  """How many pairs of each subset a category's `budget` takes: as handing pairs out one at a
  time to the subset with the fewest so far (water-filling): a subset smaller than its equal
  share gives all it has and the rest is shared among the others; all of every subset when
  the budget exceeds their total; earlier subsets get the odd pair."""
  if budget < 0:
    raise ValueError(f"a budget of {budget} pairs")
  out = {name: 0 for name in sizes}
  left, remaining = dict(sizes), budget
  while remaining and left:
    share = remaining // len(left)
    small = [name for name, size in left.items() if size <= share]
    if small:  # These fit whole; share again what they leave.
      for name in small:
        out[name], remaining = left[name], remaining - left[name]
        del left[name]
      continue
    extra = remaining - share * len(left)
    for i, name in enumerate(left):
      out[name] = share + (i < extra)
    remaining = 0
  return out


def position_rank(example_id: str) -> str:
  """The key that orders a subset's examples for placement: sha256 of the id (hex)."""
  return hashlib.sha256(example_id.encode("utf-8")).hexdigest()


def chosen_pair(spec: format.TaskSpec, chosen: str, rejected: str) -> tuple[dict[str, str], str]:
  """({first response field: chosen, second: rejected}, labels[0]): the unplaced pair."""
  first, second = spec.response_fields[:2]
  return {first: chosen, second: rejected}, spec.labels[0]


def balance_positions(spec: format.TaskSpec, items: Sequence[Any]) -> list[Any]:
  """Places each pair's chosen response at A or B so a subset's gold labels are balanced.

  `items` hold (as ``.example``, e.g. `base.Converted`) pairwise examples of `spec` with the
  chosen response first and answer labels[0] (`chosen_pair`). Ordered by `position_rank` of
  their ids, examples of even rank keep the chosen response at A; those of odd rank get the
  two responses swapped and answer labels[1]. So ⌈n/2⌉ answers are A and ⌊n/2⌋ are B, fixed
  for a fixed set of examples, and independent of the source's own order or positions.
  """
  first, second = spec.response_fields[:2]
  ranks = {item.example.example_id: rank for rank, item in enumerate(
      sorted(items, key=lambda item: position_rank(item.example.example_id)))}
  out = []
  for item in items:
    example = item.example
    if example.outputs.get(spec.answer_field) != spec.labels[0]:
      raise ValueError(f"example {example.example_id!r} (task {spec.name!r}): expected the "
                       f"chosen response first and answer {spec.labels[0]!r}, got "
                       f"{dict(example.outputs)!r}")
    if ranks[example.example_id] % 2:
      context = dict(example.context)
      context[first], context[second] = example.context[second], example.context[first]
      example = dataclasses.replace(example, context=context,
                                    outputs={spec.answer_field: spec.labels[1]})
      item = dataclasses.replace(item, example=example)
    out.append(item)
  return out


def subset_of(name: str) -> str:
  """The subset named by a subset or task name (``llmbar_natural`` -> ``llmbar-natural``)."""
  if name in ALL_SUBSETS:
    return name
  if name in TASK_SUBSETS:
    return TASK_SUBSETS[name]
  raise ValueError(f"{name!r} is neither a held-out subset {sorted(ALL_SUBSETS)} nor a "
                   f"held-out task {sorted(TASK_SUBSETS)}")


# Scoring ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SubsetScore:
  subset: str
  category: Optional[str]  # None for EXTRA_SUBSETS
  accuracy: float  # in [0, 1]
  count: int


@dataclasses.dataclass(frozen=True)
class ScoreTable:
  """Per-subset accuracies, per-category scores and the overall score (all in [0, 1])."""
  subsets: tuple[SubsetScore, ...]
  categories: dict[str, float]
  overall: Optional[float]  # None when no category was scored
  missing: tuple[str, ...]  # categories with no scored subset


def _correctness(subset: str, values: Sequence[float]) -> tuple[float, int]:
  if not len(values):
    raise ValueError(f"subset {subset!r}: no examples to score")
  total = 0.0
  for i, value in enumerate(values):
    value = float(value)
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"subset {subset!r}, example {i}: correctness {value} is not in [0, 1]")
    total += value
  return total / len(values), len(values)


def score(correct: Mapping[str, Sequence[float]]) -> ScoreTable:
  """The table from per-example correctness: {subset or task name: [1, 0, 0.5, …]}."""
  return score_accuracies({name: _correctness(subset_of(name), values)
                           for name, values in correct.items()})


def score_accuracies(results: Mapping[str, tuple[float, int]]) -> ScoreTable:
  """The table from {subset or task name: (accuracy in [0, 1], example count)}."""
  by_subset: dict[str, tuple[float, int]] = {}
  for name, (accuracy, count) in results.items():
    subset = subset_of(name)
    if subset in by_subset:
      raise ValueError(f"subset {subset!r} is given twice (as a subset and as a task name)")
    if not 0.0 <= accuracy <= 1.0 or int(count) != count or count < 1:
      raise ValueError(f"subset {subset!r}: expected (accuracy in [0, 1], count >= 1), got "
                       f"({accuracy}, {count})")
    by_subset[subset] = (float(accuracy), int(count))
  order = [s for subsets in CATEGORIES.values() for s in subsets] + list(EXTRA_SUBSETS)
  subsets = tuple(SubsetScore(s, SUBSET_CATEGORY.get(s), *by_subset[s])
                  for s in order if s in by_subset)
  categories, missing = {}, []
  for category, names in CATEGORIES.items():
    scored = [by_subset[s] for s in names if s in by_subset]
    if not scored:
      missing.append(category)
      continue
    categories[category] = sum(a * n for a, n in scored) / sum(n for _, n in scored)
  overall = sum(categories.values()) / len(categories) if categories else None
  return ScoreTable(subsets, categories, overall, tuple(missing))


def to_markdown(table: ScoreTable, digits: int = 1) -> str:
  """A Markdown report: per-category rows then per-subset rows, scores in percent."""

  def pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}"

  lines = ["| category | score |", "|---|---:|"]
  lines += [f"| {c} | {pct(table.categories.get(c))} |" for c in CATEGORIES]
  lines += [f"| **overall** | **{pct(table.overall)}** |", "",
            "| category | subset | examples | accuracy |", "|---|---|---:|---:|"]
  lines += [f"| {s.category or '(extra)'} | {s.subset} | {s.count} | {pct(s.accuracy)} |"
            for s in table.subsets]
  if table.missing:
    lines += ["", f"Not scored (no subset evaluated): {', '.join(table.missing)}."]
  return "\n".join(lines)
