"""What fits where: the train step of each model size compiled for each TPU slice, without one.

For every pairing of a model (gin_configs/models/: SmolLM2-135M, T5 v1.1 base…xxl, a
Llama-3-8B shape, a 64B-class decoder) and a slice (gin_configs/partitioning/: v5e-16,
v5e-256, v4-128, v5p-128, each with its mesh and `tpu_slice` topology), `flame.aot`
lowers and compiles the real train step (AdamW, bfloat16 activations, scanned layers with
full remat, `--per_chip` sequences per chip of `--inputs` + `--targets` tokens) through
libtpu's compile-only client and reads the compiled step's bytes per chip. A pairing whose
parameters and AdamW moments alone (12 bytes per parameter, spread over every chip) exceed
the chips' HBM is reported as not fitting without compiling. Each compile runs in its own
process; results are written to `--output` (JSON) as they come (a rerun skips pairings
already there) and printed as a Markdown table.

  python benchmarks/what_fits.py [--models smollm2,t5_base,…] [--slices v5e_16,…]
      [--output benchmarks/results/what_fits.json]

Needs the `tpu` extra (libtpu). CPU time: from seconds (SmolLM2) to minutes (64B on 256
chips) per pairing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCANNED_T5 = ["t5.t5_1_1_config.scan_layers=True", "t5.t5_1_1_config.remat_policy='full'",
              "t5.t5_1_1_config.dtype='bfloat16'"]  # --gin.NAME=VALUE, without --gin.
SCANNED_DECODER = ["decoder.DecoderConfig.scan_layers=True",
                   "decoder.DecoderConfig.remat_policy='full'",
                   "decoder.DecoderConfig.dtype='bfloat16'"]
# name: (label, gin file, bindings, parameters)
MODELS = {
    "smollm2": ("SmolLM2-135M", "models/smollm2_135m_shape.gin", SCANNED_DECODER, 134.5e6),
    "t5_base": ("T5 v1.1 base", "models/t5_1_1_base.gin", SCANNED_T5, 247.6e6),
    "t5_large": ("T5 v1.1 large", "models/t5_1_1_large.gin", SCANNED_T5, 783.2e6),
    "t5_xl": ("T5 v1.1 XL", "models/t5_1_1_xl.gin", SCANNED_T5, 2.85e9),
    "t5_xxl": ("T5 v1.1 XXL", "models/t5_1_1_xxl.gin", SCANNED_T5, 11.1e9),
    "llama_8b": ("Llama-3-8B shape", "models/llama3_8b_shape.gin", [], 8.03e9),
    "decoder_64b": ("64B-class decoder", "models/decoder_64b_shape.gin", [], 64.95e9),
}
# name: (label, gin file, chips, HBM GiB per chip)
SLICES = {
    "v5e_16": ("v5e-16", "partitioning/v5e_16.gin", 16, 16.0),
    "v5e_256": ("v5e-256", "partitioning/v5e_256.gin", 256, 16.0),
    "v4_128": ("v4-128", "partitioning/v4_128.gin", 64, 32.0),
    "v5p_128": ("v5p-128", "partitioning/v5p_128.gin", 64, 95.0),
}
GIB = 1024 ** 3
STATE_BYTES_PER_PARAM = 12  # float32 parameter + AdamW's two float32 moments


def compile_one(model: str, slice_name: str, per_chip: int, inputs: int, targets: int
                ) -> dict:
  """One pairing: `flame-aot --json` in its own process (no compilation state shared between
  pairings; the slice's gin file names its topology)."""
  _, model_gin, model_bindings, _ = MODELS[model]
  _, slice_gin, chips, _ = SLICES[slice_name]
  bindings = model_bindings + [
      "MODEL_DIR='unused'", "MIXTURE_OR_TASK_NAME='unused'", "TRAIN_STEPS=1",
      f"BATCH_SIZE={per_chip * chips}",
      f"TASK_FEATURE_LENGTHS={{'inputs': {inputs}, 'targets': {targets}}}"]
  flags = ([f"--gin_file={f}" for f in ("runs/train.gin", model_gin, slice_gin)]
           + [f"--gin.{b}" for b in bindings] + ["--json"])
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-m", "flame.aot", *flags], cwd=REPO, env=env,
                        capture_output=True, text=True)
  report = re.search(r"^\{$.*", proc.stdout, re.M | re.S)  # the report, printed last
  if proc.returncode or not report:
    return {"error": " ".join(proc.stderr.strip().splitlines()[-3:])[-400:]}
  return json.loads(report.group(0))


