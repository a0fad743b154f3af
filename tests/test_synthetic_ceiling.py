"""benchmarks/synthetic_ceiling.py: the refusals before training, the kind of mistake of each
held-out pair, and (slow) a tiny run end to end."""
import json
import os
import sys

import numpy as np
import pytest

from flame.data import synthetic
from flame.data.sources import base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ceiling():
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import synthetic_ceiling  # pylint: disable=import-outside-toplevel
  return synthetic_ceiling


@pytest.mark.parametrize("flags, message", [
    (["--steps=10", "--points=3"], "--steps=10 must be a positive multiple of --points=3"),
    (["--points=0"], "must be a positive multiple"),
    (["--checkpoints", "/nonexistent/ckpt/100"], "/nonexistent/ckpt/100 is not a checkpoint"),
])
def test_bad_settings_are_refused_before_anything_runs(tmp_path, capsys, flags, message):
  with pytest.raises(SystemExit) as exit_info:
    _ceiling().main([f"--out_dir={tmp_path / 'out'}", *flags])
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def test_each_pair_gets_the_mistake_of_its_wrong_response(tmp_path, monkeypatch):
  from flame.autorater import evaluate  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv(base.TFDS_DIR_ENV, str(tmp_path / "tfds"))
  items = evaluate.task_items(synthetic.HELDOUT_MATH.name, "test", 60, "synthetic-math")
  kinds = _ceiling().error_kinds(items)
  for item, kind in zip(items, kinds):
    context = item.request.context
    right = context["response_a"] if item.gold == "A" else context["response_b"]
    wrong = context["response_b"] if item.gold == "A" else context["response_a"]
    # The right one ends with a + b × c; the wrong one shows its mistake in its text.
    a, b, c = map(int, context["problem"].removeprefix("What is ").rstrip("?")
                  .replace("×", "+").split(" + "))
    assert right.endswith(f"The answer is {a + b * c}.")
    assert (kind == "precedence") == wrong.startswith("First add:")
    assert (kind == "product_slip") == (f"{b} × {c} = {b * c}." not in wrong
                                        and not wrong.startswith("First add:"))
  assert set(kinds) == set(synthetic.ERRORS)


@pytest.mark.slow
def test_a_tiny_run_scores_every_checkpoint_by_kind_of_mistake(tmp_path, monkeypatch):
  monkeypatch.setenv(base.TFDS_DIR_ENV, str(tmp_path / "tfds"))
  out = tmp_path / "ceiling"
  _ceiling().main([f"--out_dir={out}", "--steps=4", "--points=2", "--heldout_size=12"])
  report = json.load(open(out / "results.json"))
  assert [row["step"] for row in report["rows"]] == [2, 4]
  for row in report["rows"]:
    scores = row["scores"]
    assert scores["all"]["pairs"] == 12
    assert sum(scores[k]["pairs"] for k in synthetic.ERRORS) == 12
    # Overall accuracy is the pair-weighted mean of the kinds'.
    weighted = sum(scores[k]["accuracy"] * scores[k]["pairs"] for k in synthetic.ERRORS
                   if scores[k]["pairs"]) / 12
    assert np.isclose(weighted, scores["all"]["accuracy"])
  assert (out / "ceiling.png").exists() and (out / "results.md").exists()
