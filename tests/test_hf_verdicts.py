"""A judge exported with `flame-convert --to=hf:` gives transformers the same verdicts: the
tiny decoder (random weights, embeddings scaled up so its verdicts are far from uniform),
exported to a Hugging Face folder, loaded by transformers' LlamaForCausalLM, which reads
the verdict tokens after our rendered inputs; its per-order log-probabilities, swapped
verdicts and P(A) equal flame's."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the hf extra (torch) is not installed")
transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not "
                                   "installed")

from flame.autorater import autorater, hf_check, judgments, prompts  # noqa: E402
from flame.checkpoints import convert  # noqa: E402

from test_autorater_rate import _write_checkpoint  # noqa: E402

PAIRS = [("What is 2 + 2?", "4", "5"),
         ("Name a colour.", "Blue.", "I would rather not say."),
         ("Summarise: the cat sat on the mat.", "A cat sat.", "Dogs bark loudly at night."),
         ("Translate 'bonjour'.", "Hello.", "Goodbye, and thanks for all the fish."),
         ("Is water wet?", "Yes.", "No, never, under no circumstances at all.")]


def test_exported_judge_gives_transformers_the_same_verdicts(tmp_path):
  def sharpen(params):
    params["token_embedder"]["embedding"] *= 30.0
  checkpoint = _write_checkpoint(tmp_path / "judge", seed=2, edit=sharpen)
  hf_dir = tmp_path / "hf"
  convert.main([f"--from=orbax:{checkpoint}", f"--to=hf:{hf_dir}"])
  model = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32)
  model.eval()
  rater = autorater.Autorater.load(checkpoint, batch_size=8, max_input_length=256)
  spec = prompts.task_spec("pairwise")
  requests = [autorater.Request.of(spec, p, (a, b)) for p, a, b in PAIRS]
  ours = rater.judge(requests, swap=True)
  queries = [rater._query(r)[0] for request in requests  # pylint: disable=protected-access
             for r in (request, request.swapped())]
  ours_log_probs = rater.scorer.log_probs(rater.params, queries)
  theirs_log_probs = hf_check.transformers_log_probs(model, queries)
  for mine, theirs in zip(ours_log_probs, theirs_log_probs):
    np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4)
  labels = rater.labels_of(spec)
  decided = 0
  for i, verdict in enumerate(ours):
    theirs = judgments.pairwise(labels, theirs_log_probs[2 * i], theirs_log_probs[2 * i + 1])
    assert theirs.probabilities["A"] == pytest.approx(verdict.probabilities["A"], abs=1e-4)
    if abs(verdict.probabilities["A"] - 0.5) > 1e-3:  # not a tie that rounding could flip
      decided += 1
      assert theirs.verdict == verdict.verdict
      assert theirs.swap_consistent == verdict.swap_consistent
  assert decided >= 3


def test_hf_check_command_compares_a_users_pairs(tmp_path):
  def sharpen(params):
    params["token_embedder"]["embedding"] *= 30.0
  checkpoint = _write_checkpoint(tmp_path / "judge", seed=2, edit=sharpen)
  convert.main([f"--from=orbax:{checkpoint}", f"--to=hf:{tmp_path / 'hf'}"])
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text("".join(json.dumps({"prompt": p, "response_a": a, "response_b": b}) + "\n"
                           for p, a, b in PAIRS))
  result = hf_check.main([f"--checkpoint={checkpoint}", f"--hf_dir={tmp_path / 'hf'}",
                          f"--input={pairs}", "--max_input_length=256",
                          f"--output={tmp_path / 'check.json'}"])
  assert result["pairs"] == len(PAIRS) and result["max_abs_p_a_difference"] < 1e-4
  assert result["decided"] >= 3 and result["same_verdicts"] == result["decided"]
  assert json.loads((tmp_path / "check.json").read_text())["pairs"] == len(PAIRS)


def test_hf_check_names_a_bad_line(tmp_path):
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text('{"prompt": "p", "response_a": "a", "response_b": "b"}\n{"prompt": "p"}\n')
  with pytest.raises(ValueError, match=r"pairs.jsonl:2: expected a JSON object with prompt, "
                     r"response_a and response_b \(KeyError"):
    hf_check.read_pairs(str(pairs))