def row(model: str, slice_name: str, per_chip: int, inputs: int, targets: int) -> dict:
  label, _, _, params = MODELS[model]
  slice_label, _, chips, hbm = SLICES[slice_name]
  state_gib = params * STATE_BYTES_PER_PARAM / chips / GIB
  out = {"model": label, "slice": slice_label, "chips": chips, "hbm_gib": hbm,
         "batch": per_chip * chips, "state_gib_per_chip_estimate": round(state_gib, 2)}
  if state_gib > hbm:
    return dict(out, fits=False, compiled=False)
  report = compile_one(model, slice_name, per_chip, inputs, targets)
  if "error" in report:
    return dict(out, fits=None, compiled=False, error=report["error"])
  out.update(compiled=True, fits=report["fits"], mesh=report["mesh_shape"],
             num_params=report["num_params"], compile_seconds=report["compile_seconds"])
  oom = report["out_of_memory"]
  if oom:  # The TPU compiler refused: it names what would not fit and by how much.
    return dict(out, oom_what=oom["what"], oom_required_gib=round(oom["required"] / GIB, 2))
  memory = report["memory_bytes_per_device"]
  return dict(out, total_gib=round(memory["total"] / GIB, 2),
              temp_gib=round(memory["temp"] / GIB, 2),
              argument_gib=round(memory["argument"] / GIB, 2))


def to_markdown(rows: list[dict]) -> str:
  slices = list(dict.fromkeys(r["slice"] for r in rows))
  models = list(dict.fromkeys(r["model"] for r in rows))
  by = {(r["model"], r["slice"]): r for r in rows}

  def cell(r):
    if r is None:
      return ""
    if not r["compiled"]:
      if "error" in r:
        return "error"
      return f"no (state {r['state_gib_per_chip_estimate']:.0f} GiB)"
    if "oom_what" in r:
      return f"no ({r['oom_what']} alone {r['oom_required_gib']:.1f} GiB)"
    return f"{'yes' if r['fits'] else 'no'} ({r['total_gib']:.1f} GiB)"
  header = ("| model | " + " | ".join(
      f"{s} ({next(r['hbm_gib'] for r in rows if r['slice'] == s):g} GiB/chip)"
      for s in slices) + " |\n|---|" + "---|" * len(slices))
  lines = [f"| {m} | " + " | ".join(cell(by.get((m, s))) for s in slices) + " |"
           for m in models]
  return "\n".join([header, *lines])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--slices", default=",".join(SLICES))
  parser.add_argument("--per_chip", type=int, default=2, help="sequences per chip")
  parser.add_argument("--inputs", type=int, default=2048)
  parser.add_argument("--targets", type=int, default=512)
  parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results",
                                                       "what_fits.json"))
  args = parser.parse_args()
  rows = []
  if os.path.exists(args.output):
    with open(args.output) as f:
      rows = json.load(f)["rows"]
  done = {(r["model"], r["slice"]) for r in rows if "error" not in r}
  rows = [r for r in rows if (r["model"], r["slice"]) in done]
  for model in args.models.split(","):
    for slice_name in args.slices.split(","):
      if (MODELS[model][0], SLICES[slice_name][0]) in done:
        continue
      result = row(model, slice_name, args.per_chip, args.inputs, args.targets)
      print(json.dumps(result), flush=True)
      rows.append(result)
      os.makedirs(os.path.dirname(args.output), exist_ok=True)
      tmp = args.output + ".tmp"
      with open(tmp, "w") as f:
        json.dump({"settings": {"per_chip": args.per_chip, "inputs": args.inputs,
                                "targets": args.targets, "optimizer": "adamw",
                                "remat": "full", "scan_layers": True,
                                "activations": "bfloat16"}, "rows": rows}, f, indent=1)
      os.replace(tmp, args.output)
  print(to_markdown(rows))


if __name__ == "__main__":
  main()
