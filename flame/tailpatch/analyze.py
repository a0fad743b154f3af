"""Tail-patch analysis: curves → deltas → ratings → bundles → mixture weights (FLAMe-Opt-RM).

    python -m flame.tailpatch.analyze --out_dir=/tmp/tailpatch [--vanilla=CKPT] \\
      [--optimised=CKPT] [--gin.Rules.helpful_gain=0.05 …]

Reads ``OUT/baseline.json`` and ``OUT/results/*.json`` (`flame.tailpatch.run`) and writes,
atomically, to ``OUT/analysis/``: ``weights.tsv`` (the file `mixtures.register_mixture`
reads), ``analysis.json`` (every intermediate number), ``heatmap.png`` (task × category mean
delta, rows ordered by rating) and ``summary.md``.

The rules (Vu et al. 2024, section 5; every number a `Rules` gin setting). For task t and
category c, the curve is the category's dev score at step 0 (the unpatched checkpoint,
b) and at each evaluation point; its deltas are d_j = s_j − b.

* Score (``Rules.score``): "debiased" (the default), per pair the gold response's log-odds
  averaged over both orders (a position bias cancels in it) through a sigmoid, averaged over
  pairs (`categories.pair_scores`); or "accuracy", FLAMe's, the dev accuracy of the verdicts.
  Thresholds below are in the chosen score's units. Why debiased: in the controlled
  experiment (docs/tailpatch.md, flame_lexicon 1.2.0, 5 seeds) it ordered the tasks helpful
  > neutral > harmful on 4 of 5 seeds (Kendall tau +0.83) against 3 of 5 (+0.70) by accuracy:
  a short patch that teaches the judgment can move the log-odds while the position bias
  keeps the verdicts, so accuracy misses it; in the economy experiments,
  from runs at 22% and 45% target share, it put the target and helpful tasks first on 5 of
  6 seeds.
  Competence (below) is judged on dev accuracy either way.
* Gain: the mean of the deltas over the evaluation points (not only the last: a gain that
  appears late or fades counts less).
* Rating: −1 (harmful) when gain ≤ −harmful_drop; +2 (helpful) when gain ≥ helpful_gain and
  the gain is stable: at least stable_fraction of the points have d_j > 0; +1 (somewhat)
  when gain ≥ somewhat_gain (or a large gain that is not stable); 0 otherwise.
* Bundles: "general" holds the tasks whose total rating over the categories is ≥
  general_min_total (default: the number of categories, which is FLAMe's 5 for 5); the
  bundle of category c holds the tasks whose final patched score on c is ≥ τ_c
  (``thresholds[c]``; default b_c + helpful_gain); "others" the tasks in no bundle.
* Weights: general_weight (100K) for a task in the general bundle, plus specific_weight
  (30K) per category bundle it is in; other_weight (3K) for the others. Weak categories
  (``weak_categories``; default: the one with the lowest baseline) get their top
  weak_top_k (2) tasks by gain on that category at a fixed weak_weight (200K); ties break by
  total gain over the categories, then by name.
* Order (the heatmap's rows, the summary's): total rating, then total gain, descending.
* Competence: a category whose baseline is below chance + competence_margin (default
  50% + 5 points; pairs are judged in both orders, so 50% is what position alone gives) is
  listed as not competent, in the summary and analysis.json. Why: there a patch mostly
  measures how far a task moves an uncalibrated judge back toward 50%, not what it teaches
  (docs/tailpatch.md: on the synthetic collection the role order came out right on 0 of 3
  seeds from a checkpoint at chance; the experiment from a competent one is there too).
  Patch from a later checkpoint of the vanilla run instead.
* Dev-set size: a category scored on fewer than min_dev_pairs (default 200) dev pairs is
  listed as a small dev set. Why: in the controlled experiment's envelope
  (benchmarks/tailpatch_envelope.py, docs/tailpatch.md) the role order held on 22% of
  resamples of 25 dev pairs, 24% of 50, 37% of 100 and 67% of 198 at the best settings, and
  was still rising: below ~200 pairs a category's gains are mostly noise.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import sys
from typing import Any, Mapping, Optional, Sequence

if __name__ == "__main__":
  from flame.tailpatch import analyze as _importable
  sys.exit(_importable.main())

import gin

from flame import files

RATINGS = {2: "helpful", 1: "somewhat", 0: "no clear effect", -1: "harmful"}
# Rules.score -> the curves of a result file it reads (flame.tailpatch.run writes both).
SCORES = {"accuracy": "dev", "debiased": "dev_debiased"}
SCORE_NAMES = {"accuracy": "dev accuracy", "debiased": "debiased dev score"}
EPS = 1e-9  # comparisons with thresholds forgive float round-off (0.6 - 0.5 < 0.1)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Rules:
  """The analysis' thresholds and weights (module docstring)."""
  helpful_gain: float = 0.05
  somewhat_gain: float = 0.02
  harmful_drop: float = 0.02
  stable_fraction: float = 0.75
  general_min_total: Optional[int] = None
  thresholds: Mapping[str, float] = dataclasses.field(default_factory=dict)
  weak_categories: Optional[Sequence[str]] = None
  general_weight: float = 100_000
  specific_weight: float = 30_000
  other_weight: float = 3_000
  weak_top_k: int = 2
  weak_weight: float = 200_000
  chance: float = 0.5
  competence_margin: float = 0.05
  min_dev_pairs: int = 200
  score: str = "debiased"

  def __post_init__(self):
    if self.score not in SCORES:
      raise ValueError(f"Rules.score={self.score!r}: one of {sorted(SCORES)}")
    if not 0 <= self.somewhat_gain <= self.helpful_gain:
      raise ValueError(f"Rules: need 0 <= somewhat_gain ({self.somewhat_gain}) <= "
                       f"helpful_gain ({self.helpful_gain})")
    if self.harmful_drop < 0 or not 0 < self.stable_fraction <= 1:
      raise ValueError(f"Rules: need harmful_drop >= 0 ({self.harmful_drop}) and "
                       f"stable_fraction in (0, 1] ({self.stable_fraction})")


