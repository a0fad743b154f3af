"""A merge at ~1B parameters on this machine: time and peak memory against the I/O floor.

Writes a random base and `--num_experts` experts of a Llama decoder shape as our Orbax
checkpoints (float32; the weights of benchmarks/merge_vs_mergekit.py: each expert perturbs
half of the base's entries by N(0, 1e-3²)), one model in memory at a time, under
``--work_dir/models`` (reused when the settings match). Then, each as its own subprocess timed
with its process tree's peak RSS (merge_vs_mergekit.measure):

  floor:  benchmarks/_io_floor.py — imports, one Orbax restore of every input, one save;
  ours:   python -m merging.merge --config=<YAML> --output_dir=... --memory_budget=...
          for each of `--methods` (mergekit YAML; TIES density 0.2).

Default shape `tinyllama_1b`: TinyLlama-1.1B's (22 layers, width 2048, 32 heads / 4 KV heads
of 64, MLP 5632, vocabulary 32000, untied; 1.10B parameters, 4.4 GB per float32 checkpoint).
`--num_layers` overrides the depth, e.g. to check that peak memory does not follow it. No
mergekit here: at this size it needs several times our memory (see merge_vs_mergekit.py at
135M) and the HF copies would double the disk.

  JAX_PLATFORMS=cpu python benchmarks/merge_scale.py --work_dir=/tmp/merge_scale \\
      [--methods=task_arithmetic,ties] [--memory_budget=3GiB] [--num_layers=22]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from merge_vs_mergekit import REPO, measure, model_params, tool_env, log_tail, write_yaml
from _cpu import cpu_model  # benchmarks/ is the script's folder

if REPO not in sys.path:
  sys.path.insert(0, REPO)


def model_config(num_layers: int):
  from flame.models import decoder  # pylint: disable=import-outside-toplevel
  return decoder.DecoderConfig(vocab_size=32000, emb_dim=2048, num_layers=num_layers,
                               num_heads=32, num_kv_heads=4, head_dim=64, mlp_dim=5632,
                               tie_embeddings=False)


def generate(args, config) -> list[str]:
  """Orbax checkpoints of the base and experts (reused when the settings match)."""
  from flame.checkpoints import imported  # pylint: disable=import-outside-toplevel
  root = os.path.join(args.work_dir, "models")
  settings = {"layers": config.num_layers, "experts": args.num_experts, "seed": args.seed,
              "version": 1}
  names = ["base"] + [f"expert_{i}" for i in range(args.num_experts)]
  paths = [os.path.join(root, name) for name in names]
  manifest = os.path.join(root, "manifest.json")
  if os.path.exists(manifest):
    with open(manifest, encoding="utf-8") as f:
      if json.load(f) == settings and all(os.path.isdir(p) for p in paths):
        print(f"reusing the models in {root}", flush=True)
        return paths
  shutil.rmtree(root, ignore_errors=True)
  os.makedirs(root)
  for i, path in enumerate(paths):
    start = time.perf_counter()
    params = model_params(config, args.seed, None if i == 0 else i - 1, 1e-3, 0.5)
    imported.write_orbax(imported.ImportedModel(config, params, {"format": "random"}), path)
    del params
    print(f"  wrote {names[i]} in {time.perf_counter() - start:.1f} s", flush=True)
  with open(manifest, "w", encoding="utf-8") as f:
    json.dump(settings, f)
  return paths


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--work_dir", required=True)
  parser.add_argument("--methods", default="task_arithmetic,ties")
  parser.add_argument("--memory_budget", default="3GiB")
  parser.add_argument("--num_layers", type=int, default=22)
  parser.add_argument("--num_experts", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--poll_interval", type=float, default=0.1)
  parser.add_argument("--output", help="write the results as JSON here")
  args = parser.parse_args(argv)
  args.work_dir = os.path.abspath(args.work_dir)
  os.makedirs(args.work_dir, exist_ok=True)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  config = model_config(args.num_layers)
  print(f"{config.num_params() / 1e9:.2f}B parameters ({config.num_layers} layers), base + "
        f"{args.num_experts} experts, float32; CPU {cpu_model()}, {os.cpu_count()} cores",
        flush=True)
  base, *experts = generate(args, config)
  runs = os.path.join(args.work_dir, "runs")
  shutil.rmtree(runs, ignore_errors=True)
  os.makedirs(runs)
  results = {"cpu": cpu_model(), "cores": os.cpu_count(), "params": config.num_params(),
             "layers": config.num_layers, "memory_budget": args.memory_budget, "runs": {}}
  floor_json = os.path.join(runs, "floor.json")
  commands = {"I/O floor": [sys.executable, os.path.join(REPO, "benchmarks", "_io_floor.py"),
                            floor_json, os.path.join(runs, "floor_out"), base, *experts]}
  for method in args.methods.split(","):
    config_path = os.path.join(runs, f"{method}.yml")
    write_yaml(config_path, {
        "merge_method": method, "base_model": base, "models": [
            {"model": e, "parameters": {"weight": 1.0, **(
                {"density": 0.2} if method == "ties" else {})}} for e in experts]})
    commands[method] = [sys.executable, "-m", "merging.merge", f"--config={config_path}",
                        f"--output_dir={os.path.join(runs, method + '_out')}",
                        f"--memory_budget={args.memory_budget}", "--no_progress_bar"]
  failed = False
  for name, cmd in commands.items():
    print(f"[{name}] ...", flush=True)
    measured = measure(cmd, os.path.join(runs, name.replace("/", "_") + ".log"),
                       args.poll_interval, tool_env())
    results["runs"][name] = measured
    print(f"[{name}] {measured['seconds']:.1f} s, peak {measured['peak_rss_gib']:.2f} GiB "
          f"(rc {measured['rc']})", flush=True)
    if measured["rc"] != 0:
      failed = True
      print(log_tail(measured["log"]), flush=True)
    for out in ("floor_out", name + "_out"):
      shutil.rmtree(os.path.join(runs, out), ignore_errors=True)
  floor = results["runs"]["I/O floor"]["seconds"]
  print("\n| run | seconds | / I/O floor | peak GiB |\n|---|---:|---:|---:|")
  for name, measured in results["runs"].items():
    print(f"| {name} | {measured['seconds']:.1f} | {measured['seconds'] / floor:.2f} | "
          f"{measured['peak_rss_gib']:.2f} |")
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2, default=str)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
