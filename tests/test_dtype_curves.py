"""benchmarks/dtype_curves.py: reading a run's metrics, the step time, the curve comparison,
and the refusal of too few steps before any work."""
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _curves():
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import dtype_curves  # pylint: disable=import-outside-toplevel
  return dtype_curves


def _write_metrics(model_dir, rows):
  os.makedirs(os.path.join(model_dir, "train"))
  with open(os.path.join(model_dir, "train", "metrics.jsonl"), "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
    f.write(json.dumps({"step": 30, "eval/accuracy": 0.5}) + "\n")  # not a training row


def test_curve_step_time_and_comparison(tmp_path):
  dtype_curves = _curves()
  # 100 tokens per step; 10 steps between logs; float32 at 50 tokens/s (2 s/step), bf16 at 100
  for dtype, rate, losses in (("float32", 50.0, [4.0, 3.0, 2.0, 1.0]),
                              ("bfloat16", 100.0, [4.0, 3.0, 2.5, 1.5])):
    _write_metrics(str(tmp_path / dtype), [
        {"step": 10 * (i + 1), "loss": loss, "tokens_seen": 1000 * (i + 1),
         "tokens_per_second": 5.0 if i == 0 else rate}  # the first interval compiles
        for i, loss in enumerate(losses)])
  curves = {d: dtype_curves.curve(str(tmp_path / d)) for d in ("float32", "bfloat16")}
  assert sorted(curves["float32"]) == [10, 20, 30, 40]
  assert dtype_curves.step_seconds(curves["float32"]) == pytest.approx(2.0)
  assert dtype_curves.step_seconds(curves["bfloat16"]) == pytest.approx(1.0)
  result = dtype_curves.compare(curves)
  assert result["steps"] == [10, 20, 30, 40]
  assert result["late_mean_abs_diff"] == pytest.approx(0.5)  # steps 30, 40: |2-2.5|, |1-1.5|
  assert result["float32_step_to_step_noise"] == pytest.approx(1.0)  # |2-1|


def test_too_few_steps_are_refused_before_any_work(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    _curves().main([f"--work_dir={tmp_path / 'w'}", "--steps=3"])
  assert exit_info.value.code == 2
  assert "--steps=3: need at least 4" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "w")
