"""Training curves of a run: ``python -m flame.plot MODEL_DIR [--out PNG]``.

Reads MODEL_DIR/{train,eval}/metrics.jsonl (written by flame.train next to
the TensorBoard events) and draws loss, token accuracy and tokens/s against
the step, train and eval together. Writes MODEL_DIR/curves.png by default.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from flame import files  # noqa: E402

PANELS = (("loss", "loss per target token"), ("accuracy", "token accuracy"),
          ("tokens_per_second", "tokens / s"))


def read_metrics(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  rows = files.read_jsonl(path)
  # A resumed run appends again from its checkpoint: keep the last value per step.
  return sorted({row["step"]: row for row in rows}.values(), key=lambda r: r["step"])


def plot_run(model_dir: str, out: Optional[str] = None) -> str:
  train = read_metrics(os.path.join(model_dir, "train", "metrics.jsonl"))
  evaluation = read_metrics(os.path.join(model_dir, "eval", "metrics.jsonl"))
  if not train:
    raise FileNotFoundError(f"no training metrics in {model_dir}/train/metrics.jsonl")
  fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.2))
  for ax, (key, title) in zip(axes, PANELS):
    for rows, label, style in ((train, "train", "-"), (evaluation, "eval", "o--")):
      points = [(r["step"], r[key]) for r in rows if key in r]
      if points:
        ax.plot(*zip(*points), style, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle(os.path.basename(os.path.normpath(model_dir)))
  fig.tight_layout()
  out = out or os.path.join(model_dir, "curves.png")
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def main(argv=None) -> int:
  from flame import cli  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog="flame-plot", description=__doc__.splitlines()[0])
  parser.add_argument("model_dir")
  parser.add_argument("--out", default=None, help="PNG path (default MODEL_DIR/curves.png)")
  parser.add_argument("--debug", action="store_true")
  args = parser.parse_args(argv)
  return cli.run("flame-plot", lambda: plot_run(args.model_dir, args.out), str, args.debug)


def console_main() -> None:
  sys.exit(main())


if __name__ == "__main__":
  console_main()
