"""Does a judge exported with ``flame-convert --to=hf:`` give transformers flame's verdicts?

    python -m flame.autorater.hf_check --checkpoint=DIR[/STEP] --hf_dir=HF_DIR \\
        --input=pairs.jsonl [--max_input_length=1024] [--output=check.json]

`--input`: JSON lines ``{"prompt", "response_a", "response_b"}`` (``flame-rate``'s pairwise
schema, read and checked by `flame.autorater.records`). Each pair is scored in both orders by
flame (`Autorater`'s scorer) and by transformers' ``AutoModelForCausalLM`` loaded from
`--hf_dir` in float32, reading the verdict tokens after the same rendered input (the row
flame's decoder reads: BOS id 0, the input, the answer prefix); both verdicts come from those
log-probabilities as `Autorater.judge` makes them (`judgments.pairwise`). Prints and writes the largest
differences of the verdict log-probabilities and of P(A), and how many verdicts agree (pairs
whose P(A) is within 1e-3 of 0.5 are ties that rounding may flip, counted apart). Needs the
``hf`` extra (torch, transformers).
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Optional, Sequence

import numpy as np

from flame import cli, files
from flame.autorater import autorater, judgments, records

TIE = 1e-3  # |P(A) - 0.5| below this: a tie


def transformers_log_probs(model, queries) -> list[np.ndarray]:
  """float64 log p of each query's verdicts' first tokens under a transformers causal LM."""
  import torch  # pylint: disable=import-outside-toplevel
  out = []
  with torch.inference_mode():
    for query in queries:
      ids = torch.tensor([[0, *query.inputs, *query.verdicts.prefix]])
      logits = model(input_ids=ids).logits[0, -1].double()
      out.append(torch.log_softmax(logits, -1)[list(query.verdicts.first_tokens)].numpy())
  return out


def compare(rater: autorater.Autorater, model, requests: Sequence[autorater.Request]) -> dict:
  """flame's and transformers' verdicts on pairwise requests, both orders; per pair its
  verdicts, P(A) and verdict log-probabilities (per order) under each."""
  queries = [rater._query(r)[0] for request in requests  # pylint: disable=protected-access
             for r in (request, request.swapped())]
  log_probs = {"flame": [np.asarray(lp, np.float64)
                         for lp in rater.scorer.log_probs(rater.params, queries)],
               "transformers": transformers_log_probs(model, queries)}
  pairs = []
  for i, request in enumerate(requests):
    labels = rater.labels_of(request.spec)
    pair = {}
    for side, lps in log_probs.items():
      verdict = judgments.pairwise(labels, lps[2 * i], lps[2 * i + 1])
      pair[side] = {"verdict": verdict.verdict, "p_a": verdict.probabilities["A"],
                    "swap_consistent": verdict.swap_consistent,
                    "log_probs": [lps[2 * i].tolist(), lps[2 * i + 1].tolist()]}
    pairs.append(pair)
  decided = [p for p in pairs if abs(p["flame"]["p_a"] - 0.5) > TIE]
  return {
      "pairs": len(pairs),
      "max_abs_log_prob_difference": float(max(np.max(np.abs(a - b)) for a, b in
                                               zip(*log_probs.values()))),
      "max_abs_p_a_difference": max(abs(p["flame"]["p_a"] - p["transformers"]["p_a"])
                                    for p in pairs),
      "decided": len(decided),
      "same_verdicts": sum(p["flame"]["verdict"] == p["transformers"]["verdict"]
                           for p in decided),
      "same_swap_consistency": sum(p["flame"]["swap_consistent"]
                                   == p["transformers"]["swap_consistent"] for p in decided),
      "verdicts": pairs,
  }


def read_requests(path: str) -> list[autorater.Request]:
  """The pairwise requests of a JSONL file; its bad lines (up to five) in one ValueError."""
  _, _, rows = records.read_records(path, records.Fields(), "pairwise")
  errors = records.first_errors(rows)
  if errors:
    bad = sum(1 for r in rows if r.error)
    raise ValueError(f"{bad} bad line(s): " + "; ".join(errors))
  if not rows:
    raise ValueError(f"{path}: no pairs")
  return [r.request for r in rows]


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(prog="python -m flame.autorater.hf_check",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", required=True, help="the flame judge (Orbax)")
  parser.add_argument("--hf_dir", required=True, help="its flame-convert --to=hf: export")
  parser.add_argument("--input", required=True, help="JSON lines {prompt, response_a, response_b}")
  parser.add_argument("--max_input_length", type=int, default=1024)
  parser.add_argument("--output", help="write the comparison here (JSON)")
  parser.add_argument("--debug", action="store_true")
  args = parser.parse_args(argv)
  cli.setup_logging()
  requests = read_requests(args.input)
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
  model.eval()
  rater = autorater.Autorater.load(args.checkpoint, max_input_length=args.max_input_length)
  result = compare(rater, model, requests)
  print(f"{result['pairs']} pairs, both orders: largest |log p difference| "
        f"{result['max_abs_log_prob_difference']:.2e}, largest |P(A) difference| "
        f"{result['max_abs_p_a_difference']:.2e}; same verdict on {result['same_verdicts']} of "
        f"{result['decided']} decided pairs, same swap consistency on "
        f"{result['same_swap_consistency']}")
  if args.output:
    files.write_text_atomically(args.output, json.dumps(result, indent=1) + "\n")
  return result


if __name__ == "__main__":
  cli.console("python -m flame.autorater.hf_check", main)
