"""Resumable stages: each runs once, records what it made, and is skipped when that record exists.

A stage is a name, a one-line description and a function of no arguments returning a
JSON-ready summary. `run_stages` runs the selected ones in order. Before a stage it prints
``[i/n] name: description (estimate …)``, after it ``[i/n] name done in T``; the summary is
then written atomically to ``WORK_DIR/stages/<name>.json`` with the elapsed time. A stage
whose record exists is skipped (``[i/n] name: done earlier, T``) and its summary read back, so
a killed pipeline rerun goes straight to the stage that was interrupted, which resumes from
whatever its own outputs hold (training runs resume from their checkpoints).

`keep_settings` guards that reuse: the settings a work dir's stages were made with are kept in
``WORK_DIR/settings.json``, and a rerun with other settings is refused while any stage record
is there (its records would otherwise stand for a run with the old settings).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence, TextIO

from flame import files


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  description: str
  run: Callable[[], dict]
  # Seconds it should take, given the records of the stages before it (None: no estimate).
  estimate: Callable[[dict[str, dict]], Optional[float]] = lambda done: None
  # Stages whose outputs it reads: each must be recorded already or run before it.
  needs: tuple[str, ...] = ()


def record_path(work_dir: str, name: str) -> str:
  return os.path.join(work_dir, "stages", f"{name}.json")


def read_record(work_dir: str, name: str) -> Optional[dict]:
  path = record_path(work_dir, name)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def keep_settings(work_dir: str, settings: dict[str, Any], stage_names: Sequence[str]) -> None:
  """Writes ``WORK_DIR/settings.json``; a ValueError naming what changed when the stages already
  recorded there were made with other settings (JSON-ready values compared)."""
  path = os.path.join(work_dir, "settings.json")
  settings = json.loads(json.dumps(settings, default=list))
  done = [n for n in stage_names if os.path.exists(record_path(work_dir, n))]
  if done and os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      before = json.load(f)
    changed = [k for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k)]
    if changed:
      details = "; ".join(_difference(k, before.get(k), settings.get(k)) for k in changed[:4])
      raise ValueError(f"{work_dir} holds stages ({', '.join(done)}) made with other settings: "
                       f"{details}. Use a new --work_dir, or delete {work_dir}/stages to redo "
                       f"every stage with these settings")
  files.write_text_atomically(path, json.dumps(settings, indent=1) + "\n")


def _difference(key: str, before: Any, now: Any) -> str:
  if isinstance(before, list) and isinstance(now, list):
    gone = [x for x in before if x not in now][:2]
    new = [x for x in now if x not in before][:2]
    return f"{key}: {gone} -> {new}"
  return f"{key}: {before!r} -> {now!r}"


def format_seconds(seconds: float) -> str:
  if seconds < 90:
    return f"{seconds:.0f} s"
  return f"{seconds / 60:.1f} min"


def select(stages: Sequence[Stage], names: Optional[Sequence[str]],
           work_dir: Optional[str] = None) -> list[Stage]:
  """The stages named (in pipeline order), all when `names` is None; unknown names are an
  error listing the known ones, and so is a stage whose `needs` are neither recorded in
  `work_dir` nor selected (checked before anything runs or is written)."""
  known = [s.name for s in stages]
  if names is not None:
    unknown = [n for n in names if n not in known]
    if unknown:
      raise ValueError(f"--stages: unknown stage(s) {unknown}; the stages are "
                       f"{', '.join(known)}")
  chosen = [s for s in stages if names is None or s.name in names]
  available = {s.name for s in chosen}
  if work_dir is not None:
    available |= {n for n in known if os.path.exists(record_path(work_dir, n))}
  for stage in chosen:
    missing = [n for n in stage.needs if n not in available]
    if missing:
      raise ValueError(f"--stages: {stage.name} needs {', '.join(missing)}, not done in "
                       f"{work_dir}; add {'it' if len(missing) == 1 else 'them'} to --stages "
                       "or leave --stages out")
  return chosen


def run_stages(work_dir: str, stages: Sequence[Stage], selected: Sequence[Stage],
               out: TextIO = sys.stdout) -> dict[str, dict]:
  """Runs `selected` (a subset of `stages`, in order), skipping those with a record; returns
  {stage name: record} for every stage of `stages` with a record at the end."""
  records = {s.name: r for s in stages if (r := read_record(work_dir, s.name)) is not None}
  total = len(selected)
  for i, stage in enumerate(selected, 1):
    prefix = f"[{i}/{total}] {stage.name}"
    if stage.name in records:
      print(f"{prefix}: done earlier, {format_seconds(records[stage.name]['seconds'])} "
            f"(delete {record_path(work_dir, stage.name)} to redo it)", file=out, flush=True)
      continue
    estimate = stage.estimate(records)
    print(f"{prefix}: {stage.description}"
          + (f" (estimate {format_seconds(estimate)})" if estimate is not None else ""),
          file=out, flush=True)
    start = time.time()
    summary = stage.run()
    record = {"stage": stage.name, "seconds": round(time.time() - start, 1),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "summary": summary}
    files.write_text_atomically(record_path(work_dir, stage.name),
                                json.dumps(record, indent=1, default=str) + "\n")
    records[stage.name] = record
    print(f"{prefix} done in {format_seconds(record['seconds'])}", file=out, flush=True)
  return records


def command_line(argv: Optional[Sequence[str]], parser) -> tuple[list[str], list[str], Any,
                                                                   Optional[list[str]]]:
  """(gin files, gin bindings, the parser's args, the --stages names or None) of a story's
  command line (`argv` None: sys.argv); logging set up as every console script's."""
  from flame import cli, files, gin_utils  # pylint: disable=import-outside-toplevel
  gin_files, bindings, rest = gin_utils.split_flags(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(rest)
  cli.setup_logging()
  files.check_output_writable("--work_dir", args.work_dir)
  names = [n.strip() for n in args.stages.split(",")] if args.stages else None
  return gin_files, bindings, args, names


def report_path(work_dir: str, records: dict[str, dict], out: TextIO = sys.stdout) -> str:
  """WORK_DIR/report.md, printed when the report stage has run."""
  report = os.path.join(os.path.abspath(work_dir), "report.md")
  if "report" in records:
    print(f"report: {report}", file=out)
  return report


def summaries(records: dict[str, dict]) -> dict[str, Any]:
  return {name: record["summary"] for name, record in records.items()}
