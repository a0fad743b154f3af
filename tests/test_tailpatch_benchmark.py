"""The controlled tail-patch experiment end to end at a tiny size (slow): every stage runs and
writes its report; the numbers at this size mean nothing, the full run's are in the README."""
import json
import os
import sys

import pytest

from flame.data import synthetic
from flame.data.sources import base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_synthetic_benchmark_at_a_tiny_size(tmp_path, monkeypatch):
  monkeypatch.setenv(base.TFDS_DIR_ENV, str(tmp_path / "tfds"))
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import tailpatch_synthetic  # pylint: disable=import-outside-toplevel
  out = tmp_path / "bench"
  tailpatch_synthetic.main([f"--out_dir={out}", "--seeds=0", "--steps=8", "--partial_steps=4",
                            "--patch_steps=4", "--heldout_size=8", "--dev_limit=8"])
  report = json.load(open(out / "results.json"))
  (seed,) = report["seeds"]
  assert sorted(seed["order"]) == sorted(synthetic.ROLES)
  assert set(seed["role_positions"]) == {"target", "helpful", "neutral", "harmful"}
  assert seed["compute"]["optimised"]["steps"] == 8 and seed["compute"]["vanilla"]["steps"] == 8
  assert 0 <= seed["vanilla"]["accuracy"] <= 1 and 0 <= seed["optimised"]["accuracy"] <= 1
  for name in ("heldout.png", "heatmap.png", "results.md"):
    assert (out / name).exists()
  assert (out / "seed0" / "tailpatch" / "analysis" / "weights.tsv").exists()