def gain(curve: Sequence[float]) -> float:
  """Mean delta over the evaluation points after step 0."""
  if len(curve) < 2:
    raise ValueError(f"a curve needs step 0 and at least one evaluation point, got {curve}")
  return math.fsum(s - curve[0] for s in curve[1:]) / (len(curve) - 1)


def rate(curve: Sequence[float], rules: Rules) -> int:
  """+2, +1, 0 or −1 for one task on one category (module docstring)."""
  g = gain(curve)
  if g <= -rules.harmful_drop + EPS and g < -EPS:
    return -1
  stable = sum(s > curve[0] for s in curve[1:]) >= rules.stable_fraction * (len(curve) - 1)
  if g >= rules.helpful_gain - EPS and g > EPS and stable:
    return 2
  if g >= rules.somewhat_gain - EPS and g > EPS:
    return 1
  return 0


@dataclasses.dataclass(frozen=True)
class Analysis:
  """Every number of the analysis, JSON-ready via `to_json`."""
  categories: tuple[str, ...]
  baseline: dict[str, float]
  gains: dict[str, dict[str, float]]  # task -> category -> gain
  finals: dict[str, dict[str, float]]  # task -> category -> final patched score
  ratings: dict[str, dict[str, int]]
  totals: dict[str, int]
  thresholds: dict[str, float]  # τ per category
  bundles: dict[str, list[str]]  # "general", each category, "others"
  weak_categories: list[str]
  weak_top: dict[str, list[str]]  # weak category -> its top tasks
  weights: dict[str, float]
  order: list[str]
  not_competent: list[str] = dataclasses.field(default_factory=list)  # baseline near chance
  small_dev: list[str] = dataclasses.field(default_factory=list)  # < min_dev_pairs dev pairs
  score: str = "debiased"  # Rules.score: what the baseline, gains and finals measure
  # The unpatched dev accuracy (competence is judged on it): beside a debiased baseline, the
  # figure a reader expects; a debiased 50.0 can sit beside 60%+ accuracy.
  accuracy: dict[str, float] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def analyze(curves: Mapping[str, Mapping[str, Sequence[float]]],
            baseline: Mapping[str, float], rules: Rules = Rules(),
            dev_pairs: Optional[Mapping[str, int]] = None,
            accuracy: Optional[Mapping[str, float]] = None) -> Analysis:
  """The analysis of {task: {category: curve}} given the unpatched {category: score} (and,
  if known, each category's number of dev pairs, and its dev accuracy when the scores are
  another measure: competence is judged on accuracy)."""
  if not curves:
    raise ValueError("no tail-patch results to analyse")
  categories = tuple(baseline)
  for task, by_category in curves.items():
    missing = [c for c in categories if c not in by_category]
    if missing:
      raise ValueError(f"task {task!r} has no curve for categories {missing}")
    for c in categories:
      if by_category[c][0] != baseline[c]:
        raise ValueError(f"task {task!r}, category {c!r}: the curve starts at "
                         f"{by_category[c][0]}, not at the baseline {baseline[c]}")
  unknown = [c for c in list(rules.thresholds) + list(rules.weak_categories or ())
             if c not in categories]
  if unknown:
    raise ValueError(f"Rules name categories {unknown} that were not evaluated; the "
                     f"categories are {list(categories)}")
  tasks = sorted(curves)
  gains = {t: {c: gain(curves[t][c]) for c in categories} for t in tasks}
  finals = {t: {c: float(curves[t][c][-1]) for c in categories} for t in tasks}
  ratings = {t: {c: rate(curves[t][c], rules) for c in categories} for t in tasks}
  totals = {t: sum(ratings[t].values()) for t in tasks}
  general_min = len(categories) if rules.general_min_total is None else rules.general_min_total
  thresholds = {c: float(rules.thresholds.get(c, baseline[c] + rules.helpful_gain))
                for c in categories}
  bundles = {"general": [t for t in tasks if totals[t] >= general_min]}
  for c in categories:
    bundles[c] = [t for t in tasks if finals[t][c] >= thresholds[c] - EPS]
  bundled = {t for members in bundles.values() for t in members}
  bundles["others"] = [t for t in tasks if t not in bundled]

  weights = {}
  for t in tasks:
    specific = sum(t in bundles[c] for c in categories)
    if t in bundles["general"] or specific:
      weights[t] = (rules.general_weight * (t in bundles["general"])
                    + rules.specific_weight * specific)
    else:
      weights[t] = rules.other_weight
  total_gain = {t: math.fsum(gains[t].values()) for t in tasks}
  weak = (list(rules.weak_categories) if rules.weak_categories is not None
          else [min(categories, key=lambda c: (baseline[c], c))])
  weak_top = {}
  for c in weak:
    ranked = sorted(tasks, key=lambda t: (-gains[t][c], -total_gain[t], t))
    weak_top[c] = ranked[:rules.weak_top_k]
    for t in weak_top[c]:
      weights[t] = rules.weak_weight
  order = sorted(tasks, key=lambda t: (-totals[t], -total_gain[t], t))
  accuracy = baseline if accuracy is None else accuracy
  not_competent = [c for c in categories
                   if accuracy[c] < rules.chance + rules.competence_margin - EPS]
  small_dev = [c for c in categories
               if dev_pairs is not None and dev_pairs.get(c, 0) < rules.min_dev_pairs]
  return Analysis(categories, dict(baseline), gains, finals, ratings, totals, thresholds,
                  bundles, weak, weak_top, {t: float(w) for t, w in weights.items()}, order,
                  not_competent, small_dev, rules.score, dict(accuracy))


