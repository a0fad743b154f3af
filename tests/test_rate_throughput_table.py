"""benchmarks/rate_throughput.py's table: a run without flame-float32 (whose verdicts the
agreement columns compare against) still prints its table and ratio; it used to end in a
KeyError after every configuration had run."""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _result(config, seconds, **extra):
  return {"config": config, "framework": config.split("-")[0], "seconds": seconds,
          "pairs_per_second": 96 / seconds, "real_tokens": 90, "padded_tokens": 100,
          "gflops": 100.0, **extra}


def test_table_without_flame_float32_and_with_it():
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import rate_throughput  # pylint: disable=import-outside-toplevel
  args = argparse.Namespace(pairs=96, batch_size=8, max_input_length=512)
  table = rate_throughput.markdown(
      [_result("flame-bfloat16", 24.0), _result("transformers-bfloat16", 20.0)], args, 192)
  assert "| flame-bfloat16 | 24.0 | 4.00 | 0.90 |" in table and "| — | — |" in table
  assert "**0.83×**" in table  # 4.00 / 4.80 pairs/s
  table = rate_throughput.markdown(
      [_result("flame-float32", 48.0, agreement_vs_flame_float32=1.0,
               max_abs_diff_p_a_vs_flame_float32=0.0),
       _result("transformers-float32", 60.0, agreement_vs_flame_float32=0.9375,
               max_abs_diff_p_a_vs_flame_float32=0.02)], args, 192)
  assert "| 93.8% | 2.0e-02 |" in table and "**1.25×**" in table
