"""Merge speed, memory and agreement: our streaming merge (merging/) vs mergekit, on CPU.

Same weights for both tools: a random base model of the SmolLM2-135M shape
(gin_configs/models/smollm2_135m_shape.gin: 134.5M parameters, 30 layers, float32) and
`--num_experts` experts = base + sparse random noise (a `--noise_fraction` of the entries
perturbed by N(0, `--noise_scale`²), a different seed per expert, so TIES trimming and sign
election have real work to do). Every model is written once as our Orbax checkpoint
(`flame.checkpoints.imported.write_orbax`) and once as a Hugging Face Llama folder
(`flame.checkpoints.hf.save_hf`), one model in memory at a time (each tensor of the base is
regenerated from its own seed), under ``--work_dir/models`` (reused when the generation
settings match). The Orbax and HF copies are checked equal tensor by tensor once.

For each entry of `--methods` (``name`` or ``name:key=value:...`` overriding density,
gamma, lambda or weights, e.g. ``ties:density=0.25``) two equivalent mergekit YAMLs are
written, differing only in the model paths (HF folders for mergekit, Orbax checkpoints for
ours), and each tool runs as its own subprocess, mergekit first:

  mergekit: .venv/bin/mergekit-yaml CONFIG OUT --random-seed SEED --no-copy-tokenizer
            --no-write-model-card --quiet    (CPU; no --cuda, no --lazy-unpickle: inputs are
            safetensors, which mergekit memory-maps anyway; default --out-shard-size 5B,
            i.e. one output shard; no -j)
  ours:     .venv/bin/python -m merging.merge --config=CONFIG --output_dir=OUT
            --no_progress_bar --compile_cache=RUN_DIR/xla_cache
            run twice: first with an empty compile cache ("cold": it compiles every
            kernel), then again ("warm": a repeated merge, as in a sweep); the ratios
            use the warm run, the table shows both

with HF_HUB_OFFLINE=1 / TRANSFORMERS_OFFLINE=1 (nothing is downloaded; inputs are local
folders) and JAX_PLATFORMS=cpu. Wall time is the subprocess's (imports and the first run
included, nothing excluded); peak memory is the peak over time of the summed RSS of the
process tree, polled every `--poll_interval` s with psutil (the kernel's max RSS of the
largest process, from /usr/bin/time when present, is recorded too).

Outputs are compared tensor by tensor (ours mapped to HF names with flame.checkpoints.hf's
tensor specs): deterministic methods (linear, task_arithmetic, ties, breadcrumbs*) must
agree to float32 rounding (|a − b| <= atol + rtol·|b| everywhere); DARE/DELLA masks come
from different RNGs, so those are compared by statistics of the merged task vector over the
whole model (fraction of entries equal to the base, mean, std). For ties/breadcrumbs every
mismatching entry is also checked against the trimming boundary: mergekit 0.1.5 keeps
exactly int(d·N) entries per expert and tensor (argsort order breaks ties); from a YAML
config we cut at the same rank but keep every entry tied at the threshold (docs/merging.md,
merging/topk.py), so entries whose |τ_i| equals the value at a cut may be kept by one tool
only; the JSON counts mismatches
explained that way and not. Any mismatch fails unless `--accept_trim_boundary` (then only
unexplained ones do). Prints a table, writes `--output` JSON, and exits 1 on any
correctness failure (after printing everything).

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/merge_vs_mergekit.py \\
      [--work_dir DIR] [--methods ties,linear,task_arithmetic,dare_ties,breadcrumbs] \\
      [--density 0.2] [--lam 1.0] [--profile] [--output results.json]

Before the methods, benchmarks/_io_floor.py runs once as its own subprocess, timed the same
way: the imports, one whole Orbax restore of every input and one save of an output-sized
checkpoint, no merging — the least any Orbax-based merge must do. The table gives our time
as a multiple of that floor.

`--profile` re-runs our merge of the first method under benchmarks/_merge_profile.py and
prints where its time goes (imports, Orbax reads, merge kernels and compiles, writes,
finalize).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional

import numpy as np

from _cpu import cpu_model  # benchmarks/ is the script's folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

MODEL_GIN = "models/smollm2_135m_shape.gin"
VENV_BIN = os.path.join(REPO, ".venv", "bin")
GIB = 1 << 30
DETERMINISTIC = ("linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties")
RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")
USES_DENSITY = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
                "della_linear")
# Generation format; bump when the generated models change.
GENERATION_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Models.


def model_config(shape: str):
  """DecoderConfig of the benchmark shape: the SmolLM2-135M gin file, or a tiny one (tests)."""
  import gin  # pylint: disable=import-outside-toplevel
  from flame import gin_utils  # pylint: disable=import-outside-toplevel
  from flame.models import decoder  # pylint: disable=import-outside-toplevel

  if shape == "tiny":
    return decoder.DecoderConfig(vocab_size=512, emb_dim=64, num_layers=2, num_heads=4,
                                 num_kv_heads=2, head_dim=16, mlp_dim=128, tie_embeddings=True)
  gin.clear_config()
  gin_utils.parse([MODEL_GIN], finalize=False)
  config = decoder.DecoderConfig()
  gin.clear_config()
  return config


def _base_tensor(seed: int, index: int, shape) -> np.ndarray:
  rng = np.random.default_rng([seed, 0, index])
  if len(shape) == 1:  # RMSNorm scales around 1.
    return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
  return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)


def _noise(seed: int, expert: int, index: int, shape, scale: float,
           fraction: float) -> np.ndarray:
  rng = np.random.default_rng([seed, 1 + expert, index])
  mask = rng.random(shape, dtype=np.float32) < fraction
  values = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
  return np.where(mask, values, np.float32(0))


def model_params(config, seed: int, expert: Optional[int], scale: float,
                 fraction: float) -> dict:
  """Our nested params of the base (expert None) or of expert `expert`, float32."""
  from flame.checkpoints import hf, imported  # pylint: disable=import-outside-toplevel

  flat = {}
  for index, spec in enumerate(hf.tensor_specs(config)):
    value = _base_tensor(seed, index, spec.ours_shape)
    if expert is not None:
      value += _noise(seed, expert, index, spec.ours_shape, scale, fraction)
    flat[spec.path] = value
  return imported.unflatten(flat)


@dataclasses.dataclass(frozen=True)
class ModelPaths:
  name: str
  hf: str
  orbax: str


def generate_models(args, config) -> tuple[ModelPaths, list[ModelPaths], dict]:
  """Writes (or reuses) base and experts in both formats; returns their paths and info."""
  from flame.checkpoints import hf, imported  # pylint: disable=import-outside-toplevel

  root = os.path.join(args.work_dir, "models")
  settings = {"version": GENERATION_VERSION, "shape": args.shape, "seed": args.seed,
              "num_experts": args.num_experts, "noise_scale": args.noise_scale,
              "noise_fraction": args.noise_fraction}
  names = ["base"] + [f"expert_{i}" for i in range(args.num_experts)]
  paths = [ModelPaths(n, os.path.join(root, n, "hf"), os.path.join(root, n, "orbax"))
           for n in names]
  manifest_path = os.path.join(root, "manifest.json")
  if os.path.exists(manifest_path):
    with open(manifest_path, encoding="utf-8") as f:
      manifest = json.load(f)
    if manifest.get("settings") == settings and all(
        os.path.isdir(p.hf) and os.path.isdir(p.orbax) for p in paths):
      print(f"reusing the models in {root}", flush=True)
      return paths[0], paths[1:], dict(manifest, reused=True)
  if os.path.exists(root):
    shutil.rmtree(root)
  os.makedirs(root)
  start = time.perf_counter()
  num_params = 0
  for i, p in enumerate(paths):
    t = time.perf_counter()
    params = model_params(config, args.seed, None if i == 0 else i - 1, args.noise_scale,
                          args.noise_fraction)
    num_params = sum(int(v.size) for v in imported.flatten(params).values())
    hf.save_hf(params, config, p.hf, dtype="float32")
    source = {"format": "random (benchmarks/merge_vs_mergekit.py)", **settings,
              "model": p.name}
    imported.write_orbax(imported.ImportedModel(config=config, params=params, source=source),
                         p.orbax)
    del params
    check_same_weights(config, p)
    print(f"  wrote {p.name} ({num_params / 1e6:.1f}M params; HF + Orbax, checked equal) in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
  manifest = {"settings": settings, "num_params": num_params,
              "generation_seconds": time.perf_counter() - start}
  with open(manifest_path, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2)
  return paths[0], paths[1:], dict(manifest, reused=False)


def read_orbax_params(path: str) -> dict:
  """Flat {key: np.ndarray} of an Orbax checkpoint in our layout (DIR or DIR/<step>)."""
  from _io_floor import read_whole  # pylint: disable=import-outside-toplevel
  from flame.checkpoints import imported  # pylint: disable=import-outside-toplevel
  return {k: np.asarray(v) for k, v in imported.flatten(read_whole(path)).items()}


class SafetensorsDir:
  """Tensors of an HF folder (one or several *.safetensors files), read one at a time."""

  def __init__(self, directory: str):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
      raise FileNotFoundError(f"no *.safetensors in {directory}")
    self.handles = [safe_open(f, framework="numpy") for f in files]
    self.where = {}
    for handle in self.handles:
      for key in handle.keys():
        self.where[key] = handle

  def keys(self):
    return list(self.where)

  def get(self, name: str) -> np.ndarray:
    return self.where[name].get_tensor(name)

  def close(self):
    for handle in self.handles:
      if hasattr(handle, "__exit__"):
        handle.__exit__(None, None, None)


def check_same_weights(config, paths: ModelPaths) -> None:
  """Raises unless the Orbax and HF copies of a model hold identical tensors."""
  from flame.checkpoints import hf  # pylint: disable=import-outside-toplevel

  ours = read_orbax_params(paths.orbax)
  theirs = SafetensorsDir(paths.hf)
  try:
    for spec in hf.tensor_specs(config):
      if not np.array_equal(spec.to_hf(ours[spec.path]), theirs.get(spec.name)):
        raise RuntimeError(f"{paths.name}: Orbax and HF copies differ at {spec.name}")
  finally:
    theirs.close()


# ---------------------------------------------------------------------------------------------
# Configs.


@dataclasses.dataclass
class MethodRun:
  label: str
  method: str
  density: float
  gamma: float
  lam: float
  weights: list[float]


def parse_methods(args) -> list[MethodRun]:
  runs = []
  for item in args.methods.split(","):
    item = item.strip()
    if not item:
      continue
    name, *overrides = item.split(":")
    run = MethodRun(item, name, args.density, args.gamma, args.lam, list(args.weights))
    for override in overrides:
      key, _, value = override.partition("=")
      if key == "weights":
        run.weights = [float(w) for w in value.split("/")]
      elif key in ("density", "gamma", "lam"):
        setattr(run, key, float(value))
      else:
        raise SystemExit(f"--methods {item}: unknown override {key!r} (density, gamma, lam, "
                         "weights=a/b/c)")
    if name not in DETERMINISTIC + RANDOM:
      raise SystemExit(f"--methods: {name!r} is not one of {DETERMINISTIC + RANDOM}")
    if len(run.weights) != args.num_experts:
      raise SystemExit(f"--methods {item}: {len(run.weights)} weights for {args.num_experts} "
                       "experts")
    runs.append(run)
  return runs


def merge_yaml(run: MethodRun, base: Optional[str], experts: list[str],
               extra: Optional[dict] = None) -> dict:
  """A mergekit YAML (as a dict) merging `experts` onto `base` with `run`'s settings."""
  models = []
  for path, weight in zip(experts, run.weights):
    params: dict[str, Any] = {"weight": weight}
    if run.method in USES_DENSITY:
      params["density"] = run.density
    if run.method.startswith("breadcrumbs"):
      params["gamma"] = run.gamma
    models.append({"model": path, "parameters": params})
  config: dict[str, Any] = {"merge_method": run.method, "models": models, "dtype": "float32"}
  if run.method == "linear":
    config["parameters"] = {"normalize": True}
  else:
    config["base_model"] = base
    config["parameters"] = {"lambda": run.lam}
  config.update(extra or {})
  return config


