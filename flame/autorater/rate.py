"""flame-rate: verdicts for every line of a JSONL file.

    flame-rate --checkpoint=DIR --input=pairs.jsonl --output=verdicts.jsonl [options]

Input schemas and field flags: `flame.autorater.records`. Output: one JSON line per input
line, in order: ``line``, ``id``, ``verdict``, ``probabilities``, ``mass``, ``truncated``,
``swap_consistent`` (pairwise with swap), ``expected_rating`` (pointwise), and for
RewardBench input ``subset``, ``chosen`` (A or B), ``p_chosen`` and ``correct``; for input
with a known answer ``gold`` and ``correct``; for a bad line skipped with
``--skip_bad_lines``, ``error`` instead of a verdict.

Atomic and resumable: lines go to ``OUTPUT.partial`` in chunks (flushed and fsynced), with
``OUTPUT.partial.json`` recording the input's sha256 and the settings; the finished file is
renamed to OUTPUT. A killed run rerun with the same command continues after the last
complete chunk line (a different input or settings is refused). Summary (counts, swap
consistency, RewardBench accuracy per subset and category) printed at the end and written to
``OUTPUT.summary.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Optional, Sequence

if __name__ == "__main__":
  from flame.autorater import rate as _importable
  sys.exit(_importable.main())


from flame import cli, distributed, files, progress
from flame.autorater import records as records_lib
from flame.autorater import rewardbench

SUMMARY_SUFFIX = ".summary.json"


class RateError(ValueError):
  """A problem with the command's inputs; printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="flame-rate", description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True,
                 help="flame checkpoint: MODEL_DIR, checkpoints dir or dir/<step>")
  p.add_argument("--input", required=True, help="JSONL file to rate")
  p.add_argument("--output", required=True, help="JSONL file of verdicts (written atomically)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--vocabulary", default=None,
                 help="bytes | smollm2 | t5 (default: by the model's vocabulary size)")
  p.add_argument("--schema", choices=records_lib.SCHEMAS, default=None,
                 help="input schema (default: detected from the first line)")
  p.add_argument("--kind", choices=("pairwise", "pointwise", "classification"), default=None)
  p.add_argument("--scale", default="1,5", help="pointwise: low,high integers")
  p.add_argument("--labels", default="Yes,No", help="classification: comma-separated labels")
  p.add_argument("--instructions", default=None,
                 help="a FLAMe task name, or free text replacing the default description")
  for field in ("prompt", "chosen", "rejected", "response", "label", "id", "subset"):
    p.add_argument(f"--{field}_field", default=field)
  p.add_argument("--a_field", default="response_a")
  p.add_argument("--b_field", default="response_b")
  p.add_argument("--no_swap", action="store_true",
                 help="score pairs in the given order only (default: both orders, averaged)")
  p.add_argument("--batch_size", type=int, default=8, help="rows per forward pass")
  p.add_argument("--max_input_length", type=int, default=1024,
                 help="tokens of a rendered input, EOS included; longer ones are truncated "
                      "by the format's rule and counted")
  cli.add_dtype_flag(p)
  p.add_argument("--chunk_size", type=int, default=256,
                 help="lines scored and written (fsynced) at a time: the resume granularity")
  p.add_argument("--skip_bad_lines", action="store_true",
                 help="write an error line for a bad input line instead of stopping")
  p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
  p.add_argument("--no_progress", action="store_true")
  p.add_argument("--debug", action="store_true", help="tracebacks for every error")
  distributed.add_flags(p)
  return p


def _fields(args) -> records_lib.Fields:
  try:
    low, high = (int(v) for v in args.scale.split(","))
  except ValueError:
    raise RateError(f"--scale={args.scale!r}: expected two integers low,high") from None
  labels = tuple(v.strip() for v in args.labels.split(",") if v.strip())
  return records_lib.Fields(
      prompt=args.prompt_field, chosen=args.chosen_field, rejected=args.rejected_field,
      response_a=args.a_field, response_b=args.b_field, response=args.response_field,
      label=args.label_field, id=args.id_field, subset=args.subset_field,
      instructions=args.instructions, scale=(low, high), labels=labels)


