"""The I/O floor of a merge: the least a program must do to merge these checkpoints with Orbax.

Run by benchmarks/merge_vs_mergekit.py as its own subprocess, timed like the merges (imports
included): restores every input checkpoint whole with one Orbax call each, one after the
other, then saves one checkpoint of the output's size (the last input) with one Orbax call.
No merging. Writes {"read_s": [...], "write_s": ..., "bytes_read": ..., "bytes_written": ...}.

  python benchmarks/_io_floor.py RESULT.json OUT_DIR CHECKPOINT [CHECKPOINT ...]
"""
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


def main(result_path: str, out_dir: str, *checkpoints: str) -> None:
  read_s, bytes_read, tree = [], 0, None
  for path in checkpoints:
    start = time.perf_counter()
    tree = read_whole(path)
    read_s.append(time.perf_counter() - start)
    bytes_read += sum(v.nbytes for v in imported.flatten(tree).values())
  start = time.perf_counter()
  checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  checkpointer.save(epath.Path(out_dir) / "params", args=ocp.args.StandardSave(tree))
  checkpointer.close()
  write_s = time.perf_counter() - start
  with open(result_path, "w", encoding="utf-8") as f:
    json.dump({"read_s": read_s, "write_s": write_s, "bytes_read": bytes_read,
               "bytes_written": sum(v.nbytes for v in imported.flatten(tree).values())}, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
