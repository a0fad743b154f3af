"""Held-in / held-out accounting of merged models (Yadav et al., 2024, arXiv 2410.03617).

Raw scores are per task (a dataset, e.g. accuracy from rank classification),
grouped into categories (e.g. "NLI": ANLI, RTE, CB). For a merged model:

- held-in task t (trained on by one of the merged experts):
    normalised(t) = merged(t) / expert(t),
  where expert(t) is the raw score on t of the expert fine-tuned on t;
- held-out task t (seen by no expert):
    normalised(t) = merged(t) / base(t),
  where base(t) is the raw score of the base model the experts started from.

Normalised scores are averaged over the tasks of each category, then over
the categories (each category weighs the same whatever its number of tasks).
A value of 1.0 means "as good as the expert" (held-in) or "as good as the
base model" (held-out).

`markdown_table` renders one row per method/setting; `plot_vs_num_experts`
draws normalised held-in and held-out performance against the number of
merged experts (mean ± standard deviation over seeds).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

Scores = Mapping[str, float]
Categories = Mapping[str, Sequence[str]]


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """What normalising a merged model's scores needs.

  `held_in` / `held_out`: category → its tasks. `expert_scores`: expert name →
  {task: raw score of that expert}; each held-in task must be scored by
  exactly one expert (the one fine-tuned on it). `base_scores`: {task: raw
  score of the base model} for the held-out tasks.
  """
  held_in: Categories = dataclasses.field(default_factory=dict)
  held_out: Categories = dataclasses.field(default_factory=dict)
  expert_scores: Mapping[str, Scores] = dataclasses.field(default_factory=dict)
  base_scores: Scores = dataclasses.field(default_factory=dict)

  def tasks(self) -> list[str]:
    """Every held-in then held-out task, in category order."""
    return [t for cats in (self.held_in, self.held_out) for tasks in cats.values() for t in tasks]


@dataclasses.dataclass(frozen=True)
class NormalizedScores:
  """Normalised scores: overall (mean over categories), per category and per task.

  `held_in` / `held_out` are None when the benchmark has no such categories.
  """
  held_in: Optional[float]
  held_out: Optional[float]
  held_in_categories: dict[str, float]
  held_out_categories: dict[str, float]
  held_in_tasks: dict[str, float]
  held_out_tasks: dict[str, float]

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> "NormalizedScores":
    return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


def expert_score_by_task(expert_scores: Mapping[str, Scores]) -> dict[str, tuple[str, float]]:
  """{task: (expert, score)}; a task scored by two experts is ambiguous (ValueError)."""
  owner: dict[str, tuple[str, float]] = {}
  for expert, scores in expert_scores.items():
    for task, score in scores.items():
      if task in owner:
        raise ValueError(f"task {task!r} has scores from two experts, {owner[task][0]!r} and "
                         f"{expert!r}; each held-in task needs exactly one matching expert")
      owner[task] = (expert, float(score))
  return owner


def normalize_tasks(merged: Scores, tasks: Iterable[str],
                    reference: Mapping[str, tuple[str, float]]) -> dict[str, float]:
  """{task: merged[task] / reference score}; `reference[task]` = (who, score).

  Raises ValueError naming the task when the merged model or the reference has
  no score for it, or the reference score is 0 (or not finite).
  """
  out = {}
  for task in tasks:
    if task not in merged:
      raise ValueError(f"no score of the merged model for task {task!r} (it has scores for "
                       f"{sorted(merged)})")
    if task not in reference:
      raise ValueError(f"task {task!r} has no reference score to normalise by (reference "
                       f"scores exist for {sorted(reference)})")
    who, denominator = reference[task]
    if denominator == 0 or not math.isfinite(denominator):
      raise ValueError(f"task {task!r}: the {who} score is {denominator}, cannot normalise by it")
    out[task] = float(merged[task]) / denominator
  return out


def category_means(task_values: Mapping[str, float], categories: Categories) -> dict[str, float]:
  """{category: mean of its tasks' values}; an empty category is a ValueError."""
  out = {}
  for category, tasks in categories.items():
    if not tasks:
      raise ValueError(f"category {category!r} has no tasks")
    out[category] = float(np.mean([task_values[t] for t in tasks]))
  return out


def _mean_or_none(values: Mapping[str, float]) -> Optional[float]:
  return float(np.mean(list(values.values()))) if values else None


def normalized_scores(merged: Scores, benchmark: Benchmark) -> NormalizedScores:
  """Held-in scores over the matching expert's, held-out over the base model's, averaged per
  category then across categories (see the module docstring)."""
  experts = {t: (f"expert {e!r}", s) for t, (e, s) in
             expert_score_by_task(benchmark.expert_scores).items()}
  base = {t: ("base model", float(s)) for t, s in benchmark.base_scores.items()}
  held_in_tasks = normalize_tasks(
      merged, [t for tasks in benchmark.held_in.values() for t in tasks], experts)
  held_out_tasks = normalize_tasks(
      merged, [t for tasks in benchmark.held_out.values() for t in tasks], base)
  held_in_categories = category_means(held_in_tasks, benchmark.held_in)
  held_out_categories = category_means(held_out_tasks, benchmark.held_out)
  return NormalizedScores(_mean_or_none(held_in_categories), _mean_or_none(held_out_categories),
                          held_in_categories, held_out_categories, held_in_tasks, held_out_tasks)


# ---- reports ------------------------------------------------------------------------------

def _cell(value: Optional[float], scale: float, digits: int) -> str:
  return "–" if value is None else f"{value * scale:.{digits}f}"


def _escape(text: str) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[tuple[str, NormalizedScores]], scale: float = 100.0,
                   digits: int = 1) -> str:
  """A GitHub Markdown table: one row per (name, scores); columns held-in, held-out, then
  each held-in category and each held-out category (first-seen order; "–" where a row has
  none). Values are normalised scores × `scale` (default: percent)."""
  in_cats: list[str] = []
  out_cats: list[str] = []
  for _, scores in rows:
    in_cats += [c for c in scores.held_in_categories if c not in in_cats]
    out_cats += [c for c in scores.held_out_categories if c not in out_cats]
  header = (["setting", "held-in", "held-out"] + [f"{c} (in)" for c in in_cats] +
            [f"{c} (out)" for c in out_cats])
  lines = ["| " + " | ".join(_escape(h) for h in header) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
  for name, scores in rows:
    cells = [_escape(name), _cell(scores.held_in, scale, digits),
             _cell(scores.held_out, scale, digits)]
    cells += [_cell(scores.held_in_categories.get(c), scale, digits) for c in in_cats]
    cells += [_cell(scores.held_out_categories.get(c), scale, digits) for c in out_cats]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class Series:
  """One method's curve: number of experts [k] and mean / std over seeds [k] per panel."""
  num_experts: np.ndarray
  held_in_mean: np.ndarray
  held_in_std: np.ndarray
  held_out_mean: np.ndarray
  held_out_std: np.ndarray


def series_by_method(records: Iterable[Mapping[str, Any]]) -> dict[str, Series]:
  """Groups records {method, num_experts, held_in, held_out} (one per seed) into a `Series`
  per method, sorted by number of experts; std is the population std (0 for one seed)."""
  grouped: dict[str, dict[int, list[tuple[float, float]]]] = {}
  for r in records:
    grouped.setdefault(str(r["method"]), {}).setdefault(int(r["num_experts"]), []).append(
        (float(r["held_in"]), float(r["held_out"])))
  out = {}
  for method, by_n in grouped.items():
    ns = sorted(by_n)
    values = [np.asarray(by_n[n], np.float64) for n in ns]
    out[method] = Series(np.asarray(ns), np.array([v[:, 0].mean() for v in values]),
                         np.array([v[:, 0].std() for v in values]),
                         np.array([v[:, 1].mean() for v in values]),
                         np.array([v[:, 1].std() for v in values]))
  return out


def plot_vs_num_experts(records: Iterable[Mapping[str, Any]], path: str,
                        baselines: Optional[Mapping[str, tuple[float, float]]] = None,
                        title: Optional[str] = None, scale: float = 100.0) -> str:
  """Writes a PNG with two panels (held-in, held-out): normalised score × `scale` against
  the number of merged experts, one line per method with ± std error bars over seeds.
  `baselines`: name → (held-in, held-out) drawn as dashed horizontal lines (e.g.
  multitask training). Returns `path`."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  series = series_by_method(records)
  if not series:
    raise ValueError("no records to plot")
  fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6))
  panels = (("held-in", "held_in", 0), ("held-out", "held_out", 1))
  for ax, (label, key, index) in zip(axes, panels):
    for method, s in series.items():
      ax.errorbar(s.num_experts, getattr(s, key + "_mean") * scale,
                  yerr=getattr(s, key + "_std") * scale, marker="o", capsize=3, label=method)
    for name, values in (baselines or {}).items():
      ax.axhline(values[index] * scale, linestyle="--", linewidth=1, color="gray")
      ax.annotate(name, (0.01, values[index] * scale), xycoords=("axes fraction", "data"),
                  fontsize=7, color="gray", va="bottom")
    ax.set_title(f"{label} (normalised)")
    ax.set_xlabel("number of experts")
    ax.set_xticks(sorted({int(n) for s in series.values() for n in s.num_experts}))
  axes[0].set_ylabel("normalised score" + (" (%)" if scale == 100.0 else ""))
  axes[1].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
