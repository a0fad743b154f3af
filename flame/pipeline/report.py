"""The pipeline's report: ``WORK_DIR/report.md`` and ``WORK_DIR/figures/*.png``.

Built from the stage records alone (`flame.pipeline.runner`), so it can be rewritten without
rerunning anything. Figures: the two mixtures, the training curves, the tail-patch heatmap,
vanilla vs optimised per held-out category, and merges against the number of experts with the
multitask model as a reference line. It states the seed's two claims and, in plain words,
whether this run supports each, with the noise of its evaluation sets (a difference below two
standard errors is called within noise).
"""
from __future__ import annotations

import math
import os
import shutil
from typing import Any, Mapping, Optional, Sequence

from flame import files, plot
from merging import evaluate as merge_eval

FIGURES = ("mixture.png", "curves.png", "tailpatch_heatmap.png", "vanilla_vs_optimised.png",
           "merging.png")


# ---------------------------------------------------------------------------------------------
# Numbers.


def standard_error(accuracy: float, n: int) -> float:
  """Binomial standard error of an accuracy measured on n examples."""
  return math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / max(n, 1))


def heldout_pairs(evaluation: Mapping[str, Any], categories: Mapping[str, Sequence[str]]) -> int:
  return sum(evaluation["examples"].get(s, 0) for subsets in categories.values() for s in subsets)


def verdict(difference: float, noise: float, better: str, worse: str) -> str:
  """'better' / 'worse' when |difference| > 2 noise, else 'within noise'."""
  if difference > 2 * noise:
    return better
  if difference < -2 * noise:
    return worse
  return "within noise"


def merge_benchmark(settings, evals: Mapping[str, Mapping[str, Any]], heldin: Mapping[str, list],
                    categories: Mapping[str, Sequence[str]]) -> merge_eval.Benchmark:
  """Held-in: each expert's tasks it scores above 0 (normalised by that expert); held-out: the
  suite's categories, normalised by the vanilla autorater (the experts' base)."""
  expert_scores = {}
  held_in = {}
  for name, tasks in heldin.items():
    accuracy = evals[f"expert/{name}"]["accuracy"]
    kept = [t for t in tasks if accuracy.get(t, 0) > 0]
    if kept:
      held_in[name] = kept
      expert_scores[name] = {t: accuracy[t] for t in kept}
  base = evals["vanilla"]["accuracy"]
  held_out = {c: [s for s in subsets if base.get(s, 0) > 0] for c, subsets in categories.items()}
  return merge_eval.Benchmark(held_in=held_in, held_out={c: s for c, s in held_out.items() if s},
                              expert_scores=expert_scores,
                              base_scores={s: base[s] for ss in held_out.values() for s in ss})


# ---------------------------------------------------------------------------------------------
# Figures.


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def short(seqio_task: str) -> str:
  """``flame_<task>_<vocabulary>`` -> ``<task>`` (the name tail-patch weights use)."""
  from flame.data import tasks  # pylint: disable=import-outside-toplevel
  return tasks.info(seqio_task).task


