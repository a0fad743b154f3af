"""Merging experts for real: fine-tune one base on FLAMe capability slices, merge, evaluate.

The setup of Yadav et al. (2024) at toy scale, end to end with this repository's parts:

1. base: a small byte-level decoder trained with `flame.train` on every public FLAMe training
   task (`flame_all_bytes`);
2. experts: the base fine-tuned (`train.init_params_from`) on one capability slice each:
   factuality, safety, quality (pairwise preference tasks) and math (synthetic arithmetic);
3. merges of 2 and 4 experts with each method; λ / density picked on held-in validation
   (`merging.sweep`), then scored on held-in test and the held-out suite;
4. scores by rank classification (`flame.rank_classification`): each answer label is rendered
   as the target ``EVALUATION:\\n<field>: <label>`` and the likeliest one is the prediction.
   Held-in tasks are the experts' own tasks (validation split, even rows for selection, odd
   rows for test), normalised by the matching expert's score; held-out tasks are the
   RewardBench-style suite (`flame.data.heldout`: Chat, Chat Hard, Safety, Reasoning),
   normalised by the base model's score (`merging.evaluate`).

Writes under --work_dir: the trained models, ``results.md`` (the table) and
``normalized_vs_experts.png``. Re-running reuses finished trainings and sweep points.

  FLAME_DATA_MIRROR=../shared/data/raw python benchmarks/merge_experts_demo.py \\
      --work_dir=/tmp/flame_merge_demo
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

EXPERTS = {  # name -> (training mixture selection, held-in evaluation tasks)
    "factuality": ({"capabilities": ["factuality"]},
                   ["truthfulqa_truthfulness", "halueval_hallucination",
                    "summac_factcc_consistency"]),
    "safety": ({"capabilities": ["safety"]},
               ["hh_rlhf_harmlessness", "openai_moderation_violence",
                "openai_moderation_harassment"]),
    "quality": ({"tasks": ["pandalm_preference", "mt_bench_human_preference",
                           "faireval_preference", "llmeval2_preference"]},
                ["pandalm_preference", "mt_bench_human_preference", "llmeval2_preference"]),
    "math": ({"tasks": ["synthetic_arithmetic_pairwise", "synthetic_arithmetic_statement"]},
             ["synthetic_arithmetic_pairwise", "synthetic_arithmetic_statement"]),
}
SUBSETS = {2: [["factuality", "safety"]], 4: [["factuality", "safety", "quality", "math"]]}
GRIDS = {
    "linear": {},
    "task_arithmetic": {"lam": [0.5, 1.0]},
    "ties": {"density": [0.2, 0.5], "lam": [1.0]},
    "dare_ties": {"density": [0.2, 0.5], "lam": [1.0]},
}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--work_dir", default="/tmp/flame_merge_demo")
  parser.add_argument("--base_steps", type=int, default=300)
  parser.add_argument("--expert_steps", type=int, default=150)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--input_length", type=int, default=1024, help="bytes, EOS included")
  parser.add_argument("--eval_per_task", type=int, default=48,
                      help="at most this many examples per held-in task (half for "
                           "selection, half for test) and per held-out subset")
  parser.add_argument("--model", default="--gin.decoder.DecoderConfig.emb_dim=96 "
                      "--gin.decoder.DecoderConfig.head_dim=24 "
                      "--gin.decoder.DecoderConfig.mlp_dim=256",
                      help="gin bindings over models/decoder_tiny.gin")
  parser.add_argument("--methods", default=",".join(GRIDS))
  return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Training (flame.train in a subprocess, exactly as a user runs it).


def train_run(args, model_dir: str, mixture: dict, steps: int, init_from=None,
              learning_rate: float = 3e-3) -> None:
  if os.path.isdir(os.path.join(model_dir, "checkpoints", str(steps))):
    logging.info("reusing %s", model_dir)
    return
  name = "demo_" + os.path.basename(model_dir) + "_bytes"
  flags = [f"--gin.mixtures.register_mixture.{k}={json.dumps(v)}" for k, v in mixture.items()]
  command = [
      sys.executable, "-m", "flame.train", "--gin_file=flame/mixture_example.gin",
      f"--gin.MODEL_DIR={model_dir}", "--gin.MIXTURE_OR_TASK_NAME=@mixtures.register_mixture()",
      f"--gin.mixtures.register_mixture.name={name}",
      "--gin.mixtures.register_mixture.exclude_builders=[]", *flags,
      f"--gin.TASK_FEATURE_LENGTHS={{'inputs': {args.input_length}, 'targets': 32}}",
      f"--gin.TRAIN_STEPS={steps}", f"--gin.BATCH_SIZE={args.batch_size}",
      f"--gin.LEARNING_RATE={learning_rate}", f"--gin.train.checkpoint_every={steps}",
      f"--gin.train.eval_every={steps}", "--gin.train.eval_batches=4",
      f"--gin.optimizers.learning_rate_schedule.warmup_steps={max(1, steps // 10)}",
      *args.model.split()]
  if init_from:
    command.append(f"--gin.train.init_params_from={init_from}")
  logging.info("training %s: %s", model_dir, " ".join(command))
  start = time.time()
  subprocess.run(command, check=True, cwd=REPO)
  logging.info("trained %s in %.0f s", model_dir, time.time() - start)


# ---------------------------------------------------------------------------------------------
# Evaluation.


def load_model(args):
  import gin
  from flame import gin_utils
  gin.clear_config()
  bindings = [b.removeprefix("--gin.") for b in args.model.split()]
  gin_utils.parse([gin_utils.find_gin_file("models/decoder_tiny.gin")], bindings)
  return copy.deepcopy(gin.query_parameter("%MODEL"))


def load_params(model, model_dir: str, lengths):
  import jax
  from flame.checkpoints import manager
  abstract = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0), 1, lengths))
  return manager.restore_params_from(os.path.join(model_dir, "checkpoints"), abstract)


def rank_items(task: str, split: str, limit: int, budget: int):
  """RankItems (rendered input, one rendered target per label, gold) for one task."""
  import tensorflow_datasets as tfds
  from flame.data import format, sources
  from flame.data.sources import base as source_base
  from flame.rank_classification import RankItem
  builder_cls, spec = sources.task_specs()[task]
  builder = builder_cls(config=task)
  builder.download_and_prepare()
  items, skipped = [], 0
  for features in tfds.as_numpy(builder.as_dataset(split=split)):
    example = source_base.example_from_features(features)
    if example.example_id.endswith(format.SWAP_SUFFIX):
      continue
    try:
      text = format.render_input(spec, example, budget=budget,
                                 count_tokens=lambda s: len(s.encode("utf-8")))
    except ValueError:
      skipped += 1
      continue
    options = [format.render_target(spec, format.Example(
        task, example.example_id, example.context, {spec.answer_field: label}))
               for label in spec.labels]
    gold = spec.labels.index(example.outputs[spec.answer_field])
    items.append((example.example_id, RankItem(text, options, gold)))
    if len(items) >= limit:
      break
  items.sort(key=lambda pair: pair[0])  # A stable order whatever the TFDS shuffling.
  if skipped:
    logging.info("%s: %d examples do not fit %d bytes and are skipped", task, skipped, budget)
  return [item for _, item in items]


def build_suites(args):
  from flame.data import heldout
  budget = args.input_length - 1
  held_in_val, held_in_test = {}, {}
  for _, (_, tasks) in EXPERTS.items():
    for task in tasks:
      items = rank_items(task, "validation", args.eval_per_task, budget)
      held_in_val[task], held_in_test[task] = items[0::2], items[1::2]
  held_out = {task: rank_items(task, "test", args.eval_per_task, budget)
              for subsets in heldout.CATEGORIES.values()
              for task in (heldout.SUBSET_TASKS[s] for s in subsets)}
  return held_in_val, held_in_test, held_out


def scorer(classifier):
  def score(params, suite):
    return {task: float(classifier(params, items, progress=False).accuracy)
            for task, items in suite.items()}
  return score


def main(argv=None):
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  os.makedirs(args.work_dir, exist_ok=True)
  os.environ.setdefault("FLAME_TFDS_DIR", os.path.join(args.work_dir, "tfds"))
  timings = {}

  start = time.time()
  base_dir = os.path.join(args.work_dir, "base")
  train_run(args, base_dir, {"exclude_builders": ["flame_synthetic"]}, args.base_steps)
  for name, (mixture, _) in EXPERTS.items():
    train_run(args, os.path.join(args.work_dir, name), mixture, args.expert_steps,
              init_from=os.path.join(base_dir, "checkpoints"), learning_rate=1e-3)
  timings["training_s"] = time.time() - start

  from flame import files, partitioning
  from flame.data import heldout
  from flame.rank_classification import RankClassifier
  from merging import evaluate, merge, sweep
  lengths = {"inputs": args.input_length, "targets": 32}
  model = load_model(args)
  base_params = load_params(model, base_dir, lengths)
  experts = {name: load_params(model, os.path.join(args.work_dir, name), lengths)
             for name in EXPERTS}
  classifier = RankClassifier(model, partitioning.Partitioner(), lengths, batch_size=32)
  score = scorer(classifier)
  start = time.time()
  held_in_val, held_in_test, held_out = build_suites(args)
  reference_path = os.path.join(args.work_dir, f"reference_scores_{args.eval_per_task}.json")
  if os.path.exists(reference_path):  # Reruns reuse the unmerged models' scores.
    with open(reference_path) as f:
      reference = json.load(f)
  else:
    reference = {"base_held_out": score(base_params, held_out),
                 "base_held_in": score(base_params, held_in_test),
                 "expert_val": {n: score(experts[n], {t: held_in_val[t] for t in EXPERTS[n][1]})
                                for n in EXPERTS},
                 "expert_test_all": {n: score(experts[n], held_in_test) for n in EXPERTS},
                 "expert_held_out": {n: score(experts[n], held_out) for n in EXPERTS}}
    files.write_text_atomically(reference_path, json.dumps(reference, indent=1))
  base_held_out, base_held_in = reference["base_held_out"], reference["base_held_in"]
  expert_val, expert_held_out = reference["expert_val"], reference["expert_held_out"]
  # Normalising divides by the expert's score: a task its own expert scores 0 on (a few dozen
  # examples at this scale) cannot be normalised and is left out, with a note.
  held_in_tasks = {n: [t for t in EXPERTS[n][1]
                       if expert_val[n][t] > 0 and reference["expert_test_all"][n][t] > 0]
                   for n in EXPERTS}
  for n in EXPERTS:
    for t in sorted(set(EXPERTS[n][1]) - set(held_in_tasks[n])):
      logging.warning("held-in task %s left out: expert %s scores 0 on it", t, n)
  expert_val = {n: {t: expert_val[n][t] for t in held_in_tasks[n]} for n in EXPERTS}
  expert_test = {n: {t: reference["expert_test_all"][n][t] for t in held_in_tasks[n]}
                 for n in EXPERTS}
  timings["reference_eval_s"] = time.time() - start
  held_out_categories = {c: [heldout.SUBSET_TASKS[s] for s in subsets]
                         for c, subsets in heldout.CATEGORIES.items()}

  methods = args.methods.split(",")
  plot_records, rows = [], []
  # Reference rows: base and each expert alone (normalised on all held-in categories).
  all_in = dict(held_in_tasks)
  full = evaluate.Benchmark(held_in=all_in, held_out=held_out_categories,
                            expert_scores=expert_test, base_scores=base_held_out)
  rows.append(("base model", evaluate.normalized_scores({**base_held_in, **base_held_out},
                                                        full)))
  for n in EXPERTS:
    own = {**reference["expert_test_all"][n], **expert_held_out[n]}
    rows.append((f"expert: {n}", evaluate.normalized_scores(own, full)))

  start = time.time()
  for size, groups in SUBSETS.items():
    for group in groups:
      held_in = {n: held_in_tasks[n] for n in group}
      validation = evaluate.Benchmark(held_in=held_in,
                                      expert_scores={n: expert_val[n] for n in group})
      test = evaluate.Benchmark(held_in=held_in, held_out=held_out_categories,
                                expert_scores={n: expert_test[n] for n in group},
                                base_scores=base_held_out)
      val_suite = {t: held_in_val[t] for n in group for t in held_in_tasks[n]}
      test_suite = {**{t: held_in_test[t] for n in group for t in held_in_tasks[n]}, **held_out}
      merge_fn = (lambda method, group=group, **point: merge.merge_params(
          base_params, [experts[n] for n in group], method, seed=0, **point))
      result = sweep.sweep({m: GRIDS[m] for m in methods}, merge_fn,
                           functools.partial(score, suite=val_suite), validation,
                           functools.partial(score, suite=test_suite), test,
                           out_dir=os.path.join(args.work_dir, "sweeps", "+".join(group)),
                           resume=True)
      for method, record in result.test.items():
        scores = evaluate.NormalizedScores.from_json(record["scores"])
        rows.append((f"{sweep.describe(method, record['params'])}, {'+'.join(group)}", scores))
        plot_records.append({"method": method, "num_experts": size,
                             "held_in": scores.held_in, "held_out": scores.held_out})
  timings["merge_sweeps_s"] = time.time() - start

  table = evaluate.markdown_table(rows)
  plot_path = os.path.join(args.work_dir, "normalized_vs_experts.png")
  evaluate.plot_vs_num_experts(plot_records, plot_path,
                               title="Merged FLAMe experts (tiny byte-level decoder)")
  raw = {"base": {**base_held_in, **base_held_out},
         **{n: {**expert_test[n], **expert_held_out[n]} for n in EXPERTS}}
  lines = ["# Merging FLAMe experts: normalised scores (×100)", "", table, "",
           "Raw accuracies (held-in test halves and held-out subsets):", "",
           "| model | " + " | ".join(raw["base"]) + " |",
           "|---|" + "---:|" * len(raw["base"])]
  for name, values in raw.items():
    lines.append(f"| {name} | " + " | ".join(f"{100 * values.get(t, float('nan')):.1f}"
                                             for t in raw["base"]) + " |")
  lines += ["", f"Timings: {json.dumps({k: round(v) for k, v in timings.items()})}"]
  files.write_text_atomically(os.path.join(args.work_dir, "results.md"), "\n".join(lines) + "\n")
  print("\n".join(lines))
  print(f"plot: {plot_path}")


if __name__ == "__main__":
  main()
