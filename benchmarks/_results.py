"""The end of a benchmark run: results.json and results.md written atomically, the table and
the time printed with the CPU it ran on (quote both with every figure)."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

from flame import files
from _cpu import cpu_model  # benchmarks/ is the script's folder


def write(out_dir: str, summary: dict[str, Any], markdown: str, start: float,
          indent: Optional[int] = None) -> None:
  files.write_text_atomically(os.path.join(out_dir, "results.json"),
                              json.dumps(summary, indent=indent) + "\n")
  files.write_text_atomically(os.path.join(out_dir, "results.md"), markdown)
  print(markdown)
  print(f"{time.time() - start:.0f} s on {cpu_model()}")
