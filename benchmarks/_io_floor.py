"""The I/O floor of a merge: the least a program must do to read these checkpoints and write one.

Run by benchmarks/merge_vs_mergekit.py as its own subprocess, timed like the merges (imports
included): reads every input whole, one after the other, then writes one checkpoint of the
output's size (the last input). Orbax checkpoints: one Orbax restore each and one Orbax save.
Hugging Face folders (they have a config.json): safetensors' `load_file` of each file and one
`save_file`. No merging. Writes {"read_s": [...], "write_s": ..., "bytes_read": ...,
"bytes_written": ..., "format": ...}.

  python benchmarks/_io_floor.py RESULT.json OUT_DIR CHECKPOINT [CHECKPOINT ...]
"""
import glob
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from etils import epath  # noqa: E402

from flame.checkpoints import imported  # noqa: E402
from merging import io as merge_io  # noqa: E402


def read_whole(path: str) -> dict:
  source = merge_io.open_checkpoint(path)
  restore_args = imported.unflatten({k: ocp.RestoreArgs(restore_type=np.ndarray, dtype=v.dtype)
                                     for k, v in source.shapes.items()})
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  try:
    return checkpointer.restore(epath.Path(source.params_dir),
                                args=ocp.args.PyTreeRestore(restore_args=restore_args))
  finally:
    checkpointer.close()


def read_safetensors(directory: str) -> dict:
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  tensors = {}
  for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
    tensors.update(load_file(path))
  return tensors


def main(result_path: str, out_dir: str, *checkpoints: str) -> None:
  hf_format = all(os.path.isfile(os.path.join(p, "config.json")) for p in checkpoints)
  read_s, bytes_read, flat = [], 0, None
  for path in checkpoints:
    start = time.perf_counter()
    flat = read_safetensors(path) if hf_format else imported.flatten(read_whole(path))
    read_s.append(time.perf_counter() - start)
    bytes_read += sum(v.nbytes for v in flat.values())
  start = time.perf_counter()
  if hf_format:
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    os.makedirs(out_dir)
    save_file(flat, os.path.join(out_dir, "model.safetensors"))
  else:
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    checkpointer.save(epath.Path(out_dir) / "params",
                      args=ocp.args.StandardSave(imported.unflatten(flat)))
    checkpointer.close()
  write_s = time.perf_counter() - start
  with open(result_path, "w", encoding="utf-8") as f:
    json.dump({"read_s": read_s, "write_s": write_s, "bytes_read": bytes_read,
               "bytes_written": sum(v.nbytes for v in flat.values()),
               "format": "hf" if hf_format else "orbax"}, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
