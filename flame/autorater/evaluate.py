"""flame-evaluate: an autorater on the held-out suite or RewardBench-schema files.

    flame-evaluate --checkpoint=DIR --suite=heldout [--compare=DIR2] [--output_dir=OUT]
    flame-evaluate --checkpoint=DIR --input=pairs.jsonl [--input=more.jsonl …]

Pairs are scored in both orders (``--no_swap``: as given). Per subset: accuracy (the chosen
response wins) and swap consistency; categories and overall by RewardBench's rules
(`flame.autorater.rewardbench`; the held-out suite's categories are
`flame.data.heldout.CATEGORIES`), each with a 95% bootstrap interval; every ``--compare``
checkpoint also with its difference to the first and a paired bootstrap interval
(`flame.autorater.intervals`). Writes ``results.json``, ``results.md`` and
``pairs.jsonl`` (every verdict) to
``--output_dir`` when given (atomically) and prints the Markdown.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Optional, Sequence

if __name__ == "__main__":
  from flame.autorater import evaluate as _importable
  sys.exit(_importable.main())

from flame import cli, distributed, files
from flame.progress import bar as progress_bar
from flame.autorater import autorater, intervals, records, rewardbench
from flame.data import format, heldout


@dataclasses.dataclass(frozen=True)
class Item:
  """A judgment to make, its subset (or category) and its gold label (for a pair: A or B,
  its better response)."""
  request: autorater.Request
  subset: str
  gold: str


def task_items(task: str, split: str, limit: Optional[int] = None, label: str = "") -> list[Item]:
  """The first `limit` examples (by id) of a FLAMe task's split as items labelled `label`
  (prepared into FLAME_TFDS_DIR on first use); pairwise or classification tasks only."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from flame.data import sources  # pylint: disable=import-outside-toplevel
  from flame.data.sources import base  # pylint: disable=import-outside-toplevel
  specs = sources.task_specs()
  if task not in specs:
    raise ValueError(f"unknown FLAMe task {task!r}; known: {sorted(specs)}")
  builder_cls, spec = specs[task]
  if not spec.labels:
    raise ValueError(f"task {task!r} is {spec.kind.value}: only tasks with labels (pairwise, "
                     "classification) can be scored by accuracy")
  builder = builder_cls(config=task, data_dir=base.default_data_dir())
  builder = base.prepare(builder)
  if split not in builder.info.splits:
    raise ValueError(f"task {task!r} has no {split!r} split (it has "
                     f"{sorted(builder.info.splits)})")
  examples = sorted((base.example_from_features(f)
                     for f in tfds.as_numpy(builder.as_dataset(split=split))),
                    key=lambda e: e.example_id)
  return [Item(autorater.Request(spec, dict(e.context), e.example_id), label,
               e.outputs[spec.answer_field]) for e in examples[:limit]]


def heldout_items(limit_per_subset: Optional[int] = None,
                  subsets: Sequence[str] = tuple(heldout.ALL_SUBSETS),
                  per_category: Optional[int] = None) -> list[Item]:
  """The held-out suite's test pairs, ordered by id within each subset: the first
  `limit_per_subset` of each, and with `per_category`, about that many per category, spread
  over its subsets by `heldout.allot` (subsets outside the categories keep their limit)."""
  loaded = {subset: task_items(heldout.ALL_SUBSETS[subset], "test", limit_per_subset, subset)
            for subset in subsets}
  if per_category is not None:
    for names in heldout.CATEGORIES.values():
      sizes = {name: len(loaded[name]) for name in names if name in loaded}
      for name, take in heldout.allot(sizes, per_category).items():
        loaded[name] = loaded[name][:take]
  return [item for subset in subsets for item in loaded[subset]]


def file_items(paths: Sequence[str], fields: records.Fields = records.Fields()) -> list[Item]:
  """Pairs of RewardBench-schema files; a bad line raises naming file and line."""
  items = []
  for path in paths:
    _, _, recs = records.read_records(path, fields, "rewardbench")
    for record in recs:
      if record.error:
        raise ValueError(record.error)
      items.append(Item(record.request, record.subset or os.path.basename(path), record.chosen))
  return items


