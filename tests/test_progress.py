"""flame.progress: a bar on a terminal, a log line at least every 30 s in a log, nothing when
disabled; the line's arithmetic."""
import io

import tqdm

from flame import progress


class Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_line_counts_rate_and_eta():
  assert progress.line("evaluate", 120, 400, "pair", 60.0) == (
      "evaluate 120/400 pairs (30%), 2 pairs/s, ETA 2.3 min")
  assert progress.line("merge", 30, 300, "param", 10.0) == (
      "merge 30/300 params (10%), 3 params/s, ETA 1.5 min")
  assert progress.line("read", 5, None, "tensor", 2.0) == "read 5 tensors, 2.5 tensors/s"
  assert progress.line("read", 0, 10, "tensor", 0.0) == "read 0/10 tensors (0%), 0 tensors/s"


def test_log_progress_logs_every_interval_and_at_the_end():
  clock, lines = Clock(), []
  bar = progress.LogProgress(100, "evaluate", "pair", every=30, clock=clock, log=lines.append)
  for _ in range(10):  # 10 pairs in 29 s: nothing yet
    clock.now += 2.9
    bar.update(1)
  assert lines == []
  clock.now += 1.0
  bar.update(2)  # 12 pairs at 30 s
  assert lines == ["evaluate 12/100 pairs (12%), 0.4 pairs/s, ETA 3.7 min"]
  clock.now += 10
  bar.update(8)
  assert len(lines) == 1  # 10 s since the last line
  bar.close()
  assert lines[-1] == "evaluate 20/100 pairs (20%), 0.5 pairs/s, ETA 2.7 min"


def test_resumed_progress_counts_this_runs_work():
  clock, lines = Clock(), []
  bar = progress.LogProgress(100, "flame-rate", "pair", initial=60, every=30, clock=clock,
                             log=lines.append)
  clock.now += 40
  bar.update(20)
  assert lines == ["flame-rate 20/40 pairs (50%), 0.5 pairs/s, ETA 40 s"]
  assert bar.n == 80


def test_quick_loops_and_disabled_bars_say_nothing():
  clock, lines = Clock(), []
  with progress.LogProgress(5, "quick", "item", clock=clock, log=lines.append) as bar:
    bar.update(5)
  assert lines == []
  off = progress.bar(10, "x", "item", enabled=False)
  off.update(10)
  off.close()
  assert off.n == 10


class Terminal(io.StringIO):
  def isatty(self):
    return True


def test_a_terminal_gets_a_tqdm_bar_a_log_gets_lines():
  assert isinstance(progress.bar(10, "x", "item", stream=Terminal()), tqdm.tqdm)
  assert isinstance(progress.bar(10, "x", "item", stream=io.StringIO()), progress.LogProgress)
