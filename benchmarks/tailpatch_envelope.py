"""When can tail-patch ratings be trusted? Their role order against the settings of a grid.

    python benchmarks/tailpatch_envelope.py --out_dir=/tmp/tailpatch_envelope --seeds=0,1,2

The controlled experiment of `benchmarks/tailpatch_synthetic.py` (the tiny byte decoder on the
generated tasks of `flame.data.synthetic`, whose roles for the target category Reasoning are
known: target, helpful, two neutral, two label-flipped; the vanilla mixture with the flipped
tasks at --harmful_weight), varied one setting at a time around a centre:

- competence of the checkpoint patched: the vanilla run's checkpoint at each of --partials;
- patch length: each of --patch_steps_grid;
- learning rate of the patches: the run's (3e-3, constant) times each of --lr_scales;
- dev-set size: every patch is scored pair by pair on --dev_limit Reasoning dev pairs (both
  orders), and the analysis is recomputed on --resamples random subsets of each of --dev_sizes
  pairs (the same subset for the checkpoint and its patches, as a smaller dev split would be).

A task's rating is its gain on Reasoning dev accuracy over the unpatched checkpoint (the rule of
`flame.tailpatch.analyze` for a single evaluation point). Per setting and seed: Kendall's tau-b of
the gains against the roles (target and helpful +1, neutral 0, harmful -1) and whether
target/helpful > neutral > harmful holds (by each role's mean position). Writes
``results.json`` (per seed, setting and task: the per-pair verdict bits), ``results.md`` and
``envelope.png`` (one panel per setting: mean tau with its 95% bootstrap interval over seeds,
and the share of seeds whose roles come out in order). Every patch is resumable (a killed run
redoes at most the patch it was in). Quote the CPU with the time it prints.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from typing import Any, Sequence

import gin
import numpy as np

from flame import files, gin_utils, train
from flame.autorater import autorater
from flame.data import synthetic
from flame.pipeline import pipeline
from flame.tailpatch import categories, run as tailpatch_run
from _cpu import cpu_model  # benchmarks/ is the script's folder
import _results
import tailpatch_synthetic as experiment

GIN = experiment.GIN_FILES["synthetic"]
TARGET = experiment.TARGET_CATEGORY
BASE_LEARNING_RATE = 3e-3  # gin_configs/tailpatch/synthetic.gin


@dataclasses.dataclass(frozen=True)
class Setting:
  """One tail-patch grid: the checkpoint it patches, patch length and learning-rate scale."""
  partial: int
  steps: int
  lr_scale: float

  @property
  def name(self) -> str:
    return f"partial{self.partial}_steps{self.steps}_lr{self.lr_scale:g}"


def settings_grid(args) -> list[Setting]:
  """The centre and every one-at-a-time variation of it (each once)."""
  centre = Setting(args.centre_partial, args.centre_steps, 1.0)
  grid = [centre]
  grid += [dataclasses.replace(centre, partial=p) for p in args.partials]
  grid += [dataclasses.replace(centre, steps=s) for s in args.patch_steps_grid]
  grid += [dataclasses.replace(centre, lr_scale=s) for s in args.lr_scales]
  return list(dict.fromkeys(grid))


def check_settings(parser: argparse.ArgumentParser, args) -> None:
  """Settings that cannot work are refused before anything trains."""
  partials = sorted(set(args.partials) | {args.centre_partial})
  if any(p <= 0 or p % args.checkpoint_every for p in partials):
    parser.error(f"--partials and --centre_partial {partials} must be positive multiples of "
                 f"--checkpoint_every={args.checkpoint_every} (only those checkpoints are kept)")
  if any(s < 1 for s in list(args.patch_steps_grid) + [args.centre_steps]):
    parser.error("patch steps must be >= 1")
  if any(s <= 0 for s in args.lr_scales):
    parser.error(f"--lr_scales={args.lr_scales}: scales must be positive")
  if any(n < 2 or n > args.dev_limit for n in args.dev_sizes):
    parser.error(f"--dev_sizes={args.dev_sizes} must lie in [2, --dev_limit={args.dev_limit}]")


def dev_correct(rater: autorater.Autorater, items, params) -> list[int]:
  """1 where the judge with `params` picks the gold response of a dev pair (both orders)."""
  rater.params = params
  verdicts = rater.judge([item.request for item in items], swap=True)
  return [int(v.verdict == item.gold) for v, item in zip(verdicts, items)]


def patch(setting: Setting, init: str, task: str, model_dir: str, seed: int, rater, items
          ) -> dict[str, Any]:
  """Fine-tunes `init` on `task` alone as a tail-patch run does (constant learning rate) and
  scores the result pair by pair; the patch's checkpoints are deleted afterwards."""
  gin.clear_config()
  tailpatch_run.configure([GIN], [
      f"Settings.steps = {setting.steps}", "Settings.eval_points = 1", f"train.seed = {seed}",
      f"LEARNING_RATE = {BASE_LEARNING_RATE * setting.lr_scale!r}", "train.progress_bar = False",
      f"train.checkpoint_every = {setting.steps}"])
  start = time.time()
  state, seen = train.train(model_dir=model_dir, mixture_or_task_name=task,
                            train_steps=setting.steps, init_params_from=init)
  record = {"correct": dev_correct(rater, items, state["params"]),
            "examples": int(seen["examples_seen"]), "seconds": round(time.time() - start, 1)}
  shutil.rmtree(model_dir, ignore_errors=True)
  return record


