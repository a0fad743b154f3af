"""tpu_scripts/*.sh against a recording `gcloud` (no TPU here: the stub stands in for the
Cloud SDK, and the remote command it receives is then run by a local bash, as a worker's
login shell would run it over ssh)."""
import json
import os
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "tpu_scripts")
STUB = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


@pytest.fixture
def sandbox(tmp_path):
  """PATH with the recording gcloud first; the log of its calls."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(STUB)
  (bin_dir / "gcloud").chmod(0o755)
  log = tmp_path / "gcloud.jsonl"
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GCLOUD_LOG": str(log)}
  env.pop("HF_TOKEN", None)
  return env, log, tmp_path


def script(name, *args, env, check=True):
  return subprocess.run(["bash", os.path.join(SCRIPTS, name), *args], env=env,
                        capture_output=True, text=True, check=check)


def calls(log):
  return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def printed(stdout):
  """The commands a script printed, split back into argv lists."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def remote(call):
  """The --command a gcloud ssh call gives the workers."""
  return next(a.split("=", 1)[1] for a in call if a.startswith("--command="))


@pytest.mark.parametrize("name", ["create.sh", "setup.sh", "run.sh", "grid.sh", "merge.sh",
                                  "teardown.sh"])
def test_every_script_has_a_dry_run_and_help(sandbox, name):
  env, log, _ = sandbox
  assert "--dry_run" in script(name, "--help", env=env).stdout
  args = {"run.sh": ["--", "true"], "grid.sh": ["--tasks=2", "--", "true"],
          "merge.sh": ["--", "--config=m.yml"]}.get(name, [])
  result = script(name, "--dry_run", *args, env=env)
  assert printed(result.stdout) and not calls(log)  # Printed, nothing run.


