"""Runs ``python -m merging.merge`` in this process with per-phase timers (a profiling driver).

Used by `benchmarks/merge_vs_mergekit.py --profile`; also runnable on its own::

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/_merge_profile.py --json_out=phases.json -- \\
      --config=merge.yml --output_dir=DIR --no_progress_bar

Wraps, without changing what they do, the functions of `merging.io` / `merging.spec` that a
streaming merge spends its time in and sums their wall time: the imports, reading checkpoint
metadata (`open_checkpoint`), per-batch Orbax reads (`ParameterReader.read`), the merge
kernels (`spec.merge_tensor`, synchronised with block_until_ready so that the time is not
billed to the write that follows), per-batch writes (`StagedCheckpoint.write`), finalize
(assembling the OCDBT stores and meta) and the source meta read. JAX's compile events
(`jax.monitoring`) are summed separately; they are part of the merge-kernel time. Nested
phases are not double-counted in `unaccounted`: only the top-level phases are subtracted.
A thread samples the process's RSS every 20 ms and records the peak per phase and the
phase and parameter being processed at the overall peak.
"""
from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time

_T0 = time.perf_counter()
_LAUNCH = float(os.environ.get("MERGE_PROFILE_LAUNCH_TIME", "nan"))  # time.time() of Popen


def main(argv):
  if "--" not in argv:
    raise SystemExit("usage: _merge_profile.py --json_out=FILE -- <merging.merge arguments>")
  split = argv.index("--")
  own, merge_args = argv[:split], argv[split + 1:]
  json_out = None
  for arg in own:
    if arg.startswith("--json_out="):
      json_out = arg.split("=", 1)[1]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, repo)
  startup = time.time() - _LAUNCH if _LAUNCH == _LAUNCH else None  # before this line ran

  totals: dict[str, float] = collections.defaultdict(float)
  counts: dict[str, int] = collections.defaultdict(int)
  events: dict[str, float] = collections.defaultdict(float)
  event_counts: dict[str, int] = collections.defaultdict(int)

  start = time.perf_counter()
  import jax  # pylint: disable=import-outside-toplevel
  from merging import io as merge_io, merge as merge_lib, spec as spec_lib  # pylint: disable=import-outside-toplevel
  totals["imports"] = time.perf_counter() - start
  counts["imports"] = 1

  def listener(event, duration_secs, **kwargs):
    del kwargs
    events[event] += duration_secs
    event_counts[event] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)

  # RSS sampler: the peak resident set per phase, and the phase + parameter at the peak.
  page = os.sysconf("SC_PAGE_SIZE")
  current = {"phase": "startup", "detail": None}
  peaks: dict[str, int] = collections.defaultdict(int)
  overall = {"rss": 0, "phase": None, "detail": None}
  stop = threading.Event()

  def sample():
    with open("/proc/self/statm", "rb") as statm:
      while not stop.is_set():
        statm.seek(0)
        rss = int(statm.read().split()[1]) * page
        phase = current["phase"]
        peaks[phase] = max(peaks[phase], rss)
        if rss > overall["rss"]:
          overall.update(rss=rss, phase=phase, detail=current["detail"])
        stop.wait(0.02)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()

  def timed(phase, fn, block=False, detail=None):
    def wrapper(*args, **kwargs):
      t = time.perf_counter()
      outer = dict(current)
      current["phase"] = phase
      if detail is not None:
        current["detail"] = detail(*args, **kwargs)
      try:
        result = fn(*args, **kwargs)
        if block:
          result = jax.block_until_ready(result)
        return result
      finally:
        totals[phase] += time.perf_counter() - t
        counts[phase] += 1
        current.update(outer)
    return wrapper

  merge_io.open_checkpoint = timed("open_checkpoint (metadata)", merge_io.open_checkpoint)
  batch_name = lambda keys: f"{'/'.join(keys[0])} (+{len(keys) - 1} more)"
  merge_io.ParameterReader.read = timed("read (one call per batch)",
                                        merge_io.ParameterReader.read,
                                        detail=lambda self, keys, *a, **k: batch_name(keys))
  spec_lib.merge_tensor = timed("merge kernels (incl. compile)", spec_lib.merge_tensor,
                                block=True, detail=lambda spec, name, *a, **k: name)
  from merging import staged_checkpoint  # pylint: disable=import-outside-toplevel
  staged = staged_checkpoint.StagedCheckpoint
  staged.write = timed("write (one save per batch)", staged.write,
                       detail=lambda self, keys, *a, **k: batch_name(keys))
  staged.finalize = timed("finalize (assemble + meta)", staged.finalize)
  staged.__init__ = timed("staging setup", staged.__init__)
  merge_io.Source.meta = timed("source meta read", merge_io.Source.meta)
  # --output_format=hf / HF inputs: the same phases, through the safetensors classes.
  merge_io.HFParameterReader.read = timed("read (one call per batch)",
                                          merge_io.HFParameterReader.read,
                                          detail=lambda self, keys, *a, **k: batch_name(keys))
  from merging import staged_hf  # pylint: disable=import-outside-toplevel
  staged_hf.StagedHFModel.write = timed("write (one save per batch)", staged_hf.StagedHFModel.write,
                                        detail=lambda self, keys, *a, **k: batch_name(keys))
  staged_hf.StagedHFModel.finalize = timed("finalize (assemble + meta)",
                                           staged_hf.StagedHFModel.finalize)

  run_start = time.perf_counter()
  current["phase"] = "other (inside main)"
  merge_lib.main(merge_args)
  total_main = time.perf_counter() - run_start
  stop.set()
  sampler.join()
  top_level = ["open_checkpoint (metadata)", "read (one call per batch)",
               "merge kernels (incl. compile)", "write (one save per batch)",
               "finalize (assemble + meta)", "source meta read", "staging setup"]
  result = {
      "interpreter_startup_s": startup,
      "script_to_main_s": run_start - _T0,
      "main_s": total_main,
      "phases": {k: {"seconds": totals[k], "calls": counts[k]} for k in totals},
      "unaccounted_in_main_s": total_main - sum(totals[k] for k in top_level),
      "peak_rss_gib_by_phase": {k: v / 2**30 for k, v in peaks.items()},
      "peak_rss": {"gib": overall["rss"] / 2**30, "phase": overall["phase"],
                   "parameter": overall["detail"]},
      "jax_events": {k: {"seconds": events[k], "calls": event_counts[k]}
                     for k in sorted(events, key=lambda e: -events[e])},
  }
  text = json.dumps(result, indent=2)
  if json_out:
    with open(json_out, "w", encoding="utf-8") as f:
      f.write(text)
  print(text)


if __name__ == "__main__":
  main(sys.argv[1:])
