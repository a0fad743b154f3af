"""Peak host memory of a streaming merge (run by tests/test_merging_io.py in a subprocess).

argv: output json path, output dir, method, memory budget, base checkpoint, experts...
Writes, in bytes:
  baseline: resident set after the imports and starting the JAX backend;
  compiled: resident set after merging one all-zero parameter of the checkpoints' first shape
    (XLA's compiler and compiled kernels, a constant of the process, not of the model);
  peak_after_12: peak resident set once 12 parameters are written;
  peak: peak resident set at the end.
Peaks are VmHWM of /proc/self/status: unlike getrusage's ru_maxrss, which Linux carries over
from the parent across fork + exec, it covers this process's address space only.
"""
import json
import os
import resource
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from merging import io, spec as spec_lib, staged_checkpoint  # noqa: E402


def status_bytes(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(field)


def peak_bytes() -> int:
  try:
    return status_bytes("VmHWM")
  except (OSError, KeyError):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


result_path, output_dir, method, budget, base, *experts = sys.argv[1:]
spec = spec_lib.make_spec(method, method_params={} if method == "task_arithmetic"
                          else {"density": 0.5})
device = jax.devices()[0]
io.release_freed_buffers()  # What stream_merge does first; here before the warm-up too.
baseline = status_bytes("VmRSS")
first = next(iter(io.open_checkpoint(base).shapes.values()))
zeros = jax.device_put(np.zeros(first.shape, first.dtype), device)
spec_lib.merge_tensor(spec, "warmup", zeros, [zeros] * len(experts),
                      out_dtype=first.dtype).block_until_ready()
del zeros
compiled = status_bytes("VmRSS")
peaks = []
write = staged_checkpoint.StagedCheckpoint.write


def recording_write(self, keys, values):
  write(self, keys, values)
  peaks.extend([peak_bytes()] * len(keys))  # One entry per parameter written.


staged_checkpoint.StagedCheckpoint.write = recording_write
io.stream_merge(spec, base, experts, output_dir, progress_bar=False, memory_budget=int(budget))
with open(result_path, "w") as f:
  json.dump({"baseline": baseline, "compiled": compiled, "peak_after_12": peaks[11],
             "peak": peak_bytes()}, f)
