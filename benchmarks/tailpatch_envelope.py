"""When can tail-patch ratings be trusted? Their role order against the settings of a grid.

    python benchmarks/tailpatch_envelope.py --out_dir=/tmp/tailpatch_envelope --seeds=0,1,2
    python benchmarks/tailpatch_envelope.py --collection=lexicon --vanilla_from=/tmp/tplex \
        --centre_partial=1250 --partials=1000 --eval_points=4 --dev_limit=650 …

The controlled experiment of `benchmarks/tailpatch_synthetic.py` (--collection=synthetic: the
tiny byte decoder on the generated tasks of `flame.data.synthetic`, whose roles for the target
category Reasoning are known: target, helpful, two neutral, two label-flipped; the vanilla
mixture with the flipped tasks at --harmful_weight; --collection=lexicon: the banned-word
tasks, target category Safety, patching the vanilla runs of a `tailpatch_synthetic.py
--collection=lexicon` output folder given as --vanilla_from), varied one setting at a time
around a centre:

- competence of the checkpoint patched: the vanilla run's checkpoint at each of --partials;
- patch length: each of --patch_steps_grid;
- learning rate of the patches: the collection's LEARNING_RATE (constant) times each of
  --lr_scales;
- dev-set size: every patch is scored pair by pair on --dev_limit target dev pairs (both
  orders), and the analysis is recomputed on --resamples random subsets of each of --dev_sizes
  pairs (the same subset for the checkpoint and its patches, as a smaller dev split would be).

A task's rating is its gain on target dev accuracy over the unpatched checkpoint, averaged
over --eval_points evaluations along the patch (the rule of `flame.tailpatch.analyze`).
--rating=debiased rates by another measure of the same verdicts: per pair, the judge's
log-odds of the right response averaged over the two orders (a position bias adds to one
order's log-odds what it takes from the other's, so it cancels), through a sigmoid and
averaged over pairs; both are recorded, the tables show both. Per setting and seed: Kendall's tau-b of
the gains against the roles (target and helpful +1, neutral 0, harmful -1) and whether
target/helpful > neutral > harmful holds (by each role's mean position). Writes
``results.json`` (per seed, setting and task: the per-pair verdict bits and margins),
``summary.json`` (the same analysis with every gain, without the per-pair records),
``results.md`` and
``envelope.png`` (one panel per setting: mean tau with its 95% bootstrap interval over seeds,
and the share of seeds whose roles come out in order) and ``roles.png`` (the centre's gains
by task and role, a line per seed, a panel per rating). Every patch is resumable (a killed run
redoes at most the patch it was in). Quote the CPU with the time it prints.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import time
from typing import Any, Sequence

import gin
import numpy as np

from flame import files, gin_utils, train
from flame.autorater import autorater
from flame.pipeline import pipeline
from flame.tailpatch import categories, run as tailpatch_run
from _cpu import cpu_model  # benchmarks/ is the script's folder
import _results
import tailpatch_synthetic as experiment

RATINGS = ("accuracy", "debiased")


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
  centre = Setting(args.centre_partial, args.centre_steps, args.centre_lr_scale)
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
  steps = list(args.patch_steps_grid) + [args.centre_steps]
  if any(s < 1 for s in steps):
    parser.error("patch steps must be >= 1")
  if args.eval_points < 1 or any(s % args.eval_points for s in steps):
    parser.error(f"--eval_points={args.eval_points} must divide every patch length {steps}")
  if any(s <= 0 for s in list(args.lr_scales) + [args.centre_lr_scale]):
    parser.error(f"--lr_scales={args.lr_scales}, --centre_lr_scale={args.centre_lr_scale}: "
                 "scales must be positive")
  if any(n < 2 or n > args.dev_limit for n in args.dev_sizes):
    parser.error(f"--dev_sizes={args.dev_sizes} must lie in [2, --dev_limit={args.dev_limit}]")
  if args.collection not in GIN_OF:
    parser.error(f"--collection={args.collection!r}: one of {sorted(GIN_OF)}")
  if args.collection != "synthetic" and not args.vanilla_from:
    parser.error(f"--collection={args.collection} patches existing vanilla runs: give "
                 "--vanilla_from=the --out_dir of benchmarks/tailpatch_synthetic.py "
                 f"--collection={args.collection}")
  if args.vanilla_from:
    for seed in args.seeds:
      for partial in partials:
        path = vanilla_checkpoint(args.vanilla_from, seed, partial)
        if not os.path.isdir(path):
          parser.error(f"--vanilla_from={args.vanilla_from}: no checkpoint {path} (seed "
                       f"{seed}, step {partial})")


GIN_OF = {name: experiment.GIN_FILES[name] for name in ("synthetic", "lexicon")}


def vanilla_checkpoint(root: str, seed: int, step: int) -> str:
  return os.path.join(root, f"seed{seed}", "vanilla", "checkpoints", str(step))


def dev_scores(rater: autorater.Autorater, items, params) -> dict[str, list]:
  """Per dev pair, judged with `params`: the verdict's bit and the gold response's log-odds
  averaged over both orders (`categories.pair_scores`), rounded to 3 decimals to keep the
  record small."""
  rater.params = params
  correct, margins = categories.pair_scores(rater, items)
  return {"correct": correct, "margin": [round(m, 3) for m in margins]}


@functools.lru_cache(maxsize=None)
def base_learning_rate(collection: str) -> float:
  """The LEARNING_RATE of the collection's gin file (the vanilla run's peak rate); parsed
  once per collection (the caller clears gin's config afterwards)."""
  gin.clear_config()
  gin_utils.parse([GIN_OF[collection]], ["MODEL_DIR = 'unused'", "TRAIN_STEPS = 1"],
                  finalize=False)
  return float(gin.query_parameter("LEARNING_RATE/macro.value"))


def patch(args, setting: Setting, init: str, task: str, model_dir: str, seed: int, rater,
          items) -> dict[str, Any]:
  """Fine-tunes `init` on `task` alone as a tail-patch run does (constant learning rate),
  scoring it pair by pair every steps / --eval_points steps; the patch's checkpoints are
  deleted afterwards (a patch killed midway starts again)."""
  shutil.rmtree(model_dir, ignore_errors=True)
  learning_rate = base_learning_rate(args.collection) * setting.lr_scale
  gin.clear_config()
  tailpatch_run.configure([GIN_OF[args.collection]], [
      f"Settings.steps = {setting.steps}", f"Settings.eval_points = {args.eval_points}",
      f"train.seed = {seed}", "train.progress_bar = False", f"LEARNING_RATE = {learning_rate!r}",
      f"train.checkpoint_every = {setting.steps}"])
  points = []

  def score(params):
    points.append(dev_scores(rater, items, params))
    return {"dev/accuracy": float(np.mean(points[-1]["correct"]))}
  start = time.time()
  _, seen = train.train(model_dir=model_dir, mixture_or_task_name=task,
                        train_steps=setting.steps, init_params_from=init,
                        init_optimizer_state=args.continue_optimizer,
                        eval_every=setting.steps // args.eval_points, eval_fn=score)
  if len(points) != args.eval_points:
    raise RuntimeError(f"{model_dir}: {len(points)} dev evaluations, expected "
                       f"{args.eval_points}")
  shutil.rmtree(model_dir, ignore_errors=True)
  return {"correct": points[-1]["correct"], "points": points, "learning_rate": learning_rate,
          "examples": int(seen["examples_seen"]), "seconds": round(time.time() - start, 1)}


def identity(args) -> dict[str, Any]:
  """What every patch of an output folder shares (a rerun with others is refused)."""
  return {"collection": args.collection, "eval_points": args.eval_points,
          "continue_optimizer": args.continue_optimizer, "dev_limit": args.dev_limit}


def seed_vanilla(args, seed: int, grid: Sequence[Setting], root: str) -> str:
  """The folder of the seed's vanilla run: --vanilla_from's, or one trained (or resumed)
  here on the synthetic collection up to the latest step patched."""
  if args.vanilla_from:
    return os.path.dirname(os.path.dirname(vanilla_checkpoint(args.vanilla_from, seed, 0)))
  gin_file = GIN_OF["synthetic"]
  initial = pipeline.write_initial([gin_file], ["MODEL_DIR = 'unused'", "TRAIN_STEPS = 1"],
                                   seed, os.path.join(root, "initial"))
  vanilla = os.path.join(root, "vanilla")
  vanilla_args = argparse.Namespace(collection="synthetic", harmful_weight=args.harmful_weight,
                                    vanilla_mixture="equal",
                                    steps=max(s.partial for s in grid),
                                    curve_every=args.checkpoint_every)
  experiment.train_vanilla(vanilla, initial, vanilla_args, seed,
                           experiment.vanilla_bindings(vanilla_args, root))
  return vanilla


def run_seed(args, seed: int, grid: Sequence[Setting], items) -> dict[str, Any]:
  """Trains (or reuses) the seed's vanilla run and every patch of every setting."""
  root = os.path.join(args.out_dir, f"seed{seed}")
  path = os.path.join(root, "patches.json")
  record = json.load(open(path, encoding="utf-8")) if os.path.exists(path) else {
      "seed": seed, "identity": identity(args), "baseline": {}, "patches": {}}
  if record.get("identity", identity(args)) != identity(args):
    raise SystemExit(f"{path} was made with {record['identity']}, this run has "
                     f"{identity(args)}: use another --out_dir")
  vanilla = seed_vanilla(args, seed, grid, root)
  roles = experiment.COLLECTIONS[args.collection].roles
  rater = None
  for setting in grid:
    init = os.path.join(vanilla, "checkpoints", str(setting.partial))
    if rater is None:
      rater = autorater.Autorater.load(init, batch_size=16, max_input_length=1024)
    if str(setting.partial) not in record["baseline"]:
      rater_init = autorater.Autorater.load(init, batch_size=16, max_input_length=1024)
      record["baseline"][str(setting.partial)] = dev_scores(rater, items, rater_init.params)
    done = record["patches"].setdefault(setting.name, {})
    for task in roles:
      if task in done:
        continue
      seqio_task = f"flame_{task}_bytes"
      done[task] = patch(args, setting, init, seqio_task, os.path.join(root, "patch"), seed,
                         rater, items)
      files.write_text_atomically(path, json.dumps(record) + "\n")
      print(f"seed {seed} {setting.name} {task}: dev "
            + ", ".join(f"{100 * np.mean(p['correct']):.1f}" for p in done[task]["points"])
            + f" ({done[task]['seconds']:.0f} s)", flush=True)
  files.write_text_atomically(path, json.dumps(record) + "\n")
  return record


def points_of(entry) -> list[dict]:
  """The dev evaluations of a baseline or patch entry (records before --eval_points hold one
  list of verdict bits)."""
  if isinstance(entry, list):
    return [{"correct": entry}]
  return entry.get("points") or [entry]


def per_pair(entry, rating: str) -> np.ndarray:
  """The entry's per-pair score under `rating` (its verdict bit, or sigmoid of its margin),
  averaged over its evaluation points."""
  key = "correct" if rating == "accuracy" else "margin"
  points = points_of(entry)
  if key not in points[0]:
    raise ValueError("--rating=debiased needs the per-pair log-odds, which this record "
                     "predates: rerun the grid into a new --out_dir")
  rows = [np.asarray(point[key], np.float64) for point in points]
  if rating != "accuracy":
    rows = [1.0 / (1.0 + np.exp(-row)) for row in rows]
  return np.mean(rows, axis=0)


def measure(entry, rating: str, pick=None) -> float:
  """The entry's dev score under `rating`, on the pairs `pick` (all when None), averaged over
  its evaluation points (every point scores the same pairs)."""
  scores = per_pair(entry, rating)
  return float(scores.mean() if pick is None else scores[pick].mean())


def ratings_of(entries) -> list[str]:
  """The ratings every entry allows: accuracy always, debiased when margins were recorded."""
  return [r for r in RATINGS if r == "accuracy"
          or all("margin" in points_of(e)[0] for e in entries)]


CONTRASTS = (("helpful", "neutral"), ("neutral", "harmful"))


def role_contrasts(base, patched: dict, roles: dict[str, str], rating: str,
                   rng: np.random.Generator, resamples: int) -> dict[str, list[float]]:
  """Mean gain of one role's tasks minus another's, with a 95% paired bootstrap interval over
  the dev pairs (the same resampled pairs for the checkpoint and every patch): whether, on
  one seed, helpful tasks beat neutral ones (and neutral harmful ones) beyond dev noise."""
  reference = per_pair(base, rating)
  gains = {t: per_pair(entry, rating) - reference for t, entry in patched.items()}
  out = {}
  for high, low in CONTRASTS:
    per_pair_diff = (np.mean([gains[t] for t in gains if roles[t] == high], axis=0)
                     - np.mean([gains[t] for t in gains if roles[t] == low], axis=0))
    n = len(per_pair_diff)
    draws = [per_pair_diff[rng.integers(0, n, n)].mean() for _ in range(resamples)]
    out[f"{high}-{low}"] = [float(per_pair_diff.mean()), float(np.percentile(draws, 2.5)),
                            float(np.percentile(draws, 97.5))]
  return out


def ranking(base, patched: dict, roles: dict[str, str], category: str, rating: str,
            pick=None) -> tuple[float, bool]:
  """Kendall's tau of the tasks' target gains against their roles, and whether the role order
  holds, for one seed and setting (entries scored on the same pairs)."""
  reference = measure(base, rating, pick)
  gains = {task: {category: measure(entry, rating, pick) - reference}
           for task, entry in patched.items()}
  result = experiment.target_ranking(gains, category, roles)
  return result["kendall_tau"], result["ok"]


def analyse(records: Sequence[dict], grid: Sequence[Setting], args) -> dict[str, Any]:
  """Per setting: tau per seed, its mean and 95% interval, seeds in order; and for the centre
  the same against dev-set size (mean over --resamples random subsets per seed). Under
  --rating; `by_rating` repeats the per-setting figures for every rating the records allow."""
  collection = experiment.COLLECTIONS[args.collection]
  rank = functools.partial(ranking, roles=collection.roles, category=collection.target)
  rng = np.random.default_rng(0)
  out = {"rating": args.rating, "settings": {}, "dev_sizes": {}, "by_rating": {},
         "contrasts": {}, "seeds": [record["seed"] for record in records]}
  ratings = ratings_of([e for rec in records for e in rec["baseline"].values()])
  for rating in ratings:
    rows = {}
    for setting in grid:
      taus, oks, competence = [], [], []
      for record in records:
        base = record["baseline"][str(setting.partial)]
        tau, ok = rank(base, record["patches"][setting.name], rating=rating)
        taus.append(tau)
        oks.append(ok)
        competence.append(measure(base, "accuracy"))
      rows[setting.name] = {
          **dataclasses.asdict(setting), "tau": taus, "ok": oks,
          "tau_mean": list(experiment.bootstrap_mean(taus)), "seeds_ok": int(sum(oks)),
          "seeds": len(records), "dev_accuracy": competence}
    out["by_rating"][rating] = rows
    out["contrasts"][rating] = [
        role_contrasts(record["baseline"][str(grid[0].partial)],
                       record["patches"][grid[0].name], collection.roles, rating, rng,
                       max(args.resamples, 1000)) for record in records]
  out["settings"] = out["by_rating"][args.rating]
  centre = grid[0]
  for size in args.dev_sizes:
    taus, oks = [], []
    for record in records:
      base = record["baseline"][str(centre.partial)]
      patched = record["patches"][centre.name]
      pairs = len(points_of(base)[0]["correct"])
      seed_taus, seed_oks = [], []
      for _ in range(args.resamples):
        pick = rng.choice(pairs, size=size, replace=False)
        tau, ok = rank(base, patched, rating=args.rating, pick=pick)
        seed_taus.append(tau)
        seed_oks.append(ok)
      taus.append(float(np.mean(seed_taus)))
      oks.append(float(np.mean(seed_oks)))
    out["dev_sizes"][str(size)] = {"tau": taus, "ok_rate": oks,
                                   "tau_mean": list(experiment.bootstrap_mean(taus)),
                                   "ok_rate_mean": float(np.mean(oks))}
  return out


def envelope_plot(analysis: dict, grid: Sequence[Setting], path: str, category: str) -> None:
  """One panel per setting varied: mean tau (95% interval over seeds) and share of seeds in
  order, against the setting, a line per rating; the centre is marked; the last panel, dev
  size, under --rating."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  centre = grid[0]
  panels = [("partial", f"checkpoint patched (vanilla step)\n[dev {category} accuracy]"),
            ("steps", "patch steps"), ("lr_scale", "patch learning rate / run's")]
  fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), sharey=True)
  colours = {"debiased": "tab:blue", "accuracy": "tab:orange"}
  for ax, (field, xlabel) in zip(axes, panels):
    for rating, settings in analysis["by_rating"].items():
      rows = sorted((r for r in settings.values()
                     if all(r[f] == getattr(centre, f) for f in ("partial", "steps", "lr_scale")
                            if f != field)), key=lambda r: r[field])
      xs = list(range(len(rows)))
      means = [r["tau_mean"][0] for r in rows]
      errors = [[m - r["tau_mean"][1] for m, r in zip(means, rows)],
                [r["tau_mean"][2] - m for m, r in zip(means, rows)]]
      ax.errorbar(xs, means, yerr=errors, fmt="o-", capsize=3, color=colours[rating],
                  label=f"Kendall τ (95% CI), {rating}")
      ax.plot(xs, [r["seeds_ok"] / r["seeds"] for r in rows], "s--", color=colours[rating],
              alpha=0.5, label=f"share of seeds in role order, {rating}")
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
  ax.errorbar(range(len(sizes)), means, yerr=errors, fmt="o-", capsize=3,
              color=colours[analysis["rating"]])
  ax.plot(range(len(sizes)), [analysis["dev_sizes"][s]["ok_rate_mean"] for s in sizes], "s--",
          color=colours[analysis["rating"]], alpha=0.5)
  ax.set_xticks(range(len(sizes)), sizes)
  ax.set_xlabel(f"dev pairs (resampled, centre setting,\nrated by {analysis['rating']})")
  ax.axhline(0, color="black", lw=0.5)
  axes[0].set_ylabel("Kendall τ of gains vs roles")
  axes[0].set_ylim(-1.05, 1.05)
  axes[0].legend(loc="lower left", fontsize=7)
  fig.suptitle(f"Tail-patch role ordering against grid settings ({category}; "
               f"{len(next(iter(analysis['settings'].values()))['tau'])} seeds; centre: "
               f"step {centre.partial}, {centre.steps} steps, lr ×{centre.lr_scale:g})")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def gains_table(records: Sequence[dict], grid: Sequence[Setting]) -> dict[str, Any]:
  """seed -> setting -> rating -> {"baseline": dev score, task: gain}: every rating without
  the per-pair records (``summary.json``, small enough to keep beside the figures)."""
  out = {}
  for record in records:
    by_setting = out[str(record["seed"])] = {}
    for setting in grid:
      base = record["baseline"][str(setting.partial)]
      ratings = ratings_of([base])
      by_setting[setting.name] = {
          rating: {"baseline": round(measure(base, rating), 5), **{
              task: round(measure(entry, rating) - measure(base, rating), 5)
              for task, entry in record["patches"][setting.name].items()}}
          for rating in ratings}
  return out


def roles_plot(records: Sequence[dict], setting: Setting, roles: dict[str, str],
               category: str, path: str) -> None:
  """The centre's gain of every task on every seed, one panel per rating the records allow:
  tasks along x grouped by role, one marker per seed (what the role order is read from)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  ratings = ratings_of([rec["baseline"][str(setting.partial)] for rec in records])
  order = sorted(roles, key=lambda t: (experiment.ROLE_ORDER.index(roles[t]), t))
  colours = {"target": "tab:blue", "helpful": "tab:green", "neutral": "tab:grey",
             "harmful": "tab:red"}
  fig, axes = plt.subplots(1, len(ratings), figsize=(5.5 * len(ratings), 4), squeeze=False)
  for ax, rating in zip(axes[0], ratings):
    for record in records:
      base = measure(record["baseline"][str(setting.partial)], rating)
      gains = [100 * (measure(record["patches"][setting.name][t], rating) - base)
               for t in order]
      ax.plot(range(len(order)), gains, color="black", lw=0.4, alpha=0.4)
      ax.scatter(range(len(order)), gains, c=[colours[roles[t]] for t in order], s=18)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xticks(range(len(order)), [f"{t.removeprefix('synthetic_')}\n({roles[t]})"
                                      for t in order], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"gain on dev {category}, points")
    ax.set_title(f"rated by {rating}")
  fig.suptitle(f"Tail-patch gains by known role, {len(records)} seeds (step "
               f"{setting.partial}, {setting.steps} steps, lr ×{setting.lr_scale:g}); a line "
               "per seed")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def to_markdown(analysis: dict, category: str) -> str:
  lines = []
  for rating, rows in analysis["by_rating"].items():
    lines += [f"Rated by {rating}:", "",
              f"| checkpoint step | dev {category} | patch steps | lr × | Kendall τ (95% CI) | "
              "seeds in order |", "|---:|---:|---:|---:|---|---:|"]
    for r in rows.values():
      mean, low, high = r["tau_mean"]
      lines.append(f"| {r['partial']} | {100 * np.mean(r['dev_accuracy']):.1f} | "
                   f"{r['steps']} | {r['lr_scale']:g} | {mean:+.2f} ({low:+.2f}, {high:+.2f}) | "
                   f"{r['seeds_ok']}/{r['seeds']} |")
    lines.append("")
  lines += ["Centre, per seed: mean gain of one role's tasks minus another's, points (95% "
            "paired bootstrap interval over dev pairs):", "",
            "| seed | " + " | ".join(f"{h} − {l} ({rating})" for rating in analysis["contrasts"]
                                     for h, l in CONTRASTS) + " |",
            "|---:|" + "---|" * (len(CONTRASTS) * len(analysis["contrasts"]))]
  for i, seed in enumerate(analysis["seeds"]):
    cells = [analysis["contrasts"][rating][i][f"{h}-{l}"] for rating in analysis["contrasts"]
             for h, l in CONTRASTS]
    lines.append(f"| {seed} | " + " | ".join(f"{100 * m:+.2f} ({100 * lo:+.2f}, {100 * hi:+.2f})"
                                             for m, lo, hi in cells) + " |")
  lines.append("")
  lines += [f"| dev pairs (centre, rated by {analysis['rating']}) | Kendall τ (95% CI) | "
            "share of resamples in order |", "|---:|---|---:|"]
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
  p.add_argument("--centre_lr_scale", type=float, default=1.0,
                 help="the centre's patch learning rate / the collection's LEARNING_RATE")
  p.add_argument("--partials", type=ints, default=[25, 50, 100],
                 help="other vanilla checkpoints to patch (competence axis)")
  p.add_argument("--patch_steps_grid", type=ints, default=[8, 96])
  p.add_argument("--lr_scales", type=floats, default=[0.3])
  p.add_argument("--checkpoint_every", type=int, default=25,
                 help="the vanilla run keeps a checkpoint every this many steps")
  p.add_argument("--harmful_weight", type=float, default=0.2,
                 help="weight of the label-flipped tasks in the vanilla mixture")
  p.add_argument("--dev_limit", type=int, default=200,
                 help="target dev pairs per patch (both orders)")
  p.add_argument("--dev_sizes", type=ints, default=[25, 50, 100, 198])
  p.add_argument("--resamples", type=int, default=200)
  p.add_argument("--collection", default="synthetic",
                 help="synthetic or lexicon (the controlled collections of "
                 "benchmarks/tailpatch_synthetic.py)")
  p.add_argument("--vanilla_from", default=None,
                 help="patch the vanilla runs of this benchmarks/tailpatch_synthetic.py "
                 "--out_dir (its seed<N>/vanilla/checkpoints/<step>) instead of training them; "
                 "required for --collection=lexicon")
  p.add_argument("--eval_points", type=int, default=1,
                 help="dev evaluations per patch, every steps / eval_points steps; a task's "
                 "gain is their mean")
  p.add_argument("--continue_optimizer", action="store_true",
                 help="patches start from the checkpoint's Adam moments, not a fresh Adam")
  p.add_argument("--rating", choices=RATINGS, default="accuracy",
                 help="the dev score a gain is measured in, for the figure and the dev-size "
                 "table: accuracy (FLAMe's) or debiased (the gold response's log-odds "
                 "averaged over both orders, through a sigmoid)")
  return p


def main(argv=None) -> None:
  parser = build_parser()
  args = parser.parse_args(argv)
  check_settings(parser, args)
  start = time.time()
  grid = settings_grid(args)
  collection = experiment.COLLECTIONS[args.collection]
  target_task = next(t for t, role in collection.roles.items() if role == "target")
  items = categories.dev_items({collection.target: (target_task,)}, args.dev_limit)
  if max(args.dev_sizes) > len(items):
    parser.error(f"--dev_sizes={args.dev_sizes}: the dev split has {len(items)} pairs")
  records = [run_seed(args, seed, grid, items) for seed in args.seeds]
  analysis = analyse(records, grid, args)
  os.makedirs(args.out_dir, exist_ok=True)
  envelope_plot(analysis, grid, os.path.join(args.out_dir, "envelope.png"), collection.target)
  roles_plot(records, grid[0], collection.roles, collection.target,
             os.path.join(args.out_dir, "roles.png"))
  summary = {"argv": vars(args), "cpu": cpu_model(), "seconds": round(time.time() - start),
             "patch_seconds": round(sum(patch["seconds"] for record in records
                                        for setting in grid
                                        for patch in record["patches"][setting.name].values())),
             "analysis": analysis}
  files.write_text_atomically(os.path.join(args.out_dir, "summary.json"), json.dumps(
      {**summary, "gains": gains_table(records, grid)}, indent=1) + "\n")
  _results.write(args.out_dir, {**summary, "records": records},
                 to_markdown(analysis, collection.target), start)


if __name__ == "__main__":
  main()