def evaluate(rater: autorater.Autorater, items: Sequence[Item], swap: bool = True,
             categories=None, progress: bool = True) -> dict[str, Any]:
  """Accuracy and swap consistency per subset, category scores and overall (JSON-ready)."""
  bar = progress_bar(len(items), "evaluate", "item", progress and distributed.is_leader())
  verdicts = rater.judge([i.request for i in items], swap=swap,
                         on_batch=lambda n: bar.update(n / (2 if swap else 1)))
  bar.close()
  correct = [float(v.verdict == i.gold) for v, i in zip(verdicts, items)]
  subset_names = [i.subset for i in items]
  report = rewardbench.report(rewardbench.subset_accuracies(subset_names, correct), categories)
  out = report.to_json()
  out["intervals"] = intervals.score_intervals(subset_names, correct, categories)
  swapped = [(s, float(v.swap_consistent)) for s, v in zip(subset_names, verdicts)
             if v.swap_consistent is not None]  # Pairs only: one response cannot swap.
  if swap and swapped:
    by_subset = rewardbench.subset_accuracies([s for s, _ in swapped], [c for _, c in swapped])
    out["swap_consistency"] = {s: a for s, (a, _) in by_subset.items()}
    out["swap_consistency_overall"] = sum(c for _, c in swapped) / len(swapped)
    out["intervals"]["swap_consistency"] = intervals.mean_interval([c for _, c in swapped])
  binary = {}  # Binary classification subsets: accuracy flatters a judge that says one label.
  for item, verdict in zip(items, verdicts):
    spec = item.request.spec
    if spec.kind == format.TaskKind.CLASSIFICATION and len(spec.labels) == 2:
      binary.setdefault(item.subset, ([], []))
      binary[item.subset][0].append(item.gold)
      binary[item.subset][1].append(verdict.verdict)
  if binary:
    out["balanced_accuracy"] = {s: rewardbench.balanced_accuracy(gold, predicted)
                                for s, (gold, predicted) in binary.items()}
  out["mean_verdict_mass"] = sum(v.mass for v in verdicts) / len(verdicts)
  out["pairs"] = [{"id": i.request.request_id, "subset": i.subset, "gold": i.gold,
                   "correct": c, **v.to_json()} for i, v, c in zip(items, verdicts, correct)]
  return out


def compare_to_first(results: dict[str, dict], categories=None) -> None:
  """Adds ``versus`` to every result after the first: its difference to the first (the
  baseline, e.g. the zero-shot model) per category and overall, with a paired bootstrap
  interval over the same pairs (`flame.autorater.intervals`)."""
  names = list(results)
  if len(names) < 2:
    return
  baseline = results[names[0]]["pairs"]
  subsets = [p["subset"] for p in baseline]
  for name in names[1:]:
    pairs = results[name]["pairs"]
    if [(p["subset"], p["id"]) for p in pairs] != [(p["subset"], p["id"]) for p in baseline]:
      raise ValueError(f"{name} was not judged on the same pairs as {names[0]}")
    results[name]["versus"] = {"baseline": names[0], **intervals.paired_difference(
        subsets, [p["correct"] for p in pairs], [p["correct"] for p in baseline], categories)}