# ---- files ---------------------------------------------------------------------------------

def read_results(out_dir: str) -> tuple[dict, dict[str, dict]]:
  """(baseline record, {task: result record}) of a tail-patch output folder, checked to share
  one init checkpoint, the same steps and the same categories."""
  baseline_path = os.path.join(out_dir, "baseline.json")
  if not os.path.exists(baseline_path):
    raise FileNotFoundError(f"{baseline_path} not found: run flame.tailpatch.run first")
  with open(baseline_path, encoding="utf-8") as f:
    baseline = json.load(f)
  results = {}
  for path in sorted(glob.glob(os.path.join(out_dir, "results", "*.json"))):
    with open(path, encoding="utf-8") as f:
      try:
        record = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON result file ({e})") from e
    for key in ("init", "steps", "eval_points", "categories", "limit_per_task"):
      if record.get(key) != baseline.get(key):
        raise ValueError(f"{path}: {key}={record.get(key)!r} differs from "
                         f"{baseline_path}'s {baseline.get(key)!r}: results of another "
                         "tail-patch grid")
    missing = [c for c in baseline["dev"] if c not in record.get("dev", {})]
    if missing:
      raise ValueError(f"{path}: no curve for categories {missing}")
    results[record["task"]] = record
  if not results:
    raise FileNotFoundError(f"no result files in {out_dir}/results: run flame.tailpatch.run")
  return baseline, results


