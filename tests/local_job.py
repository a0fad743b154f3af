"""Several local processes run as one JAX job (localhost coordinator, gloo collectives).

`run_job(["-m", "merging.merge", ...], num_processes=2, devices_per_process=2)` starts the
command once per process with ``--coordinator_address=localhost:PORT --num_processes=N
--process_id=I`` appended and that many simulated CPU devices each, and returns each
process's (return code, stdout, stderr).
"""
import os
import socket
import subprocess
import sys
from typing import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def job_env(devices_per_process: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")


def start_job(command: Sequence[str], num_processes: int, devices_per_process: int,
              extra_flags=("--heartbeat_timeout=15",)) -> list[subprocess.Popen]:
  port = free_port()
  return [subprocess.Popen(
      [sys.executable, *command, f"--coordinator_address=localhost:{port}",
       f"--num_processes={num_processes}", f"--process_id={i}", *extra_flags],
      cwd=REPO, env=job_env(devices_per_process), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(num_processes)]


def wait_job(procs: Sequence[subprocess.Popen], timeout: float = 400
             ) -> list[tuple[int, str, str]]:
  results = []
  for proc in procs:
    try:
      out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
    results.append((proc.returncode, out, err))
  return results


def run_job(command: Sequence[str], num_processes: int, devices_per_process: int,
            timeout: float = 400) -> list[tuple[int, str, str]]:
  return wait_job(start_job(command, num_processes, devices_per_process), timeout)


def check_ok(results) -> None:
  for i, (code, _, err) in enumerate(results):
    assert code == 0, f"process {i} exited {code}:\n{err[-4000:]}"
