"""One configuration of a side-by-side benchmark per child process: its own thread pools, its
own peak memory, a time limit, and its result as the last line of JSON it prints."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env() -> dict:
  """The environment of a child: JAX on one CPU device using every core (no simulated
  multi-device CPU, libtpu ignored), quiet TensorFlow, the repository importable."""
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


def run(script: str, name: str, flags: list[str], timeout: float) -> dict:
  """`python script --child=name *flags`; its last stdout line parsed, plus "config" and
  "framework" (the name's first word); a child still running after `timeout` seconds is
  stopped and reported as {"config", "framework", "timed_out": timeout}."""
  cmd = [sys.executable, os.path.abspath(script), f"--child={name}", *flags]
  framework = name.split("-")[0]
  print(f"running {name} …", file=sys.stderr, flush=True)
  try:
    proc = subprocess.run(cmd, env=child_env(), stdout=subprocess.PIPE, text=True, cwd=REPO,
                          timeout=timeout)
  except subprocess.TimeoutExpired:
    print(f"{name}: stopped after {timeout:.0f} s", file=sys.stderr, flush=True)
    return {"config": name, "framework": framework, "timed_out": timeout}
  if proc.returncode:
    raise SystemExit(f"{name} benchmark failed (exit {proc.returncode})")
  return {**json.loads(proc.stdout.strip().splitlines()[-1]), "config": name,
          "framework": framework}
