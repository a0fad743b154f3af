"""Joining a multi-process JAX job: the same flags for every entry point.

A pod runs one process per host; `jax.distributed.initialize` connects them into one job whose
`jax.devices()` are every host's devices. On TPU VMs (and Slurm, Open MPI) it finds the
coordinator, process count and index itself: ``--multihost`` is all that is needed. Elsewhere
(several processes on one machine, as the tests do; GPUs without a scheduler) give all three:
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``.

Failures are named: a process id outside ``[0, N)``; a job that does not assemble within
``--initialization_timeout`` seconds. With an explicit coordinator address the processes
first meet in Python on the coordinator's port (process 0 waits for a hello from each
other process with its id and N, then lets them all go on to JAX's own join), so a process
that never comes is "process 1 of 2 did not join within 300 s (coordinator HOST:PORT)" on
process 0 and on every process that came, and a disagreement on N is named on both sides,
each an exit 2 instead of JAX's native abort; a process told N that joined a job of another
size (JAX itself accepts it silently); and a process that dies mid-run, after which
JAX's coordination service stops the others within ``--heartbeat_timeout`` seconds with
"another task died" (it aborts them; there is no Python exception to catch).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import socket
import time
from typing import Optional

import jax

from flame import errors


class DistributedError(errors.InputError, RuntimeError):
  """The processes of a multi-process job could not be joined as asked."""


@dataclasses.dataclass(frozen=True)
class JobSettings:
  """How this process joins the job (all None with `multihost`: detected from the TPU VM)."""
  multihost: bool = False
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  initialization_timeout: int = 300
  heartbeat_timeout: int = 100

  @property
  def explicit(self) -> bool:
    return any(v is not None for v in (self.coordinator_address, self.num_processes,
                                       self.process_id))

  @property
  def wanted(self) -> bool:
    return self.multihost or self.explicit


def add_flags(parser: argparse.ArgumentParser) -> None:
  """The multi-process flags of every console script."""
  group = parser.add_argument_group(
      "multi-process (start the same command once per host)")
  group.add_argument("--multihost", action="store_true",
                     help="join a multi-process job; on TPU VMs nothing else is needed")
  group.add_argument("--coordinator_address", default=None,
                     help="HOST:PORT of process 0 (off TPU VMs, with the next two)")
  group.add_argument("--num_processes", type=int, default=None)
  group.add_argument("--process_id", type=int, default=None)
  group.add_argument("--initialization_timeout", type=int, default=300,
                     help="seconds to wait for every process to join (default 300)")
  group.add_argument("--heartbeat_timeout", type=int, default=100,
                     help="seconds after which a silent process counts as dead and the others "
                          "stop (default 100)")


def initialize_from(args: argparse.Namespace) -> None:
  """`initialize` with a command line parsed with `add_flags` (its flags are named as the
  fields of `JobSettings`): every console script's first step."""
  initialize(JobSettings(**{f.name: getattr(args, f.name)
                            for f in dataclasses.fields(JobSettings)}))


def check(settings: JobSettings) -> None:
  """Refuses settings that cannot form a job, before anything connects."""
  given = {"--coordinator_address": settings.coordinator_address,
           "--num_processes": settings.num_processes, "--process_id": settings.process_id}
  missing = [name for name, value in given.items() if value is None]
  if settings.explicit and missing:
    raise DistributedError(f"{', '.join(missing)} missing: give --coordinator_address, "
                           "--num_processes and --process_id together (or --multihost alone "
                           "on a TPU VM)")
  if settings.coordinator_address is not None:
    host_and_port(settings.coordinator_address)
  if settings.num_processes is not None and settings.num_processes < 1:
    raise DistributedError(f"--num_processes={settings.num_processes}; must be at least 1")
  if (settings.process_id is not None and settings.num_processes is not None
      and not 0 <= settings.process_id < settings.num_processes):
    raise DistributedError(f"--process_id={settings.process_id} is not in [0, "
                           f"{settings.num_processes}) for --num_processes="
                           f"{settings.num_processes}")
  for name in ("initialization_timeout", "heartbeat_timeout"):
    if getattr(settings, name) < 1:
      raise DistributedError(f"--{name}={getattr(settings, name)}; must be at least 1 second")


def initialize(settings: JobSettings) -> None:
  """Joins the job described by `settings` (nothing when it asks for none). Call before any
  other JAX work."""
  if not settings.wanted:
    return
  check(settings)
  # Collectives between CPU devices of different processes (tests; TPU/GPU use their own).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  where = settings.coordinator_address or "the detected coordinator"
  if settings.coordinator_address and (settings.num_processes or 1) > 1:
    # Assemble the job in Python first: JAX aborts the process (no exception) when it does
    # not assemble in time, so a process that never comes is named here instead.
    if settings.process_id:
      _join_coordinator(settings)
    else:
      _gather_processes(settings)
  # JAX aborts the process (no exception) when the job does not assemble in time; say first
  # what is being waited for, so that the abort's log has its context.
  logging.info("joining the job at %s as process %s of %s (waiting up to %d s for every "
               "process)", where, settings.process_id, settings.num_processes,
               settings.initialization_timeout)
  try:
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address,
        num_processes=settings.num_processes, process_id=settings.process_id,
        initialization_timeout=settings.initialization_timeout,
        heartbeat_timeout_seconds=settings.heartbeat_timeout)
  except Exception as e:  # XlaRuntimeError / RuntimeError / ValueError from detection.
    if not settings.explicit:
      raise DistributedError(
          f"--multihost found no multi-process environment here ({type(e).__name__}: {e}): "
          "it is detected on TPU VMs, under Slurm and under Open MPI; elsewhere give "
          "--coordinator_address=HOST:PORT --num_processes=N --process_id=I") from e
    raise DistributedError(
        f"could not join the job at {where} as process {settings.process_id} of "
        f"{settings.num_processes} within {settings.initialization_timeout} s: "
        f"{type(e).__name__}: {e}\nEvery process must be started with the same "
        "--coordinator_address and --num_processes and a distinct --process_id (on a TPU VM: "
        "--multihost on every worker, e.g. tpu_scripts/run.sh --worker=all)") from e
  if settings.num_processes is not None and jax.process_count() != settings.num_processes:
    count = jax.process_count()
    raise DistributedError(
        f"--num_processes={settings.num_processes} but the job at {where} has {count} "
        f"processes (process 0 started it with --num_processes={count}); start every process "
        "with the same --num_processes")
  logging.info("process %d of %d: %d local of %d devices; a process silent for %d s stops the "
               "job", jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), settings.heartbeat_timeout)
  if not is_leader():
    logging.getLogger().addFilter(_WarningsOnly())  # process 0 tells the story


