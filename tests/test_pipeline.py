"""flame-pipeline: the resumable stage runner, and the whole pipeline at a tiny size.

The pipeline test runs every stage for real (TFDS preparation from the data mirror, flame.train,
tail-patching, merging, the autorater's evaluation) with a few steps of the tiny decoder on four
synthetic tasks, then checks every artefact and that a rerun redoes nothing.
"""
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flame.pipeline import pipeline, runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




# The runner.


def stages_counting(calls, fail_at=None):
  def make(name):
    def run():
      calls.append(name)
      if name == fail_at:
        raise RuntimeError(f"{name} failed")
      return {"value": len(calls)}
    return runner.Stage(name, f"does {name}", run, lambda done: 10.0 * len(done))
  return [make(n) for n in ("a", "b", "c")]


def test_runner_skips_finished_stages_and_resumes_after_a_failure(tmp_path):
  calls, out = [], io.StringIO()
  stages = stages_counting(calls, fail_at="b")
  with pytest.raises(RuntimeError, match="b failed"):
    runner.run_stages(str(tmp_path), stages, stages, out)
  assert calls == ["a", "b"]
  assert runner.read_record(str(tmp_path), "a")["summary"] == {"value": 1}
  assert runner.read_record(str(tmp_path), "b") is None  # A failed stage records nothing.
  calls.clear()
  stages = stages_counting(calls)
  records = runner.run_stages(str(tmp_path), stages, stages, out)
  assert calls == ["b", "c"]  # a is not redone.
  assert sorted(records) == ["a", "b", "c"] and records["c"]["summary"] == {"value": 2}
  lines = out.getvalue().splitlines()
  assert lines[0] == "[1/3] a: does a (estimate 0 s)"
  assert "[1/3] a: done earlier" in out.getvalue()
  assert "[2/3] b: does b (estimate 10 s)" in lines


def test_runner_selects_stages_by_name(tmp_path):
  calls = []
  stages = stages_counting(calls)
  chosen = runner.select(stages, ["c", "a"])
  assert [s.name for s in chosen] == ["a", "c"]  # Pipeline order.
  runner.run_stages(str(tmp_path), stages, chosen, io.StringIO())
  assert calls == ["a", "c"]
  with pytest.raises(ValueError, match=r"unknown stage\(s\) \['d'\]; the stages are a, b, c"):
    runner.select(stages, ["a", "d"])


def test_a_stage_whose_inputs_are_missing_is_refused_before_anything_runs(tmp_path):
  calls, out = [], io.StringIO()
  a, b, c = stages_counting(calls)
  stages = [a, dataclasses.replace(b, needs=("a",)), dataclasses.replace(c, needs=("a", "b"))]
  work_dir = str(tmp_path / "work")
  with pytest.raises(ValueError, match=r"--stages: c needs a, b, not done in .*work; add them"):
    runner.select(stages, ["c"], work_dir)
  with pytest.raises(ValueError, match=r"--stages: b needs a, not done"):
    runner.select(stages, ["b", "c"], work_dir)
  assert calls == [] and not os.path.exists(work_dir)
  runner.run_stages(work_dir, stages, runner.select(stages, ["a", "b"], work_dir), out)
  chosen = runner.select(stages, ["c"], work_dir)  # a and b are recorded now
  runner.run_stages(work_dir, stages, chosen, out)
  assert calls == ["a", "b", "c"]


def test_the_stories_name_what_each_stage_reads():
  """Every stage but the first of each story needs an earlier stage (none needs a later
  one), so `--stages=X` on a fresh work dir is refused naming what to run first."""
  from flame.pipeline import judge, merge_study  # pylint: disable=import-outside-toplevel
  for stages in (pipeline.build_stages(pipeline.configure([], []), pipeline.Paths("/w")),
                 judge.build_stages(judge.configure([], [], "/w")),
                 merge_study.build_stages(merge_study.configure([], [], "/w"))):
    names = [s.name for s in stages]
    assert stages[0].needs == ()
    for i, stage in enumerate(stages[1:], 1):
      assert stage.needs and set(stage.needs) <= set(names[:i]), (stage.name, stage.needs)


