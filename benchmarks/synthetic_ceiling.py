"""How far can a small byte decoder learn the synthetic target task? Accuracy per kind of error.

    python benchmarks/synthetic_ceiling.py --out_dir=/tmp/synthetic_ceiling [--model=small]

The tail-patch experiments (`tailpatch_synthetic.py`, `tailpatch_envelope.py`) need a target
category the model is still learning: a task that helps can only show when there is something
left to learn. This trains the target task alone (``synthetic_arithmetic_pairwise``, the
run's learning rate, from random parameters) and scores every kept checkpoint on the held-out
Reasoning pairs (both orders) split by the mistake in the wrong solution
(`synthetic.solution_error`): a precedence error ("First add: …") shows in the text, a slip in
the product or the sum (off by ±1, ±2 or ±10) only to a model that checks the arithmetic.
``--checkpoints`` scores existing checkpoints instead (e.g. a vanilla run's). Writes
``results.json``, ``results.md`` and ``ceiling.png``; quote the CPU with the time it prints.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import gin

from flame import files, gin_utils, train
from flame.autorater import autorater, evaluate
from flame.data import synthetic
from flame.pipeline import pipeline
from _cpu import cpu_model  # benchmarks/ is the script's folder
import _results
import tailpatch_synthetic as experiment

GIN = experiment.GIN_FILES["synthetic"]
TARGET_TASK = "flame_synthetic_arithmetic_pairwise_bytes"
# The tiny decoder of the gin file, and one 4x wider and 2x deeper (~1M parameters).
MODELS = {"tiny": [], "small": ["decoder.DecoderConfig.emb_dim = 128",
                                "decoder.DecoderConfig.num_layers = 4",
                                "decoder.DecoderConfig.head_dim = 32",
                                "decoder.DecoderConfig.mlp_dim = 512"]}


def error_kinds(items: list[evaluate.Item]) -> list[str]:
  """The mistake in each pair's wrong solution (the response that is not gold)."""
  kinds = []
  for item in items:
    context = item.request.context
    wrong = context["response_b"] if item.gold == "A" else context["response_a"]
    kinds.append(synthetic.solution_error(context["problem"], wrong))
  return kinds


def score(checkpoint: str, items: list[evaluate.Item], kinds: list[str]) -> dict:
  """Accuracy (95% interval) and swap consistency per kind of error, and over all pairs
  (`evaluate.evaluate` with each pair's kind as its subset; "all" weighs kinds by pairs)."""
  rater = autorater.Autorater.load(checkpoint, batch_size=16, max_input_length=1024)
  labelled = [dataclasses.replace(item, subset=kind) for item, kind in zip(items, kinds)]
  categories = {"all": list(synthetic.ERRORS), **{kind: [kind] for kind in synthetic.ERRORS}}
  result = evaluate.evaluate(rater, labelled, True, categories, progress=False)
  out = {"all": {"pairs": len(items), "accuracy": result["categories"]["all"],
                 "interval": result["intervals"]["all"],
                 "swap_consistency": result["swap_consistency_overall"]}}
  for kind in synthetic.ERRORS:
    subset = result["subsets"].get(kind)
    out[kind] = ({"pairs": 0, "accuracy": float("nan"), "interval": None,
                  "swap_consistency": float("nan")} if subset is None else
                 {"pairs": subset["count"], "accuracy": subset["accuracy"],
                  "interval": result["intervals"][kind],
                  "swap_consistency": result["swap_consistency"][kind]})
  return out