def _settings(args, schema: str) -> dict[str, Any]:
  """What the output depends on besides the input file: a resumed run must match it."""
  keys = ("checkpoint", "step", "vocabulary", "kind", "scale", "labels", "instructions",
          "prompt_field", "chosen_field", "rejected_field", "response_field", "label_field",
          "id_field", "subset_field", "a_field", "b_field", "no_swap", "max_input_length", "dtype")
  return {"schema": schema, **{k: getattr(args, k) for k in keys}}


def output_line(record: records_lib.Record, verdict, truncated: bool) -> dict[str, Any]:
  """The output JSON object of one input record."""
  out: dict[str, Any] = {"line": record.line, "id": record.record_id}
  if record.error:
    out["error"] = record.error
    return out
  out.update(verdict.to_json())
  out["truncated"] = truncated
  if record.chosen is not None:
    out["subset"] = record.subset
    out["chosen"] = record.chosen
    out["p_chosen"] = verdict.probabilities[record.chosen]
    out["correct"] = verdict.verdict == record.chosen
  elif record.gold is not None:
    out["gold"] = record.gold
    out["correct"] = verdict.verdict == record.gold
  return out


def _resume(partial: str, state_path: str, state: dict) -> int:
  """Complete lines already in `partial` (a torn last line is cut off); 0 for a fresh start."""
  if not os.path.exists(partial):
    return 0
  try:
    with open(state_path, encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, json.JSONDecodeError):
    saved = None
  if saved != state:
    raise RateError(f"{partial} is left from a run with another input or settings; delete it "
                    f"(and {state_path}) to start over")
  with open(partial, "rb") as f:
    data = f.read()
  keep = data[:data.rfind(b"\n") + 1]
  if len(keep) != len(data):
    with open(partial, "r+b") as f:
      f.truncate(len(keep))
  return keep.count(b"\n")


def summarize(lines: Sequence[dict], schema: str) -> dict[str, Any]:
  """Counts and scores of a finished output file's lines (one per input line)."""
  rated = [l for l in lines if "error" not in l]
  summary: dict[str, Any] = {"lines": len(lines), "rated": len(rated),
                             "bad_lines": len(lines) - len(rated),
                             "truncated": sum(bool(l["truncated"]) for l in rated)}
  swaps = [l["swap_consistent"] for l in rated if "swap_consistent" in l]
  if swaps:
    summary["swap_consistency"] = sum(swaps) / len(swaps)
  judged = [l for l in rated if "correct" in l]
  if judged:
    summary["accuracy"] = sum(l["correct"] for l in judged) / len(judged)
  if schema == "rewardbench" and judged:
    subsets = rewardbench.subset_accuracies([l["subset"] or "(none)" for l in judged],
                                            [float(l["correct"]) for l in judged])
    summary["rewardbench"] = rewardbench.report(subsets).to_json()
  if schema in ("classification", "unified") and judged and "gold" in judged[0]:
    try:
      summary["balanced_accuracy"] = rewardbench.balanced_accuracy(
          [l["gold"] for l in judged], [l["verdict"] for l in judged])
    except ValueError:
      pass
  return summary