def test_settings_may_change_only_while_no_stage_is_recorded(tmp_path):
  work_dir, names = str(tmp_path), ["a", "b", "c"]
  runner.keep_settings(work_dir, {"steps": 4, "tasks": ["x"]}, names)
  runner.keep_settings(work_dir, {"steps": 5, "tasks": ["x"]}, names)  # nothing done yet
  stages = stages_counting([])
  runner.run_stages(work_dir, stages, stages[:1], io.StringIO())
  runner.keep_settings(work_dir, {"steps": 5, "tasks": ["x"]}, names)  # the same: a resume
  with pytest.raises(ValueError, match=r"holds stages \(a\) made with other settings: steps: 5 "
                     r"-> 6; tasks: \['x'\] -> \['y'\]\. Use a new --work_dir, or delete "):
    runner.keep_settings(work_dir, {"steps": 6, "tasks": ["y"]}, names)
  with open(os.path.join(work_dir, "settings.json"), encoding="utf-8") as f:
    assert json.load(f) == {"steps": 5, "tasks": ["x"]}


# The pipeline at a tiny size.

TINY = [f"PipelineSettings.{binding}" for binding in (
    'tasks = ["synthetic_arithmetic_pairwise", "synthetic_arithmetic_statement", '
    '"synthetic_string_order", "synthetic_string_reversal"]',
    'categories = {"Reasoning": ["synthetic_arithmetic_pairwise"]}',
    'experts = {"math": ["synthetic_arithmetic_pairwise", "synthetic_arithmetic_statement"], '
    '"strings": ["synthetic_string_order", "synthetic_string_reversal"]}',
    "batch_size = 8", "vanilla_steps = 4", "partial_steps = 2", "patch_steps = 2",
    "patch_eval_points = 1", "dev_limit = 4", "expert_steps = 2",
    'merge_methods = {"linear": {}, "ties": {"density": 0.5, "lam": 1.0}}',
    "heldout_per_subset = 2", "heldin_per_task = 4", "eval_batch_size = 8")]


