"""The banned-word collection's vanilla dev curves in one figure, from the committed JSON
(each curve's own command is in it and reproduces its numbers):

    python benchmarks/plot_tailpatch_lexicon.py \
      [--results=benchmarks/results/tailpatch_lexicon_dev_curves.json] \
      [--out=docs/tailpatch_lexicon_dev_curves.png]
"""
from __future__ import annotations

import argparse
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plot(results: dict, out: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(10, 4.2))
  cosine = [name for name in results["dev_curves"] if "cosine" in name]
  others = iter(["tab:blue", "tab:orange", "tab:purple", "tab:red", "tab:brown"])
  for name, run in results["dev_curves"].items():
    curve = run["curve"]
    steps = [p["step"] for p in curve]
    accuracy = [100 * p["accuracy"] for p in curve]
    if name in cosine:  # the recipe's seeds: one colour, the first labelled for all
      first = name == cosine[0]
      ax.plot(steps, accuracy, color="tab:green", marker="o", ms=3, lw=1.2, alpha=0.8,
              label=f"{name.rsplit(',', 1)[0]}, seeds 0–{len(cosine) - 1}" if first else None)
    else:
      ax.plot(steps, accuracy, color=next(others), marker="o", ms=3, lw=1.2, ls="--",
              label=name)
  ax.axhline(50, color="gray", lw=0.8, ls=":")
  ax.axhline(70, color="gray", lw=0.8, ls="-.")
  ax.set_xlabel("vanilla step (batch 16)")
  ax.set_ylabel("target dev accuracy (%), both orders")
  ax.set_title("Banned-word target: dev accuracy along the vanilla run", fontsize=10)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  fig.savefig(out, dpi=110, bbox_inches="tight")
  plt.close(fig)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--results", default=os.path.join(
      REPO, "benchmarks", "results", "tailpatch_lexicon_dev_curves.json"))
  p.add_argument("--out", default=os.path.join(REPO, "docs", "tailpatch_lexicon_dev_curves.png"))
  args = p.parse_args(argv)
  plot(json.load(open(args.results, encoding="utf-8")), args.out)
  print(args.out)


if __name__ == "__main__":
  main()