def run_seed(args, seed: int, grid: Sequence[Setting], items) -> dict[str, Any]:
  """Trains (or reuses) the seed's vanilla run and every patch of every setting."""
  root = os.path.join(args.out_dir, f"seed{seed}")
  path = os.path.join(root, "patches.json")
  record = json.load(open(path, encoding="utf-8")) if os.path.exists(path) else {
      "seed": seed, "baseline": {}, "patches": {}}
  initial = pipeline.write_initial([GIN], ["MODEL_DIR = 'unused'", "TRAIN_STEPS = 1"], seed,
                                   os.path.join(root, "initial"))
  vanilla = os.path.join(root, "vanilla")
  vanilla_args = argparse.Namespace(collection="synthetic", harmful_weight=args.harmful_weight,
                                    steps=max(s.partial for s in grid),
                                    curve_every=args.checkpoint_every)
  experiment.train_vanilla(vanilla, initial, vanilla_args, seed,
                           experiment.vanilla_bindings(vanilla_args, root))
  rater = None
  for setting in grid:
    init = os.path.join(vanilla, "checkpoints", str(setting.partial))
    if rater is None:
      rater = autorater.Autorater.load(init, batch_size=16, max_input_length=1024)
    if str(setting.partial) not in record["baseline"]:
      rater_init = autorater.Autorater.load(init, batch_size=16, max_input_length=1024)
      record["baseline"][str(setting.partial)] = dev_correct(rater, items, rater_init.params)
    done = record["patches"].setdefault(setting.name, {})
    for task in synthetic.ROLES:
      if task in done:
        continue
      seqio_task = f"flame_{task}_bytes"
      done[task] = patch(setting, init, seqio_task, os.path.join(root, "patch"), seed, rater,
                         items)
      files.write_text_atomically(path, json.dumps(record) + "\n")
      print(f"seed {seed} {setting.name} {task}: dev {100 * np.mean(done[task]['correct']):.1f} "
            f"({done[task]['seconds']:.0f} s)", flush=True)
  files.write_text_atomically(path, json.dumps(record) + "\n")
  return record


def ranking(base: np.ndarray, patched: dict[str, np.ndarray]) -> tuple[float, bool]:
  """Kendall's tau of the tasks' Reasoning gains against their roles, and whether the role
  order holds, for one seed and setting (arrays of per-pair correctness, same pairs)."""
  gains = {task: {TARGET: float(bits.mean() - base.mean())} for task, bits in patched.items()}
  result = experiment.target_ranking(gains, TARGET)
  return result["kendall_tau"], result["ok"]


