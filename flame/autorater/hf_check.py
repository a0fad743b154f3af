"""Does a judge exported with ``flame-convert --to=hf:`` give transformers flame's verdicts?

    python -m flame.autorater.hf_check --checkpoint=DIR[/STEP] --hf_dir=HF_DIR \\
        --input=pairs.jsonl [--max_input_length=1024] [--output=check.json]

`--input`: JSON lines ``{"prompt", "response_a", "response_b"}``. Each pair is judged in both
orders by flame (`Autorater`) and by transformers' ``AutoModelForCausalLM`` loaded from
`--hf_dir` in float32, reading the verdict tokens after the same rendered input (the row
flame's decoder reads: BOS id 0, the input, the answer prefix). Prints and writes the largest
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
from flame.autorater import autorater, judgments, prompts

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


def compare(rater: autorater.Autorater, model, pairs: Sequence[tuple[str, str, str]]) -> dict:
  """flame's and transformers' verdicts on (prompt, A, B) pairs, both orders."""
  spec = prompts.task_spec("pairwise")
  requests = [autorater.Request.of(spec, p, (a, b)) for p, a, b in pairs]
  ours = rater.judge(requests, swap=True)
  queries = [rater._query(r)[0] for request in requests  # pylint: disable=protected-access
             for r in (request, request.swapped())]
  ours_lp = rater.scorer.log_probs(rater.params, queries)
  theirs_lp = transformers_log_probs(model, queries)
  labels = rater.labels_of(spec)
  theirs = [judgments.pairwise(labels, theirs_lp[2 * i], theirs_lp[2 * i + 1])
            for i in range(len(requests))]
  decided = [i for i, v in enumerate(ours) if abs(v.probabilities["A"] - 0.5) > TIE]
  return {
      "pairs": len(requests),
      "max_abs_log_prob_difference": float(max(np.max(np.abs(np.asarray(a) - b))
                                               for a, b in zip(ours_lp, theirs_lp))),
      "max_abs_p_a_difference": float(max(abs(o.probabilities["A"] - t.probabilities["A"])
                                          for o, t in zip(ours, theirs))),
      "decided": len(decided),
      "same_verdicts": sum(ours[i].verdict == theirs[i].verdict for i in decided),
      "same_swap_consistency": sum(ours[i].swap_consistent == theirs[i].swap_consistent
                                   for i in decided),
      "verdicts": [{"flame": o.verdict, "transformers": t.verdict,
                    "p_a_flame": o.probabilities["A"], "p_a_transformers": t.probabilities["A"]}
                   for o, t in zip(ours, theirs)],
  }


def read_pairs(path: str) -> list[tuple[str, str, str]]:
  pairs = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        pairs.append((row["prompt"], row["response_a"], row["response_b"]))
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{number}: expected a JSON object with prompt, response_a and "
                         f"response_b ({type(e).__name__}: {e})") from None
  if not pairs:
    raise ValueError(f"{path}: no pairs")
  return pairs


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
  pairs = read_pairs(args.input)
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
  model.eval()
  rater = autorater.Autorater.load(args.checkpoint, max_input_length=args.max_input_length)
  result = compare(rater, model, pairs)
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