def write_yaml(path: str, value: dict) -> None:
  import yaml  # pylint: disable=import-outside-toplevel
  with open(path, "w", encoding="utf-8") as f:
    yaml.safe_dump(value, f, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Measured subprocesses.


def tool_env() -> dict:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             PYTHONPATH=REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""))
  return env


def measure(cmd: list[str], log_path: str, poll_interval: float, env=None) -> dict:
  """Runs `cmd`, returns wall seconds, peak summed RSS of its process tree, exit code."""
  import psutil  # pylint: disable=import-outside-toplevel

  time_file = log_path + ".time"
  wrapped = cmd
  if os.path.exists("/usr/bin/time"):
    wrapped = ["/usr/bin/time", "-f", "%e %M %U %S", "-o", time_file] + cmd
  peak = {"rss": 0, "processes": 0}
  done = threading.Event()
  load_before = os.getloadavg()
  with open(log_path, "w", encoding="utf-8") as log:
    start = time.perf_counter()
    proc = subprocess.Popen(wrapped, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env=env or tool_env())

    def poll():
      root = psutil.Process(proc.pid)
      while not done.is_set():
        try:
          tree = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
          break
        total = 0
        for p in tree:
          if wrapped is not cmd and p.pid == proc.pid:
            continue  # /usr/bin/time itself
          try:
            total += p.memory_info().rss
          except psutil.NoSuchProcess:
            pass
        if total > peak["rss"]:
          peak["rss"], peak["processes"] = total, len(tree) - (wrapped is not cmd)
        done.wait(poll_interval)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    rc = proc.wait()
    wall = time.perf_counter() - start
    done.set()
    poller.join()
  result = {"cmd": cmd, "rc": rc, "seconds": wall, "peak_rss_bytes": peak["rss"],
            "peak_rss_gib": peak["rss"] / GIB, "processes_at_peak": peak["processes"],
            "log": log_path, "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]]}
  if os.path.exists(time_file):
    try:
      with open(time_file, encoding="utf-8") as f:
        fields = f.read().split()
      result["time_elapsed_s"] = float(fields[-4])
      result["time_max_rss_gib"] = int(fields[-3]) * 1024 / GIB  # largest process, kernel
      result["cpu_seconds"] = float(fields[-2]) + float(fields[-1])  # user + sys, the tree
    except (ValueError, IndexError):
      pass
  return result


def log_tail(path: str, lines: int = 30) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return "".join(f.readlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# Comparison.


def compare_outputs(config, run: MethodRun, mergekit_dir: str, ours_dir: str, base_hf: str,
                    expert_hfs: list[str], rtol: float, atol: float,
                    accept_trim_boundary: bool = False) -> dict:
  from flame.checkpoints import hf, imported  # pylint: disable=import-outside-toplevel

  ours = (read_orbax_params(ours_dir) if not os.path.isfile(os.path.join(ours_dir, "config.json"))
          else imported.flatten(hf.load_hf(ours_dir, with_sha256=False).params))
  theirs = SafetensorsDir(mergekit_dir)
  trims = run.method in ("ties", "breadcrumbs", "breadcrumbs_ties")
  base = SafetensorsDir(base_hf) if run.method in RANDOM or trims else None
  experts = [SafetensorsDir(path) for path in expert_hfs] if trims else []
  boundary = {"tensors_checked": 0, "mismatches": 0, "explained": 0, "unexplained": 0,
              "unexplained_examples": []}
  specs = hf.tensor_specs(config)
  result: dict[str, Any] = {"tensors": len(specs)}
  expected_names = {s.name for s in specs}
  extra = sorted(set(theirs.keys()) - expected_names)
  missing = sorted(expected_names - set(theirs.keys()))
  result["mergekit_extra_tensors"] = extra
  result["mergekit_missing_tensors"] = missing
  problems = []
  if missing:
    problems.append(f"mergekit output lacks {missing[:5]}")
  if sorted(ours) != sorted(s.path for s in specs):
    problems.append("our output's parameter keys differ from the model's")
  try:
    if run.method in DETERMINISTIC:
      max_abs, max_rel, bad, bad_tensors, worst = 0.0, 0.0, 0, [], None
      for spec in specs:
        if spec.name in missing:
          continue
        a = spec.to_hf(ours[spec.path]).astype(np.float32)
        b = theirs.get(spec.name).astype(np.float32)
        if a.shape != b.shape:
          problems.append(f"{spec.name}: shape {a.shape} (ours) vs {b.shape} (mergekit)")
          continue
        diff = np.abs(a - b)
        tensor_max = float(diff.max()) if diff.size else 0.0
        over = int(np.count_nonzero(diff > atol + rtol * np.abs(b)))
        rel = float((diff / np.maximum(np.abs(b), 1e-30)).max()) if diff.size else 0.0
        if tensor_max > max_abs:
          max_abs, worst = tensor_max, spec.name
        max_rel = max(max_rel, rel)
        if over:
          bad += over
          bad_tensors.append({"name": spec.name, "entries": int(b.size), "over_tolerance": over,
                              "max_abs_diff": tensor_max})
          if trims:
            mismatch = diff > atol + rtol * np.abs(b)
            near = trim_boundary(run, base.get(spec.name), [e.get(spec.name) for e in experts])
            explained = int(np.count_nonzero(mismatch & near))
            boundary["tensors_checked"] += 1
            boundary["mismatches"] += over
            boundary["explained"] += explained
            boundary["unexplained"] += over - explained
            if over > explained and len(boundary["unexplained_examples"]) < 8:
              boundary["unexplained_examples"].append({"name": spec.name,
                                                       "unexplained": over - explained})
      for name in extra:  # e.g. an lm_head.weight written for tied embeddings
        if name == "lm_head.weight" and "model.embed_tokens.weight" in theirs.where:
          same = np.array_equal(theirs.get(name), theirs.get("model.embed_tokens.weight"))
          result["mergekit_lm_head_equals_embedding"] = bool(same)
      result.update(max_abs_diff=max_abs, max_rel_diff=max_rel, worst_tensor=worst,
                    entries_over_tolerance=bad, tensors_over_tolerance=len(bad_tensors),
                    rtol=rtol, atol=atol,
                    over_tolerance_examples=sorted(bad_tensors,
                                                   key=lambda t: -t["over_tolerance"])[:8])
      result["keep_count_note"] = keep_count_note(config, run)
      if trims:
        result["trim_boundary"] = boundary
      if bad_tensors:
        result["max_over_tolerance_per_tensor"] = max(t["over_tolerance"] for t in bad_tensors)
        message = (f"{bad} entries in {len(bad_tensors)} tensors differ by more than "
                   f"atol {atol} + rtol {rtol}·|mergekit| (max |diff| {max_abs:.3g} in "
                   f"{worst})")
        if trims:
          message += (f"; {boundary['explained']} of them at entries where the two tools' "
                      f"trimming sets can differ (an expert's |τ| equals the value at a cut: "
                      f"mergekit's argsort keeps exactly its count, we keep every tie), "
                      f"{boundary['unexplained']} elsewhere")
        if trims and accept_trim_boundary and boundary["unexplained"] == 0:
          result["accepted_trim_boundary_mismatches"] = message
        else:
          problems.append(message)
    else:
      stats = {"mergekit": _Moments(), "ours": _Moments()}
      max_abs = 0.0
      for spec in specs:
        if spec.name in missing:
          continue
        b0 = base.get(spec.name).astype(np.float64)
        for label, value in (("mergekit", theirs.get(spec.name)),
                             ("ours", spec.to_hf(ours[spec.path]))):
          stats[label].add(value.astype(np.float64) - b0, value == base.get(spec.name))
        max_abs = max(max_abs, float(np.abs(spec.to_hf(ours[spec.path]).astype(np.float64)
                                            - theirs.get(spec.name)).max()))
      summary = {k: v.summary() for k, v in stats.items()}
      result.update(statistics=summary, max_abs_diff=max_abs)
      m, o = summary["mergekit"], summary["ours"]
      checks = {
          "fraction_equal_to_base": abs(m["fraction_equal_to_base"] - o["fraction_equal_to_base"])
                                    <= 0.01,
          "std": abs(m["std"] - o["std"]) <= 0.03 * max(m["std"], 1e-30),
          "mean": abs(m["mean"] - o["mean"]) <= 0.03 * max(m["std"], 1e-30),
          "mean_abs_nonzero": abs(m["mean_abs_nonzero"] - o["mean_abs_nonzero"])
                              <= 0.03 * max(m["mean_abs_nonzero"], 1e-30),
      }
      result["statistics_checks"] = {
          "checks": checks, "tolerances": "fraction equal to base ±0.01 absolute; std and "
          "mean|τ| over nonzero entries ±3% relative; mean ±3% of mergekit's std"}
      for name, ok in checks.items():
        if not ok:
          problems.append(f"merged task-vector statistic {name} differs: mergekit "
                          f"{m[name]:.6g} vs ours {o[name]:.6g}")
  finally:
    theirs.close()
    for handle in ([base] if base is not None else []) + experts:
      handle.close()
  result["problems"] = problems
  result["ok"] = not problems
  return result


class _Moments:
  """Entry count, count equal to base, sum, sum of squares, sum |x| of a merged task vector."""

  def __init__(self):
    self.n = self.equal = 0
    self.s = self.s2 = self.sabs = 0.0

  def add(self, tau: np.ndarray, equal_to_base: np.ndarray):
    self.n += tau.size
    self.equal += int(np.count_nonzero(equal_to_base))
    self.s += float(tau.sum())
    self.s2 += float(np.square(tau).sum())
    self.sabs += float(np.abs(tau).sum())

  def summary(self) -> dict:
    mean = self.s / self.n
    nonzero = max(self.n - self.equal, 1)
    return {"entries": self.n, "fraction_equal_to_base": self.equal / self.n, "mean": mean,
            "std": math.sqrt(max(self.s2 / self.n - mean * mean, 0.0)),
            "mean_abs_nonzero": self.sabs / nonzero}


def _mergekit_cuts(run: MethodRun, n: int) -> list[int]:
  """Descending magnitude ranks (1-based; the count of entries above the cut) at which
  mergekit 0.1.5 cuts a tensor of n entries (sparsify.magnitude / magnitude_outliers)."""
  if run.method == "ties":
    return [max(1, int(run.density * n))] if run.density > 0 else [0]
  target = int(run.density * n)
  n_top = int(run.gamma * n)
  n_bot = max(0, n - target - n_top)
  return [n - n_bot, n - n_bot - target]  # low cut, high cut (the dropped top)


def _our_cuts(run: MethodRun, n: int) -> list[int]:
  """Our ranks for a YAML config (mergekit's counting, `count="floor"`)."""
  from merging import methods  # pylint: disable=import-outside-toplevel
  if run.method == "ties":
    return [int(methods.ties_ranks(n, 1, density=run.density, count="floor")[0][0])]
  low, high = methods.breadcrumbs_ranks(n, 1, density=run.density, gamma=run.gamma,
                                        count="floor")
  return [int(low[0]), int(high[0])]


def trim_boundary(run: MethodRun, base: np.ndarray, experts: list[np.ndarray]) -> np.ndarray:
  """Entries (HF layout) where mergekit's and our trimming of some expert can disagree: its
  |τ_i| equals a value ranked between the two tools' cut ranks (inclusive, plus the next
  rank; ties at a cut are kept whole by us and split by argsort order by mergekit)."""
  if run.density >= 1:
    return np.zeros(base.shape, bool)
  n = base.size
  near = np.zeros(n, bool)
  for expert in experts:
    magnitude = np.abs(expert.astype(np.float32) - base.astype(np.float32)).reshape(-1)
    ranks = set()
    for theirs, ours in zip(_mergekit_cuts(run, n), _our_cuts(run, n)):
      ranks.update(range(max(1, min(theirs, ours)), min(n, max(theirs, ours) + 1) + 1))
    if not ranks:
      continue
    ranks = sorted(ranks)
    part = np.partition(magnitude, [n - r for r in ranks])
    values = np.unique(part[[n - r for r in ranks]])
    near |= np.isin(magnitude, values)
  return near.reshape(base.shape)


def keep_count_note(config, run: MethodRun) -> Optional[str]:
  """Whether our cut ranks (`_our_cuts`) and mergekit 0.1.5's (`_mergekit_cuts`) differ for
  some tensor of this model (they should not: YAML configs count as mergekit does)."""
  if run.method not in ("ties", "breadcrumbs", "breadcrumbs_ties") or run.density >= 1:
    return None
  from flame.checkpoints import hf  # pylint: disable=import-outside-toplevel
  differing = []
  for spec in hf.tensor_specs(config):
    n = int(np.prod(spec.hf_shape))
    ours, theirs = _our_cuts(run, n), _mergekit_cuts(run, n)
    if ours != theirs:
      differing.append((spec.name, n, ours, theirs))
  if not differing:
    return None
  name, n, ours, theirs = differing[0]
  return (f"{len(differing)} tensors are cut at other ranks than mergekit's (e.g. {name}, "
          f"N={n}: ours {ours}, mergekit {theirs}). Besides, we keep every entry tied at a "
          "threshold, mergekit exactly its count.")


# ---------------------------------------------------------------------------------------------
# Main.


def run_method(args, config, run: MethodRun, base: ModelPaths, experts: list[ModelPaths],
               ) -> dict:
  method_dir = os.path.join(args.work_dir, "runs", run.label.replace(":", "_").replace(
      "=", "").replace("/", "-"))
  if os.path.exists(method_dir):
    shutil.rmtree(method_dir)
  os.makedirs(method_dir)
  mk_yaml = merge_yaml(run, base.hf, [e.hf for e in experts])
  our_base, our_experts = our_inputs(args, base, experts)
  our_yaml = merge_yaml(run, our_base, our_experts, extra={"random_seed": args.seed})
  mk_config, our_config = (os.path.join(method_dir, "mergekit.yml"),
                           os.path.join(method_dir, "ours.yml"))
  write_yaml(mk_config, mk_yaml)
  write_yaml(our_config, our_yaml)
  mk_out, our_out = os.path.join(method_dir, "mergekit_out"), os.path.join(method_dir, "ours_out")
  mk_cmd = [os.path.join(VENV_BIN, "mergekit-yaml"), mk_config, mk_out, "--random-seed",
            str(args.seed), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"
            ] + args.mergekit_args.split()
  # A fresh compile cache per method: the first of our runs compiles (cold), the second
  # loads the kernels the first kept (warm: a repeated merge, a sweep, the pipeline's merges).
  our_cmd = [sys.executable, "-m", "merging.merge", f"--config={our_config}",
             f"--output_dir={our_out}", "--no_progress_bar",
             f"--output_format={args.ours_format}",
             f"--compile_cache={os.path.join(method_dir, 'xla_cache')}"] + (
                 [f"--memory_budget={args.memory_budget}"] if args.memory_budget else [])
  result: dict[str, Any] = {"label": run.label, "method": run.method,
                            "settings": dataclasses.asdict(run),
                            "mergekit_yaml": mk_yaml, "ours_yaml": our_yaml}
  print(f"[{run.label}] mergekit ...", flush=True)
  result["mergekit"] = measure(mk_cmd, os.path.join(method_dir, "mergekit.log"),
                               args.poll_interval)
  print(f"[{run.label}] mergekit: {result['mergekit']['seconds']:.1f} s, peak "
        f"{result['mergekit']['peak_rss_gib']:.2f} GiB (rc {result['mergekit']['rc']})",
        flush=True)
  for tool, cache in (("ours_cold", "cold"), ("ours", "warm")):
    print(f"[{run.label}] ours, {cache} compile cache ...", flush=True)
    shutil.rmtree(our_out, ignore_errors=True)
    result[tool] = measure(our_cmd, os.path.join(method_dir, f"{tool}.log"), args.poll_interval)
    print(f"[{run.label}] ours ({cache}): {result[tool]['seconds']:.1f} s, peak "
          f"{result[tool]['peak_rss_gib']:.2f} GiB (rc {result[tool]['rc']})", flush=True)
  failed = [tool for tool in ("mergekit", "ours_cold", "ours") if result[tool]["rc"] != 0]
  if failed:
    for tool in failed:
      print(f"[{run.label}] {tool} FAILED (rc {result[tool]['rc']}); log tail:\n"
            f"{log_tail(result[tool]['log'])}", flush=True)
    result["comparison"] = {"ok": False, "problems": [f"{t} exited with rc {result[t]['rc']}"
                                                      for t in failed]}
    return result
  t = time.perf_counter()
  result["comparison"] = compare_outputs(config, run, mk_out, our_out, base.hf,
                                         [e.hf for e in experts], args.rtol, args.atol,
                                         args.accept_trim_boundary)
  result["comparison"]["seconds"] = time.perf_counter() - t
  status = "OK" if result["comparison"]["ok"] else "FAIL: " + "; ".join(
      result["comparison"]["problems"])
  print(f"[{run.label}] comparison: max |diff| {result['comparison'].get('max_abs_diff')}: "
        f"{status}", flush=True)
  if result["comparison"].get("keep_count_note"):
    print(f"[{run.label}] note: {result['comparison']['keep_count_note']}", flush=True)
  if not args.keep_outputs:
    shutil.rmtree(mk_out, ignore_errors=True)
    shutil.rmtree(our_out, ignore_errors=True)
  return result


def our_inputs(args, base: ModelPaths, experts: list[ModelPaths]) -> tuple[str, list[str]]:
  """The copies flame-merge reads: Orbax checkpoints, or with --ours_format=hf mergekit's own
  HF folders (it then also writes HF)."""
  if args.ours_format == "hf":
    return base.hf, [e.hf for e in experts]
  return base.orbax, [e.orbax for e in experts]


def fresh_dir(path: str) -> str:
  if os.path.exists(path):
    shutil.rmtree(path)
  os.makedirs(path)
  return path


def measure_json_tool(args, cmd: list[str], log: str, json_out: str, out_dir: str,
                      env=None) -> dict:
  """`measure(cmd)`; on success also the JSON the tool wrote to `json_out` (its output folder
  `out_dir` removed afterwards)."""
  measured = measure(cmd, log, args.poll_interval, env or tool_env())
  if measured["rc"] != 0:
    print(log_tail(measured["log"]), flush=True)
    return {"measured": measured}
  with open(json_out, encoding="utf-8") as f:
    written = json.load(f)
  shutil.rmtree(out_dir, ignore_errors=True)
  return {"measured": measured, **written}


def measure_io_floor(args, base: ModelPaths, experts: list[ModelPaths]) -> dict:
  """benchmarks/_io_floor.py on our inputs: one whole Orbax restore of each, one save."""
  floor_dir = fresh_dir(os.path.join(args.work_dir, "io_floor"))
  json_out, out_dir = os.path.join(floor_dir, "floor.json"), os.path.join(floor_dir, "out")
  our_base, our_experts = our_inputs(args, base, experts)
  cmd = [sys.executable, os.path.join(REPO, "benchmarks", "_io_floor.py"), json_out, out_dir,
         our_base] + our_experts
  print(f"[I/O floor] one whole read of every input, one write of the output "
        f"({args.ours_format}) ...", flush=True)
  result = measure_json_tool(args, cmd, os.path.join(floor_dir, "floor.log"), json_out,
                             out_dir)
  if "read_s" in result:
    print(f"[I/O floor] {result['measured']['seconds']:.1f} s (reads "
          f"{sum(result['read_s']):.1f} s, write {result['write_s']:.1f} s, the rest imports), "
          f"peak {result['measured']['peak_rss_gib']:.2f} GiB", flush=True)
  return result


def profile_ours(args, run: MethodRun, base: ModelPaths, experts: list[ModelPaths]) -> dict:
  """Our merge of `run` once more, under the phase-timing driver."""
  profile_dir = fresh_dir(os.path.join(args.work_dir, "profile"))
  config_path = os.path.join(profile_dir, "ours.yml")
  write_yaml(config_path, merge_yaml(run, *our_inputs(args, base, experts),
                                     extra={"random_seed": args.seed}))
  json_out, out_dir = os.path.join(profile_dir, "phases.json"), os.path.join(profile_dir, "out")
  env = tool_env()
  env["MERGE_PROFILE_LAUNCH_TIME"] = repr(time.time())
  cmd = [sys.executable, os.path.join(REPO, "benchmarks", "_merge_profile.py"),
         f"--json_out={json_out}", "--", f"--config={config_path}", f"--output_dir={out_dir}",
         "--no_progress_bar", f"--output_format={args.ours_format}"]
  print(f"[profile {run.label}] ours under benchmarks/_merge_profile.py ...", flush=True)
  result = measure_json_tool(args, cmd, os.path.join(profile_dir, "profile.log"), json_out,
                             out_dir, env)
  return dict(result, label=run.label)


def print_profile(profile: dict) -> None:
  if "phases" not in profile:
    return
  total = profile["measured"]["seconds"]
  print(f"\nWhere our {profile['label']} merge spends its {total:.1f} s (profiled run):")
  rows = []
  if profile.get("interpreter_startup_s") is not None:
    rows.append(("interpreter start", profile["interpreter_startup_s"], 1))
  for name, value in profile["phases"].items():
    rows.append((name, value["seconds"], value["calls"]))
  rows.append(("other, inside main()", profile["unaccounted_in_main_s"], None))
  for name, seconds, calls in rows:
    per = f"  ({calls} calls, {1e3 * seconds / calls:.1f} ms each)" if calls else ""
    print(f"  {name:36s} {seconds:7.2f} s  {100 * seconds / total:5.1f}%{per}")
  if profile.get("peak_rss"):
    peak = profile["peak_rss"]
    print(f"  peak RSS {peak['gib']:.2f} GiB during {peak['phase']}"
          f"{' of ' + peak['parameter'] if peak.get('parameter') else ''}; per phase: " +
          ", ".join(f"{k} {v:.2f}" for k, v in profile.get("peak_rss_gib_by_phase", {}).items()))
  compile_events = {k: v for k, v in profile.get("jax_events", {}).items()
                    if "compile" in k or "trace" in k or "lower" in k or "mlir" in k}
  for name, value in list(compile_events.items())[:4]:
    print(f"    jax {name}: {value['seconds']:.2f} s over {value['calls']} events")


def _fmt(value: Optional[float]) -> str:
  return "n/a" if value is None else f"{value:.1f}"


def print_table(results: list[dict], floor_seconds: Optional[float]) -> None:
  header = ("method", "mergekit s", "ours s (cold cache)", "ours s", "speed ratio (mk/ours)",
            "ours / I/O floor", "mergekit peak GiB",
            "ours peak GiB", "memory ratio (mk/ours)", "max |diff|", "check",
            "mergekit CPU s", "ours CPU s", "load avg (1 min)")
  rows = []
  for r in results:
    mk, ours, comp = r["mergekit"], r["ours"], r.get("comparison", {})
    diff = comp.get("max_abs_diff")
    rows.append((
        r["label"], f"{mk['seconds']:.1f}",
        f"{r['ours_cold']['seconds']:.1f}" if "ours_cold" in r else "n/a",
        f"{ours['seconds']:.1f}",
        f"{mk['seconds'] / ours['seconds']:.2f}",
        "n/a" if not floor_seconds else f"{ours['seconds'] / floor_seconds:.2f}",
        f"{mk['peak_rss_gib']:.2f}",
        f"{ours['peak_rss_gib']:.2f}",
        f"{mk['peak_rss_bytes'] / max(ours['peak_rss_bytes'], 1):.2f}",
        "n/a" if diff is None else f"{diff:.3g}",
        ("OK" if comp.get("ok") else "FAIL") + (" (stats)" if r["method"] in RANDOM else ""),
        _fmt(mk.get("cpu_seconds")), _fmt(ours.get("cpu_seconds")),
        "/".join(f"{x:.1f}" for x in mk.get("loadavg_1min_before_after", []) +
                 ours.get("loadavg_1min_before_after", []))))
  print("\n| " + " | ".join(header) + " |")
  print("|" + "|".join("---" for _ in header) + "|")
  for row in rows:
    print("| " + " | ".join(row) + " |")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--work_dir", help="models, configs, outputs, logs (default: a new temp "
                      "dir; reused when given and the generation settings match)")
  parser.add_argument("--methods", default="ties,linear,task_arithmetic,dare_ties,breadcrumbs",
                      help="comma-separated; name or name:density=D:gamma=G:lam=L:weights=a/b/c")
  parser.add_argument("--density", type=float, default=0.2)
  parser.add_argument("--gamma", type=float, default=0.01, help="breadcrumbs' outlier fraction")
  parser.add_argument("--lam", type=float, default=1.0, help="mergekit's lambda")
  parser.add_argument("--weights", type=lambda s: [float(w) for w in s.split(",")],
                      default=None, help="one per expert (default: all 1.0)")
  parser.add_argument("--num_experts", type=int, default=3)
  parser.add_argument("--noise_scale", type=float, default=1e-3)
  parser.add_argument("--noise_fraction", type=float, default=0.5,
                      help="fraction of each expert's entries that are perturbed")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--shape", choices=("smollm2_135m", "tiny"), default="smollm2_135m")
  parser.add_argument("--rtol", type=float, default=1e-5)
  parser.add_argument("--atol", type=float, default=1e-8)
  parser.add_argument("--accept_trim_boundary", action="store_true",
                      help="pass ties/breadcrumbs when every mismatch is at a trimming "
                      "boundary (mergekit's argsort keeps exactly int(dN), we keep every entry "
                      "tied at the cut); default: any mismatch fails")
  parser.add_argument("--poll_interval", type=float, default=0.05)
  parser.add_argument("--mergekit_args", default="", help="extra mergekit-yaml options")
  parser.add_argument("--profile", action="store_true",
                      help="re-run our merge of the first method with per-phase timers")
  parser.add_argument("--keep_outputs", action="store_true")
  parser.add_argument("--memory_budget", help="flame-merge --memory_budget (default: its own)")
  parser.add_argument("--ours_format", choices=("orbax", "hf"), default="orbax",
                      help="what flame-merge reads and writes: our Orbax copies (default) or "
                      "the same HF safetensors folders mergekit reads (--output_format=hf)")
  parser.add_argument("--output", help="write the results as JSON here")
  args = parser.parse_args(argv)
  if args.weights is None:
    args.weights = [1.0] * args.num_experts
  if args.work_dir is None:
    args.work_dir = tempfile.mkdtemp(prefix="merge_vs_mergekit-")
  args.work_dir = os.path.abspath(args.work_dir)
  os.makedirs(args.work_dir, exist_ok=True)
  runs = parse_methods(args)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import importlib.metadata as metadata  # pylint: disable=import-outside-toplevel
  import logging  # pylint: disable=import-outside-toplevel
  logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's read-only notices

  config = model_config(args.shape)
  print(f"work dir {args.work_dir}; {args.shape}: {config.num_params() / 1e6:.1f}M params, "
        f"{args.num_experts} experts; CPU {cpu_model()}, {os.cpu_count()} cores", flush=True)
  base, experts, generation = generate_models(args, config)
  sources_before = merging_sources()
  io_floor = measure_io_floor(args, base, experts)
  floor_seconds = io_floor["measured"]["seconds"] if "read_s" in io_floor else None
  results = []
  for run in runs:
    results.append(run_method(args, config, run, base, experts))
  print_table(results, floor_seconds)
  if floor_seconds:
    print(f"\nI/O floor (benchmarks/_io_floor.py: imports, one {args.ours_format} read of each "
          f"of the {1 + len(experts)} inputs, one write of the output): {floor_seconds:.1f} s, peak "
          f"{io_floor['measured']['peak_rss_gib']:.2f} GiB")
  profile = None
  if args.profile and runs:
    profile = profile_ours(args, runs[0], base, experts)
    print_profile(profile)
  sources_after = merging_sources()
  if sources_after != sources_before:
    print("\nWARNING: merging/*.py changed while the benchmark ran: " + ", ".join(
        sorted(k for k in set(sources_before) | set(sources_after)
               if sources_before.get(k) != sources_after.get(k))))
  failures = [r["label"] for r in results if not r.get("comparison", {}).get("ok")]
  for r in results:
    comp = r.get("comparison", {})
    if not comp.get("ok"):
      print(f"\nFAIL {r['label']}: " + "; ".join(comp.get("problems", [])))
      if comp.get("keep_count_note"):
        print(f"  likely cause: {comp['keep_count_note']}")
  report = {
      "argv": sys.argv, "work_dir": args.work_dir, "shape": args.shape,
      "ours_format": args.ours_format,
      "num_params": config.num_params(), "generation": generation,
      "machine": {"cpu": cpu_model(), "platform": platform.platform(),
                  "python": platform.python_version(),
                  "cpus": os.cpu_count(),
                  "affinity": len(os.sched_getaffinity(0)) if hasattr(
                      os, "sched_getaffinity") else None},
      "versions": {p: _version(metadata, p) for p in ("mergekit", "torch", "transformers",
                                                       "jax", "orbax-checkpoint",
                                                       "safetensors")},
      "merging_sources": {"before": sources_before, "after": sources_after},
      "results": results, "io_floor": io_floor, "profile": profile, "failures": failures}
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2, default=str)
    print(f"\nwrote {args.output}")
  if failures:
    print(f"\ncorrectness FAILED for: {', '.join(failures)}")
    return 1
  return 0


def merging_sources() -> dict[str, str]:
  """sha256 (first 12 hex digits) of merging/*.py: which version of our code ran."""
  import hashlib  # pylint: disable=import-outside-toplevel
  out = {}
  for path in sorted(glob.glob(os.path.join(REPO, "merging", "*.py"))):
    with open(path, "rb") as f:
      out[os.path.basename(path)] = hashlib.sha256(f.read()).hexdigest()[:12]
  return out


def _version(metadata, package: str) -> Optional[str]:
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return None


if __name__ == "__main__":
  sys.exit(main())
