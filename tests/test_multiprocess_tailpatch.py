"""A tail-patch run and rank classification as multi-process jobs.

Scores of a given checkpoint are the same as with one process; the patched scores are not
compared, since each process trains on its own shard of the task, so the batches differ from
one process's (as in T5X)."""
import json
import os

import pytest

import local_job
from test_tailpatch_run import setup  # noqa: F401  (the fixture: gin file, init checkpoint)


def patch(setup, out_dir, processes, devices):  # noqa: F811
  gin_file, init, _ = setup
  results = local_job.run_job(["-m", "flame.tailpatch.run", f"--gin_file={gin_file}",
                               f"--init={init}", f"--out_dir={out_dir}", "--task_index=0"],
                              processes, devices, timeout=500)
  local_job.check_ok(results)
  [result_file] = (out_dir / "results").iterdir()
  return json.loads(result_file.read_text()), results


@pytest.mark.slow  # ~60 s
@pytest.mark.timeout(900)
def test_two_processes_tail_patch_like_one(setup, tmp_path):  # noqa: F811
  two, results = patch(setup, tmp_path / "two", 2, 2)
  one, _ = patch(setup, tmp_path / "one", 1, 4)
  for key in ("steps_evaluated", "examples", "dev_examples", "init", "task"):
    assert two[key] == one[key], key
  for category, scores in two["dev"].items():  # the unpatched checkpoint's scores agree
    assert scores[0] == one["dev"][category][0] and len(scores) == 3
  assert json.loads((tmp_path / "two" / "baseline.json").read_text())["dev"] == json.loads(
      (tmp_path / "one" / "baseline.json").read_text())["dev"]
  assert two["examples"] == 4 * 8  # 4 steps of the global batch 8, not of each process's 4
  assert os.listdir(tmp_path / "two" / "tasks") == [two["task"]]
  assert not os.path.exists(tmp_path / "two" / "tasks" / two["task"] / "checkpoints")


@pytest.mark.slow  # ~30 s
@pytest.mark.timeout(300)
def test_rank_classification_scores_equal_across_process_counts(tmp_path):
  helper = os.path.join(local_job.REPO, "tests", "helpers", "multiprocess_rank.py")
  scores = {}
  for processes, devices in ((2, 2), (1, 4)):
    output = tmp_path / f"{processes}.json"
    local_job.check_ok(local_job.run_job([helper, str(output)], processes, devices))
    scores[processes] = json.loads(output.read_text())
    assert scores[processes]["devices"] == 4
  assert scores[2]["processes"] == 2
  assert scores[2]["scores"] == scores[1]["scores"]  # bit for bit (as JSON floats)
  assert len(scores[2]["scores"]) == 13