def rate(args: argparse.Namespace) -> dict[str, Any]:
  """Runs flame-rate; returns the summary."""
  from flame.autorater import autorater  # pylint: disable=import-outside-toplevel

  output = os.path.abspath(args.output)
  partial, state_path = output + ".partial", output + ".partial.json"
  files.check_output("--output", args.output, [("--input", args.input),
                                               ("--checkpoint", args.checkpoint)])
  if os.path.exists(output) and not args.overwrite:
    raise RateError(f"{output} exists; pass --overwrite to replace it")
  if not os.path.isfile(args.input):
    raise RateError(f"--input={args.input}: no such file")
  if args.chunk_size < 1:
    raise RateError(f"--chunk_size must be positive, got {args.chunk_size}")
  try:
    schema, _, records = records_lib.read_records(args.input, _fields(args), args.schema,
                                                  args.kind)
  except records_lib.InputError as e:
    raise RateError(str(e)) from None
  bad = [r for r in records if r.error]
  if bad and not args.skip_bad_lines:
    shown = "\n  ".join(records_lib.first_errors(records))
    raise RateError(f"{len(bad)} of {len(records)} lines of {args.input} cannot be rated "
                    f"(nothing was written):\n  {shown}\nfix them, or pass --skip_bad_lines to "
                    "write an error line for each and rate the rest")
  state = {"input_sha256": files.sha256_of(args.input), **_settings(args, schema)}
  # Every process of a multi-process job rates every line (each feeding its share of each
  # batch); process 0 alone writes, the others wait for it where they read what it wrote.
  leader = distributed.is_leader()
  if leader:
    done = _resume(partial, state_path, state)
  distributed.barrier(f"flame-rate-resumed:{output}")
  if not leader:
    done = _resume(partial, state_path, state)
  rater = autorater.Autorater.load(args.checkpoint, args.step, args.vocabulary, args.dtype,
                                   batch_size=args.batch_size,
                                   max_input_length=args.max_input_length)
  if not done and leader:
    files.write_text_atomically(state_path, json.dumps(state, indent=1))
    open(partial, "wb").close()
  swap = not args.no_swap
  bar = progress.bar(len(records), "flame-rate", "pair" if schema in ("rewardbench", "pairwise")
                     else "item", not args.no_progress and leader, initial=done, smoothing=0.1)
  rows_per_item = 2 if swap and schema in ("rewardbench", "pairwise") else 1
  for start in range(done, len(records), args.chunk_size):
    chunk = records[start:start + args.chunk_size]
    good = [r for r in chunk if not r.error]
    flags: list = []
    verdicts = rater.judge([r.request for r in good], swap=swap,
                           on_batch=lambda n: bar.update(n / rows_per_item), truncated=flags)
    by_line = {r.line: (v, t) for r, v, t in zip(good, verdicts, flags)}
    text = "".join(json.dumps(output_line(r, *by_line.get(r.line, (None, False))),
                              ensure_ascii=False) + "\n" for r in chunk)
    if leader:
      with open(partial, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    bar.n = start + len(chunk)
    bar.refresh()
  bar.close()
  distributed.barrier(f"flame-rate-written:{output}")
  with open(partial, encoding="utf-8") as f:
    lines = [json.loads(l) for l in f]
  summary = summarize(lines, schema)
  summary.update(input=os.path.abspath(args.input), output=output, schema=schema)
  distributed.barrier(f"flame-rate-read:{output}")
  if leader:
    files.write_text_atomically(output + SUMMARY_SUFFIX, json.dumps(summary, indent=1) + "\n")
    os.replace(partial, output)
    os.remove(state_path)
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  lines = [f"rated {summary['rated']} of {summary['lines']} lines → {summary['output']}"]
  if summary["bad_lines"]:
    lines.append(f"  {summary['bad_lines']} bad lines written as errors (see 'error' fields)")
  if summary["truncated"]:
    lines.append(f"  {summary['truncated']} inputs over --max_input_length were truncated "
                 "(long prompts lose their front, then responses their end)")
  for key in ("accuracy", "balanced_accuracy", "swap_consistency"):
    if key in summary:
      lines.append(f"  {key.replace('_', ' ')}: {100 * summary[key]:.1f}%")
  if "rewardbench" in summary:
    rb = summary["rewardbench"]
    report = rewardbench.Report({s: (v["accuracy"], v["count"]) for s, v in
                                 rb["subsets"].items()}, rb["categories"], rb["overall"])
    lines += ["", rewardbench.to_markdown(report)]
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

  def body():
    distributed.initialize_from(args)
    return rate(args)
  return cli.run("flame-rate", body, format_summary, args.debug)

def console_main() -> None:
  sys.exit(main())
