"""flame-rate and the Autorater API on real (tiny, random-weight) Orbax checkpoints: schemas,
position swap, planted position bias, bad input, atomic resumable output."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flame.autorater import autorater, judgments, rate
from flame.checkpoints import imported
from flame.models import decoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = decoder.DecoderConfig(vocab_size=259, emb_dim=32, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8, mlp_dim=64)


def _write_checkpoint(path, config=CONFIG, seed=0, edit=None):
  model = decoder.DecoderOnlyModel(config)
  params = jax.tree_util.tree_map(np.array, jax.device_get(model.init_params(
      jax.random.PRNGKey(seed), 1, {"inputs": 8, "targets": 8})))
  if edit:
    edit(params)
  imported.write_orbax(imported.ImportedModel(config, params, {"format": "test"}), str(path))
  return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return _write_checkpoint(tmp_path_factory.mktemp("ckpt") / "random")


def _plant_a_bias(params):
  """Every input's final hidden state points along dimension 0 (a huge constant in every
  embedding), and the untied head maps that dimension onto the token "A": P(A) ≈ 1 always."""
  params["token_embedder"]["embedding"][:, 0] = 100.0
  head = params["logits_dense"]["kernel"]
  head[0, :] = 0.0
  head[0, ord("A") + 3] = 3.0


@pytest.fixture(scope="module")
def biased_checkpoint(tmp_path_factory):
  config = decoder.DecoderConfig(**{**CONFIG.__dict__, "tie_embeddings": False})
  return _write_checkpoint(tmp_path_factory.mktemp("ckpt") / "biased", config,
                           edit=_plant_a_bias)


def _jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
  return str(path)


def _rb_rows(n=12):
  subsets = ["llmbar-natural", "math-prm", "hep-go"]
  return [{"prompt": f"What is {i} plus {i}?", "chosen": str(2 * i), "rejected": str(2 * i + 1),
           "subset": subsets[i % 3], "id": f"q{i}"} for i in range(n)]


def _rate(tmp_path, input_path, *flags, name="out.jsonl", checkpoint=None):
  out = str(tmp_path / name)
  code = rate.main([f"--checkpoint={checkpoint}", f"--input={input_path}", f"--output={out}",
                    "--no_progress", *flags])
  return code, out


def _read(path):
  return [json.loads(l) for l in open(path, encoding="utf-8")]


def test_rewardbench_schema(tmp_path, checkpoint, capsys):
  rows = _rb_rows()
  code, out = _rate(tmp_path, _jsonl(tmp_path / "rb.jsonl", rows), checkpoint=checkpoint)
  assert code == 0
  lines = _read(out)
  assert [l["id"] for l in lines] == [r["id"] for r in rows]
  for line in lines:
    assert set(line["probabilities"]) == {"A", "B"}
    assert abs(sum(line["probabilities"].values()) - 1) < 1e-9
    assert line["p_chosen"] == line["probabilities"][line["chosen"]]
    assert line["correct"] == (line["verdict"] == line["chosen"])
  assert {l["chosen"] for l in lines} == {"A", "B"}  # chosen placed at both positions
  summary = json.load(open(out + rate.SUMMARY_SUFFIX))
  accuracy = {s: np.mean([l["correct"] for l in lines if l["subset"] == s])
              for s in ("llmbar-natural", "math-prm", "hep-go")}
  for s, a in accuracy.items():
    assert summary["rewardbench"]["subsets"][s]["accuracy"] == pytest.approx(a)
  # Reasoning: math-prm weighs as much as the code subsets together (4 examples each here).
  assert summary["rewardbench"]["categories"]["Reasoning"] == pytest.approx(
      (accuracy["math-prm"] + accuracy["hep-go"]) / 2)
  printed = capsys.readouterr().out
  assert "rated 12 of 12 lines" in printed and "| Reasoning |" in printed
  assert not os.path.exists(out + ".partial")


def test_reversed_pairs_give_complementary_verdicts(tmp_path, checkpoint):
  rows = [{"prompt": f"Say something about {w}.", "response_a": f"{w} is nice.",
           "response_b": f"I like {w} a lot, truly."}
          for w in ("cats", "the sea", "jazz", "rain", "chess", "bread")]
  reversed_rows = [{**r, "response_a": r["response_b"], "response_b": r["response_a"]}
                   for r in rows]
  _, out = _rate(tmp_path, _jsonl(tmp_path / "p.jsonl", rows), checkpoint=checkpoint)
  _, out_rev = _rate(tmp_path, _jsonl(tmp_path / "r.jsonl", reversed_rows), name="rev.jsonl",
                     checkpoint=checkpoint)
  for a, b in zip(_read(out), _read(out_rev)):
    assert {a["verdict"], b["verdict"]} == {"A", "B"}
    assert a["probabilities"]["A"] == pytest.approx(b["probabilities"]["B"], abs=1e-6)
    assert a["swap_consistent"] == b["swap_consistent"]


def test_planted_position_bias(tmp_path, biased_checkpoint):
  rows = _rb_rows(8)
  path = _jsonl(tmp_path / "rb.jsonl", rows)
  _, no_swap = _rate(tmp_path, path, "--no_swap", name="noswap.jsonl",
                     checkpoint=biased_checkpoint)
  lines = _read(no_swap)
  assert all(l["verdict"] == "A" and l["probabilities"]["A"] > 0.99 for l in lines)
  assert all("swap_consistent" not in l for l in lines)
  _, swapped = _rate(tmp_path, path, name="swap.jsonl", checkpoint=biased_checkpoint)
  lines = _read(swapped)
  assert not any(l["swap_consistent"] for l in lines)
  for l in lines:  # Averaging both orders cancels the bias exactly.
    assert l["probabilities"]["A"] == pytest.approx(0.5, abs=1e-9)
  assert json.load(open(swapped + rate.SUMMARY_SUFFIX))["swap_consistency"] == 0.0


def test_pointwise_and_classification(tmp_path, checkpoint):
  rows = [{"question": "Capital of France?", "answer": a, "gold": g}
          for a, g in (("Paris", "Yes"), ("Rome", "No"), ("Lyon", "No"))]
  path = _jsonl(tmp_path / "c.jsonl", rows)
  code, out = _rate(tmp_path, path, "--kind=pointwise", "--scale=1,7", "--prompt_field=question",
                    "--response_field=answer", checkpoint=checkpoint)
  assert code == 0
  for line in _read(out):
    probs = line["probabilities"]
    assert list(probs) == [str(v) for v in range(1, 8)]
    assert line["expected_rating"] == pytest.approx(sum(int(k) * v for k, v in probs.items()))
  code, out = _rate(tmp_path, path, "--kind=classification", "--labels=Yes,No",
                    "--prompt_field=question", "--response_field=answer", "--label_field=gold",
                    name="cls.jsonl", checkpoint=checkpoint)
  lines = _read(out)
  assert [l["gold"] for l in lines] == ["Yes", "No", "No"]
  summary = json.load(open(out + rate.SUMMARY_SUFFIX))
  predicted = [l["verdict"] for l in lines]
  recall_yes = float(predicted[0] == "Yes")
  recall_no = np.mean([p == "No" for p in predicted[1:]])
  assert summary["balanced_accuracy"] == pytest.approx((recall_yes + recall_no) / 2)


def test_unified_schema(tmp_path, checkpoint):
  header = {"task_spec": {"name": "my_task", "kind": "classification", "capability": "factuality",
                          "title": "Claim check", "description": "Is the claim true? yes or no.",
                          "context_fields": ["claim"], "output_fields": ["verdict"],
                          "labels": ["yes", "no"]}}
  rows = [header, {"example_id": "e1", "context": {"claim": "Water is wet."},
                   "outputs": {"verdict": "yes"}},
          {"example_id": "e2", "context": {"claim": "Fire is cold."}}]
  code, out = _rate(tmp_path, _jsonl(tmp_path / "u.jsonl", rows), checkpoint=checkpoint)
  assert code == 0
  lines = _read(out)
  assert [l["id"] for l in lines] == ["e1", "e2"]
  assert set(lines[0]["probabilities"]) == {"yes", "no"} and lines[0]["gold"] == "yes"
  assert "gold" not in lines[1]


def test_api_matches_cli_and_instructions(tmp_path, checkpoint):
  rater = autorater.Autorater.load(checkpoint)
  v = rater.compare("What is 2+2?", "4", "5")
  assert v.verdict in ("A", "B") and v.swap_consistent is not None
  reverse = rater.compare("What is 2+2?", "5", "4")
  assert v.probabilities["A"] == pytest.approx(reverse.probabilities["B"], abs=1e-6)
  r = rater.rate("Name a prime.", "7", scale=(1, 3))
  assert set(r.probabilities) == {"1", "2", "3"}
  c = rater.classify("Name a prime.", "8", labels=("Yes", "No"), instructions="Is it prime?")
  assert set(c.probabilities) == {"Yes", "No"}
  task = rater.compare("Sort: b, a", "a, b", "b, a", instructions="llmbar_natural")
  assert task.verdict in ("A", "B")
  _, out = _rate(tmp_path, _jsonl(tmp_path / "one.jsonl", [
      {"prompt": "What is 2+2?", "response_a": "4", "response_b": "5"}]), checkpoint=checkpoint)
  assert _read(out)[0]["probabilities"]["A"] == pytest.approx(v.probabilities["A"], abs=1e-6)


def test_bad_lines_stop_before_writing(tmp_path, checkpoint, capsys):
  rows = _rb_rows(3) + ["{not json", json.dumps({"prompt": "p", "chosen": "x"}),
                        json.dumps({"prompt": "p", "chosen": "  ", "rejected": "y"}), "[1, 2]"]
  path = _jsonl(tmp_path / "bad.jsonl", rows)
  with open(path, "ab") as f:
    f.write(b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}\n')
  code, out = _rate(tmp_path, path, checkpoint=checkpoint)
  err = capsys.readouterr().err
  assert code == 2
  assert "5 of 8 lines" in err
  assert f"{path}:4: not valid JSON" in err
  assert f"{path}:5: field 'rejected' is missing" in err
  assert f"{path}:6: field 'chosen' is empty" in err
  assert f"{path}:7: expected a JSON object" in err
  assert f"{path}:8: not UTF-8" in err
  assert not os.listdir(tmp_path).count("out.jsonl")
  assert not [n for n in os.listdir(tmp_path) if n.startswith("out.jsonl")]
  code, out = _rate(tmp_path, path, "--skip_bad_lines", checkpoint=checkpoint)
  assert code == 0
  lines = _read(out)
  assert len(lines) == 8 and [l["line"] for l in lines] == list(range(1, 9))
  assert [("error" in l) for l in lines] == [False] * 3 + [True] * 5
  assert "5 bad lines" in capsys.readouterr().out


def test_long_inputs_truncated_and_counted(tmp_path, checkpoint, capsys):
  rows = _rb_rows(2) + [{"prompt": "story " * 400, "chosen": "fine", "rejected": "bad",
                         "id": "long"}]
  code, out = _rate(tmp_path, _jsonl(tmp_path / "l.jsonl", rows), "--max_input_length=600",
                    checkpoint=checkpoint)
  assert code == 0
  assert [l["truncated"] for l in _read(out)] == [False, False, True]
  assert json.load(open(out + rate.SUMMARY_SUFFIX))["truncated"] == 1
  assert "1 inputs over --max_input_length were truncated" in capsys.readouterr().out


def test_other_errors(tmp_path, checkpoint, capsys):
  path = _jsonl(tmp_path / "rb.jsonl", _rb_rows(2))
  code, _ = _rate(tmp_path, path, "--vocabulary=smollm2", checkpoint=checkpoint)
  assert code == 2 and "another model's vocabulary" in capsys.readouterr().err
  code, _ = _rate(tmp_path, path, checkpoint=str(tmp_path / "missing"))
  assert code == 2
  code, _ = _rate(tmp_path, _jsonl(tmp_path / "odd.jsonl", [{"q": "x"}]), checkpoint=checkpoint)
  assert code == 2 and "cannot tell the schema" in capsys.readouterr().err
  code, out = _rate(tmp_path, path, checkpoint=checkpoint)
  assert code == 0
  code, _ = _rate(tmp_path, path, checkpoint=checkpoint)
  assert code == 2 and "--overwrite" in capsys.readouterr().err


def test_killed_run_resumes_to_the_same_file(tmp_path, checkpoint):
  rows = [{"prompt": f"Question number {i}: " + "word " * (i % 7), "chosen": f"answer {i}",
           "rejected": f"reply {i * 3}", "id": f"r{i}"} for i in range(240)]
  path = _jsonl(tmp_path / "big.jsonl", rows)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  base = [sys.executable, "-m", "flame.autorater.rate", f"--checkpoint={checkpoint}",
          f"--input={path}", "--chunk_size=8", "--no_progress", "--batch_size=8"]
  subprocess.run(base + [f"--output={tmp_path / 'full.jsonl'}"], check=True, env=env, cwd=REPO,
                 capture_output=True)
  killed = tmp_path / "killed.jsonl"
  proc = subprocess.Popen(base + [f"--output={killed}"], env=env, cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  partial = str(killed) + ".partial"
  deadline = time.time() + 120
  while time.time() < deadline:
    if os.path.exists(partial) and sum(1 for _ in open(partial, "rb")) >= 16:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not killed.exists()
  done = sum(1 for _ in open(partial, "rb"))
  assert 16 <= done < 240
  subprocess.run(base + [f"--output={killed}"], check=True, env=env, cwd=REPO,
                 capture_output=True)
  assert open(killed, "rb").read() == open(tmp_path / "full.jsonl", "rb").read()
  assert not os.path.exists(partial)


def test_pairwise_verdict_reference():
  lp1 = np.log(np.array([0.7, 0.2, 0.1]))  # A, B, Tie with the pair as given
  lp2 = np.log(np.array([0.4, 0.5, 0.1]))  # swapped order: A now names the second response
  v = judgments.pairwise(("A", "B", "Tie"), lp1, lp2)
  assert v.probabilities == pytest.approx({"A": (0.7 + 0.5) / 2, "B": (0.2 + 0.4) / 2,
                                           "Tie": 0.1})
  assert v.verdict == "A" and v.swap_consistent is True
  v = judgments.pairwise(("A", "B"), np.log([0.6, 0.3]), np.log([0.6, 0.3]))
  assert v.swap_consistent is False and v.mass == pytest.approx(0.9)
  p = judgments.pointwise(("1", "2", "3"), np.log([0.2, 0.2, 0.6]) - 3.0)
  assert p.expected_rating == pytest.approx(0.2 + 0.4 + 1.8) and p.verdict == "3"