def to_markdown(results: dict[str, dict], digits: int = 1) -> str:
  """One column per evaluated checkpoint: categories, overall, swap consistency, subsets."""
  names = list(results)

  def pct(v):
    return "—" if v is None else f"{100 * v:.{digits}f}"
  def with_interval(value, interval):
    if value is None or not interval:
      return pct(value)
    return f"{pct(value)} ({pct(interval[0])}–{pct(interval[1])})"

  def difference(result, name):
    versus = result.get("versus", {}).get(name)
    if versus is None:
      return "—"
    low, high = versus["interval"]
    return f"{100 * versus['difference']:+.{digits}f} ({100 * low:+.{digits}f}, {100 * high:+.{digits}f})"
  first = results[names[0]]
  categories = list(dict.fromkeys(c for r in results.values() for c in r["categories"]))
  header = "| | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names)
  rows = [f"| {c} | " + " | ".join(with_interval(r["categories"].get(c),
                                                 r.get("intervals", {}).get(c))
                                   for r in results.values()) + " |" for c in categories]
  rows.append("| **overall** | " + " | ".join(
      f"**{with_interval(r['overall'], r.get('intervals', {}).get('overall'))}**"
      for r in results.values()) + " |")
  if len(names) > 1:
    rows.append(f"| overall − {names[0]} (paired) | — | " + " | ".join(
        difference(results[n], "overall") for n in names[1:]) + " |")
  if "swap_consistency_overall" in first:
    rows.append("| swap consistency | " + " | ".join(
        with_interval(r.get("swap_consistency_overall"),
                      r.get("intervals", {}).get("swap_consistency"))
        for r in results.values()) + " |")
  rows.append("| verdict-token mass | " + " | ".join(
      f"{r['mean_verdict_mass']:.3f}" for r in results.values()) + " |")
  subsets = list(first["subsets"])
  sub_rows = [f"| {s} ({first['subsets'][s]['count']}) | " + " | ".join(
      pct(r["subsets"].get(s, {}).get("accuracy")) for r in results.values()) + " |"
              for s in subsets]
  sub_rows += [f"| {s}, balanced accuracy | " + " | ".join(
      pct(r.get("balanced_accuracy", {}).get(s)) for r in results.values()) + " |"
               for s in first.get("balanced_accuracy", {})]
  return "\n".join([header, *rows, "", "| subset (pairs) | " + " | ".join(names) +
                    " |\n|---|" + "---:|" * len(names), *sub_rows])


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="flame-evaluate", description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--compare", action="append", default=[],
                 help="another checkpoint to put side by side (repeatable)")
  p.add_argument("--suite", choices=("heldout",), default=None)
  p.add_argument("--input", action="append", default=[], help="RewardBench-schema JSONL")
  p.add_argument("--limit_per_subset", type=cli.positive_int, default=None,
                 help="the first N pairs (by id) of each held-out subset")
  p.add_argument("--per_category", type=cli.positive_int, default=None,
                 help="about N held-out pairs per category, spread over its subsets")
  p.add_argument("--vocabulary", default=None)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--max_input_length", type=int, default=1024)
  cli.add_dtype_flag(p)
  p.add_argument("--no_swap", action="store_true")
  p.add_argument("--output_dir", default=None)
  p.add_argument("--no_progress", action="store_true")
  p.add_argument("--debug", action="store_true")
  distributed.add_flags(p)
  return p


def run(args) -> dict[str, dict]:
  if bool(args.suite) == bool(args.input):
    raise ValueError("give exactly one of --suite=heldout or --input=FILE")
  if args.output_dir:
    files.check_output("--output_dir", args.output_dir, [
        ("--checkpoint", args.checkpoint), *[("--compare", c) for c in args.compare],
        *[("--input", i) for i in args.input]])
  if args.suite:
    items = heldout_items(args.limit_per_subset, per_category=args.per_category)
    categories = heldout.CATEGORIES
  else:
    items, categories = file_items(args.input), None
  if not items:
    raise ValueError(f"no pairs to evaluate in {', '.join(args.input or ['the suite'])}")
  results = {}
  for checkpoint in [args.checkpoint] + args.compare:
    rater = autorater.Autorater.load(checkpoint, vocabulary=args.vocabulary, dtype=args.dtype,
                                     batch_size=args.batch_size,
                                     max_input_length=args.max_input_length)
    name = os.path.basename(os.path.normpath(checkpoint))
    while name in results:
      name += "'"
    results[name] = evaluate(rater, items, not args.no_swap, categories, not args.no_progress)
    results[name]["checkpoint"] = os.path.abspath(checkpoint)
  compare_to_first(results, categories)
  if args.output_dir and distributed.is_leader():
    pairs = [{"checkpoint": name, **pair} for name, r in results.items()
             for pair in r.pop("pairs")]
    files.write_text_atomically(os.path.join(args.output_dir, "pairs.jsonl"), "".join(
        json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs))
    files.write_text_atomically(os.path.join(args.output_dir, "results.json"),
                                json.dumps(results, indent=1) + "\n")
    files.write_text_atomically(os.path.join(args.output_dir, "results.md"),
                                to_markdown(results) + "\n")
  return results


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

  def body():
    distributed.initialize_from(args)
    return run(args)
  return cli.run("flame-evaluate", body, to_markdown, args.debug)

def console_main() -> None:
  sys.exit(main())
