"""The report of ``flame-merge-study``: normalised scores with paired bootstrap intervals.

Scores follow Yadav et al. (2024) through `merging.evaluate`: a held-in task's accuracy over
the accuracy of the expert trained on it, a held-out category's over the base model's; means
per expert group (held-in) and across categories. Which held-in groups count: a merge of k
experts is scored on those k experts' groups, every other model on all of them.

Intervals: every model judged the same items, so one set of stratified resamples
(`flame.autorater.intervals.stratified_draws`: each subset's items drawn with replacement)
scores all of them; a normalised score is computed on every resample (numerator and
denominator from the same draw) and its 2.5th / 97.5th percentiles are its interval. A
difference to the multitask model uses the same draws for both: a paired interval.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from flame import files
from flame.pipeline import judge_report, runner

LEVEL = 0.95


def correctness(path: str) -> tuple[list[str], np.ndarray]:
  """(subset of each item, 1.0/0.0 per item) of a saved evaluation."""
  with open(path, encoding="utf-8") as f:
    pairs = json.load(f)["pairs"]
  return [p["subset"] for p in pairs], np.array([p["correct"] for p in pairs], np.float64)


def groups_of(model: str, experts: Sequence[str], merges: Mapping[str, Any]) -> list[str]:
  """The expert groups a model's held-in score covers (a merge: its experts; others: all)."""
  key = model.removeprefix("merge/")
  return list(merges[key]["experts"]) if model.startswith("merge/") else list(experts)


def scores_per_draw(subsets: Sequence[str], correct: np.ndarray, categories, draws
                    ) -> dict[str, np.ndarray]:
  """{category or held-in task: [1 + R]}: the point score, then one per resample."""
  from flame.autorater import intervals, rewardbench  # pylint: disable=import-outside-toplevel
  point = rewardbench.report(rewardbench.subset_accuracies(subsets, list(correct)), categories)
  resampled = intervals.resampled_scores(subsets, correct, categories, draws)
  return {c: np.concatenate([[point.categories[c]], resampled[c]]) for c in point.categories}


def normalised(values: Mapping[str, Mapping[str, np.ndarray]], model: str,
               heldin: Mapping[str, Sequence[str]], groups: Sequence[str],
               heldout_categories: Sequence[str]) -> dict[str, np.ndarray]:
  """{"held_in", "held_out", each held-out category: [1 + R]} of `model`: `merging.evaluate`'s
  rules on the point and on every resample at once (a 0 denominator gives inf or nan, which
  `interval` drops)."""
  mine = values[model]
  with np.errstate(divide="ignore", invalid="ignore"):
    groups_mean = [np.mean([mine[t] / values[f"expert/{g}"][t] for t in heldin[g]], axis=0)
                   for g in groups]
    out = {c: mine[c] / values["base"][c] for c in heldout_categories}
  out["held_in"] = np.mean(groups_mean, axis=0)
  out["held_out"] = np.mean([out[c] for c in heldout_categories], axis=0)
  return out


def interval(values: np.ndarray) -> list[float]:
  """[low, high] of the resamples (values[1:]); resamples that divide by 0 are dropped."""
  tail = (1.0 - LEVEL) / 2
  finite = values[1:][np.isfinite(values[1:])]
  if not finite.size:
    return [float("nan"), float("nan")]
  return [float(v) for v in np.quantile(finite, [tail, 1 - tail])]


def summarise(study, records: Mapping[str, dict]) -> dict[str, Any]:
  """Point scores, intervals and differences to the multitask model of every model."""
  from flame.autorater import intervals  # pylint: disable=import-outside-toplevel
  from flame.data import heldout  # pylint: disable=import-outside-toplevel
  settings = study.settings
  evals = records["evaluate"]["summary"]
  merges = records["merge"]["summary"]
  heldin = {g: list(t) for g, t in settings.heldin.items()}
  heldin_tasks = [t for tasks in heldin.values() for t in tasks]
  categories = {**{c: list(s) for c, s in heldout.CATEGORIES.items()},
                **{t: [t] for t in heldin_tasks}}
  loaded = {name: correctness(e["path"]) for name, e in evals.items()}
  subsets = loaded["base"][0]
  for name, (theirs, _) in loaded.items():
    if theirs != subsets:
      raise ValueError(f"{evals[name]['path']} scored other items than the base model's "
                       "evaluation: delete WORK_DIR/eval/ and rerun the evaluate stage")
  draws = intervals.stratified_draws(subsets, settings.resamples, seed=0)
  values = {name: scores_per_draw(subsets, correct, categories, draws)
            for name, (_, correct) in loaded.items()}
  heldout_categories = [c for c in heldout.CATEGORIES if c in values["base"]]
  experts = list(settings.experts)
  norm = {name: normalised(values, name, heldin, groups_of(name, experts, merges),
                           heldout_categories) for name in values}
  out = {}
  for name, scores in norm.items():
    row = {key: {"score": float(v[0]), "interval": interval(v)} for key, v in scores.items()}
    if name != "multitask":
      groups = groups_of(name, experts, merges)
      # The multitask model on the same groups, on the same draws: a paired difference.
      theirs = normalised(values, "multitask", heldin, groups, heldout_categories)
      with np.errstate(invalid="ignore"):  # inf - inf on a resample that divides by 0
        differences = {key: scores[key] - theirs[key] for key in ("held_in", "held_out")}
      row["versus_multitask"] = {
          key: {"difference": float(value[0]), "interval": interval(value)}
          for key, value in differences.items()}
    row["raw"] = {k: float(v[0]) for k, v in values[name].items()}
    row["swap_consistency"] = evals[name].get("swap_consistency")
    out[name] = row
  return {"models": out, "heldout_categories": heldout_categories, "heldin": heldin,
          "items": {s: subsets.count(s) for s in dict.fromkeys(subsets)}}