def train_target(args, root: str) -> list[str]:
  """The target task alone from random parameters; its kept checkpoints, in step order."""
  bindings = MODELS[args.model]
  initial = pipeline.write_initial([GIN], ["MODEL_DIR = 'unused'", "TRAIN_STEPS = 1", *bindings],
                                   args.seed, os.path.join(root, "initial"))
  every = args.steps // args.points
  gin.clear_config()
  gin_utils.parse([GIN], [f"MODEL_DIR = {os.path.join(root, 'run')!r}",
                          f"TRAIN_STEPS = {args.steps}", f"train.init_params_from = {initial!r}",
                          f"train.checkpoint_every = {every}", f"train.seed = {args.seed}",
                          f"MIXTURE_OR_TASK_NAME = {TARGET_TASK!r}",
                          f"LEARNING_RATE = {args.learning_rate!r}", "train.progress_bar = False",
                          *bindings])
  train.train()  # pylint: disable=no-value-for-parameter  (resumes from its checkpoints)
  return [os.path.join(root, "run", "checkpoints", str(step))
          for step in range(every, args.steps + 1, every)]


def plot(rows: list[dict], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6.5, 4))
  xs = [row["step"] for row in rows]
  for kind in ["all", *synthetic.ERRORS]:
    ax.plot(xs, [100 * row["scores"][kind]["accuracy"] for row in rows], "o-", label=kind)
  ax.axhline(50, color="grey", lw=0.8, ls=":")
  ax.set_xlabel("training step (target task alone)")
  ax.set_ylabel("held-out Reasoning accuracy, both orders (%)")
  ax.set_ylim(0, 105)
  ax.set_title(title, fontsize=10)
  ax.legend(title="mistake in the wrong solution", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def to_markdown(rows: list[dict]) -> str:
  kinds = ["all", *synthetic.ERRORS]
  lines = ["| checkpoint | " + " | ".join(f"{k} (pairs)" for k in kinds) + " | swap consistency |",
           "|---|" + "---:|" * (len(kinds) + 1)]
  for row in rows:
    cells = [f"{100 * row['scores'][k]['accuracy']:.1f} ({row['scores'][k]['pairs']})"
             for k in kinds]
    lines.append(f"| {row['checkpoint']} | " + " | ".join(cells) +
                 f" | {100 * row['scores']['all']['swap_consistency']:.1f} |")
  return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out_dir", default="/tmp/synthetic_ceiling")
  p.add_argument("--model", choices=sorted(MODELS), default="tiny")
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--points", type=int, default=5, help="checkpoints scored along the run")
  p.add_argument("--learning_rate", type=float, default=3e-3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--heldout_size", type=int, default=300)
  p.add_argument("--checkpoints", nargs="*", default=None,
                 help="score these checkpoints instead of training")
  return p


def main(argv=None) -> None:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.points < 1 or args.steps < args.points or args.steps % args.points:
    parser.error(f"--steps={args.steps} must be a positive multiple of --points={args.points}")
  for checkpoint in args.checkpoints or []:
    if not os.path.isdir(checkpoint):
      parser.error(f"--checkpoints: {checkpoint} is not a checkpoint folder")
  files.check_output("--out_dir", args.out_dir)
  start = time.time()
  checkpoints = args.checkpoints or train_target(args, args.out_dir)
  train_seconds = time.time() - start
  items = evaluate.task_items(synthetic.HELDOUT_MATH.name, "test", args.heldout_size,
                              "synthetic-math")
  kinds = error_kinds(items)
  rows = []
  for checkpoint in checkpoints:
    step = os.path.basename(os.path.normpath(checkpoint))
    rows.append({"checkpoint": checkpoint, "step": int(step) if step.isdigit() else None,
                 "scores": score(checkpoint, items, kinds)})
    print(to_markdown(rows[-1:]).splitlines()[-1], flush=True)
  os.makedirs(args.out_dir, exist_ok=True)
  title = (f"{args.model} decoder, target task alone, lr {args.learning_rate:g}"
           if not args.checkpoints else "checkpoints given")
  if all(row["step"] is not None for row in rows):
    plot(rows, os.path.join(args.out_dir, "ceiling.png"), title)
  summary = {"argv": vars(args), "cpu": cpu_model(), "train_seconds": round(train_seconds),
             "seconds": round(time.time() - start), "rows": rows}
  _results.write(args.out_dir, summary, to_markdown(rows), start, indent=1)


if __name__ == "__main__":
  main()