def checkpoint_seen(path: str) -> dict[str, int]:
  """{"steps", "examples", "tokens"} a training checkpoint's meta records (latest step of a
  MODEL_DIR or checkpoints dir, or ``dir/<step>``); the parameters are not read."""
  from flame.checkpoints import convert  # pylint: disable=import-outside-toplevel
  checkpointer, step = convert.checkpoint_step(path)
  meta = checkpointer.restore_meta(step)
  if "examples_seen" not in meta:
    raise ValueError(f"checkpoint {path} does not record the data it trained on (written "
                     "before flame.train counted examples, or not a training checkpoint)")
  return {"steps": int(meta["step"]), "examples": int(meta["examples_seen"]),
          "tokens": int(meta["tokens_seen"])}


def compute(results: Mapping[str, Mapping[str, Any]], vanilla: Optional[Mapping[str, int]],
            optimised: Optional[Mapping[str, int]]) -> dict[str, Any]:
  """Examples and tokens: tail-patching (all tasks), the optimised run, their sum, the vanilla
  run, and the ratio vanilla / (tail-patching + optimised)."""
  patch = {"runs": len(results), "steps": sum(r["steps"] for r in results.values()),
           "examples": sum(r["examples"] for r in results.values()),
           "tokens": sum(r["tokens"] for r in results.values())}
  out: dict[str, Any] = {"tailpatch": patch, "optimised": optimised, "vanilla": vanilla}
  if optimised is not None:
    out["tailpatch_plus_optimised"] = {k: patch[k] + optimised[k]
                                       for k in ("steps", "examples", "tokens")}
    if vanilla is not None:
      out["vanilla_over_ours"] = {k: vanilla[k] / max(out["tailpatch_plus_optimised"][k], 1)
                                  for k in ("examples", "tokens")}
  return out


def signed_points(gain: float) -> str:
  """A gain (a fraction) in signed points to 0.1; a gain under 0.05 points keeps two
  significant digits (e.g. "-0.0012"), so debiased gains from a checkpoint at chance, which
  move by 1e-5, still show their order and sign instead of a row of "-0.0"."""
  points = 100 * gain
  if points == 0 or abs(points) >= 0.05:
    return f"{points:+.1f}"
  return f"{points:+.2g}"


def weights_tsv(analysis: Analysis) -> str:
  lines = ["task\tweight", "# tail-patch weights (flame.tailpatch.analyze); rows by rating"]
  lines += [f"{t}\t{analysis.weights[t]:g}" for t in analysis.order if analysis.weights[t] > 0]
  return "\n".join(lines) + "\n"


