"""flame-merge as a multi-process job: the same checkpoint, bit for bit, as one process.

The inputs are written by one process and read by the job's processes, each its own shards;
the job's output is restored by one process (resharded onto its devices).
"""
import os
import signal
import time

import jax
import numpy as np
import pytest

from flame.checkpoints import imported, manager
from merging import merge as merge_lib

import local_job

SHAPES = {("embed", "embedding"): (64, 16), ("layers_0", "mlp", "kernel"): (16, 48),
          ("layers_0", "norm", "scale"): (16,), ("layers_1", "mlp", "kernel"): (16, 48),
          ("final_norm", "scale"): (5,)}  # 5: divides no device count, stays replicated


def save(directory, flat):
  checkpointer = manager.Checkpointer(directory, async_save=False)
  checkpointer.save(0, {"params": imported.unflatten(flat)}, {}, force=True)
  checkpointer.wait()
  checkpointer.close()
  return str(directory)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
  root = tmp_path_factory.mktemp("family")
  rng = np.random.default_rng(3)
  base = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
  paths = [save(root / "base", base)]
  for i in range(3):
    paths.append(save(root / f"expert{i}", {
        k: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}))
  return paths


def restore(path):
  abstract = imported.unflatten({k: jax.ShapeDtypeStruct(s, np.float32)
                                 for k, s in SHAPES.items()})
  return imported.flatten(jax.device_get(manager.restore_params_from(path, abstract)))


def flags(family, gin_file, output_dir):
  return [f"--gin_file=merging/{gin_file}", f"--gin.BASE={family[0]!r}",
          f"--gin.EXPERTS={family[1:]!r}", f"--gin.OUTPUT_DIR={str(output_dir)!r}",
          "--memory_budget=48KiB", "--no_progress_bar"]  # a few parameters per batch


@pytest.mark.timeout(600)
@pytest.mark.parametrize("gin_file,processes,devices", [
    ("dare_ties.gin", 2, 2),
    pytest.param("ties.gin", 4, 2, marks=pytest.mark.slow),  # global trimming thresholds
])
def test_multi_process_merge_equals_single_process_bit_for_bit(family, tmp_path, gin_file,
                                                               processes, devices):
  results = local_job.run_job(["-m", "merging.merge",
                               *flags(family, gin_file, tmp_path / "job")], processes, devices)
  local_job.check_ok(results)
  paths = {out.strip().splitlines()[-1] for _, out, _ in results}
  assert paths == {str(tmp_path / "job" / "0")}  # every process names the one output
  # Process 0 tells the story; the others log warnings and errors only.
  assert "merging 5 parameters" in results[0][2]
  assert not any("merging 5 parameters" in err for _, _, err in results[1:])
  single = merge_lib.main(flags(family, gin_file, tmp_path / "single"))
  got, want = restore(str(tmp_path / "job" / "0")), restore(single)
  for key in SHAPES:
    np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))
  meta = manager.Checkpointer(tmp_path / "job", read_only=True).restore_meta()
  assert meta["merge"]["method"] == gin_file.removesuffix(".gin")
  assert not [p for p in (tmp_path / "job").iterdir() if p.name.startswith(".merge-")]
  # Every process wrote its own shards: one OCDBT store per batch and process.
  stores = [n for n in os.listdir(tmp_path / "job" / "0" / "params")
            if n.startswith("ocdbt.process_")]
  assert len(stores) % processes == 0 and len(stores) > processes


@pytest.mark.timeout(300)
def test_a_killed_process_stops_the_others_with_a_message(family, tmp_path):
  procs = local_job.start_job(["-m", "merging.merge", *flags(family, "dare_ties.gin",
                                                             tmp_path / "job")], 2, 2,
                              extra_flags=("--heartbeat_timeout=5",))
  # Kill process 1 as soon as the job has formed (its log says so), mid-merge.
  joined = time.time() + 120
  while time.time() < joined and not (tmp_path / "job").exists():
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGKILL)
  start = time.time()
  results = local_job.wait_job(procs, timeout=120)
  assert results[0][0] != 0
  assert time.time() - start < 60
  assert "another task died" in results[0][2]
  assert not (tmp_path / "job" / "0").exists()  # nothing half-written is visible
