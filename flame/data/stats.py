"""What a FLAMe mixture is made of: ``python -m flame.data.stats --mixture=NAME [--out_dir=DIR]``.

Or ``--tasks=a,b,…`` (FLAMe task names; rates min(n_i, --cap) ** (1 / --temperature)).
Prints one row per task (kind, capability, training examples n_i, mixing rate, share of the
mixture = rate / Σ rates), then totals per task kind and per capability (tasks, examples,
share of the examples, share of the mixture). With ``--out_dir`` it saves three bar charts,
in the spirit of the FLAMe paper's Figures 3–4 (the data by task type and capability): share
of examples next to share of the mixture, by kind (``<name>_by_kind.png``) and by capability
(``<name>_by_capability.png``), and the ``--top`` largest tasks (``<name>_top_tasks.png``).

n_i: the ``train`` split of each task's TFDS dataset info; unprepared datasets are prepared
first (``FLAME_TFDS_DIR``, ``FLAME_DATA_MIRROR``).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import os
import sys
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from flame import cli  # noqa: E402
from flame.data import mixtures  # noqa: E402
from flame.data import tasks as flame_tasks  # noqa: E402


@dataclasses.dataclass(frozen=True)
class TaskRow:
  task: str          # FLAMe task name
  seqio_name: str
  kind: str
  capability: str
  examples: int      # training examples n_i
  rate: float
  share: float       # rate / Σ rates


@dataclasses.dataclass(frozen=True)
class GroupRow:
  group: str
  tasks: int
  examples: int
  example_share: float  # Σ n_i in the group / Σ n_i
  share: float          # Σ shares in the group


def task_rows(rates: Mapping[str, float], counts: Mapping[str, int]) -> list[TaskRow]:
  """Rows for seqio task -> rate (and -> n_i), largest share first."""
  normalised = mixtures.shares(rates)
  rows = []
  for name, rate in rates.items():
    item = flame_tasks.info(name)
    rows.append(TaskRow(item.task, name, item.spec.kind.value, item.spec.capability.value,
                        int(counts[name]), float(rate), normalised[name]))
  return sorted(rows, key=lambda r: (-r.share, r.task))


def group_rows(rows: Sequence[TaskRow], key: str) -> list[GroupRow]:
  """Totals of `rows` per value of attribute `key` ("kind" or "capability"), largest first."""
  total_examples = sum(r.examples for r in rows)
  groups = collections.defaultdict(list)
  for row in rows:
    groups[getattr(row, key)].append(row)
  out = [GroupRow(group, len(members), sum(r.examples for r in members),
                  sum(r.examples for r in members) / total_examples if total_examples else 0.0,
                  math.fsum(r.share for r in members))
         for group, members in groups.items()]
  return sorted(out, key=lambda g: (-g.share, g.group))


def mixture_rows(name: str) -> list[TaskRow]:
  """Rows of a registered mixture (or single task), with the rates seqio uses."""
  rates = mixtures.rates(name)
  return task_rows(rates, {task: flame_tasks.num_examples(task) for task in rates})


def task_list_rows(task_names: Sequence[str], vocabulary: str = "bytes",
                   cap: Optional[int] = mixtures.DEFAULT_CAP,
                   temperature: float = 1.0) -> list[TaskRow]:
  """Rows of an examples-proportional (capped, tempered) mix of FLAMe tasks."""
  flame_tasks.register(vocabularies=(vocabulary,))
  names = [flame_tasks.seqio_task_name(t, vocabulary) for t in task_names]
  counts = {name: flame_tasks.num_examples(name) for name in names}
  return task_rows(mixtures.mixing_rates(counts, cap, temperature), counts)


def format_report(title: str, rows: Sequence[TaskRow]) -> str:
  width = max([len("task")] + [len(r.task) for r in rows])
  total = sum(r.examples for r in rows)
  lines = [f"{title}: {len(rows)} tasks, {total:,} training examples", "",
           f"{'task':<{width}}  {'kind':<14}  {'capability':<21}  {'examples':>9}  "
           f"{'rate':>12}  {'share':>7}"]
  for r in rows:
    lines.append(f"{r.task:<{width}}  {r.kind:<14}  {r.capability:<21}  {r.examples:>9,}  "
                 f"{r.rate:>12.6g}  {100 * r.share:>6.2f}%")
  for key in ("kind", "capability"):
    lines += ["", f"{'by ' + key:<22}  {'tasks':>5}  {'examples':>9}  {'of examples':>11}  "
              f"{'share':>7}"]
    for g in group_rows(rows, key):
      lines.append(f"{g.group:<22}  {g.tasks:>5}  {g.examples:>9,}  "
                   f"{100 * g.example_share:>10.2f}%  {100 * g.share:>6.2f}%")
  return "\n".join(lines)


def _bars(groups: Sequence[GroupRow], title: str, path: str) -> str:
  fig, ax = plt.subplots(figsize=(7, 3.5))
  positions = range(len(groups))
  ax.bar([p - 0.2 for p in positions], [100 * g.example_share for g in groups], width=0.4,
         label="share of examples", color="#9db9d8")
  ax.bar([p + 0.2 for p in positions], [100 * g.share for g in groups], width=0.4,
         label="share of the mixture", color="#2f5f98")
  ax.set_xticks(list(positions))
  ax.set_xticklabels([g.group.replace("_", "\n") for g in groups])
  ax.set_ylabel("%")
  ax.set_title(title)
  ax.legend(frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_mix(rows: Sequence[TaskRow], out_dir: str, name: str, top: int = 20) -> list[str]:
  """Writes the three charts of the module docstring; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = [_bars(group_rows(rows, key), f"{name}: by {label}",
                 os.path.join(out_dir, f"{name}_by_{key}.png"))
           for key, label in (("kind", "task kind"), ("capability", "capability"))]
  shown = list(rows)[:top]
  fig, ax = plt.subplots(figsize=(7, 0.3 * len(shown) + 1.2))
  ax.barh([r.task for r in shown][::-1], [100 * r.share for r in shown][::-1], color="#2f5f98")
  ax.set_xlabel("share of the mixture (%)")
  ax.set_title(f"{name}: top {len(shown)} of {len(rows)} tasks")
  fig.tight_layout()
  path = os.path.join(out_dir, f"{name}_top_tasks.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return paths + [path]


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m flame.data.stats", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  what = parser.add_mutually_exclusive_group(required=True)
  what.add_argument("--mixture", help="a registered mixture or task, e.g. flame_all_bytes")
  what.add_argument("--tasks", help="comma-separated FLAMe task names")
  parser.add_argument("--vocabulary", default="bytes", help="with --tasks")
  parser.add_argument("--cap", type=int, default=mixtures.DEFAULT_CAP, help="with --tasks")
  parser.add_argument("--temperature", type=float, default=1.0, help="with --tasks")
  parser.add_argument("--out_dir", help="save the bar charts here")
  parser.add_argument("--top", type=int, default=20, help="tasks in the top-tasks chart")
  parser.add_argument("--debug", action="store_true")
  args = parser.parse_args(argv)
  return cli.run("flame-data-stats", lambda: report(args), debug=args.debug)


def report(args) -> list[TaskRow]:
  if args.mixture:
    name, rows = args.mixture, mixture_rows(args.mixture)
    title = f"mixture {name}"
  else:
    chosen = [t.strip() for t in args.tasks.split(",") if t.strip()]
    rows = task_list_rows(chosen, args.vocabulary, args.cap, args.temperature)
    name = "tasks"
    title = f"tasks (cap {args.cap}, temperature {args.temperature:g})"
  print(format_report(title, rows))
  if args.out_dir:
    for path in plot_mix(rows, args.out_dir, name, args.top):
      print(f"wrote {path}")
  return rows


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