def plot_heatmap(analysis: Analysis, path: str) -> str:
  """Task × category mean delta (percentage points), rows ordered by rating; cell text: the
  delta and the rating."""
  rows, cols = analysis.order, list(analysis.categories)
  return plot_matrix(
      [f"{t}  [{analysis.totals[t]:+d}]" for t in rows],
      [f"{c}\n(base {100 * analysis.baseline[c]:.1f})" for c in cols],
      [[100 * analysis.gains[t][c] for c in cols] for t in rows],
      [[f"{signed_points(analysis.gains[t][c])} ({analysis.ratings[t][c]:+d})" for c in cols]
       for t in rows], "Tail-patch: effect of each task on each target category", path,
      f"mean {SCORE_NAMES[analysis.score]} change (points)")


def plot_matrix(row_labels: Sequence[str], col_labels: Sequence[str],
                values: Sequence[Sequence[float]], cell_text: Sequence[Sequence[str]],
                title: str, path: str, legend: str = "mean dev accuracy change (points)") -> str:
  """A diverging heatmap centred on 0 (gains in points), written atomically to `path`."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  values = np.asarray(values, dtype=float)
  limit = max(float(np.abs(values).max()), 1e-9)
  fig, ax = plt.subplots(figsize=(1.6 * len(col_labels) + 4.5, 0.42 * len(row_labels) + 1.6))
  image = ax.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
  ax.set_xticks(range(len(col_labels)), col_labels)
  ax.set_yticks(range(len(row_labels)), row_labels)
  for i, row in enumerate(cell_text):
    for j, text in enumerate(row):
      ax.text(j, i, text, ha="center", va="center", fontsize=8,
              color="white" if abs(values[i, j]) > 0.6 * limit else "black")
  fig.colorbar(image, ax=ax, label=legend)
  ax.set_title(title)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(tmp, dpi=110, bbox_inches="tight")  # the colorbar label too
  plt.close(fig)
  os.replace(tmp, path)
  return path


def summary_markdown(analysis: Analysis, accounting: Mapping[str, Any]) -> str:
  cols = list(analysis.categories)
  pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
  lines = ["# Tail-patch analysis", "",
           f"Baseline (unpatched) {SCORE_NAMES[analysis.score]}: " + ", ".join(
               f"{c} {pct(analysis.baseline[c])}" for c in cols) + "."
           + (" Rated by the debiased score (Rules.score): per pair the gold response's "
              "log-odds averaged over both orders, through a sigmoid; a position bias "
              "cancels in it." if analysis.score == "debiased" else ""),
           "Weak categories: " + ", ".join(
               f"{c} (top tasks: {', '.join(analysis.weak_top[c])})"
               for c in analysis.weak_categories) + ".", ""]
  if analysis.not_competent:
    lines += [f"**Not competent: {', '.join(analysis.not_competent)}.** The patched "
              "checkpoint is near chance there, so its ratings mostly measure how far a task "
              "moves an uncalibrated judge, not what it teaches; patch from a later checkpoint "
              "of the vanilla run (docs/tailpatch.md).", ""]
  if analysis.small_dev:
    lines += [f"**Small dev sets: {', '.join(analysis.small_dev)}** (fewer than the "
              "min_dev_pairs the ratings need to order tasks reliably; docs/tailpatch.md): "
              "raise Settings.limit_per_task or add dev tasks to the category.", ""]
  lines += ["| task | " + " | ".join(f"{c} gain (rating)" for c in cols)
            + " | total | bundles | weight |", "|---|" + "---:|" * len(cols) + "---:|---|---:|"]
  for t in analysis.order:
    bundles = [b for b, members in analysis.bundles.items() if t in members]
    lines.append(f"| {t} | " + " | ".join(
        f"{signed_points(analysis.gains[t][c])} ({analysis.ratings[t][c]:+d})" for c in cols)
                 + f" | {analysis.totals[t]:+d} | {', '.join(bundles)} | "
                 f"{analysis.weights[t]:,.0f} |")
  lines += ["", "Thresholds τ (final patched score to join a category's bundle): " + ", ".join(
      f"{c} {pct(analysis.thresholds[c])}" for c in cols) + ".", "", "## Compute", ""]
  lines.append(accounting_text(accounting))
  return "\n".join(lines) + "\n"


def accounting_text(accounting: Mapping[str, Any]) -> str:
  patch = accounting["tailpatch"]
  parts = [f"Tail-patching: {patch['runs']} runs, {patch['steps']:,} steps, "
           f"{patch['examples']:,} examples, {patch['tokens']:,} tokens."]
  for key, label in (("optimised", "Optimised run"), ("vanilla", "Vanilla run")):
    if accounting.get(key):
      r = accounting[key]
      parts.append(f"{label}: {r['steps']:,} steps, {r['examples']:,} examples, "
                   f"{r['tokens']:,} tokens.")
  if "vanilla_over_ours" in accounting:
    r = accounting["vanilla_over_ours"]
    parts.append(f"The vanilla run used {r['examples']:.2f}x the examples and "
                 f"{r['tokens']:.2f}x the tokens of tail-patching plus the optimised run.")
  return " ".join(parts)


def run(out_dir: str, rules: Rules, vanilla: Optional[str] = None,
        optimised: Optional[str] = None) -> tuple[Analysis, dict]:
  """Analyses a tail-patch folder and writes OUT/analysis/*; returns (analysis, accounting)."""
  baseline, results = read_results(out_dir)
  key = SCORES[rules.score]
  for path, record in [(os.path.join(out_dir, "baseline.json"), baseline)] + [
      (os.path.join(out_dir, "results", f"{t}.json"), r) for t, r in results.items()]:
    if key not in record:
      raise ValueError(f"{path}: no {key!r} scores (written before flame.tailpatch.run "
                       f"recorded them); Rules.score={rules.score!r} needs the grid rerun, or "
                       f"--gin.Rules.score=\"'accuracy'\" to rate by dev accuracy")
  analysis = analyze({t: r[key] for t, r in results.items()}, baseline[key], rules,
                     baseline.get("dev_examples"), baseline["dev"])
  accounting = compute(results, checkpoint_seen(vanilla) if vanilla else None,
                       checkpoint_seen(optimised) if optimised else None)
  where = os.path.join(out_dir, "analysis")
  files.write_text_atomically(os.path.join(where, "weights.tsv"), weights_tsv(analysis))
  files.write_text_atomically(os.path.join(where, "analysis.json"), json.dumps(
      {"init": baseline["init"], "rules": dataclasses.asdict(rules), **analysis.to_json(),
       "compute": accounting}, indent=1) + "\n")
  plot_heatmap(analysis, os.path.join(where, "heatmap.png"))
  files.write_text_atomically(os.path.join(where, "summary.md"),
                              summary_markdown(analysis, accounting))
  return analysis, accounting


def main(argv: Optional[Sequence[str]] = None) -> int:
  import argparse  # pylint: disable=import-outside-toplevel
  from flame import gin_utils  # pylint: disable=import-outside-toplevel
  from flame import cli  # pylint: disable=import-outside-toplevel
  gin_files, bindings, rest = gin_utils.split_flags(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(prog="flame-tailpatch-analyze",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--out_dir", required=True, help="a flame.tailpatch.run output folder")
  p.add_argument("--vanilla", help="the vanilla run's checkpoint, for compute accounting")
  p.add_argument("--optimised", help="the optimised run's checkpoint, likewise")
  p.add_argument("--debug", action="store_true")
  args = p.parse_args(rest)

  def body():
    gin_utils.parse(gin_files, bindings)
    return run(args.out_dir, Rules(), args.vanilla, args.optimised)
  return cli.run("flame-tailpatch-analyze", body, lambda r: summary_markdown(*r) +
                 f"\nwritten to {os.path.join(args.out_dir, 'analysis')}/", args.debug)


def console_main() -> None:
  sys.exit(main())
