"""flame.distributed: joining a multi-process job, and each way it can be asked wrongly."""
import subprocess
import sys

import pytest

from flame import distributed

import local_job

MERGE = ["-m", "merging.merge", "--config=/nonexistent/merge.yml", "--output_dir=/nonexistent"]


@pytest.mark.parametrize("settings,message", [
    (distributed.JobSettings(coordinator_address="localhost:1234", num_processes=2),
     "--process_id missing"),
    (distributed.JobSettings(num_processes=2, process_id=0),
     "--coordinator_address missing"),
    (distributed.JobSettings(coordinator_address="h:1", num_processes=2, process_id=2),
     "--process_id=2 is not in [0, 2)"),
    (distributed.JobSettings(coordinator_address="h:1", num_processes=0, process_id=0),
     "--num_processes=0; must be at least 1"),
    (distributed.JobSettings(multihost=True, heartbeat_timeout=0),
     "--heartbeat_timeout=0; must be at least 1 second"),
    # Process 0 too: it would otherwise start a coordinator on a bad address and wait.
    (distributed.JobSettings(coordinator_address="localhost", num_processes=2, process_id=0),
     "--coordinator_address='localhost'; expected HOST:PORT with a port in 1..65535"),
    (distributed.JobSettings(coordinator_address="h:70000", num_processes=2, process_id=0),
     "--coordinator_address='h:70000'; expected HOST:PORT"),
    (distributed.JobSettings(coordinator_address=":8476", num_processes=2, process_id=1),
     "--coordinator_address=':8476'; expected HOST:PORT"),
])
def test_settings_that_cannot_form_a_job_are_refused_before_connecting(settings, message):
  with pytest.raises(distributed.DistributedError) as error:
    distributed.initialize(settings)
  assert message in str(error.value)


def test_no_flags_means_one_process():
  distributed.initialize(distributed.JobSettings())  # nothing to join: returns at once
  assert distributed.is_leader()
  distributed.barrier("alone")  # a barrier of one process returns at once


def console(command, *flags):
  return subprocess.run([sys.executable, *command, *flags], cwd=local_job.REPO,
                        env=local_job.job_env(1), capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(200)
def test_a_process_count_that_disagrees_with_the_coordinator_is_named():
  port = local_job.free_port()
  procs = [subprocess.Popen([sys.executable, *MERGE, f"--coordinator_address=localhost:{port}",
                             f"--num_processes={n}", f"--process_id={i}",
                             "--heartbeat_timeout=5"], cwd=local_job.REPO,
                            env=local_job.job_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i, n in ((0, 2), (1, 3))]
  results = local_job.wait_job(procs, timeout=150)
  code, _, err = results[1]
  assert code == 2
  assert (f"flame-merge: error: --num_processes=3 but the job at localhost:{port} has 2 "
          "processes") in err


@pytest.mark.timeout(200)
@pytest.mark.parametrize("process_id, messages", [
    # Process 1 alone: nobody runs the coordinator.
    (1, ["flame-merge: error: no coordinator answered at localhost:{port} within 3 s",
         "start process 0"]),
    # Process 0 alone: the coordinator names the process that never came, without JAX's
    # native abort.
    (0, ["flame-merge: error: process 1 of 2 did not join within 3 s (coordinator "
         "localhost:{port})"]),
])
def test_a_job_that_does_not_assemble_is_named_within_the_timeout(process_id, messages):
  port = local_job.free_port()
  result = console(MERGE, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                   f"--process_id={process_id}", "--initialization_timeout=3")
  assert result.returncode == 2, result.stderr[-3000:]
  for message in messages:
    assert message.format(port=port) in result.stderr
  assert "Aborted" not in result.stderr and "Check failure" not in result.stderr


def test_a_coordinator_address_without_a_port_is_named():
  result = console(MERGE, "--coordinator_address=localhost", "--num_processes=2",
                   "--process_id=0")
  assert result.returncode == 2
  assert "--coordinator_address='localhost'; expected HOST:PORT" in result.stderr


def test_multihost_without_a_cluster_environment_says_what_to_give():
  result = console(["-m", "flame.autorater.rate", "--checkpoint=/nonexistent", "--input=x",
                    "--output=y"], "--multihost")
  assert result.returncode == 2
  assert "flame-rate: error: --multihost found no multi-process environment here" in (
      result.stderr)
  assert "--coordinator_address=HOST:PORT --num_processes=N --process_id=I" in result.stderr


def test_a_one_process_output_is_refused_before_joining():
  """flame-merge --output_format=hf in a 2-process job: refused at once, no coordinator
  started or waited for (there is none at this port)."""
  port = local_job.free_port()
  result = console(MERGE, "--output_format=hf", f"--coordinator_address=localhost:{port}",
                   "--num_processes=2", "--process_id=1", "--initialization_timeout=60")
  assert result.returncode == 2
  assert "flame-merge: error: --output_format=hf is written by one process" in result.stderr
  assert "no coordinator answered" not in result.stderr