def _pct(cell: Mapping[str, Any]) -> str:
  low, high = cell["interval"]
  return f"{100 * cell['score']:.1f} ({100 * low:.1f}–{100 * high:.1f})"


def _diff(cell: Optional[Mapping[str, Any]]) -> str:
  if not cell:
    return "—"
  low, high = cell["interval"]
  return f"{100 * cell['difference']:+.1f} ({100 * low:+.1f}, {100 * high:+.1f})"


def plot(summary: Mapping[str, Any], merges: Mapping[str, Any], out: str) -> str:
  """Normalised held-in and held-out score against the number of merged experts, one line per
  method with its 95% interval, the multitask model as a dashed band."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  models = summary["models"]
  fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
  methods = list(dict.fromkeys(m["method"] for m in merges.values()))
  for ax, key, title in zip(axes, ("held_in", "held_out"), ("held-in (÷ expert)",
                                                            "held-out (÷ base)")):
    for i, method in enumerate(methods):
      keys = sorted((m["num_experts"], k) for k, m in merges.items() if m["method"] == method)
      x = np.array([n for n, _ in keys]) + (i - (len(methods) - 1) / 2) * 0.06
      cells = [models[f"merge/{k}"][key] for _, k in keys]
      y = np.array([100 * c["score"] for c in cells])
      err = np.array([[y[j] - 100 * c["interval"][0], 100 * c["interval"][1] - y[j]]
                      for j, c in enumerate(cells)]).T
      ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
    multitask = models["multitask"][key]
    ax.axhline(100 * multitask["score"], ls="--", color="grey", lw=1)
    ax.axhspan(100 * multitask["interval"][0], 100 * multitask["interval"][1], color="grey",
               alpha=0.15, label="multitask (95%)")
    ax.axhline(100, ls=":", color="black", lw=0.8)
    ax.set_title(title)
    ax.set_xlabel("experts merged")
    ax.set_xticks(sorted({m["num_experts"] for m in merges.values()}))
  axes[0].set_ylabel("normalised score (%)")
  axes[1].legend(fontsize=7)
  fig.suptitle("Merged SmolLM2-135M experts vs the multitask model")
  fig.tight_layout()
  os.makedirs(os.path.dirname(out), exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def write(study, records: Mapping[str, dict]) -> dict:
  """Writes report.md, summary.json and figures/merged_vs_experts.png; returns the summary."""
  summary = summarise(study, records)
  merges = records["merge"]["summary"]
  models = summary["models"]
  cats = summary["heldout_categories"]
  figure = plot(summary, merges, study.path("figures", "merged_vs_experts.png"))
  steps = {n: records["experts"]["summary"][n]["steps"] for n in study.settings.experts}
  lines = ["# Merging SmolLM2-135M experts against multitask training", "",
           f"Machine: {judge_report.cpu_model()}. Recipe: {', '.join(study.gin_files)}"
           + (f"; bindings: {', '.join(study.bindings)}" if study.bindings else "") + ".",
           f"Experts: {', '.join(f'{n} ({s} steps)' for n, s in steps.items())}; multitask: "
           f"{records['multitask']['summary']['steps']} steps on their union. Items: "
           + ", ".join(f"{s} {n}" for s, n in summary["items"].items()) + ".", "",
           "## Normalised scores (%), 95% bootstrap intervals", "",
           "Held-in: each task's accuracy ÷ its expert's; held-out: each category ÷ the base "
           "model's. The last two columns: the paired difference to the multitask model.", "",
           "| model | held-in | held-out | " + " | ".join(cats) +
           " | held-in − multitask | held-out − multitask |",
           "|---|---:|---:|" + "---:|" * len(cats) + "---:|---:|"]
  for name, row in models.items():
    versus = row.get("versus_multitask", {})
    lines.append(f"| {name} | {_pct(row['held_in'])} | {_pct(row['held_out'])} | "
                 + " | ".join(f"{100 * row[c]['score']:.1f}" for c in cats)
                 + f" | {_diff(versus.get('held_in'))} | {_diff(versus.get('held_out'))} |")
  raw_keys = [t for tasks in summary["heldin"].values() for t in tasks] + cats
  lines += ["", f"![merged vs experts](figures/{os.path.basename(figure)})", "",
            "## Raw accuracy (%)", "",
            "| model | " + " | ".join(raw_keys) + " | swap consistency |",
            "|---|" + "---:|" * (len(raw_keys) + 1)]
  for name, row in models.items():
    swap = row["swap_consistency"]
    lines.append(f"| {name} | " + " | ".join(f"{100 * row['raw'][k]:.1f}" for k in raw_keys)
                 + f" | {'—' if swap is None else f'{100 * swap:.1f}'} |")
  lines += ["", "## Time per stage", "", "| stage | time |", "|---|---:|"]
  lines += [f"| {name} | {runner.format_seconds(record['seconds'])} |"
            for name, record in records.items()]
  files.write_text_atomically(study.path("report.md"), "\n".join(lines) + "\n")
  files.write_text_atomically(study.path("summary.json"), json.dumps(summary, indent=1) + "\n")
  return {"report": study.path("report.md"), "figure": figure,
          "summary": study.path("summary.json")}
