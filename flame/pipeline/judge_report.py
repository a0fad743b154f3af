"""The report of ``flame-judge``: WORK_DIR/report.md and figures/learning_curve.png."""
from __future__ import annotations

import os
import platform
from typing import Any, Mapping

from flame import files
from flame.pipeline import runner


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
  except OSError:
    pass
  return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def plot_curve(points: list[Mapping[str, Any]], out: str) -> str:
  """Dev accuracy (with its interval) and swap consistency against examples seen."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  x = [p["examples_seen"] for p in points]
  fig, ax = plt.subplots(figsize=(6, 3.6))
  accuracy = [100 * p["accuracy"] for p in points]
  low = [100 * p["interval"][0] for p in points]
  high = [100 * p["interval"][1] for p in points]
  ax.fill_between(x, low, high, alpha=0.2, label="accuracy, 95% interval")
  ax.plot(x, accuracy, "o-", label="accuracy (both orders)")
  swap = [(xi, 100 * p["swap_consistency"]) for xi, p in zip(x, points)
          if p.get("swap_consistency") is not None]
  if swap:
    ax.plot(*zip(*swap), "s--", label="swap consistency")
  ax.axhline(50, color="grey", lw=0.8, ls=":")
  ax.set_xlabel("training examples seen (0 = zero-shot)")
  ax.set_ylabel("% of dev pairs")
  ax.set_title("FLAMe on SmolLM2-135M-Instruct: dev pairs")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(out), exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def write(story, records: Mapping[str, dict]) -> dict:
  """Writes report.md (+ the curve figure) from the stage records; returns their paths."""
  summaries = runner.summaries(dict(records))
  lines = ["# A SmolLM2-135M FLAMe judge", "",
           f"Machine: {cpu_model()}. Recipe: {', '.join(story.gin_files)}"
           + (f"; bindings: {', '.join(story.bindings)}" if story.bindings else "") + ".", ""]
  lines += ["## Time per stage", "", "| stage | time |", "|---|---:|"]
  lines += [f"| {name} | {runner.format_seconds(record['seconds'])} |"
            for name, record in records.items()]
  total = sum(record["seconds"] for record in records.values())
  lines += [f"| **all** | **{runner.format_seconds(total)}** |", ""]
  figure = None
  if "heldout" in summaries:
    held = summaries["heldout"]
    lines += ["## Held-out suite", "",
              "Both orders of every pair; scores ×100 with 95% bootstrap intervals; the "
              "difference to zero-shot with a paired bootstrap interval (same pairs).", "",
              held["markdown"], ""]
  if "curve" in summaries:
    points = summaries["curve"]["points"]
    figure = plot_curve(points, story.path("figures", "learning_curve.png"))
    lines += ["## Learning curve (dev pairs, never the held-out suite)", "",
              f"![learning curve](figures/{os.path.basename(figure)})", "",
              "| step | examples seen | accuracy | 95% interval | swap consistency |",
              "|---:|---:|---:|---|---:|"]
    for p in points:
      swap = p.get("swap_consistency")
      lines.append(f"| {p['step']} | {p['examples_seen']} | {100 * p['accuracy']:.1f} | "
                   f"{100 * p['interval'][0]:.1f}–{100 * p['interval'][1]:.1f} | "
                   f"{'—' if swap is None else f'{100 * swap:.1f}'} |")
    lines.append("")
  if "flame" in summaries:
    lines += ["## The trained judge", "",
              f"FLAMe: `{summaries['flame']['model_dir']}/checkpoints` "
              f"({summaries['flame']['examples']} examples seen)."]
    if "flame_rm" in summaries:
      lines.append(f"FLAMe-RM: `{summaries['flame_rm']['model_dir']}/checkpoints`.")
    lines.append("")
  path = story.path("report.md")
  files.write_text_atomically(path, "\n".join(lines) + "\n")
  return {"report": path, "figure": figure}