def test_printed_commands_are_the_executed_ones(sandbox):
  env, log, _ = sandbox
  args = ["--tpu_name=pod", "--zone=europe-west4-b", "--project=p1",
          "--accelerator_type=v4-32", "--runtime_version=tpu-ubuntu2204-base"]
  dry = printed(script("create.sh", *args, "--spot", "--dry_run", env=env).stdout)
  script("create.sh", *args, "--spot", env=env)
  assert [["gcloud", *c] for c in calls(log)] == dry
  assert dry[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod",
                    "--zone=europe-west4-b", "--project=p1", "--accelerator-type=v4-32",
                    "--version=tpu-ubuntu2204-base", "--spot"]
  queued = printed(script("create.sh", *args, "--queued", "--dry_run", env=env).stdout)[0]
  assert queued[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "pod"]
  assert "--node-id=pod" in queued and "--runtime-version=tpu-ubuntu2204-base" in queued
  down = printed(script("teardown.sh", "--tpu_name=pod", "--dry_run", env=env).stdout)[0]
  assert down[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod"]


def run_remotely(command, home, env):
  """Runs a worker's --command in a local bash with a fake checkout and a `flame-train` that
  prints its arguments one per line."""
  checkout = home / "flame"
  (checkout / ".venv" / "bin").mkdir(parents=True, exist_ok=True)
  (checkout / ".venv" / "bin" / "activate").write_text(
      f'export PATH="{checkout}/.venv/bin:$PATH"\n')
  for tool in ("flame-train", "flame-merge", "flame-tailpatch"):
    (checkout / ".venv" / "bin" / tool).write_text(
        '#!/usr/bin/env bash\nfor a in "$@"; do echo "ARG<$a>"; done\necho "TOKEN<${HF_TOKEN:-}>"\n')
    (checkout / ".venv" / "bin" / tool).chmod(0o755)
  out = subprocess.run(["bash", "-c", command], env={**env, "HOME": str(home)},
                       capture_output=True, text=True, check=True).stdout
  return ([line[4:-1] for line in out.splitlines() if line.startswith("ARG<")],
          [line[6:-1] for line in out.splitlines() if line.startswith("TOKEN<")])


def test_run_reaches_every_worker_and_gin_overrides_survive_ssh(sandbox):
  env, log, tmp = sandbox
  command = ["flame-train", "--gin_file=pipelines/smollm2.gin",
             "--gin.MODEL_DIR='gs://bucket/run 1'", '--gin.TASK_FEATURE_LENGTHS={"inputs": 1024}',
             "--gin.train.eval_fn=None", "$HOME;rm -rf /"]
  secret = "hf_do_not_print_me"
  result = script("run.sh", "--env=HF_TOKEN", "--log=train", "--", *command,
                  env={**env, "HF_TOKEN": secret})
  assert secret not in result.stdout and "HF_TOKEN=***" in result.stdout
  (call,) = calls(log)
  assert call[:6] == ["compute", "tpus", "tpu-vm", "ssh", "flame-v5e-16", "--worker=all"]
  args, tokens = run_remotely(remote(call), tmp / "home", env)
  assert args == command[1:]  # Every argument arrives intact, nothing expanded.
  assert tokens == [secret]  # Forwarded to the worker, never printed.
  assert (tmp / "home" / "logs").is_dir()
  assert [p.name.split(".")[0] for p in (tmp / "home" / "logs").iterdir()] == ["train"]


def test_grid_runs_one_task_index_per_job_over_the_vms(sandbox):
  env, log, tmp = sandbox
  result = script("grid.sh", "--tasks=5", "--tpu_names=vm-a,vm-b", "--", "flame-tailpatch",
                  "--init=gs://b/ckpt/1000", "--out_dir=gs://b/tp", env=env)
  jobs = calls(log)
  assert len(jobs) == 5 and result.returncode == 0
  placed = {}
  for call in jobs:
    assert "--worker=all" in call
    run_remotely(remote(call), tmp / "home", env)  # Output goes to the job's log.
    (log_file,) = (tmp / "home" / "logs").iterdir()
    args = [line[4:-1] for line in log_file.read_text().splitlines() if line.startswith("ARG<")]
    log_file.unlink()
    indices = [a for a in args if a.startswith("--task_index=")]
    assert len(indices) == 1 and args[:2] == ["--init=gs://b/ckpt/1000", "--out_dir=gs://b/tp"]
    assert log_file.name.startswith(f"task_{indices[0].split('=')[1]}.")
    placed[int(indices[0].split("=")[1])] = call[4]
  assert placed == {0: "vm-a", 1: "vm-b", 2: "vm-a", 3: "vm-b", 4: "vm-a"}


@pytest.mark.parametrize("args,message", [
    (["--tasks=0", "--", "flame-tailpatch"], "--tasks must be a positive number"),
    (["--tasks=3", "--", "flame-tailpatch", "--all"], "must not choose tasks (--all)"),
    (["--tasks=3"], "no command"),
])
def test_grid_refuses_bad_requests(sandbox, args, message):
  env, log, _ = sandbox
  result = script("grid.sh", *args, env=env, check=False)
  assert result.returncode == 2 and message in result.stderr and not calls(log)


def test_setup_installs_exactly_as_the_readme_says(sandbox):
  env, _, _ = sandbox
  commands = printed(script("setup.sh", "--dry_run", env=env).stdout)
  readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
  install = first_block.splitlines()[0].split(" && FLAME_DATA_MIRROR")[0]
  assert install.startswith("pip install -e ") and "tpu" in install
  ssh = commands[-1]
  assert "--worker=all" in ssh and remote(ssh).endswith(install)
  assert [c[:5] for c in commands[:2]] == [
      ["git", "-C", REPO, "archive", "--format=tar.gz"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp"]]


def test_merge_runs_on_worker_0(sandbox):
  env, log, tmp = sandbox
  script("merge.sh", "--", "--config=merge yml.yml", "--output_dir=gs://b/merged", env=env)
  (call,) = calls(log)
  assert "--worker=0" in call and "--worker=all" not in call
  args, _ = run_remotely(remote(call), tmp / "home", env)
  assert args == ["--config=merge yml.yml", "--output_dir=gs://b/merged"]


def test_merge_on_all_workers_joins_one_job(sandbox):
  env, log, tmp = sandbox
  script("merge.sh", "--all_workers", "--", "--config=m.yml", "--output_dir=/mnt/shared/out",
         env=env)
  (call,) = calls(log)
  assert "--worker=all" in call
  args, _ = run_remotely(remote(call), tmp / "home", env)
  assert args == ["--config=m.yml", "--output_dir=/mnt/shared/out", "--multihost"]