def tiny_flags():
  return ["--gin_file=pipelines/quickstart.gin"] + [f"--gin.{b}" for b in TINY]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  work_dir = str(tmp_path_factory.mktemp("pipeline"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("FLAME_TFDS_DIR", str(tmp_path_factory.mktemp("tfds")))
    out = io.StringIO()
    records = pipeline.run(["pipelines/quickstart.gin"], TINY, work_dir, out=out)
    yield work_dir, records, out.getvalue()


def test_tiny_pipeline_writes_every_artefact(tiny_run):
  work_dir, records, printed = tiny_run
  assert list(records) == ["prepare", "vanilla", "tailpatch", "optimised", "experts", "merge",
                           "evaluate", "report"]
  for i, name in enumerate(records, 1):
    assert f"[{i}/8] {name}: " in printed and f"[{i}/8] {name} done in " in printed
  summaries = runner.summaries(records)
  assert set(summaries["prepare"]["rates"]) == {
      f"flame_{t}_bytes" for t in ("synthetic_arithmetic_pairwise",
                                   "synthetic_arithmetic_statement", "synthetic_string_order",
                                   "synthetic_string_reversal")}
  assert all(summaries["prepare"]["train_examples"][t] > 0 for t in summaries["prepare"]["rates"])
  assert sorted(summaries["tailpatch"]["order"]) == sorted(
      t.removeprefix("flame_").removesuffix("_bytes") for t in summaries["prepare"]["rates"])
  assert os.path.isfile(os.path.join(work_dir, "tailpatch", "analysis", "weights.tsv"))
  assert summaries["optimised"]["compute"]["tailpatch"]["runs"] == 4
  assert summaries["experts"]["multitask"]["steps"] == 4  # 2 experts x 2 steps.
  assert sorted(summaries["merge"]) == ["linear_2", "ties_2"]
  evaluation = summaries["evaluate"]
  assert sorted(evaluation) == sorted(["vanilla", "optimised", "expert/math", "expert/strings",
                                       "multitask", "merge/linear_2", "merge/ties_2"])
  for name, result in evaluation.items():
    assert set(result["categories"]) == {"Chat", "Chat Hard", "Safety", "Reasoning"}, name
    assert result["examples"]["synthetic_arithmetic_pairwise"] == 4
    assert result["examples"]["hhh-helpful"] == 2
    assert 0.0 <= result["overall"] <= 1.0
  report = open(os.path.join(work_dir, "report.md"), encoding="utf-8").read()
  assert "**Claim 1 — " in report and "**Claim 2 — " in report
  for figure in ("mixture.png", "curves.png", "tailpatch_heatmap.png",
                 "vanilla_vs_optimised.png", "merging.png"):
    path = os.path.join(work_dir, "figures", figure)
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", figure
    assert f"(figures/{figure})" in report
  assert "| ties_2 (density=0.5, lam=1.0) |" in report


def test_rerun_redoes_nothing_and_report_stage_rewrites_the_same_report(tiny_run):
  work_dir, records, _ = tiny_run
  report_path = os.path.join(work_dir, "report.md")
  before = open(report_path, encoding="utf-8").read()
  out = io.StringIO()
  again = pipeline.run(["pipelines/quickstart.gin"], TINY, work_dir, out=out)
  assert out.getvalue().count("done earlier") == 8
  assert {k: v["finished"] for k, v in again.items()} == {
      k: v["finished"] for k, v in records.items()}
  os.remove(runner.record_path(work_dir, "report"))
  os.remove(report_path)
  pipeline.run(["pipelines/quickstart.gin"], TINY, work_dir, ["report"], out=io.StringIO())
  assert open(report_path, encoding="utf-8").read() == before


def test_bad_settings_are_refused_before_any_work(tmp_path):
  with pytest.raises(ValueError, match="vanilla_steps = 5 must be a multiple of "
                     "PipelineSettings.partial_steps = 2"):
    pipeline.run(["pipelines/quickstart.gin"], TINY + ["PipelineSettings.vanilla_steps = 5"],
                 str(tmp_path / "w"))
  with pytest.raises(ValueError, match="unknown stage"):
    pipeline.run(["pipelines/quickstart.gin"], TINY, str(tmp_path / "w"), ["train"])
  assert not os.path.exists(tmp_path / "w" / "stages")


@pytest.mark.slow  # A second whole tiny pipeline in a subprocess (about 2 minutes).
def test_killed_pipeline_resumes_to_the_same_numbers(tiny_run, tmp_path):
  """Killed while training the experts (after vanilla, tail-patch and FLAMe-Opt finished),
  the rerun redoes none of those and ends with the uninterrupted run's numbers."""
  work_dir = str(tmp_path / "killed")
  proc = subprocess.Popen(
      [sys.executable, "-m", "flame.pipeline.pipeline", f"--work_dir={work_dir}",
       *tiny_flags()], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  marker = os.path.join(work_dir, "experts", "math", "checkpoints")
  deadline = time.time() + 600
  while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  stderr = proc.communicate()[1].decode(errors="replace")
  assert os.path.exists(marker), stderr[-3000:]
  assert runner.read_record(work_dir, "optimised") is not None
  assert runner.read_record(work_dir, "experts") is None
  finished = {n: runner.read_record(work_dir, n)["finished"]
              for n in ("prepare", "vanilla", "tailpatch", "optimised")}
  out = io.StringIO()
  records = pipeline.run(["pipelines/quickstart.gin"], TINY, work_dir, out=out)
  assert out.getvalue().count("done earlier") == 4
  assert {n: records[n]["finished"] for n in finished} == finished
  uninterrupted = runner.summaries(tiny_run[1])
  resumed = runner.summaries(records)
  for stage in ("tailpatch", "evaluate"):
    assert json.dumps(resumed[stage], sort_keys=True).replace(work_dir, "W") == json.dumps(
        uninterrupted[stage], sort_keys=True).replace(tiny_run[0], "W"), stage


def test_the_smollm2_pipeline_config_parses():
  settings = pipeline.configure(["pipelines/smollm2.gin"], [])
  assert settings.vocabulary == "smollm2" and settings.initial_checkpoint == "/tmp/smollm2_135m"
  assert settings.tasks == pipeline.configure(["pipelines/quickstart.gin"], []).tasks
  assert settings.vanilla_steps % settings.partial_steps == 0
