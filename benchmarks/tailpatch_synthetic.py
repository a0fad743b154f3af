"""Does tail-patch mixture optimisation work? The controlled experiment, on the tiny decoder.

    python benchmarks/tailpatch_synthetic.py --out_dir=/tmp/tailpatch_synthetic --seeds=0,1,2
    python benchmarks/tailpatch_synthetic.py --collection=real --out_dir=/tmp/tailpatch_real \
      --seeds=0 --steps=200 --partial_steps=100 --patch_steps=10

The generated tasks of `flame.data.synthetic` have known roles for the target category
(Reasoning: judging worked arithmetic solutions): the target task itself, a helpful one
(arithmetic statements), two neutral ones (string tasks) and two harmful ones (the target and
helpful tasks with flipped labels). Per seed:

1. ``initial``: random parameters of the tiny decoder (gin_configs/tailpatch/synthetic.gin).
2. ``vanilla``: `flame.train` from it on the examples-proportional mixture for --steps steps,
   keeping the checkpoint at --partial_steps.
3. `flame.tailpatch.optimize` from that partial checkpoint: every task patched for
   --patch_steps steps and scored on the dev split of Reasoning and Strings, the analysis,
   and the optimised run: from ``initial``, the same --steps steps on the written weights.
4. Both final models judged on the held-out Reasoning subset (``synthetic_math_heldout``: a
   problem range no training task has, never used for choosing anything), pairs in both
   orders.

``--collection=lexicon`` runs the same on a skill a model learns gradually (`flame.data.lexicon`:
which one-word reply is not a banned word; target category Safety; the 4-layer byte decoder of
gin_configs/tailpatch/lexicon.gin), judged on held-out word pairings.

``--collection=real`` runs the same on the public collection (gin_configs/tailpatch/
collection_tiny.gin: FLAMe's recipe with the tiny model; target categories Chat, Chat Hard,
Safety, Reasoning from training tasks' dev splits) and judges on the whole held-out suite
(--heldout_size pairs per subset); there are no roles to check.

Checks, per seed: the analysis orders the tasks target/helpful above neutral above harmful
(by each role's mean position in the analysis order), and the optimised model beats the
vanilla one on held-out Reasoning at an equal number of steps. Writes ``results.json``,
``results.md``, ``heldout.png`` (vanilla vs optimised per seed) and ``heatmap.png`` (the
mean gain per task and category over the seeds). Every stage resumes or skips when its
output exists. Quote the CPU with the numbers (they are accuracies, not speeds, but the
time it took is printed).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from typing import Any, Optional

import gin
import numpy as np

from flame import files, gin_utils, train
from flame.autorater import autorater, evaluate, intervals
from flame.data import heldout, lexicon, synthetic
from flame.pipeline import pipeline
from flame.tailpatch import analyze, optimize
from _cpu import cpu_model  # benchmarks/ is the script's folder



@dataclasses.dataclass(frozen=True)
class Collection:
  """A collection the experiment runs on: its gin file, and for a controlled one the known
  role of every task for the target category and the held-out subset judged."""
  gin: str
  model: str
  roles: Optional[dict[str, str]] = None
  target: Optional[str] = None
  heldout_subset: Optional[str] = None


COLLECTIONS = {
    "synthetic": Collection("tailpatch/synthetic.gin", "tiny decoder", synthetic.ROLES,
                            "Reasoning", "synthetic-math"),
    "lexicon": Collection("tailpatch/lexicon.gin", "4-layer decoder", lexicon.ROLES, "Safety",
                          "lexicon"),
    "real": Collection("tailpatch/collection_tiny.gin", "tiny decoder"),
}
GIN_FILES = {name: c.gin for name, c in COLLECTIONS.items()}
ROLE_ORDER = ("target", "helpful", "neutral", "harmful")
TARGET_CATEGORY = COLLECTIONS["synthetic"].target


def synthetic_categories() -> dict:
  from flame.tailpatch import categories  # pylint: disable=import-outside-toplevel
  return categories.SYNTHETIC_CATEGORIES


ROLE_SCORE = {"target": 1, "helpful": 1, "neutral": 0, "harmful": -1}
MIN_DEV_PAIRS = 100  # a category's accuracy then has a standard error <= 5 points


def vanilla_bindings(args, root: str) -> list[str]:
  """The vanilla mixture of a controlled collection, the label-flipped tasks down-weighted by
  --harmful_weight as in a collection where most labels are right, the neutral ones scaled by
  --neutral_weight as in a collection where the target category is a small share (FLAMe's
  102 tasks; the economy a reweighting can show is bounded by that share): --vanilla_mixture=equal,
  every other task weight 1 (the committed results up to the lexicon's 1.1.0 release);
  proportional, each task's train split size (FLAMe's examples-proportional mixture: the
  lexicon's tasks are 3x the synthetic ones, pairwise splits hold both orders). Real: the
  gin file's."""
  roles = COLLECTIONS[args.collection].roles
  if roles is None or (args.harmful_weight == args.neutral_weight == 1.0
                       and args.vanilla_mixture == "equal"):
    return []
  from flame.data import tasks  # pylint: disable=import-outside-toplevel

  def size(task: str) -> int:
    if args.vanilla_mixture == "equal":
      return 1
    return tasks.num_examples(tasks.seqio_task_name(task, "bytes"))

  scale = {"harmful": args.harmful_weight, "neutral": args.neutral_weight}
  weights = os.path.join(root, "vanilla_weights.tsv")
  rows = [f"{task}\t{size(task) * scale.get(role, 1.0):g}" for task, role in roles.items()]
  files.write_text_atomically(weights, "\n".join(rows) + "\n")
  return ["import flame.data.mixtures",
          "MIXTURE_OR_TASK_NAME = @mixtures.register_mixture()",
          "mixtures.register_mixture.name = 'flame_synthetic_vanilla'",
          f"mixtures.register_mixture.weights_file = {weights!r}"]


def role_share(weights: dict[str, float], roles: dict[str, str]) -> float:
  """The share of a mixture's rate on the target and helpful tasks (what a reweighting can
  raise: the optimised run learns the target at most 1/share times faster per example)."""
  wanted = sum(w for t, w in weights.items() if roles[t] in ("target", "helpful"))
  return wanted / sum(weights.values())


def vanilla_weights(out_dir: str, seed: int, roles: dict[str, str]) -> dict[str, float]:
  """The seed's vanilla mixture weights (every task 1 when no weights file was written)."""
  path = os.path.join(out_dir, f"seed{seed}", "vanilla_weights.tsv")
  if not os.path.exists(path):
    return {task: 1.0 for task in roles}
  from flame.data import mixtures, sources  # pylint: disable=import-outside-toplevel
  return mixtures.read_weights(path, sources.task_specs())


def train_vanilla(model_dir: str, initial: str, args, seed: int, mixture: list[str]) -> None:
  gin.clear_config()
  gin_utils.parse([GIN_FILES[args.collection]], [f"MODEL_DIR = {model_dir!r}", f"TRAIN_STEPS = {args.steps}",
                               f"train.init_params_from = {initial!r}",
                               f"train.checkpoint_every = {args.curve_every}",
                               f"train.seed = {seed}", "train.progress_bar = False", *mixture])
  train.train()  # pylint: disable=no-value-for-parameter


def heldout_items(collection: str, size: int) -> list[evaluate.Item]:
  """The pairs a collection's runs are judged on (never used to choose anything): synthetic,
  the held-out Reasoning subset; lexicon, held-out word pairings; real, the held-out suite
  (`size` pairs per subset)."""
  subset = COLLECTIONS[collection].heldout_subset  # the name heldout_accuracy reads
  if collection == "synthetic":
    return evaluate.task_items(synthetic.HELDOUT_MATH.name, "test", size, subset)
  if collection == "lexicon":
    return [evaluate.Item(autorater.Request(lexicon.PAIRWISE, dict(e.context), e.example_id),
                          subset, e.outputs["answer"]) for e in lexicon.heldout_examples(size)]
  return evaluate.heldout_items(size)


def heldout_accuracy(checkpoint: str, items, collection: str) -> dict[str, Any]:
  """A controlled collection: accuracy on its held-out subset; real: the held-out suite's
  categories, with "accuracy" its overall score."""
  rater = autorater.Autorater.load(checkpoint, batch_size=16, max_input_length=1024)
  if COLLECTIONS[collection].heldout_subset is not None:
    subset = items[0].subset  # one subset: the held-out pairs, or the target's dev pairs
    result = evaluate.evaluate(rater, items, True, None, progress=False)
    return {"accuracy": result["subsets"][subset]["accuracy"],
            "swap_consistency": result["swap_consistency_overall"]}
  result = evaluate.evaluate(rater, items, True, heldout.CATEGORIES, progress=False)
  return {"accuracy": result["overall"], "categories": result["categories"],
          "swap_consistency": result["swap_consistency_overall"]}


def kendall_tau_b(x: list[float], y: list[float]) -> float:
  """Kendall's tau-b of two paired lists (ties in either list handled; 0 when one is constant)."""
  concordant = discordant = ties_x = ties_y = 0
  for i in range(len(x)):
    for j in range(i + 1, len(x)):
      dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
      if dx == 0 and dy == 0:
        continue
      if dx == 0:
        ties_x += 1
      elif dy == 0:
        ties_y += 1
      elif dx == dy:
        concordant += 1
      else:
        discordant += 1
  denominator = ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5
  return (concordant - discordant) / denominator if denominator else 0.0


def target_ranking(gains: dict, category: str, roles: dict[str, str] = synthetic.ROLES
                   ) -> dict[str, Any]:
  """The tasks ordered by their gain on the target category, each role's mean position in
  that order, whether helpful > neutral > harmful holds, and Kendall's tau-b of the gains
  against the known roles (target and helpful +1, neutral 0, harmful -1)."""
  order = sorted(gains, key=lambda t: (-gains[t][category], t))
  positions = role_positions(order, roles)
  tasks = list(gains)
  return {"order": order, "role_positions": positions,
          "ok": (max(positions["target"], positions["helpful"]) < positions["neutral"]
                 < positions["harmful"]),
          "kendall_tau": kendall_tau_b([gains[t][category] for t in tasks],
                                       [ROLE_SCORE[roles[t]] for t in tasks])}


def bootstrap_mean(values: list[float]) -> tuple[float, float, float]:
  """Mean and its 95% bootstrap interval over the values (e.g. one per seed)."""
  low, high = intervals.mean_interval(values)
  return float(np.mean(values)), float(low), float(high)


def heldout_curve(model_dir: str, every: int, steps: int, items, collection: str
                  ) -> list[dict[str, Any]]:
  """Accuracy on `items` (held-out, or dev pairs) and examples seen at every `every` steps of
  a run."""
  curve = []
  for step in range(every, steps + 1, every):
    checkpoint = os.path.join(model_dir, "checkpoints", str(step))
    seen = analyze.checkpoint_seen(checkpoint)
    curve.append(dict(heldout_accuracy(checkpoint, items, collection), step=step,
                      examples=seen["examples"]))
  return curve


def examples_to_match(vanilla_curve: list[dict], optimised_curve: list[dict],
                      overhead: int) -> Optional[float]:
  """Examples the optimised route needs (its run to the first checkpoint at or above the
  vanilla run's final held-out accuracy, plus `overhead`) over the vanilla run's examples;
  None when it never gets there."""
  goal = vanilla_curve[-1]
  for point in optimised_curve:
    if point["accuracy"] >= goal["accuracy"]:
      return (point["examples"] + overhead) / goal["examples"]
  return None


def role_positions(order: list[str], roles: dict[str, str] = synthetic.ROLES
                   ) -> dict[str, float]:
  """Mean position (0 = first) of each role's tasks in the analysis order."""
  positions = {}
  for role in ROLE_ORDER:
    mine = [i for i, task in enumerate(order) if roles[task] == role]
    positions[role] = statistics.mean(mine)
  return positions


def seed_vanilla(args, seed: int, root: str) -> tuple[str, str]:
  """The seed's initial checkpoint and its trained (or resumed, or already finished) vanilla
  run's folder."""
  initial = pipeline.write_initial([GIN_FILES[args.collection]],
                                   ["MODEL_DIR = 'unused'", "TRAIN_STEPS = 1"], seed,
                                   os.path.join(root, "initial"))
  vanilla = os.path.join(root, "vanilla")
  train_vanilla(vanilla, initial, args, seed, vanilla_bindings(args, root) + args.binding)
  return initial, vanilla


def dev_items(collection: str, limit: Optional[int]) -> list[evaluate.Item]:
  """The target task's dev pairs (its validation split, the first `limit`): what
  --partial_steps is chosen on, never the held-out pairs."""
  c = COLLECTIONS[collection]
  target = next(task for task, role in c.roles.items() if role == "target")
  return evaluate.task_items(target, "validation", limit, c.heldout_subset)


def vanilla_dev_curve(args, seed: int, items) -> list[dict[str, Any]]:
  """--vanilla_only: the seed's vanilla run and the target's dev accuracy every
  --curve_every steps (kept in dev_curve.json; a rerun reads it)."""
  root = os.path.join(args.out_dir, f"seed{seed}")
  done = os.path.join(root, "dev_curve.json")
  if os.path.exists(done):
    return json.load(open(done, encoding="utf-8"))
  _, vanilla = seed_vanilla(args, seed, root)
  curve = heldout_curve(vanilla, args.curve_every, args.steps, items, args.collection)
  files.write_text_atomically(done, json.dumps(curve, indent=1) + "\n")
  return curve


def dev_curve_report(args, curves: dict[int, list[dict]]) -> None:
  """dev_curve.json, dev_curve.png and a table: where the vanilla run becomes competent."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  files.write_text_atomically(os.path.join(args.out_dir, "dev_curve.json"), json.dumps(
      {"cpu": cpu_model(), "args": vars(args), "curves": curves}, indent=1) + "\n")
  fig, ax = plt.subplots(figsize=(5.5, 3.4))
  for seed, curve in curves.items():
    ax.plot([p["step"] for p in curve], [100 * p["accuracy"] for p in curve], marker="o",
            ms=3, label=f"seed {seed}")
  ax.axhline(50, color="gray", lw=0.8, ls=":")
  ax.axhline(70, color="tab:green", lw=0.8, ls="--")
  ax.set_xlabel("vanilla step")
  ax.set_ylabel(f"dev {COLLECTIONS[args.collection].target} accuracy (%)")
  ax.set_title("Vanilla run: target dev accuracy (choose --partial_steps)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(args.out_dir, "dev_curve.png"), dpi=110)
  plt.close(fig)
  steps = [p["step"] for p in next(iter(curves.values()))]
  print("| step | " + " | ".join(f"seed {s}: dev % (swap %)" for s in curves) + " |")
  print("|---:|" + "---:|" * len(curves))
  for i, step in enumerate(steps):
    print(f"| {step} | " + " | ".join(
        f"{100 * c[i]['accuracy']:.1f} ({100 * c[i]['swap_consistency']:.0f})"
        for c in curves.values()) + " |")


def run_seed(args, seed: int, items) -> dict:
  root = os.path.join(args.out_dir, f"seed{seed}")
  done = os.path.join(root, "result.json")
  if os.path.exists(done):
    with open(done, encoding="utf-8") as f:
      result = json.load(f)
    if "baseline_accuracy" not in result:  # written before it was recorded: the grid's own
      baseline, _ = analyze.read_results(os.path.join(root, "tailpatch"))
      result["baseline_accuracy"] = baseline["dev"]
    return result
  start = time.time()
  initial, vanilla = seed_vanilla(args, seed, root)
  opt_args = optimize.build_parser().parse_args([
      f"--init={vanilla}/checkpoints/{args.partial_steps}", f"--initial={initial}",
      f"--out_dir={os.path.join(root, 'tailpatch')}",
      f"--optimised_steps={args.optimised_steps}", f"--vanilla={vanilla}",
      *(f"--optimised_binding={b}" for b in args.optimised_binding),
      *(f"--patch_binding={b}" for b in args.patch_binding)])
  # Every phase keeps a checkpoint each --curve_every steps (the optimised run's held-out
  # curve reads them; a patch run shorter than that keeps only its last). The vanilla
  # mixture's weights are not passed on: the patches take its tasks from the gin file's
  # mixture (the same tasks), and the optimised run must train on the analysis' weights.
  bindings = [*args.binding, f"Settings.steps = {args.patch_steps}", f"train.seed = {seed}",
              "train.progress_bar = False", f"train.checkpoint_every = {args.curve_every}"]
  if args.categories:
    categories = {c: synthetic_categories()[c] for c in args.categories.split(",")}
    bindings.append(f"Settings.categories = {categories!r}")
  if args.dev_limit is not None:
    bindings.append(f"Settings.limit_per_task = {args.dev_limit}")
  if args.eval_points is not None:
    bindings.append(f"Settings.eval_points = {args.eval_points}")
  if args.continue_optimizer:
    bindings.append("Settings.continue_optimizer = True")
  analysis, accounting = optimize.optimize([GIN_FILES[args.collection]], bindings, opt_args)
  optimised = os.path.join(root, "tailpatch", "optimised")
  vanilla_curve = heldout_curve(vanilla, args.curve_every, args.steps, items, args.collection)
  optimised_curve = heldout_curve(optimised, args.curve_every, args.optimised_steps, items,
                                  args.collection)
  patch_examples = accounting["tailpatch"]["examples"]
  partial_examples = next(p["examples"] for p in vanilla_curve
                          if p["step"] == args.partial_steps)
  result = {
      "seed": seed, "order": analysis.order, "totals": analysis.totals,
      "gains": analysis.gains, "weights": analysis.weights, "baseline": analysis.baseline,
      "score": analysis.score, "baseline_accuracy": analysis.accuracy,
      "vanilla": vanilla_curve[-1], "optimised": optimised_curve[-1],
      "vanilla_curve": vanilla_curve, "optimised_curve": optimised_curve,
      "examples_to_match": {
          "patches_and_optimised": examples_to_match(vanilla_curve, optimised_curve,
                                                     patch_examples),
          "with_partial_run": examples_to_match(vanilla_curve, optimised_curve,
                                                patch_examples + partial_examples)},
      "compute": accounting, "seconds": round(time.time() - start)}
  collection = COLLECTIONS[args.collection]
  if collection.roles is not None:
    positions = role_positions(analysis.order, collection.roles)
    result["role_positions"] = positions
    result["ranking_ok"] = (max(positions["target"], positions["helpful"])
                            < positions["neutral"] < positions["harmful"])
    result["target"] = target_ranking(analysis.gains, collection.target, collection.roles)
  result["optimised_wins"] = result["optimised"]["accuracy"] > result["vanilla"]["accuracy"]
  files.write_text_atomically(done, json.dumps(result, indent=1) + "\n")
  return result


def mean_std(values) -> tuple[float, float]:
  values = list(values)
  return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def label(task: str, roles: Optional[dict[str, str]]) -> str:
  role = (roles or {}).get(task)
  return f"{task.removeprefix('synthetic_')} ({role})" if role else task


def plots(results: list[dict], out_dir: str, metric: str,
          roles: Optional[dict[str, str]] = None) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(5.5, 3.4))
  seeds = [r["seed"] for r in results]
  x = np.arange(len(seeds))
  for offset, key, legend in ((-0.2, "vanilla", "examples-proportional"),
                              (0.2, "optimised", "tail-patch optimised")):
    ax.bar(x + offset, [100 * r[key]["accuracy"] for r in results], 0.4, label=legend)
  ax.axhline(50, color="gray", lw=0.8, ls=":")
  ax.set_xticks(x, [f"seed {s}" for s in seeds])
  ax.set_ylabel(metric)
  ax.set_title("Equal steps, two mixtures")
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "heldout.png"), dpi=110)
  plt.close(fig)
  if all("vanilla_curve" in r for r in results):
    economy_plot(results, os.path.join(out_dir, "economy.png"), metric)
  # The analysis over seeds: mean gain per task and category, rows by mean total rating.
  tasks = list(results[0]["gains"])
  categories = list(results[0]["gains"][tasks[0]])
  gain = {t: {c: statistics.mean(r["gains"][t][c] for r in results) for c in categories}
          for t in tasks}
  total = {t: statistics.mean(r["totals"][t] for r in results) for t in tasks}
  order = sorted(tasks, key=lambda t: (-total[t], t))
  analyze.plot_matrix(
      [f"{label(t, roles)}  [{total[t]:+.1f}]" for t in order], categories,
      [[100 * gain[t][c] for c in categories] for t in order],
      [[f"{100 * gain[t][c]:+.1f}" for c in categories] for t in order],
      f"Tail-patch gains, mean of {len(results)} seeds", os.path.join(out_dir, "heatmap.png"))


def check_settings(parser: argparse.ArgumentParser, args) -> None:
  """Settings that cannot work are refused before any training, naming the flag."""
  args.optimised_steps = args.optimised_steps or args.steps
  args.curve_every = args.curve_every or args.partial_steps
  eval_points = args.eval_points or 4  # tailpatch.run.Settings' default
  problems = []
  if not 0 < args.partial_steps < args.steps:
    problems.append(f"--partial_steps={args.partial_steps} must be above 0 and below "
                    f"--steps={args.steps} (the patches start from a partial vanilla run)")
  for flag in ("steps", "partial_steps", "optimised_steps"):
    if getattr(args, flag) % args.curve_every:
      problems.append(f"--{flag}={getattr(args, flag)} is not a multiple of "
                      f"--curve_every={args.curve_every} (checkpoints are kept every "
                      "--curve_every steps)")
  if args.patch_steps < 1 or args.patch_steps % eval_points:
    problems.append(f"--patch_steps={args.patch_steps} does not divide into "
                    f"--eval_points={eval_points} evaluation points")
  if args.dev_limit is not None and args.dev_limit < args.min_dev_pairs:
    problems.append(f"--dev_limit={args.dev_limit} dev pairs per task: the analysis needs "
                    f">= --min_dev_pairs={args.min_dev_pairs} (at {MIN_DEV_PAIRS} a "
                    "category's accuracy has a standard error <= 5 points, the size of a "
                    "'helpful' gain)")
  if not 0 <= args.harmful_weight <= 1:
    problems.append(f"--harmful_weight={args.harmful_weight} must be in [0, 1]")
  if not args.neutral_weight > 0:
    problems.append(f"--neutral_weight={args.neutral_weight} must be above 0")
  if args.vanilla_only and COLLECTIONS[args.collection].roles is None:
    problems.append(f"--vanilla_only needs a controlled collection (a target task), not "
                    f"--collection={args.collection}")
  if args.categories:
    unknown = set(args.categories.split(",")) - set(synthetic_categories())
    if unknown or args.collection != "synthetic":
      problems.append(f"--categories={args.categories}: synthetic categories are "
                      f"{sorted(synthetic_categories())}")
  if problems:
    parser.error("; ".join(problems))


def economy_plot(results: list[dict], path: str, metric: str) -> None:
  """Held-out accuracy against examples trained on: the vanilla run, and the optimised run
  with the tail-patching examples added to its own (thin: each seed; thick: the mean)."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 3.8))
  for key, color, legend in (("vanilla_curve", "tab:blue", "vanilla (examples-proportional)"),
                             ("optimised_curve", "tab:orange",
                              "tail-patch + optimised (patching's examples included)")):
    curves = []
    for r in results:
      offset = r["compute"]["tailpatch"]["examples"] if key == "optimised_curve" else 0
      xs = [offset + p["examples"] for p in r[key]]
      ys = [100 * p["accuracy"] for p in r[key]]
      ax.plot(xs, ys, color=color, lw=0.6, alpha=0.35)
      curves.append((xs, ys))
    ax.plot(np.mean([c[0] for c in curves], axis=0), np.mean([c[1] for c in curves], axis=0),
            color=color, lw=2.2, marker="o", ms=3, label=legend)
  ax.axhline(50, color="gray", lw=0.8, ls=":")
  third = np.mean([r["vanilla_curve"][-1]["examples"] for r in results]) / 3
  ax.axvline(third, color="tab:green", lw=0.8, ls="--", label="1/3 of the vanilla run's examples")
  ax.set_xlabel("examples trained on")
  ax.set_ylabel(metric)
  ax.set_title(f"Economy: held-out accuracy per example ({len(results)} seeds)")
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out_dir", default="/tmp/tailpatch_synthetic")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--steps", type=int, default=400, help="vanilla and optimised run steps")
  p.add_argument("--partial_steps", type=int, default=200)
  p.add_argument("--patch_steps", type=int, default=40)
  p.add_argument("--heldout_size", type=int, default=300,
                 help="held-out pairs (synthetic), or per held-out subset (real)")
  p.add_argument("--dev_limit", type=int, default=None,
                 help="dev pairs per task for the target categories (default: the gin file's)")
  p.add_argument("--eval_points", type=int, default=None,
                 help="dev evaluations per patch (default: the gin file's)")
  p.add_argument("--collection", choices=tuple(GIN_FILES), default="synthetic")
  p.add_argument("--optimised_steps", type=int, default=None,
                 help="the optimised run's steps (default: --steps)")
  p.add_argument("--curve_every", type=int, default=None,
                 help="held-out accuracy of both runs every this many steps (default: "
                 "--partial_steps)")
  p.add_argument("--harmful_weight", type=float, default=1.0,
                 help="synthetic: the vanilla mixture's weight of each label-flipped task "
                 "relative to the others (1.0: examples-proportional)")
  p.add_argument("--neutral_weight", type=float, default=1.0,
                 help="controlled collections: the vanilla mixture's weight of each neutral "
                 "task relative to the others (e.g. 10: the target and helpful tasks become "
                 "a small share of the mixture, as in a large collection)")
  p.add_argument("--vanilla_mixture", choices=("equal", "proportional"), default="equal",
                 help="controlled collections: the vanilla run's task weights, each 1 or each "
                 "its train split's size (examples-proportional); flipped tasks x "
                 "--harmful_weight either way")
  p.add_argument("--categories", default=None,
                 help="synthetic: comma-separated target categories (Reasoning, Strings; "
                 "default both)")
  p.add_argument("--min_dev_pairs", type=int, default=MIN_DEV_PAIRS)
  p.add_argument("--continue_optimizer", action="store_true",
                 help="patches continue the vanilla run's optimizer state (Adam's moments) "
                 "instead of a fresh one (tailpatch.run.Settings.continue_optimizer)")
  p.add_argument("--binding", action="append", default=[],
                 help="a gin binding for every run (vanilla, patches, optimised), e.g. "
                 "--binding='LEARNING_RATE = 3e-3'; repeatable")
  p.add_argument("--optimised_binding", action="append", default=[],
                 help="a gin binding for the optimised run only, after --binding (e.g. its "
                 "cosine schedule over its own steps); repeatable")
  p.add_argument("--patch_binding", action="append", default=[],
                 help="a gin binding for the patches and their analysis only, after --binding "
                 "(e.g. 'LEARNING_RATE = 1e-4' with a constant schedule, or "
                 "'Rules.score = \"accuracy\"'); repeatable")
  p.add_argument("--vanilla_only", action="store_true",
                 help="controlled collections: train only the vanilla runs and report the "
                 "target task's dev accuracy every --curve_every steps (dev_curve.png), to "
                 "choose --partial_steps on dev; no patches, no held-out pairs")
  args = p.parse_args(argv)
  check_settings(p, args)
  collection = COLLECTIONS[args.collection]
  if args.vanilla_only:
    items = dev_items(args.collection, args.dev_limit)
    dev_curve_report(args, {int(s): vanilla_dev_curve(args, int(s), items)
                            for s in args.seeds.split(",")})
    return
  synthetic_run = collection.roles is not None  # a controlled collection, roles known
  items = heldout_items(args.collection, args.heldout_size)
  metric = (f"held-out {collection.target} accuracy (%)" if synthetic_run
            else "held-out suite, overall (%)")
  results = [run_seed(args, int(s), items) for s in args.seeds.split(",")]
  summary = {
      "cpu": cpu_model(), "args": vars(args), "metric": metric,
      "vanilla": mean_std(r["vanilla"]["accuracy"] for r in results),
      "optimised": mean_std(r["optimised"]["accuracy"] for r in results),
      "ranking_ok": sum(r.get("ranking_ok", False) for r in results),
      "optimised_wins": sum(r["optimised_wins"] for r in results), "seeds": len(results),
      "examples_ratio": mean_std(r["compute"]["vanilla_over_ours"]["examples"]
                                 for r in results),
      "seconds": sum(r["seconds"] for r in results)}
  if synthetic_run:
    summary["target_ranking_ok"] = sum(r["target"]["ok"] for r in results)
    summary["kendall_tau"] = bootstrap_mean([r["target"]["kendall_tau"] for r in results])
    summary["target_helpful_share"] = {
        "vanilla": [role_share(vanilla_weights(args.out_dir, r["seed"], collection.roles),
                               collection.roles) for r in results],
        "optimised": [role_share(r["weights"], collection.roles) for r in results]}
    # the partial checkpoint's dev accuracy, and its score by the analysis' Rules.score
    for key, field in (("partial_dev_accuracy", "baseline_accuracy"),
                       ("partial_dev_score", "baseline")):
      summary[key] = {c: bootstrap_mean([r[field][c] for r in results])
                      for c in results[0][field]}
    for key in ("patches_and_optimised", "with_partial_run"):
      reached = [r["examples_to_match"][key] for r in results]
      summary[f"examples_to_match/{key}"] = {
          "reached": sum(x is not None for x in reached),
          "mean_interval": bootstrap_mean([x for x in reached if x is not None])
          if any(x is not None for x in reached) else None}
  files.write_text_atomically(os.path.join(args.out_dir, "results.json"),
                              json.dumps({"summary": summary, "seeds": results}, indent=1))
  plots(results, args.out_dir, metric, collection.roles)
  lines = [f"Tail-patch, {args.collection} tasks, {collection.model}, {len(results)} seeds "
           f"({summary['cpu']}, {summary['seconds'] / 60:.0f} min)", "",
           "| seed | partial ckpt dev accuracy (rated score) | "
           "order by target gain (first → last) | roles ok | "
           "Kendall τ | vanilla | optimised | examples to match |",
           "|---|---|---|---|---:|---:|---:|---:|"]
  for r in results:
    dev = ", ".join(f"{c} {100 * a:.1f} (rated {100 * r['baseline'][c]:.1f})"
                    for c, a in r["baseline_accuracy"].items())
    match = r["examples_to_match"]["patches_and_optimised"]
    if synthetic_run:
      order = ", ".join(label(t, collection.roles) for t in r["target"]["order"])
      ok, tau = ("yes" if r["target"]["ok"] else "no"), f"{r['target']['kendall_tau']:+.2f}"
    else:
      order, ok, tau = ", ".join(label(t, None) for t in r["order"]), "—", "—"
    lines.append(f"| {r['seed']} | {dev} | {order} | {ok} | {tau} | "
                 f"{100 * r['vanilla']['accuracy']:.1f} | "
                 f"{100 * r['optimised']['accuracy']:.1f} | "
                 + ("never" if match is None else f"{match:.2f}x") + " |")
  if not synthetic_run:
    lines += ["", "| held-out category | " + " | ".join(
        f"vanilla s{r['seed']} | optimised s{r['seed']}" for r in results) + " |",
              "|---|" + "---:|" * (2 * len(results))]
    lines += [f"| {c} | " + " | ".join(
        f"{100 * r['vanilla']['categories'][c]:.1f} | {100 * r['optimised']['categories'][c]:.1f}"
        for r in results) + " |" for c in results[0]["vanilla"]["categories"]]
  v, o = summary["vanilla"], summary["optimised"]
  lines += ["", f"{metric}: examples-proportional {100 * v[0]:.1f} ± {100 * v[1]:.1f}, "
            f"optimised {100 * o[0]:.1f} ± {100 * o[1]:.1f} (mean ± std over seeds); the "
            f"optimised mixture won on {summary['optimised_wins']}/{len(results)} seeds"
            + (f"; the roles were ordered right on {summary['ranking_ok']}/{len(results)}."
               if synthetic_run else ".")
            + f" The vanilla run used {summary['examples_ratio'][0]:.2f}x the examples of "
            "tail-patching plus the optimised run."]
  if synthetic_run:
    tau = summary["kendall_tau"]
    lines += ["", f"Role order helpful > neutral > harmful by the gain on {collection.target}: "
              f"{summary['target_ranking_ok']}/{len(results)} seeds; Kendall τ of the gains "
              f"against the roles {tau[0]:+.2f} (95% bootstrap interval over seeds "
              f"{tau[1]:+.2f} to {tau[2]:+.2f})."]
    share = summary["target_helpful_share"]
    lines.append("Target and helpful tasks' share of the mixture: vanilla "
                 f"{100 * statistics.mean(share['vanilla']):.0f}%, optimised "
                 + ", ".join(f"{100 * x:.0f}%" for x in share["optimised"]) + " (per seed).")
    for key, what in (("patches_and_optimised", "tail-patching plus the optimised run"),
                      ("with_partial_run", "the same plus the partial vanilla run")):
      got = summary[f"examples_to_match/{key}"]
      interval = got["mean_interval"]
      lines.append(f"Examples to reach the vanilla run's final held-out accuracy, {what}, as "
                   f"a fraction of the vanilla run's: reached on {got['reached']}/"
                   f"{len(results)} seeds" + ("" if interval is None else
                   f", mean {interval[0]:.2f} (95% interval {interval[1]:.2f}–"
                   f"{interval[2]:.2f})") + ".")
  text = "\n".join(lines) + "\n"
  files.write_text_atomically(os.path.join(args.out_dir, "results.md"), text)
  print(text)


if __name__ == "__main__":
  main()
