"""flame.aot: compile the real train step for a TPU topology on this (CPU) machine.

The TPU topology API loads libtpu as a compile-only plugin, which works under
conftest's JAX_PLATFORMS=cpu and 8 simulated CPU devices, so everything runs
in-process. Skipped where libtpu is not installed.
"""
import json
import os
import subprocess
import sys

import pytest

from flame import aot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = "v5e:2x2"
BOUNDS = (2, 2, 1)
# The SmolLM2-135M shape with 1 of its 30 layers and a short batch keeps the
# compile at a few seconds; the embedding (49152 × 576) dominates the params anyway.
SMOLLM2_SMALL = ["decoder.DecoderConfig.num_layers = 1",
                 "TASK_FEATURE_LENGTHS = {'inputs': 60, 'targets': 4}",
                 "BATCH_SIZE = 4"]


@pytest.fixture(autouse=True)
def _need_libtpu():
  if not aot.libtpu_available():
    pytest.skip(f"libtpu not installed: {aot.INSTALL_HINT}")


def test_cli_compiles_quickstart_json(tmp_path, capsys):
  aot.main(["--gin_file=quickstart.gin", f"--gin.MODEL_DIR={tmp_path}",
            f"--topology={TOPOLOGY}", "--chips_per_host_bounds=2,2,1",
            "--gin.partitioning.Partitioner.mesh_shape=(-1, 1, 1)",
            # A partitioner behind a macro is rebuilt over the topology's devices too.
            "--gin.PARTITIONER=@partitioning.Partitioner()", "--gin.train.partitioner=%PARTITIONER",
            "--json"])
  report = json.loads(capsys.readouterr().out)
  assert report["num_chips"] == 4 and report["device_kind"].startswith("TPU v5")
  assert report["mesh_shape"] == {"data": 4, "fsdp": 1, "model": 1}
  assert report["num_params"] > 0
  memory = report["memory_bytes_per_device"]
  for key in ("argument", "output", "temp", "generated_code", "total"):
    assert memory[key] > 0, key
  assert memory["total"] < 16 * 2 ** 30 and report["fits"] is True
  assert report["hbm_gib_per_device"] == 16.0


def test_model_parallel_holds_fewer_param_bytes_per_chip(tmp_path):
  files = ["quickstart.gin", "models/smollm2_135m_shape.gin"]
  common = [f"MODEL_DIR = '{tmp_path}'"] + SMOLLM2_SMALL
  data = aot.compile_for_topology(
      files, common + ["partitioning.Partitioner.mesh_shape = (-1, 1, 1)"], TOPOLOGY, BOUNDS)
  model = aot.compile_for_topology(
      files, common + ["partitioning.Partitioner.mesh_shape = (1, 1, 4)"], TOPOLOGY, BOUNDS)
  assert data["mesh_shape"]["data"] == 4 and model["mesh_shape"]["model"] == 4
  assert data["num_params"] == model["num_params"] > 49152 * 576  # embedding + 1 layer
  # Pure data parallel replicates every weight: all parameter bytes on each chip.
  assert data["param_bytes_per_device"] == 4 * data["num_params"]
  assert model["param_bytes_per_device"] < data["param_bytes_per_device"] / 2
  assert (model["memory_bytes_per_device"]["argument"]
          < data["memory_bytes_per_device"]["argument"])
  print(aot.format_report(data))
  print(aot.format_report(model))


def test_bad_topology_and_missing_libtpu_explain_the_fix(monkeypatch):
  with pytest.raises(aot.TopologyError, match="pip install"):
    aot.topology_devices("bogus:1")
  monkeypatch.setattr(aot, "libtpu_available", lambda: False)
  with pytest.raises(aot.TopologyError, match=r'pip install -e "\.\[tpu\]"'):
    aot.main(["--gin_file=quickstart.gin", "--topology=v5e:2x2"])


def test_a_slice_gin_file_names_its_topology_and_mesh():
  """gin_configs/partitioning/v5e_16.gin: no --topology flag needed; FSDP over 16 chips.
  Run as the docs say, `python -m flame.aot` (the gin file imports flame.aot itself)."""
  done = subprocess.run([sys.executable, "-m", "flame.aot", "--gin_file=quickstart.gin",
                         "--gin_file=partitioning/v5e_16.gin", "--json"], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        # This process may hold libtpu already (the other tests load it).
                        env=dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1"))
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads(done.stdout[done.stdout.index("{"):])
  assert report["topology"] == "v5e:4x4" and report["num_chips"] == 16
  assert report["mesh_shape"] == {"data": 1, "fsdp": 16, "model": 1}
  assert report["fits"] is True


def test_a_step_that_does_not_fit_is_reported_not_raised():
  """The TPU compiler refuses a step over HBM; flame-aot reports what did not fit."""
  report = aot.compile_for_topology(
      ["quickstart.gin", "models/smollm2_135m_shape.gin"],
      ["MODEL_DIR = 'unused'", "decoder.DecoderConfig.num_layers = 1", "BATCH_SIZE = 512",
       "TASK_FEATURE_LENGTHS = {'inputs': 2040, 'targets': 8}",
       # The head at every position and the full attention square: what did not fit before
       # the head-at-targets and causal-block savings (with them this step fits).
       "train.loss_positions_per_row = None", "decoder.DecoderConfig.attention_block = 0"],
      TOPOLOGY, BOUNDS)
  assert report["fits"] is False and report["memory_bytes_per_device"] is None
  oom = report["out_of_memory"]
  assert oom["required"] > oom["available"] > 15 * 2 ** 30
  text = aot.format_report(report)
  assert "NO: the TPU compiler ran out of HBM" in text


def test_a_mesh_that_does_not_divide_the_topology_is_named():
  with pytest.raises(ValueError, match=r"mesh_shape \(data=1, fsdp=-1, model=3\) cannot cover "
                     "4 devices"):
    aot.compile_for_topology(["quickstart.gin"], [
        "MODEL_DIR = 'unused'", "partitioning.Partitioner.mesh_shape = (1, -1, 3)"],
        TOPOLOGY, BOUNDS)
