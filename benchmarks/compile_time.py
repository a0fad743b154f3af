"""Compile time of the train step, scanned layers vs unrolled, as the model gets deeper.

The SmolLM2-135M shape (gin_configs/models/smollm2_135m_shape.gin) with `--depths` layers,
float32, AdamW, batch `--batch` x `--length` tokens: for each depth and layout
(`DecoderConfig.scan_layers` False / True, `--remat` policy) the real train step
(`Trainer.compile_train_step`) is lowered and compiled from abstract shapes (nothing
allocated), each in its own process (no compilation cache shared), on

  * cpu: this machine's XLA:CPU, one device;
  * tpu: the TPU topology `--topology` through libtpu's compile-only client (`flame.aot`;
    needs the `tpu` extra), which also reports bytes per chip.

Then the step time of the `--step_depth`-layer model (30: SmolLM2's own) on CPU, scanned vs
unrolled (`--steps` timed steps after one warm-up). Prints a Markdown table and writes
`--output` JSON.

  JAX_PLATFORMS=cpu python benchmarks/compile_time.py [--depths 8,16,32,64] [--remat none]
      [--topology v5e:2x2] [--platforms cpu,tpu] [--output compile_time.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
GIN_FILES = ["runs/train.gin", "models/smollm2_135m_shape.gin"]


def bindings(depth: int, scanned: bool, remat: str, batch: int, length: int) -> list[str]:
  return [f"decoder.DecoderConfig.num_layers = {depth}",
          f"decoder.DecoderConfig.scan_layers = {scanned}",
          f"decoder.DecoderConfig.remat_policy = {remat!r}",
          "MODEL_DIR = 'unused'", "MIXTURE_OR_TASK_NAME = 'unused'", "TRAIN_STEPS = 1",
          f"BATCH_SIZE = {batch}",
          f"TASK_FEATURE_LENGTHS = {{'inputs': {length - 1}, 'targets': 1}}"]


def cpu_trainer(args, depth: int, scanned: bool):
  """(trainer, partitioner, model, lengths) on one CPU device, from the gin files."""
  import gin
  import jax
  from flame import aot, gin_utils, trainer as trainer_lib
  gin.clear_config()
  gin_utils.parse(GIN_FILES, bindings(depth, scanned, args.remat, args.batch, args.length),
                  finalize=False)
  train_args = aot.train_arguments_from_gin()
  partitioner = aot.build_partitioner(train_args["partitioner_ref"], jax.devices("cpu")[:1])
  model = train_args["model"]
  trainer = trainer_lib.Trainer(model, train_args["optimizer"], partitioner,
                                train_args["learning_rate_fn"],
                                loss_positions=train_args["loss_positions"])
  return trainer, partitioner, model, train_args["task_feature_lengths"]


def child(args) -> dict:
  """One measurement (this process compiles exactly one train step)."""
  depth, scanned = args.depth, args.layout == "scanned"
  if args.platform == "tpu":
    from flame import aot
    report = aot.compile_for_topology(GIN_FILES, bindings(depth, scanned, args.remat,
                                                          args.batch, args.length),
                                      topology=args.topology)
    return {"compile_seconds": report["compile_seconds"],
            "bytes_per_chip": report["memory_bytes_per_device"]["total"],
            "fits": report["fits"]}
  import jax
  import numpy as np
  trainer, partitioner, model, lengths = cpu_trainer(args, depth, scanned)
  start = time.perf_counter()
  compiled = trainer.lower_train_step(args.batch, lengths)[1].compile()
  out = {"compile_seconds": round(time.perf_counter() - start, 2)}
  if args.step:
    batch_shapes = model.model_feature_shapes(args.batch, lengths)
    rng = np.random.default_rng(0)
    batch = {k: rng.integers(1, 1000, s).astype(np.int32) for k, s in batch_shapes.items()}
    batch["decoder_causal_attention"] = np.zeros(batch_shapes["decoder_causal_attention"],
                                                 np.int32)
    batch["decoder_loss_weights"] = np.ones(batch_shapes["decoder_loss_weights"], np.int32)
    state = trainer.init_state(args.batch, lengths)
    device_batch = partitioner.shard_batch(batch)
    times = []
    for i in range(1 + args.steps):
      tick = time.perf_counter()
      state, metrics = compiled(state, device_batch)
      jax.block_until_ready(metrics["loss"])
      if i:
        times.append(time.perf_counter() - tick)
    out["step_seconds"] = round(sum(times) / len(times), 3)
  return out


def measure(args, platform: str, depth: int, layout: str, step: bool = False) -> dict:
  command = [sys.executable, os.path.abspath(__file__), "--child", f"--platform={platform}",
             f"--depth={depth}", f"--layout={layout}", f"--remat={args.remat}",
             f"--batch={args.batch}", f"--length={args.length}", f"--topology={args.topology}",
             f"--steps={args.steps}"] + (["--step"] if step else [])
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if done.returncode:
    return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--depths", default="8,16,32,64")
  p.add_argument("--platforms", default="cpu,tpu")
  p.add_argument("--remat", default="none", choices=("none", "full", "dots"))
  p.add_argument("--topology", default="v5e:2x2")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--step_depth", type=int, default=30)
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--output")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--platform", help=argparse.SUPPRESS)
  p.add_argument("--depth", type=int, help=argparse.SUPPRESS)
  p.add_argument("--layout", help=argparse.SUPPRESS)
  p.add_argument("--step", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(child(args)))
    return 0
  from _cpu import cpu_model  # pylint: disable=import-outside-toplevel
  depths = [int(d) for d in args.depths.split(",")]
  platforms = args.platforms.split(",")
  rows = []
  for platform in platforms:
    for depth in depths:
      row = {"platform": platform, "depth": depth}
      for layout in ("unrolled", "scanned"):
        row[layout] = measure(args, platform, depth, layout)
        print(f"{platform} {depth} layers {layout}: {row[layout]}", flush=True)
      rows.append(row)
  steps = {layout: measure(args, "cpu", args.step_depth, layout, step=True)
           for layout in ("unrolled", "scanned")}
  print(f"cpu {args.step_depth} layers, compile + step: {steps}", flush=True)
  lines = [f"Train-step compile time (SmolLM2-135M shape, batch {args.batch} x {args.length}, "
           f"remat {args.remat}; CPU: {cpu_model()}; TPU: {args.topology} via libtpu AOT)", "",
           "| platform | layers | unrolled s | scanned s |", "|---|---:|---:|---:|"]
  for row in rows:
    cells = [str(row[k].get("compile_seconds", row[k].get("error"))) for k in ("unrolled",
                                                                            "scanned")]
    lines.append(f"| {row['platform']} | {row['depth']} | {cells[0]} | {cells[1]} |")
  lines += ["", f"CPU step time at {args.step_depth} layers: unrolled "
            f"{steps['unrolled'].get('step_seconds')} s, scanned "
            f"{steps['scanned'].get('step_seconds')} s (compile "
            f"{steps['unrolled'].get('compile_seconds')} s vs "
            f"{steps['scanned'].get('compile_seconds')} s)."]
  print("\n".join(lines))
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump({"rows": rows, "steps": steps, "args": vars(args), "cpu": cpu_model()}, f,
                indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
