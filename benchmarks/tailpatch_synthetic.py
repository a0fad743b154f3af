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
import json
import os
import statistics
import time
from typing import Any

import gin
import numpy as np

from flame import files, gin_utils, train
from flame.autorater import autorater, evaluate
from flame.data import heldout, synthetic
from flame.pipeline import pipeline
from flame.tailpatch import analyze, optimize
from rate_throughput import cpu_model  # benchmarks/ is the script's folder

GIN_FILES = {"synthetic": "tailpatch/synthetic.gin", "real": "tailpatch/collection_tiny.gin"}
ROLE_ORDER = ("target", "helpful", "neutral", "harmful")


def train_vanilla(model_dir: str, initial: str, args, seed: int) -> None:
  gin.clear_config()
  gin_utils.parse([GIN_FILES[args.collection]], [f"MODEL_DIR = {model_dir!r}", f"TRAIN_STEPS = {args.steps}",
                               f"train.init_params_from = {initial!r}",
                               f"train.checkpoint_every = {args.partial_steps}",
                               f"train.seed = {seed}", "train.progress_bar = False"])
  train.train()  # pylint: disable=no-value-for-parameter


def heldout_accuracy(checkpoint: str, items, collection: str) -> dict[str, Any]:
  """Synthetic: accuracy on the held-out Reasoning subset; real: the held-out suite's
  categories, with "accuracy" its overall score."""
  rater = autorater.Autorater.load(checkpoint, batch_size=16, max_input_length=1024)
  if collection == "synthetic":
    result = evaluate.evaluate(rater, items, True, None, progress=False)
    return {"accuracy": result["subsets"]["synthetic-math"]["accuracy"],
            "swap_consistency": result["swap_consistency_overall"]}
  result = evaluate.evaluate(rater, items, True, heldout.CATEGORIES, progress=False)
  return {"accuracy": result["overall"], "categories": result["categories"],
          "swap_consistency": result["swap_consistency_overall"]}


def role_positions(order: list[str]) -> dict[str, float]:
  """Mean position (0 = first) of each role's tasks in the analysis order."""
  positions = {}
  for role in ROLE_ORDER:
    mine = [i for i, task in enumerate(order) if synthetic.ROLES[task] == role]
    positions[role] = statistics.mean(mine)
  return positions


def run_seed(args, seed: int, items) -> dict:
  root = os.path.join(args.out_dir, f"seed{seed}")
  done = os.path.join(root, "result.json")
  if os.path.exists(done):
    return json.load(open(done, encoding="utf-8"))
  start = time.time()
  initial = pipeline.write_initial([GIN_FILES[args.collection]],
                                   ["MODEL_DIR = 'unused'", "TRAIN_STEPS = 1"], seed,
                                   os.path.join(root, "initial"))
  vanilla = os.path.join(root, "vanilla")
  train_vanilla(vanilla, initial, args, seed)
  opt_args = optimize.build_parser().parse_args([
      f"--init={vanilla}/checkpoints/{args.partial_steps}", f"--initial={initial}",
      f"--out_dir={os.path.join(root, 'tailpatch')}", f"--optimised_steps={args.steps}",
      f"--vanilla={vanilla}"])
  bindings = [f"Settings.steps = {args.patch_steps}", f"train.seed = {seed}",
              "train.progress_bar = False"]
  if args.dev_limit is not None:
    bindings.append(f"Settings.limit_per_task = {args.dev_limit}")
  if args.eval_points is not None:
    bindings.append(f"Settings.eval_points = {args.eval_points}")
  analysis, accounting = optimize.optimize([GIN_FILES[args.collection]], bindings, opt_args)
  optimised = os.path.join(root, "tailpatch", "optimised")
  result = {
      "seed": seed, "order": analysis.order, "totals": analysis.totals,
      "gains": analysis.gains, "weights": analysis.weights, "baseline": analysis.baseline,
      "vanilla": heldout_accuracy(vanilla, items, args.collection),
      "optimised": heldout_accuracy(optimised, items, args.collection),
      "compute": accounting, "seconds": round(time.time() - start)}
  if args.collection == "synthetic":
    positions = role_positions(analysis.order)
    result["role_positions"] = positions
    result["ranking_ok"] = (max(positions["target"], positions["helpful"])
                            < positions["neutral"] < positions["harmful"])
  result["optimised_wins"] = result["optimised"]["accuracy"] > result["vanilla"]["accuracy"]
  files.write_text_atomically(done, json.dumps(result, indent=1) + "\n")
  return result


def mean_std(values) -> tuple[float, float]:
  values = list(values)
  return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def label(task: str) -> str:
  role = synthetic.ROLES.get(task)
  return f"{task.removeprefix('synthetic_')} ({role})" if role else task


def plots(results: list[dict], out_dir: str, metric: str) -> None:
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
  # The analysis over seeds: mean gain per task and category, rows by mean total rating.
  tasks = list(results[0]["gains"])
  categories = list(results[0]["gains"][tasks[0]])
  gain = {t: {c: statistics.mean(r["gains"][t][c] for r in results) for c in categories}
          for t in tasks}
  total = {t: statistics.mean(r["totals"][t] for r in results) for t in tasks}
  order = sorted(tasks, key=lambda t: (-total[t], t))
  analyze.plot_matrix(
      [f"{label(t)}  [{total[t]:+.1f}]" for t in order], categories,
      [[100 * gain[t][c] for c in categories] for t in order],
      [[f"{100 * gain[t][c]:+.1f}" for c in categories] for t in order],
      f"Tail-patch gains, mean of {len(results)} seeds", os.path.join(out_dir, "heatmap.png"))


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
  args = p.parse_args(argv)
  if args.steps % args.partial_steps:
    raise SystemExit("--steps must be a multiple of --partial_steps")
  synthetic_run = args.collection == "synthetic"
  if synthetic_run:
    items = evaluate.task_items(synthetic.HELDOUT_MATH.name, "test", args.heldout_size,
                                "synthetic-math")
  else:
    items = evaluate.heldout_items(args.heldout_size)
  metric = ("held-out Reasoning accuracy (%)" if synthetic_run
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
  files.write_text_atomically(os.path.join(args.out_dir, "results.json"),
                              json.dumps({"summary": summary, "seeds": results}, indent=1))
  plots(results, args.out_dir, metric)
  lines = [f"Tail-patch, {args.collection} tasks, tiny decoder, {len(results)} seeds "
           f"({summary['cpu']}, {summary['seconds'] / 60:.0f} min)", "",
           "| seed | analysis order (first → last) | roles ok | vanilla | optimised |",
           "|---|---|---|---:|---:|"]
  for r in results:
    order = ", ".join(label(t) for t in r["order"])
    ok = ("yes" if r["ranking_ok"] else "no") if synthetic_run else "—"
    lines.append(f"| {r['seed']} | {order} | {ok} | {100 * r['vanilla']['accuracy']:.1f} | "
                 f"{100 * r['optimised']['accuracy']:.1f} |")
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
  text = "\n".join(lines) + "\n"
  files.write_text_atomically(os.path.join(args.out_dir, "results.md"), text)
  print(text)


if __name__ == "__main__":
  main()