def plot_mixtures(rates: Mapping[str, float], weights: Mapping[str, float], path: str) -> str:
  """Each task's share of the vanilla mixture and of the tail-patch optimised one."""
  plt = _pyplot()
  tasks = sorted(rates, key=lambda t: -rates[t])
  total_rate, total_weight = sum(rates.values()) or 1.0, sum(weights.values()) or 1.0
  vanilla = [100 * rates[t] / total_rate for t in tasks]
  names = [short(t) for t in tasks]
  optimised = [100 * weights.get(n, 0.0) / total_weight for n in names]
  fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(tasks) + 1.2))
  y = range(len(tasks))
  ax.barh([i - 0.2 for i in y], vanilla, 0.4, label="vanilla (examples-proportional)")
  ax.barh([i + 0.2 for i in y], optimised, 0.4, label="tail-patch optimised")
  ax.set_yticks(list(y), names, fontsize=8)
  ax.invert_yaxis()
  ax.set_xlabel("share of the mixture (%)")
  ax.legend(fontsize=8, loc="lower right")
  ax.set_title("Mixtures")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_curves(runs: Mapping[str, str], path: str) -> str:
  """Training loss against step of each run (`flame.plot.read_metrics`)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.0, 3.4))
  for name, model_dir in runs.items():
    rows = plot.read_metrics(os.path.join(model_dir, "train", "metrics.jsonl"))
    points = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if points:
      ax.plot(*zip(*points), label=name, lw=1.2,
              ls="-" if name in ("vanilla", "optimised") else "--")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss per target token")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  ax.set_title("Training curves")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_vanilla_vs_optimised(vanilla: Mapping[str, Any], optimised: Mapping[str, Any],
                              compute_ratio: Optional[float], path: str) -> str:
  """Held-out accuracy per category (and overall) of both models, compute in the title."""
  plt = _pyplot()
  names = list(vanilla["categories"]) + ["overall"]
  values = [[100 * (m["categories"].get(c) if c != "overall" else m["overall"]) for c in names]
            for m in (vanilla, optimised)]
  fig, ax = plt.subplots(figsize=(6.0, 3.4))
  x = range(len(names))
  ax.bar([i - 0.2 for i in x], values[0], 0.4, label="vanilla")
  ax.bar([i + 0.2 for i in x], values[1], 0.4, label="FLAMe-Opt (tail-patch)")
  ax.axhline(50, color="gray", lw=0.8, ls=":")
  ax.set_xticks(list(x), names, fontsize=8)
  ax.set_ylabel("held-out accuracy (%)")
  title = "Vanilla vs optimised mixture, equal steps"
  if compute_ratio is not None:
    title += f"\n(vanilla used {compute_ratio:.2f}x the examples of tail-patching + optimised)"
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ---------------------------------------------------------------------------------------------
# The report.


def _pct(value: Optional[float]) -> str:
  return "–" if value is None else f"{100 * value:.1f}"


def write(settings, paths, summaries: Mapping[str, Any], heldin: Mapping[str, list]) -> dict:
  """Writes report.md and the figures from the stage summaries (`heldin`: each expert's tasks
  scored by accuracy); returns what it wrote."""
  from flame.data import heldout  # pylint: disable=import-outside-toplevel
  figures = os.path.join(paths.work_dir, "figures")
  os.makedirs(figures, exist_ok=True)
  prepare, patch, opt = summaries["prepare"], summaries["tailpatch"], summaries["optimised"]
  evals = summaries["evaluate"]
  categories = heldout.CATEGORIES
  written = {}

  written["mixture"] = plot_mixtures(prepare["rates"], patch["weights"],
                                     os.path.join(figures, "mixture.png"))
  runs = {"vanilla": paths.vanilla, "optimised": paths.optimised,
          **{f"expert {n}": paths.expert(n) for n in settings.experts},
          "multitask": paths.multitask}
  written["curves"] = plot_curves(runs, os.path.join(figures, "curves.png"))
  heatmap = os.path.join(paths.tailpatch, "analysis", "heatmap.png")
  written["tailpatch_heatmap"] = os.path.join(figures, "tailpatch_heatmap.png")
  shutil.copyfile(heatmap, written["tailpatch_heatmap"])
  ratio = (opt["compute"].get("vanilla_over_ours") or {}).get("examples")
  written["vanilla_vs_optimised"] = plot_vanilla_vs_optimised(
      evals["vanilla"], evals["optimised"], ratio, os.path.join(figures,
                                                               "vanilla_vs_optimised.png"))

  benchmark = merge_benchmark(settings, evals, heldin, categories)

  def normalized(name):
    return merge_eval.normalized_scores(evals[name]["accuracy"], benchmark)

  merges = summaries["merge"]
  merged = {key: normalized(f"merge/{key}") for key in merges}
  records = [{"method": r["method"], "num_experts": r["num_experts"],
              "held_in": merged[key].held_in, "held_out": merged[key].held_out}
             for key, r in merges.items()]
  multitask = normalized("multitask")
  written["merging"] = merge_eval.plot_vs_num_experts(
      [r for r in records if r["held_in"] is not None and r["held_out"] is not None],
      os.path.join(figures, "merging.png"),
      baselines={"multitask": (multitask.held_in, multitask.held_out)},
      title="Merged experts vs the multitask model (normalised)")

  claims = claims_text(settings, summaries, evals, benchmark, records, multitask, categories)
  text = markdown(settings, paths, summaries, evals, benchmark, merged, multitask, claims,
                  categories)
  files.write_text_atomically(os.path.join(paths.work_dir, "report.md"), text)
  return {"report": os.path.join(paths.work_dir, "report.md"), "figures": written,
          "claims": claims}


def claims_text(settings, summaries, evals, benchmark, records, multitask,
                categories) -> dict[str, str]:
  """The seed's two claims, each with this run's evidence and a plain verdict."""
  vanilla, optimised = evals["vanilla"], evals["optimised"]
  n = heldout_pairs(vanilla, categories)
  noise = math.hypot(standard_error(vanilla["overall"], n),
                     standard_error(optimised["overall"], n))
  diff = optimised["overall"] - vanilla["overall"]
  ratio = (summaries["optimised"]["compute"].get("vanilla_over_ours") or {}).get("examples")
  judged = verdict(diff, noise, "better", "worse")
  compute = ("" if ratio is None else
             f" Tail-patching plus the optimised run used {1 / ratio:.2f}x the vanilla run's "
             f"training examples ({'less' if ratio > 1 else 'more'} compute"
             + (", as FLAMe's does at 30K vanilla steps" if ratio > 1 else
                "; FLAMe's saving needs a vanilla run much longer than the optimised one")
             + ").")
  first = (f"**Claim 1 — a tail-patch optimised mixture (FLAMe-Opt) judges better than the "
           f"vanilla mixture at an equal number of steps.** Here the optimised model scores "
           f"{_pct(optimised['overall'])} on the held-out suite against {_pct(vanilla['overall'])}"
           f" ({100 * diff:+.1f} points; two standard errors on these {n} pairs ≈ "
           f"{200 * noise:.1f} points): **{judged}**."
           + {"better": " This run supports the claim.",
              "worse": " This run contradicts the claim.",
              "within noise": " This run neither supports nor contradicts the claim."}[judged]
           + compute)

  full = [r for r in records if r["num_experts"] == len(settings.experts)
          and r["held_in"] is not None and r["held_out"] is not None]
  keeps = [r for r in full if r["held_in"] >= 0.9]
  lifts = [r for r in full if r["held_out"] > 1.0]
  matches = [r for r in full if multitask.held_in is not None
             and abs(r["held_in"] - multitask.held_in) <= 0.05
             and abs(r["held_out"] - multitask.held_out) <= 0.05]
  beats = [r for r in full if multitask.held_in is not None
           and r["held_in"] >= multitask.held_in and r["held_out"] >= multitask.held_out]
  methods = ", ".join(f"{r['method']} ({100 * r['held_in']:.0f} in / {100 * r['held_out']:.0f}"
                      f" out)" for r in full)
  second = (f"**Claim 2 — merging fully fine-tuned experts keeps their held-in skills, lifts "
            f"held-out performance over the base, and matches a multitask model trained on "
            f"the union of their data.** Merging all {len(settings.experts)} experts "
            f"(normalised: held-in by each task's expert, held-out by the vanilla base): "
            f"{methods}; the multitask model: {_pct(multitask.held_in)} in / "
            f"{_pct(multitask.held_out)} out. {len(keeps)} of {len(full)} methods keep at "
            f"least 90% of the experts' held-in scores, {len(lifts)} score above the base on "
            f"held-out, {len(matches)} are within 5 points of the multitask model on both and "
            f"{len(beats)} match or beat it on both. "
            + ("This run supports the claim with " + ", ".join(r["method"] for r in beats) + "."
               if beats and lifts and keeps else
               "This run does not support the whole claim; see the table for which parts hold."))
  scale = (f"At this scale ({settings.vanilla_steps} vanilla steps, {n} held-out pairs, "
           f"{settings.heldin_per_task} per held-in task) these are checks that the machinery "
           "runs end to end, not evidence about the method; the papers' numbers come from "
           "models and runs thousands of times larger.")
  return {"flame_opt": first, "merging": second, "scale": scale}


def markdown(settings, paths, summaries, evals, benchmark, merged, multitask, claims,
             categories) -> str:
  """`merged`: each merge's normalised scores, by merge key."""
  from flame.pipeline import runner  # pylint: disable=import-outside-toplevel
  lines = ["# flame-pipeline report", "",
           f"Work dir `{paths.work_dir}`; model `{settings.model_gin}`"
           f"{' ' + ' '.join(settings.model_bindings) if settings.model_bindings else ''}, "
           f"vocabulary {settings.vocabulary}; {len(settings.tasks)} training tasks.", "",
           "## The claims", "", claims["flame_opt"], "", claims["merging"], "",
           f"_{claims['scale']}_", "", "## Stages", "", "| stage | time | finished |",
           "|---|---:|---|"]
  for name in ("prepare", "vanilla", "tailpatch", "optimised", "experts", "merge", "evaluate"):
    record = runner.read_record(paths.work_dir, name)
    if record:
      lines.append(f"| {name} | {runner.format_seconds(record['seconds'])} | "
                   f"{record['finished']} |")
  prepare, patch = summaries["prepare"], summaries["tailpatch"]
  total_rate = sum(prepare["rates"].values()) or 1.0
  total_weight = sum(patch["weights"].values()) or 1.0
  lines += ["", "## Mixtures and tail-patching", "", "![mixtures](figures/mixture.png)", "",
            "| task | train examples | vanilla share | tail-patch rating | optimised share |",
            "|---|---:|---:|---:|---:|"]
  for task in sorted(prepare["rates"], key=lambda t: -prepare["rates"][t]):
    name = short(task)
    lines.append(f"| {name} | {prepare['train_examples'].get(task, 0)} | "
                 f"{100 * prepare['rates'][task] / total_rate:.1f}% | "
                 f"{patch['totals'].get(name, 0):+d} | "
                 f"{100 * patch['weights'].get(name, 0.0) / total_weight:.1f}% |")
  lines += ["", "![tail-patch heatmap](figures/tailpatch_heatmap.png)", ""]
  weak = patch.get("not_competent") or []
  if weak:
    lines += [f"**Read the ratings with care:** the checkpoint patched (step "
              f"{settings.partial_steps}) is near chance on {', '.join(weak)} (dev: " + ", ".join(
                  f"{c} {100 * patch['baseline'][c]:.1f}%" for c in weak) + "), so a patch "
              "there mostly measures how far a task moves an uncalibrated judge, not what it "
              "teaches; a later partial checkpoint (`PipelineSettings.partial_steps`) rates "
              "tasks better (docs/tailpatch.md).", ""]
  small = patch.get("small_dev") or []
  if small:
    lines += [f"**Small dev sets:** {', '.join(small)} were scored on fewer than 200 dev "
              "pairs, where ratings order tasks little better than chance "
              "(`PipelineSettings.dev_limit`; docs/tailpatch.md).", ""]
  lines += ["![training curves](figures/curves.png)", "",
            "## Vanilla vs optimised on the held-out suite", "",
            "![vanilla vs optimised](figures/vanilla_vs_optimised.png)", "",
            "| model | " + " | ".join(categories) + " | overall | swap consistency |",
            "|---|" + "---:|" * (len(categories) + 2)]
  shown = ["vanilla", "optimised", *[f"expert/{n}" for n in settings.experts], "multitask"]
  for name in shown:
    e = evals[name]
    lines.append(f"| {name} | " + " | ".join(_pct(e["categories"].get(c)) for c in categories)
                 + f" | {_pct(e['overall'])} | {_pct(e['swap_consistency'])} |")
  compute = summaries["optimised"]["compute"]
  if compute.get("vanilla_over_ours"):
    lines += ["", f"Compute: tail-patching {compute['tailpatch']['examples']} examples in "
              f"{compute['tailpatch']['runs']} runs, the optimised run "
              f"{compute['optimised']['examples']}, the vanilla run "
              f"{compute['vanilla']['examples']} (vanilla / ours = "
              f"{compute['vanilla_over_ours']['examples']:.2f})."]
  rows = [("vanilla (base)", merge_eval.normalized_scores(evals["vanilla"]["accuracy"],
                                                          benchmark))]
  rows += [(f"expert {n}", merge_eval.normalized_scores(evals[f"expert/{n}"]["accuracy"],
                                                        benchmark)) for n in settings.experts]
  rows.append(("multitask", multitask))
  rows += [(f"{key} ({', '.join(f'{k}={v}' for k, v in r['params'].items()) or 'defaults'})",
            merged[key]) for key, r in summaries["merge"].items()]
  lines += ["", "## Merging experts", "", "![merging](figures/merging.png)", "",
            "Normalised scores (%): held-in tasks by the expert trained on them, held-out "
            "subsets by the vanilla autorater the experts started from.", "",
            merge_eval.markdown_table(rows).rstrip(), "",
            "Raw accuracies are in `eval/*.json`; every stage's numbers in `stages/*.json`."]
  return "\n".join(lines) + "\n"
