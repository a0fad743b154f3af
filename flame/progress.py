"""Progress of a long loop: a tqdm bar on a terminal, a log line at least every 30 s in a log.

A bar redrawn into a log file is a wall of carriage returns and escape codes; no bar at all
leaves a 10-minute evaluation silent. `bar` gives the one that fits where stderr goes:

    with progress.bar(len(items), "evaluate", "pair") as bar:
      for ...: bar.update(n)

logs ``evaluate 120/400 pairs (30%), 2.1 pairs/s, ETA 2.2 min`` when stderr is not a terminal.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Callable, Optional

PROGRESS_SECONDS = 30.0


def duration(seconds: float) -> str:
  return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def line(desc: str, done: float, total: Optional[float], unit: str, seconds: float) -> str:
  """'evaluate 120/400 pairs (30%), 2.1 pairs/s, ETA 2.2 min' (`done` of `total` after
  `seconds`; without a total, the count and the rate)."""
  rate = done / seconds if seconds > 0 else 0.0
  count = f"{done:.0f}" if total is None else f"{done:.0f}/{total:.0f}"
  text = f"{desc} {count} {unit}s"
  if total:
    text += f" ({100 * done / total:.0f}%)"
  text += f", {rate:.3g} {unit}s/s"
  if total and rate > 0:
    text += f", ETA {duration((total - done) / rate)}"
  return text


class LogProgress:
  """tqdm's `update` / `close` / context manager, logging a `line` when `every` seconds have
  passed since the last one (and at the end, when it logged anything before)."""

  def __init__(self, total: Optional[float], desc: str, unit: str, initial: float = 0,
               every: float = PROGRESS_SECONDS, clock: Callable[[], float] = time.monotonic,
               log: Callable[[str], None] = logging.info):
    self.total, self.desc, self.unit, self.n = total, desc, unit, initial
    self._initial, self._every, self._clock, self._log = initial, every, clock, log
    self._start = self._last = clock()
    self._logged = False

  def update(self, n: float = 1) -> None:
    self.n += n
    now = self._clock()
    if now - self._last >= self._every:
      self._emit(now)

  def _emit(self, now: float) -> None:
    self._log(line(self.desc, self.n - self._initial, None if self.total is None
                   else self.total - self._initial, self.unit, now - self._start))
    self._last, self._logged = now, True

  def refresh(self) -> None:
    pass

  def close(self) -> None:
    if self._logged:
      self._emit(self._clock())
      self._logged = False

  def __enter__(self) -> "LogProgress":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def bar(total: Optional[float], desc: str, unit: str, enabled: bool = True, initial: float = 0,
        stream=None, **tqdm_kwargs):
  """A tqdm bar when `stream` (stderr) is a terminal, else a `LogProgress`; one that never logs
  when not `enabled`."""
  if not enabled:
    return LogProgress(total, desc, unit, initial, every=math.inf)
  stream = sys.stderr if stream is None else stream
  if getattr(stream, "isatty", lambda: False)():
    import tqdm  # pylint: disable=import-outside-toplevel
    return tqdm.tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream,
                     **tqdm_kwargs)
  return LogProgress(total, desc, unit, initial)
