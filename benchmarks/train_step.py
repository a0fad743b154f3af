"""Train-step throughput on CPU: flame's Trainer vs transformers' LlamaForCausalLM.

Both train the SmolLM2-135M shape (gin_configs/models/smollm2_135m_shape.gin:
30 layers, width 576, 9 query / 3 KV heads of 64, SwiGLU MLP 1536, vocabulary
49152, tied embeddings, RoPE theta 1e5), randomly initialised, in float32, on
the same batch: `--batch` sequences × `--length` random token ids, next-token
loss on every position (targets = the ids shifted by one). Optimizers match:
AdamW (b1 0.9, b2 0.999, eps 1e-8, no weight decay, constant learning rate)
after global-norm clipping to 1.0 — flame.optimizers.adamw in ours,
torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW in transformers'.

Each framework runs in its own child process (so thread pools do not compete
and peak RSS is per framework), one after the other, with the same CPU
affinity: torch.set_num_threads(cores) and XLA's CPU thread pool over the same
cores. The first `--warmup` steps (compilation, allocator warm-up) are not
timed; then `--steps` steps each are, one by one (synchronising after each).

  .venv/bin/python benchmarks/train_step.py [--steps 3] [--warmup 1]
      [--batch 4] [--length 256] [--output results.json]

Prints a Markdown table (seconds/step, tokens/s, peak RSS, first loss) and the
ratio ours/transformers of tokens/s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_GIN = "models/smollm2_135m_shape.gin"
LEARNING_RATE = 1e-4


def _cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover - non-Linux
    return os.cpu_count() or 1


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def smollm2_config():
  """DecoderConfig bound by the SmolLM2 shape gin file (plus optional overrides)."""
  import gin
  from flame import gin_utils
  from flame.models import decoder
  gin.clear_config()
  gin_utils.parse([MODEL_GIN], finalize=False)
  config = decoder.DecoderConfig()
  gin.clear_config()
  return config


def random_tokens(batch: int, length: int, vocab_size: int, seed: int = 0):
  import numpy as np
  rng = np.random.default_rng(seed)
  return rng.integers(1, vocab_size, size=(batch, length + 1), dtype=np.int32)


def _timed(step_fn, warmup: int, steps: int):
  losses, times = [], []
  for i in range(warmup + steps):
    start = time.perf_counter()
    loss = step_fn()
    elapsed = time.perf_counter() - start
    losses.append(loss)
    if i >= warmup:
      times.append(elapsed)
  return losses, times


def run_flame(args) -> dict:
  import jax
  import numpy as np
  from flame import optimizers, partitioning, trainer as trainer_lib
  from flame.models import decoder

  config = smollm2_config()
  if args.num_layers:
    config = decoder.DecoderConfig(**{**vars(config), "num_layers": args.num_layers})
  rss_after_import = _rss_bytes()
  tokens = random_tokens(args.batch, args.length, config.vocab_size, args.seed)
  batch = {
      "decoder_input_tokens": tokens[:, :-1],
      "decoder_target_tokens": tokens[:, 1:],
      "decoder_loss_weights": np.ones((args.batch, args.length), np.int32),
      "decoder_causal_attention": np.zeros((args.batch, args.length), np.int32),
  }
  model = decoder.DecoderOnlyModel(config)
  schedule = optimizers.learning_rate_schedule(LEARNING_RATE, decay="constant")
  partitioner = partitioning.Partitioner((1, 1, 1), devices=jax.devices("cpu")[:1])
  trainer = trainer_lib.Trainer(model, optimizers.adamw(learning_rate=schedule, clip_norm=1.0),
                                partitioner, schedule)
  lengths = {"inputs": args.length - 1, "targets": 1}  # PrefixLM: inputs + targets = length
  assert model.model_feature_shapes(args.batch, lengths)["decoder_input_tokens"] == (
      args.batch, args.length)
  state = trainer.init_state(args.batch, lengths)
  _, shardings = trainer.abstract_state(args.batch, lengths)
  train_step = trainer.compile_train_step(shardings)
  device_batch = partitioner.shard_batch(batch)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state["params"]))
  holder = {"state": state}

  def step():
    holder["state"], metrics = train_step(holder["state"], device_batch)
    return float(jax.block_until_ready(metrics["loss"]))

  compile_start = time.perf_counter()
  losses, times = _timed(step, args.warmup, args.steps)
  return {"framework": "flame (JAX/Flax)", "version": f"jax {jax.__version__}",
          "num_params": num_params, "losses": losses, "step_seconds": times,
          "warmup_seconds": time.perf_counter() - compile_start - sum(times),
          "rss_after_import": rss_after_import, "peak_rss": _peak_rss_bytes()}


def run_transformers(args) -> dict:
  import torch
  import transformers

  config = smollm2_config()
  torch.set_num_threads(_cores())
  torch.manual_seed(args.seed)
  rss_after_import = _rss_bytes()
  hf_config = transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.emb_dim,
      intermediate_size=config.mlp_dim, num_hidden_layers=args.num_layers or config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      head_dim=config.head_dim, hidden_act="silu", max_position_embeddings=max(2048, args.length),
      rms_norm_eps=config.norm_epsilon, tie_word_embeddings=config.tie_embeddings,
      rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
      attention_bias=False, mlp_bias=False, use_cache=False)
  model = transformers.LlamaForCausalLM(hf_config).to(torch.float32)
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999),
                                eps=1e-8, weight_decay=0.0)
  tokens = torch.from_numpy(random_tokens(args.batch, args.length, config.vocab_size,
                                          args.seed).astype("int64"))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  num_params = sum(p.numel() for p in model.parameters())  # tied: counted once

  def step():
    optimizer.zero_grad(set_to_none=True)
    logits = model(input_ids=inputs, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())

  start = time.perf_counter()
  losses, times = _timed(step, args.warmup, args.steps)
  return {"framework": "transformers LlamaForCausalLM (PyTorch)",
          "version": f"torch {torch.__version__}, transformers {transformers.__version__}, "
                     f"attn {model.config._attn_implementation}",
          "num_params": num_params, "losses": losses, "step_seconds": times,
          "warmup_seconds": time.perf_counter() - start - sum(times),
          "rss_after_import": rss_after_import, "peak_rss": _peak_rss_bytes()}


RUNNERS = {"flame": run_flame, "transformers": run_transformers}


def _child_env() -> dict:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"  # one CPU device; libtpu may be installed
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # No simulated multi-device CPU: one device using every core.
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


def run_child(framework: str, args) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f"--framework={framework}",
         f"--steps={args.steps}", f"--warmup={args.warmup}", f"--batch={args.batch}",
         f"--length={args.length}", f"--seed={args.seed}"]
  if args.num_layers:
    cmd.append(f"--num_layers={args.num_layers}")
  print(f"running {framework} …", file=sys.stderr, flush=True)
  proc = subprocess.run(cmd, env=_child_env(), stdout=subprocess.PIPE, text=True, cwd=REPO)
  if proc.returncode:
    raise SystemExit(f"{framework} benchmark failed (exit {proc.returncode})")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(result: dict, tokens_per_step: int) -> dict:
  seconds = sum(result["step_seconds"]) / len(result["step_seconds"])
  return {**result, "seconds_per_step": seconds, "tokens_per_second": tokens_per_step / seconds}


def markdown(results: list[dict], args, tokens_per_step: int) -> str:
  gib = 1024 ** 3
  lines = [f"SmolLM2-135M shape, float32, AdamW, batch {args.batch} × {args.length} tokens "
           f"({tokens_per_step} tokens/step), {args.steps} timed steps after {args.warmup} "
           f"warm-up, {_cores()} CPU cores ({platform.processor() or platform.machine()})",
           "",
           "| framework | params | s/step | tokens/s | warm-up s | peak RSS GiB | first loss |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    lines.append(f"| {r['framework']} | {r['num_params'] / 1e6:.1f}M | "
                 f"{r['seconds_per_step']:.2f} | {r['tokens_per_second']:.0f} | "
                 f"{r['warmup_seconds']:.1f} | {r['peak_rss'] / gib:.2f} | "
                 f"{r['losses'][0]:.3f} |")
  if len(results) == 2:
    ratio = results[0]["tokens_per_second"] / results[1]["tokens_per_second"]
    lines += ["", f"ours / transformers tokens/s: **{ratio:.2f}×**"]
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=3, help="timed steps per framework")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps (compile) first")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_layers", type=int, default=0,
                      help="override the 30 layers (quick checks only)")
  parser.add_argument("--output", default=None, help="also write the results as JSON here")
  parser.add_argument("--framework", choices=sorted(RUNNERS), default=None,
                      help="run only this one, in this process, and print JSON (internal)")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error("--steps must be >= 1")

  if args.framework:
    print(json.dumps(RUNNERS[args.framework](args)), flush=True)
    return {}

  tokens_per_step = args.batch * args.length
  results = [summarize(run_child(name, args), tokens_per_step)
             for name in ("flame", "transformers")]
  table = markdown(results, args, tokens_per_step)
  print(table)
  report = {"batch": args.batch, "length": args.length, "tokens_per_step": tokens_per_step,
            "steps": args.steps, "warmup": args.warmup, "cores": _cores(),
            "num_layers": args.num_layers or 30, "results": results,
            "ratio_ours_over_transformers": (results[0]["tokens_per_second"]
                                             / results[1]["tokens_per_second"]),
            "markdown": table}
  if args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  main()
