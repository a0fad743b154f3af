"""Do bfloat16 and float32 compute give the same verdicts? SmolLM2-135M-Instruct on the held-out
suite, every pair in both orders, once in each dtype (`flame-evaluate --dtype`).

    python benchmarks/dtype_agreement.py [--checkpoint /tmp/smollm2_135m]
        [--limit_per_subset 25] [--max_input_length 1024] [--output r.json]

Reports the share of pairs whose verdict is the same, the largest and mean |P(A) difference|,
each dtype's overall score and the time each took; the checkpoint is our Orbax import of the
packaged GGUF (written at `--checkpoint` if absent).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cpu  # noqa: E402  pylint: disable=wrong-import-position
import rate_throughput  # noqa: E402  pylint: disable=wrong-import-position


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", default="/tmp/smollm2_135m")
  parser.add_argument("--limit_per_subset", type=int, default=25)
  parser.add_argument("--max_input_length", type=int, default=1024)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--output", default=None)
  args = parser.parse_args(argv)

  from flame import files
  from flame.autorater import autorater, evaluate
  from flame.data import heldout
  rate_throughput.ensure_checkpoint(args.checkpoint)
  items = evaluate.heldout_items(args.limit_per_subset)
  runs = {}
  for dtype in ("float32", "bfloat16"):
    rater = autorater.Autorater.load(args.checkpoint, dtype=dtype, batch_size=args.batch_size,
                                     max_input_length=args.max_input_length)
    start = time.perf_counter()
    runs[dtype] = evaluate.evaluate(rater, items, True, heldout.CATEGORIES, progress=True)
    runs[dtype]["seconds"] = time.perf_counter() - start
  p = {d: np.array([pair["probabilities"]["A"] for pair in r["pairs"]]) for d, r in runs.items()}
  verdicts = {d: [pair["verdict"] for pair in r["pairs"]] for d, r in runs.items()}
  same = float(np.mean([a == b for a, b in zip(verdicts["float32"], verdicts["bfloat16"])]))
  diff = np.abs(p["float32"] - p["bfloat16"])
  report = {"cpu": _cpu.describe(), "pairs": len(items),
            "limit_per_subset": args.limit_per_subset, "same_verdict": same,
            "max_abs_diff_p_a": float(diff.max()), "mean_abs_diff_p_a": float(diff.mean()),
            **{f"{d}_overall": r["overall"] for d, r in runs.items()},
            **{f"{d}_swap_consistency": r.get("swap_consistency_overall")
               for d, r in runs.items()},
            **{f"{d}_seconds": r["seconds"] for d, r in runs.items()}}
  print(json.dumps(report, indent=1))
  if args.output:
    files.write_text_atomically(args.output, json.dumps(report, indent=1) + "\n")
  return report


if __name__ == "__main__":
  main()