def analyse(records: Sequence[dict], grid: Sequence[Setting], args) -> dict[str, Any]:
  """Per setting: tau per seed, its mean and 95% interval, seeds in order; and for the centre
  the same against dev-set size (mean over --resamples random subsets per seed)."""
  rng = np.random.default_rng(0)
  out = {"settings": {}, "dev_sizes": {}}
  for setting in grid:
    taus, oks, competence = [], [], []
    for record in records:
      base = np.array(record["baseline"][str(setting.partial)])
      patched = {t: np.array(r["correct"]) for t, r in record["patches"][setting.name].items()}
      tau, ok = ranking(base, patched)
      taus.append(tau)
      oks.append(ok)
      competence.append(float(base.mean()))
    out["settings"][setting.name] = {
        **dataclasses.asdict(setting), "tau": taus, "ok": oks,
        "tau_mean": list(experiment.bootstrap_mean(taus)), "seeds_ok": int(sum(oks)),
        "seeds": len(records), "dev_accuracy": competence}
  centre = grid[0]
  for size in args.dev_sizes:
    taus, oks = [], []
    for record in records:
      base = np.array(record["baseline"][str(centre.partial)])
      patched = {t: np.array(r["correct"]) for t, r in record["patches"][centre.name].items()}
      seed_taus, seed_oks = [], []
      for _ in range(args.resamples):
        pick = rng.choice(len(base), size=size, replace=False)
        tau, ok = ranking(base[pick], {t: bits[pick] for t, bits in patched.items()})
        seed_taus.append(tau)
        seed_oks.append(ok)
      taus.append(float(np.mean(seed_taus)))
      oks.append(float(np.mean(seed_oks)))
    out["dev_sizes"][str(size)] = {"tau": taus, "ok_rate": oks,
                                   "tau_mean": list(experiment.bootstrap_mean(taus)),
                                   "ok_rate_mean": float(np.mean(oks))}
  return out