class _WarningsOnly(logging.Filter):
  """Drops INFO lines (every process would print the same ones), keeps warnings and errors."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def host_and_port(address: str) -> tuple[str, int]:
  """(host, port) of HOST:PORT ([v6::addr]:PORT too); a named error for anything else."""
  host, _, port = address.rpartition(":")
  if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedError(f"--coordinator_address={address!r}; expected HOST:PORT with a port "
                           "in 1..65535, e.g. 10.0.0.2:8476 (the same on every process)")
  return host.strip("[]"), int(port)


_HELLO = "flame-join"


def _read_line(conn: socket.socket) -> str:
  """One short line from `conn` ("" when it closes first); the socket's timeout applies."""
  data = b""
  while not data.endswith(b"\n") and len(data) < 200:
    chunk = conn.recv(200)
    if not chunk:
      break
    data += chunk
  return data.decode("utf-8", "replace").strip()


def _not_joined(missing: list[str], settings: JobSettings) -> DistributedError:
  return DistributedError(
      f"process{'es' if len(missing) > 1 else ''} {', '.join(missing)} of "
      f"{settings.num_processes} did not join within {settings.initialization_timeout} s "
      f"(coordinator {settings.coordinator_address}): start every process with the same "
      "--coordinator_address and --num_processes and a distinct --process_id")


def _gather_processes(settings: JobSettings) -> None:
  """Process 0, before JAX: waits on the coordinator's port for every other process to say
  hello with its id and --num_processes, then tells them all to go on. A process that does
  not come within the timeout, or disagrees on the count, is a named error on every process
  that came (exit 2, nothing aborted)."""
  address, count = settings.coordinator_address, settings.num_processes
  _, port = host_and_port(address)
  deadline = time.monotonic() + settings.initialization_timeout
  if socket.has_dualstack_ipv6():
    server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
  else:
    server = socket.create_server(("", port))
  joined: dict[int, socket.socket] = {}
  try:
    while len(joined) < count - 1:
      server.settimeout(max(0.01, deadline - time.monotonic()))
      try:
        conn, _ = server.accept()
      except socket.timeout:
        missing = [str(i) for i in range(1, count) if i not in joined]
        for peer in joined.values():
          peer.sendall(f"missing {' '.join(missing)}\n".encode())
        raise _not_joined(missing, settings) from None
      conn.settimeout(10)
      try:
        hello, peer_id, peer_count = _read_line(conn).split()
        peer_id, peer_count = int(peer_id), int(peer_count)
      except (OSError, ValueError):
        conn.close()  # not one of ours (a port scanner, a health check): ignore it
        continue
      if hello != _HELLO or peer_count != count:
        conn.sendall(f"mismatch {count}\n".encode())
        conn.close()
        raise DistributedError(
            f"process {peer_id} was started with --num_processes={peer_count}, process 0 "
            f"with --num_processes={count}; start every process with the same "
            "--num_processes")
      joined[peer_id] = conn
    for conn in joined.values():
      conn.sendall(b"go\n")
  finally:
    for conn in joined.values():
      conn.close()
    server.close()


def _join_coordinator(settings: JobSettings) -> None:
  """Every other process, before JAX: says hello to process 0 and waits for the go."""
  address, count = settings.coordinator_address, settings.num_processes
  host, port = host_and_port(address)
  timeout = settings.initialization_timeout
  deadline = time.monotonic() + timeout
  while True:
    try:
      conn = socket.create_connection((host, port), timeout=1)
      break
    except OSError as e:
      if time.monotonic() > deadline:
        raise DistributedError(
            f"no coordinator answered at {address} within {timeout:g} s ({e}): start process 0 "
            "(it runs the coordinator) with the same --coordinator_address, and check the "
            "host name and port") from e
      time.sleep(0.5)
  with conn:
    conn.sendall(f"{_HELLO} {settings.process_id} {count}\n".encode())
    conn.settimeout(max(1.0, deadline - time.monotonic()) + 10)
    try:
      reply = _read_line(conn)
    except OSError:
      reply = ""
  word, _, rest = reply.partition(" ")
  if word == "go":
    return
  if word == "mismatch":
    raise DistributedError(
        f"--num_processes={count} but the job at {address} has {rest} processes (process 0 "
        f"started it with --num_processes={rest}); start every process with the same "
        "--num_processes")
  if word == "missing":
    raise _not_joined(rest.split(), settings)
  raise DistributedError(f"the coordinator at {address} closed the connection before the "
                         f"job assembled (process 0 stopped: see its log)")


def is_leader() -> bool:
  """Process 0: the one that writes logs, summaries and files every process would write."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches `name` (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
