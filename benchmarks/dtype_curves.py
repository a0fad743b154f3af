"""Does bfloat16 compute train like float32? The SmolLM2 judge recipe run once in each dtype from
the same checkpoint on the same batches, loss curves side by side.

    python benchmarks/dtype_curves.py [--checkpoint /tmp/smollm2_135m] [--steps 200]
        [--batch_size 2] [--work_dir /tmp/dtype_curves] [--output r.json] [--plot curves.png]

Each run is `flame-train --gin_file=flame/smollm2_judge.gin` (the FLAMe mixture on
SmolLM2-135M-Instruct, its top 8 layers trained) with `DecoderConfig.dtype` set, in its own
process, one after the other, into WORK_DIR/<dtype> (a finished run is read, not redone; an
interrupted one resumes). Reports per dtype the loss at every logged step and the mean step
time after the first logged interval (from the run's own metrics); the mean |loss
difference| over the last half of the run against the float32 curve's own noise (the mean
|difference| between consecutive logged losses); and plots both curves.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cpu  # noqa: E402  pylint: disable=wrong-import-position
import rate_throughput  # noqa: E402  pylint: disable=wrong-import-position

DTYPES = ("float32", "bfloat16")


def train(checkpoint: str, model_dir: str, dtype: str, steps: int, batch_size: int) -> None:
  """Runs (or resumes, or finds finished) one recipe run."""
  subprocess.run(["flame-train", "--gin_file=flame/smollm2_judge.gin",
                  f"--gin.SMOLLM2_CHECKPOINT={checkpoint}", f"--gin.MODEL_DIR={model_dir}",
                  f"--gin.TRAIN_STEPS={steps}", f"--gin.BATCH_SIZE={batch_size}",
                  f"--gin.decoder.DecoderConfig.dtype='{dtype}'",
                  f"--gin.train.checkpoint_every={steps}"], check=True)


def curve(model_dir: str) -> dict[int, dict]:
  """step -> the metrics logged at it (train/metrics.jsonl)."""
  rows = {}
  with open(os.path.join(model_dir, "train", "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        rows[row["step"]] = row
  return rows


def step_seconds(rows: dict[int, dict]) -> float:
  """Mean seconds per step between logged steps (the first, compiling, interval left out):
  each interval's tokens seen over its logged tokens per second."""
  steps = sorted(rows)
  seconds = [(rows[b]["tokens_seen"] - rows[a]["tokens_seen"]) / rows[b]["tokens_per_second"]
             / (b - a) for a, b in zip(steps[1:], steps[2:])]
  return sum(seconds) / max(1, len(seconds))


def compare(curves: dict[str, dict[int, dict]]) -> dict:
  """Both losses at the steps both logged; over the last half of them, the mean |float32 -
  bfloat16| and the float32 curve's own mean |change| from one logged step to the next."""
  steps = sorted(set(curves["float32"]) & set(curves["bfloat16"]))
  loss = {d: [curves[d][s]["loss"] for s in steps] for d in DTYPES}
  half = len(steps) // 2
  f32, bf16 = loss["float32"][half:], loss["bfloat16"][half:]
  diff = sum(abs(a - b) for a, b in zip(f32, bf16)) / len(f32)
  noise = sum(abs(a - b) for a, b in zip(f32, f32[1:])) / max(1, len(f32) - 1)
  return {"steps": steps, "loss": loss, "late_mean_abs_diff": diff,
          "float32_step_to_step_noise": noise}


def plot(result: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  for dtype in DTYPES:
    seconds = result["seconds_per_step"][dtype]
    ax.plot(result["steps"], result["loss"][dtype], label=f"{dtype} ({seconds:.2f} s/step)",
            alpha=0.8)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (targets)")
  ax.set_title(f"SmolLM2-135M judge recipe, batch {result['batch_size']}: float32 vs bfloat16 "
               f"compute\n{result['cpu']['cpu']}, {result['cpu']['cores']} cores", fontsize=9)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", default="/tmp/smollm2_135m")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch_size", type=int, default=2)
  parser.add_argument("--work_dir", default="/tmp/dtype_curves")
  parser.add_argument("--output", default=None, help="the result as JSON")
  parser.add_argument("--plot", default=None, help="the curves as PNG")
  args = parser.parse_args(argv)
  if args.steps < 4:
    parser.error(f"--steps={args.steps}: need at least 4 to compare curves")

  from flame import files
  rate_throughput.ensure_checkpoint(args.checkpoint)
  curves = {}
  for dtype in DTYPES:
    model_dir = os.path.join(args.work_dir, dtype)
    train(args.checkpoint, model_dir, dtype, args.steps, args.batch_size)
    curves[dtype] = curve(model_dir)
  result = {"cpu": _cpu.describe(), "batch_size": args.batch_size, "train_steps": args.steps,
            **compare(curves)}
  result["seconds_per_step"] = {d: step_seconds(curves[d]) for d in DTYPES}
  print(json.dumps({k: v for k, v in result.items() if k not in ("loss", "steps")}, indent=1))
  if args.output:
    files.write_text_atomically(args.output, json.dumps(result, indent=1) + "\n")
  if args.plot:
    plot(result, args.plot)
  return result


if __name__ == "__main__":
  main()
