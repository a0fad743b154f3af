"""Two processes × 2 CPU devices as one 4-device job (jax.distributed + gloo)."""
import json
import os
import socket
import subprocess
import sys

import pytest

from flame.checkpoints import manager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.timeout(600)
def test_two_processes_train_one_model_on_their_own_data_shards(tmp_path):
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(REPO, "tests", "helpers", "multihost_train.py"), str(i),
       str(port), str(tmp_path / "run"), str(tmp_path / f"out{i}.json")],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(2)]
  errors = [p.communicate(timeout=540)[1].decode() for p in procs]
  for p, err in zip(procs, errors):
    assert p.returncode == 0, err[-4000:]
  out = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
  assert all(o["devices"] == 4 and o["local_devices"] == 2 and o["step"] == 6 for o in out)
  assert out[0]["loss"] == out[1]["loss"]  # one global loss, reduced across processes
  # Each host read its own half of the global batch: 4 rows, none shared.
  rows = [set(map(tuple, o["first_rows"])) for o in out]
  assert len(out[0]["first_rows"]) == 4 and not rows[0] & rows[1]
  assert manager.Checkpointer(tmp_path / "run" / "checkpoints", read_only=True).all_steps() == [3,
                                                                                              6]
