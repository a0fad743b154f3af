"""flame-rate as a multi-process job writes the same file, byte for byte, as one process with
the same devices (each process feeds its share of every batch; process 0 writes)."""
import json

import pytest

import local_job
from test_autorater_rate import _jsonl, _rb_rows, _write_checkpoint


@pytest.mark.slow  # ~30 s; the merge's 2-vs-1 process test stays in the default suite
@pytest.mark.timeout(600)
def test_two_processes_rate_a_file_exactly_as_one(tmp_path):
  checkpoint = _write_checkpoint(tmp_path / "judge")
  rows = _rb_rows(11)  # 11 pairs: the last batch is padded
  data = _jsonl(tmp_path / "pairs.jsonl", rows)

  def rate(name, processes, devices):
    output = tmp_path / f"{name}.jsonl"
    results = local_job.run_job(["-m", "flame.autorater.rate", f"--checkpoint={checkpoint}",
                                 f"--input={data}", f"--output={output}", "--batch_size=8",
                                 "--chunk_size=4", "--no_progress"], processes, devices)
    local_job.check_ok(results)
    return output, results

  two, results = rate("two", 2, 2)
  one, _ = rate("one", 1, 4)
  assert two.read_bytes() == one.read_bytes()
  assert len(two.read_text().splitlines()) == 11
  summary = json.loads((tmp_path / "two.jsonl.summary.json").read_text())
  assert summary["rated"] == 11
  # Both processes report the same summary; only the output's files exist.
  printed = ["\n".join(l for l in out.splitlines() if not l.startswith("[Gloo]"))
             for _, out, _ in results]  # gloo announces its connections on stdout
  assert printed[0] == printed[1] and "rated 11 of 11 lines" in printed[0]
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("two")) == [
      "two.jsonl", "two.jsonl.summary.json"]


@pytest.mark.slow  # ~30 s
@pytest.mark.timeout(600)
def test_two_processes_evaluate_exactly_as_one(tmp_path):
  checkpoint = _write_checkpoint(tmp_path / "judge")
  data = _jsonl(tmp_path / "rb.jsonl", _rb_rows(9))
  written = {}
  for processes, devices in ((2, 2), (1, 4)):
    out = tmp_path / f"eval{processes}"
    local_job.check_ok(local_job.run_job(
        ["-m", "flame.autorater.evaluate", f"--checkpoint={checkpoint}", f"--input={data}",
         f"--output_dir={out}", "--batch_size=8", "--no_progress"], processes, devices))
    written[processes] = {name: (out / name).read_bytes()
                          for name in ("results.json", "pairs.jsonl", "results.md")}
  assert written[2] == written[1]