def envelope_plot(analysis: dict, grid: Sequence[Setting], path: str) -> None:
  """One panel per setting varied: mean tau (95% interval over seeds) and share of seeds in
  order, against the setting; the centre is marked."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  centre = grid[0]
  panels = [("partial", "checkpoint patched (vanilla step)\n[dev Reasoning accuracy]"),
            ("steps", "patch steps"), ("lr_scale", "patch learning rate / run's")]
  fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), sharey=True)
  for ax, (field, xlabel) in zip(axes, panels):
    rows = sorted((r for r in analysis["settings"].values()
                   if all(r[f] == getattr(centre, f) for f in ("partial", "steps", "lr_scale")
                          if f != field)), key=lambda r: r[field])
    xs = list(range(len(rows)))
    means = [r["tau_mean"][0] for r in rows]
    errors = [[m - r["tau_mean"][1] for m, r in zip(means, rows)],
              [r["tau_mean"][2] - m for m, r in zip(means, rows)]]
    ax.errorbar(xs, means, yerr=errors, fmt="o-", capsize=3, label="Kendall τ (95% CI)")
    ax.plot(xs, [r["seeds_ok"] / r["seeds"] for r in rows], "s--", color="tab:green",
            label="share of seeds in role order")
    labels = [f"{r[field]:g}" for r in rows]
    if field == "partial":
      labels = [f"{r['partial']}\n[{100 * np.mean(r['dev_accuracy']):.0f}%]" for r in rows]
    ax.set_xticks(xs, labels)
    for x, r in zip(xs, rows):
      if r[field] == getattr(centre, field):
        ax.axvline(x, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(xlabel)
    ax.axhline(0, color="black", lw=0.5)
  sizes = sorted(analysis["dev_sizes"], key=int)
  ax = axes[3]
  means = [analysis["dev_sizes"][s]["tau_mean"][0] for s in sizes]
  errors = [[m - analysis["dev_sizes"][s]["tau_mean"][1] for m, s in zip(means, sizes)],
            [analysis["dev_sizes"][s]["tau_mean"][2] - m for m, s in zip(means, sizes)]]
  ax.errorbar(range(len(sizes)), means, yerr=errors, fmt="o-", capsize=3)
  ax.plot(range(len(sizes)), [analysis["dev_sizes"][s]["ok_rate_mean"] for s in sizes], "s--",
          color="tab:green")
  ax.set_xticks(range(len(sizes)), sizes)
  ax.set_xlabel("dev pairs (resampled, centre setting)")
  ax.axhline(0, color="black", lw=0.5)
  axes[0].set_ylabel("Kendall τ of gains vs roles")
  axes[0].set_ylim(-1.05, 1.05)
  axes[0].legend(loc="lower right", fontsize=8)
  fig.suptitle(f"Tail-patch role ordering against grid settings (Reasoning; "
               f"{len(next(iter(analysis['settings'].values()))['tau'])} seeds; centre: "
               f"step {centre.partial}, {centre.steps} steps, lr ×1)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def to_markdown(analysis: dict) -> str:
  lines = ["| checkpoint step | dev Reasoning | patch steps | lr × | Kendall τ (95% CI) | "
           "seeds in order |", "|---:|---:|---:|---:|---|---:|"]
  for r in analysis["settings"].values():
    mean, low, high = r["tau_mean"]
    lines.append(f"| {r['partial']} | {100 * np.mean(r['dev_accuracy']):.1f} | {r['steps']} | "
                 f"{r['lr_scale']:g} | {mean:+.2f} ({low:+.2f}, {high:+.2f}) | "
                 f"{r['seeds_ok']}/{r['seeds']} |")
  lines += ["", "| dev pairs (centre) | Kendall τ (95% CI) | share of resamples in order |",
            "|---:|---|---:|"]
  for size, r in sorted(analysis["dev_sizes"].items(), key=lambda kv: int(kv[0])):
    mean, low, high = r["tau_mean"]
    lines.append(f"| {size} | {mean:+.2f} ({low:+.2f}, {high:+.2f}) | "
                 f"{100 * r['ok_rate_mean']:.0f}% |")
  return "\n".join(lines) + "\n"


def ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def floats(text: str) -> list[float]:
  return [float(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out_dir", default="/tmp/tailpatch_envelope")
  p.add_argument("--seeds", type=ints, default=[0, 1, 2])
  p.add_argument("--centre_partial", type=int, default=200,
                 help="vanilla step of the checkpoint patched at the centre")
  p.add_argument("--centre_steps", type=int, default=32, help="patch steps at the centre")
  p.add_argument("--partials", type=ints, default=[25, 50, 100],
                 help="other vanilla checkpoints to patch (competence axis)")
  p.add_argument("--patch_steps_grid", type=ints, default=[8, 96])
  p.add_argument("--lr_scales", type=floats, default=[0.3])
  p.add_argument("--checkpoint_every", type=int, default=25,
                 help="the vanilla run keeps a checkpoint every this many steps")
  p.add_argument("--harmful_weight", type=float, default=0.2,
                 help="weight of the label-flipped tasks in the vanilla mixture")
  p.add_argument("--dev_limit", type=int, default=200,
                 help="Reasoning dev pairs per patch (both orders)")
  p.add_argument("--dev_sizes", type=ints, default=[25, 50, 100, 198])
  p.add_argument("--resamples", type=int, default=200)
  return p


def main(argv=None) -> None:
  parser = build_parser()
  args = parser.parse_args(argv)
  check_settings(parser, args)
  start = time.time()
  grid = settings_grid(args)
  items = categories.dev_items({TARGET: categories.SYNTHETIC_CATEGORIES[TARGET]},
                               args.dev_limit)
  if max(args.dev_sizes) > len(items):
    parser.error(f"--dev_sizes={args.dev_sizes}: the dev split has {len(items)} pairs")
  records = [run_seed(args, seed, grid, items) for seed in args.seeds]
  analysis = analyse(records, grid, args)
  os.makedirs(args.out_dir, exist_ok=True)
  envelope_plot(analysis, grid, os.path.join(args.out_dir, "envelope.png"))
  summary = {"argv": vars(args), "cpu": cpu_model(), "seconds": round(time.time() - start),
             "analysis": analysis, "records": records}
  _results.write(args.out_dir, summary, to_markdown(analysis), start)

if __name__ == "__main__":
  main()
