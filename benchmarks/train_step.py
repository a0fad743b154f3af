"""Train-step throughput on CPU: flame's Trainer vs transformers' LlamaForCausalLM.

Both train the SmolLM2-135M shape (gin_configs/models/smollm2_135m_shape.gin: 30 layers,
width 576, 9 query / 3 KV heads of 64, SwiGLU MLP 1536, vocabulary 49152, tied embeddings,
RoPE theta 1e5), randomly initialised, float32 parameters and optimizer state, on the same
batch. Optimizers match: AdamW (b1 0.9, b2 0.999, eps 1e-8, no weight decay, constant
learning rate) after global-norm clipping to 1.0 — flame.optimizers.adamw in ours,
torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW in transformers'.

Two batch shapes:
- default (full sequence): `--batch` rows × `--length` random ids, next-token loss at every
  position.
- `--judge`: judge-shaped rows (8 × 512 unless given): each row one example of ~480 input
  tokens (464..480) and 16..32 target tokens, padding after; the loss on the targets only.
  Ours runs the output head at the 32 target positions of each row
  (`train.loss_positions_per_row`, as `flame-train` does by default); transformers gets
  labels -100 outside the targets (its loss, full logits).

Configurations (`--configs`, all by default), each in its own child process, one after the
other, on the same cores (torch.set_num_threads(cores); XLA's thread pool over them):
flame-float32, flame-bfloat16 (`DecoderConfig.dtype="bfloat16"`: bf16 matmuls, float32
softmax, norms, logsumexp and loss), transformers-float32 and transformers-bfloat16
(`torch.autocast("cpu", torch.bfloat16)`). The first `--warmup` steps (compilation,
allocator warm-up) are not timed, then `--steps` steps are, one by one; a configuration
whose warm-up step took longer than `--slow_seconds` is timed on one step only, and one that
has not finished within `--timeout` seconds is stopped and reported as a bound (on a CPU
without AVX512_BF16, PyTorch's bf16 matmuls run at 1-20 GFLOP/s: one autocast step of the
SmolLM2 shape takes tens of minutes).

It also measures the dots one layer runs (`--dots`, on by default): GFLOP/s of the forward
x @ W and the two gradient dots (dy @ Wᵀ, xᵀ @ dy) at the MLP's shape, float32 and bfloat16,
in JAX (XLA:CPU; bfloat16 as the model runs it, `flame.models.mixed.matmul`: bf16 operands,
float32 sums, the weight gradient through its custom VJP) and in PyTorch, next to the CPU's
peak (benchmarks/_cpu.py).

  .venv/bin/python benchmarks/train_step.py [--judge] [--steps 3] [--warmup 1]
      [--batch 8] [--length 512] [--configs flame-float32,…] [--no-dots] [--output r.json]

Prints Markdown tables and `ratio_vs_best`: our best configuration's tokens/s over
transformers' best configuration's.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _children  # noqa: E402  pylint: disable=wrong-import-position
import _cpu  # noqa: E402  pylint: disable=wrong-import-position

MODEL_GIN = "models/smollm2_135m_shape.gin"
LEARNING_RATE = 1e-4
CONFIGS = ("flame-float32", "flame-bfloat16", "transformers-float32", "transformers-bfloat16")
JUDGE_INPUTS, JUDGE_TARGETS = (464, 480), (16, 32)


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def smollm2_config(num_layers: int = 0, dtype: str = "float32"):
  """DecoderConfig bound by the SmolLM2 shape gin file (plus optional overrides)."""
  import gin
  from flame import gin_utils
  from flame.models import decoder
  gin.clear_config()
  gin_utils.parse([MODEL_GIN], finalize=False)
  config = decoder.DecoderConfig()
  gin.clear_config()
  return decoder.DecoderConfig(**{**vars(config), "num_layers": num_layers or config.num_layers,
                                  "dtype": dtype})


def example_batch(args, vocab_size: int):
  """(ids [batch, length + 1], loss mask [batch, length]): position t predicts ids[t + 1].

  Full-sequence mode: every position counts. Judge mode: row r holds inputs of n_r tokens
  then targets of m_r tokens (then zeros); the positions predicting a target count.
  """
  import numpy as np
  rng = np.random.default_rng(args.seed)
  ids = rng.integers(1, vocab_size, size=(args.batch, args.length + 1), dtype=np.int32)
  mask = np.ones((args.batch, args.length), np.int32)
  if args.judge:
    mask[:] = 0
    for r in range(args.batch):
      n, m = rng.integers(*JUDGE_INPUTS, endpoint=True), rng.integers(*JUDGE_TARGETS,
                                                                         endpoint=True)
      ids[r, 1 + n + m:] = 0
      mask[r, n:n + m] = 1  # position n - 1 + j + 1 predicts target j (ids[n + 1 + j])
  return ids, mask


def step_flops(config, args) -> float:
  """Model FLOPs of one training step (forward × 3), the same count for every configuration
  so that GFLOP/s compare as speeds do: the layers' projections at every position,
  attention's two [length × length] products per head (the full square, as PaLM's MFU
  counts it; a causal kernel may skip half), the output head where the loss reads (every
  position; --judge: 32 per row). Work a configuration does beyond these (transformers' head
  at every position of a judge row) shows as lower GFLOP/s."""
  head_positions = JUDGE_TARGETS[1] if args.judge else args.length
  c = config
  projections = c.emb_dim * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  per_token = 2 * c.num_layers * (projections + 3 * c.emb_dim * c.mlp_dim)
  tokens = args.batch * args.length
  attention = 2 * 2 * c.num_layers * args.batch * args.length ** 2 * c.num_heads * c.head_dim
  head = 2 * args.batch * head_positions * c.emb_dim * c.vocab_size
  return 3.0 * (per_token * tokens + attention + head)


def _timed(step_fn, warmup: int, steps: int, slow_seconds: float):
  losses, times, warmup_seconds = [], [], 0.0
  for i in range(warmup + steps):
    start = time.perf_counter()
    loss = step_fn()
    elapsed = time.perf_counter() - start
    losses.append(loss)
    if i < warmup:
      warmup_seconds += elapsed
      continue
    times.append(elapsed)
    if warmup_seconds > slow_seconds:
      break
  return losses, times, warmup_seconds


def run_flame(args, dtype: str) -> dict:
  import jax
  import numpy as np
  from flame import optimizers, partitioning, trainer as trainer_lib
  from flame.models import decoder

  config = smollm2_config(args.num_layers, dtype)
  rss_after_import = _rss_bytes()
  ids, mask = example_batch(args, config.vocab_size)
  batch = {"decoder_input_tokens": ids[:, :-1], "decoder_target_tokens": ids[:, 1:],
           "decoder_loss_weights": mask,
           "decoder_causal_attention": np.zeros_like(mask)}
  model = decoder.DecoderOnlyModel(config)
  schedule = optimizers.learning_rate_schedule(LEARNING_RATE, decay="constant")
  partitioner = partitioning.Partitioner((1, 1, 1), devices=jax.devices("cpu")[:1])
  loss_positions = JUDGE_TARGETS[1] if args.judge else None
  trainer = trainer_lib.Trainer(model, optimizers.adamw(learning_rate=schedule, clip_norm=1.0),
                                partitioner, schedule, loss_positions=loss_positions)
  assert trainer.fits_loss_positions(batch)
  lengths = {"inputs": args.length - 1, "targets": 1}  # PrefixLM: inputs + targets = length
  state = trainer.init_state(args.batch, lengths)
  _, shardings = trainer.abstract_state(args.batch, lengths)
  train_step = trainer.compile_train_step(shardings)
  device_batch = partitioner.shard_batch(batch)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state["params"]))
  holder = {"state": state}

  def step():
    holder["state"], metrics = train_step(holder["state"], device_batch)
    return float(jax.block_until_ready(metrics["loss"]))

  losses, times, warmup = _timed(step, args.warmup, args.steps, args.slow_seconds)
  return {"framework": "flame", "version": f"jax {jax.__version__}", "num_params": num_params,
          "losses": losses, "step_seconds": times, "warmup_seconds": warmup,
          "flops_per_step": step_flops(config, args),
          "rss_after_import": rss_after_import, "peak_rss": _peak_rss_bytes()}


def run_transformers(args, dtype: str) -> dict:
  import contextlib
  import torch
  import transformers

  config = smollm2_config(args.num_layers)
  torch.set_num_threads(_cpu.cores())
  torch.manual_seed(args.seed)
  rss_after_import = _rss_bytes()
  hf_config = transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.emb_dim,
      intermediate_size=config.mlp_dim, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      head_dim=config.head_dim, hidden_act="silu", max_position_embeddings=max(2048, args.length),
      rms_norm_eps=config.norm_epsilon, tie_word_embeddings=config.tie_embeddings,
      rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
      attention_bias=False, mlp_bias=False, use_cache=False)
  model = transformers.LlamaForCausalLM(hf_config).to(torch.float32)
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999),
                                eps=1e-8, weight_decay=0.0)
  ids, mask = example_batch(args, config.vocab_size)
  ids = torch.from_numpy(ids.astype("int64"))
  inputs, labels = ids[:, :-1], ids[:, 1:].clone()
  labels[torch.from_numpy(mask) == 0] = -100
  num_params = sum(p.numel() for p in model.parameters())  # tied: counted once

  def autocast():
    if dtype == "bfloat16":
      return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()

  def step():
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      logits = model(input_ids=inputs, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             labels.reshape(-1), ignore_index=-100)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())

  losses, times, warmup = _timed(step, args.warmup, args.steps, args.slow_seconds)
  return {"framework": "transformers",
          "version": f"torch {torch.__version__}, transformers {transformers.__version__}, "
                     f"attn {model.config._attn_implementation}",
          "num_params": num_params, "losses": losses, "step_seconds": times,
          "warmup_seconds": warmup, "flops_per_step": step_flops(config, args),
          "rss_after_import": rss_after_import, "peak_rss": _peak_rss_bytes()}


# ---- the dots of one layer -------------------------------------------------------------------
DOT_SHAPE = (4096, 576, 1536)  # tokens (8 × 512), width, MLP width
DOTS = ("forward x@W", "input grad dy@Wᵀ", "weight grad xᵀ@dy")


def _dot_rate(fn, repeats: int = 5) -> float:
  fn()
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  seconds = (time.perf_counter() - start) / repeats
  m, k, n = DOT_SHAPE
  return 2 * m * k * n / seconds / 1e9


def run_dots_jax(args, dtype: str) -> dict:
  del args
  import jax
  import jax.numpy as jnp
  m, k, n = DOT_SHAPE
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x, w, dy = (jax.random.normal(key, shape, jnp.dtype(dtype))
              for key, shape in zip(keys, [(m, k), (k, n), (m, n)]))
  if dtype == "bfloat16":  # as the model computes them: flame.models.mixed, float32 sums
    from flame.models import mixed
    fns = [jax.jit(mixed.matmul), jax.jit(lambda dy, w: mixed.matmul(dy, w, True)),
           jax.jit(lambda x, dy: jax.grad(lambda w: jnp.vdot(mixed.matmul(x, w), dy))(w))]
    w = w.astype(jnp.float32)  # float32 master weights, as in training
  else:
    fns = [jax.jit(lambda x, w: x @ w), jax.jit(lambda dy, w: dy @ w.T),
           jax.jit(lambda x, dy: x.T @ dy)]
  operands = [(x, w), (dy, w), (x, dy)]
  return {"framework": "flame", "version": f"jax {jax.__version__}",
          "gflops": {name: _dot_rate(lambda f=f, a=a: jax.block_until_ready(f(*a)))
                     for name, f, a in zip(DOTS, fns, operands)}}


def run_dots_torch(args, dtype: str) -> dict:
  del args
  import torch
  torch.set_num_threads(_cpu.cores())
  m, k, n = DOT_SHAPE
  t = getattr(torch, dtype)
  x, w, dy = torch.randn(m, k, dtype=t), torch.randn(k, n, dtype=t), torch.randn(m, n, dtype=t)
  fns = [lambda: x @ w, lambda: dy @ w.T, lambda: x.T @ dy]
  return {"framework": "transformers", "version": f"torch {torch.__version__}",
          "gflops": {name: _dot_rate(f) for name, f in zip(DOTS, fns)}}


RUNNERS = {"flame": run_flame, "transformers": run_transformers,
           "dots_flame": run_dots_jax, "dots_transformers": run_dots_torch}


def run_child(name: str, args) -> dict:
  return _children.run(__file__, name, [
      f"--steps={args.steps}", f"--warmup={args.warmup}", f"--batch={args.batch}",
      f"--length={args.length}", f"--seed={args.seed}", f"--slow_seconds={args.slow_seconds}",
      f"--num_layers={args.num_layers}"] + (["--judge"] if args.judge else []), args.timeout)


def summarize(result: dict, tokens_per_step: int) -> dict:
  if "timed_out" in result:  # Not even warm-up + one step within --timeout: a bound only.
    return {**result, "tokens_per_second": 0.0}
  seconds = sum(result["step_seconds"]) / len(result["step_seconds"])
  return {**result, "seconds_per_step": seconds, "tokens_per_second": tokens_per_step / seconds,
          "gflops": result["flops_per_step"] / seconds / 1e9}


def best(results: list[dict], framework: str) -> dict:
  return max((r for r in results if r["framework"] == framework and "timed_out" not in r),
             key=lambda r: r["tokens_per_second"])


def markdown(results: list[dict], dots: list[dict], args, tokens_per_step: int) -> str:
  gib = 1024 ** 3
  cpu = _cpu.describe()
  shape = (f"judge rows: inputs {JUDGE_INPUTS[0]}–{JUDGE_INPUTS[1]} + targets "
           f"{JUDGE_TARGETS[0]}–{JUDGE_TARGETS[1]}, loss on targets only" if args.judge else
           "next-token loss at every position")
  lines = [f"SmolLM2-135M shape, AdamW, batch {args.batch} × {args.length} tokens ({shape}), "
           f"{args.steps} timed steps after {args.warmup} warm-up; {_cpu.quote()}", "",
           "| configuration | s/step | tokens/s | GFLOP/s (% of peak) | warm-up s | peak RSS GiB "
           "| first loss |", "|---|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    if "timed_out" in r:
      lines.append(f"| {r['config']} | > {r['timed_out'] / (1 + args.warmup):.0f} | "
                   f"< {tokens_per_step * (1 + args.warmup) / r['timed_out']:.1f} | | "
                   f"(warm-up + 1 step not done in {r['timed_out']:.0f} s) | | |")
      continue
    peak = cpu["peak_gflops"][r["config"].split("-")[1]]
    lines.append(f"| {r['config']} | {r['seconds_per_step']:.2f} | "
                 f"{r['tokens_per_second']:.0f} | {r['gflops']:.0f} ({100 * r['gflops'] / peak:.0f}%) "
                 f"| {r['warmup_seconds']:.1f} | {r['peak_rss'] / gib:.2f} | {r['losses'][0]:.3f} |")
  frameworks = {r["framework"] for r in results}
  if frameworks == {"flame", "transformers"}:
    ours, theirs = best(results, "flame"), best(results, "transformers")
    lines += ["", f"ours at best ({ours['config']}) / transformers at best ({theirs['config']}) "
                  f"tokens/s: **{ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}×**"]
  if dots:
    m, k, n = DOT_SHAPE
    lines += ["", f"Dots of one MLP projection ([{m}×{k}] @ [{k}×{n}]), GFLOP/s:", "",
              "| framework | dtype | " + " | ".join(DOTS) + " |",
              "|---|---|" + "---:|" * len(DOTS)]
    for d in dots:
      lines.append(f"| {d['framework']} ({d['version']}) | {d['dtype']} | "
                   + " | ".join(f"{d['gflops'][name]:.0f}" for name in DOTS) + " |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--judge", action="store_true",
                      help="judge-shaped rows (defaults: batch 8 × 512), loss on targets")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps (compile) first")
  parser.add_argument("--batch", type=int, default=None, help="rows (4; --judge: 8)")
  parser.add_argument("--length", type=int, default=None, help="tokens per row (256; --judge: 512)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--configs", default=",".join(CONFIGS),
                      help=f"comma-separated subset of {','.join(CONFIGS)}")
  parser.add_argument("--no-dots", dest="dots", action="store_false",
                      help="skip the per-dot GFLOP/s table")
  parser.add_argument("--slow_seconds", type=float, default=120.0,
                      help="a configuration whose warm-up took longer is timed on one step")
  parser.add_argument("--timeout", type=float, default=1200.0,
                      help="seconds a configuration may take in all (a slower one is reported "
                           "as a bound and left out of the ratio)")
  parser.add_argument("--num_layers", type=int, default=0,
                      help="override the 30 layers (quick checks only)")
  parser.add_argument("--output", default=None, help="also write the results as JSON here")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.batch = args.batch or (8 if args.judge else 4)
  args.length = args.length or (512 if args.judge else 256)
  if args.steps < 1:
    parser.error("--steps must be >= 1")
  if args.judge and args.length < JUDGE_INPUTS[1] + JUDGE_TARGETS[1]:
    parser.error(f"--judge needs --length >= {JUDGE_INPUTS[1] + JUDGE_TARGETS[1]}")
  configs = [c for c in args.configs.split(",") if c]
  unknown = sorted(set(configs) - set(CONFIGS))
  if unknown:
    parser.error(f"--configs: unknown {unknown}; expected a subset of {list(CONFIGS)}")

  if args.child:
    runner, dtype = args.child.rsplit("-", 1)
    print(json.dumps({**RUNNERS[runner.replace("-", "_")](args, dtype), "dtype": dtype}),
          flush=True)
    return {}

  tokens_per_step = args.batch * args.length
  results = [summarize(run_child(name, args), tokens_per_step) for name in configs]
  dots = ([run_child(f"dots-{framework}-{dtype}", args)
           for framework in ("flame", "transformers") for dtype in ("float32", "bfloat16")]
          if args.dots else [])
  table = markdown(results, dots, args, tokens_per_step)
  print(table)
  report = {"mode": "judge" if args.judge else "full_sequence", "batch": args.batch,
            "length": args.length, "tokens_per_step": tokens_per_step, "steps": args.steps,
            "warmup": args.warmup, "cpu": _cpu.describe(), "num_layers": args.num_layers or 30,
            "results": results, "dots": dots, "markdown": table}
  if {r["framework"] for r in results} == {"flame", "transformers"}:
    ours, theirs = best(results, "flame"), best(results, "transformers")
    report["ratio_vs_best"] = ours["tokens_per_second"] / theirs["tokens_per_second"]
    report["best"] = {"flame": ours["config"], "transformers": theirs["config"]}
  if args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  main()
