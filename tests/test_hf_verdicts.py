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

from flame.autorater import autorater, hf_check, prompts  # noqa: E402
from flame.checkpoints import convert  # noqa: E402

from test_autorater_rate import _write_checkpoint  # noqa: E402

PAIRS = [("What is 2 + 2?", "4", "5"),
         ("Name a colour.", "Blue.", "I would rather not say."),
         ("Summarise: the cat sat on the mat.", "A cat sat.", "Dogs bark loudly at night."),
         ("Translate 'bonjour'.", "Hello.", "Goodbye, and thanks for all the fish."),
         ("Is water wet?", "Yes.", "No, never, under no circumstances at all.")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(a tiny judge's checkpoint, its HF export)."""
  def sharpen(params):
    params["token_embedder"]["embedding"] *= 30.0
  tmp_path = tmp_path_factory.mktemp("exported")
  checkpoint = _write_checkpoint(tmp_path / "judge", seed=2, edit=sharpen)
  convert.main([f"--from=orbax:{checkpoint}", f"--to=hf:{tmp_path / 'hf'}"])
  return checkpoint, tmp_path / "hf"


def test_exported_judge_gives_transformers_the_same_verdicts(exported):
  checkpoint, hf_dir = exported
  model = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32)
  model.eval()
  rater = autorater.Autorater.load(checkpoint, batch_size=8, max_input_length=256)
  spec = prompts.task_spec("pairwise")
  requests = [autorater.Request.of(spec, p, (a, b)) for p, a, b in PAIRS]
  ours = rater.judge(requests, swap=True)
  result = hf_check.compare(rater, model, requests)
  decided = 0
  for verdict, pair in zip(ours, result["verdicts"], strict=True):
    for mine, theirs in zip(pair["flame"]["log_probs"], pair["transformers"]["log_probs"]):
      np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4)
    # The comparison's flame side is what Autorater.judge says.
    assert pair["flame"]["p_a"] == pytest.approx(verdict.probabilities["A"], abs=1e-9)
    theirs = pair["transformers"]
    assert theirs["p_a"] == pytest.approx(verdict.probabilities["A"], abs=1e-4)
    if abs(verdict.probabilities["A"] - 0.5) > 1e-3:  # not a tie that rounding could flip
      decided += 1
      assert theirs["verdict"] == verdict.verdict
      assert theirs["swap_consistent"] == verdict.swap_consistent
  assert decided >= 3 and result["decided"] == decided


def test_hf_check_command_compares_a_users_pairs(exported, tmp_path):
  checkpoint, hf_dir = exported
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text("".join(json.dumps({"prompt": p, "response_a": a, "response_b": b}) + "\n"
                           for p, a, b in PAIRS))
  result = hf_check.main([f"--checkpoint={checkpoint}", f"--hf_dir={hf_dir}",
                          f"--input={pairs}", "--max_input_length=256",
                          f"--output={tmp_path / 'check.json'}"])
  assert result["pairs"] == len(PAIRS) and result["max_abs_p_a_difference"] < 1e-4
  assert result["decided"] >= 3 and result["same_verdicts"] == result["decided"]
  assert json.loads((tmp_path / "check.json").read_text())["pairs"] == len(PAIRS)


def test_hf_check_names_a_bad_line(tmp_path):
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text('{"prompt": "p", "response_a": "a", "response_b": "b"}\n{"prompt": "p"}\n')
  with pytest.raises(ValueError, match=r"1 bad line\(s\): .*pairs.jsonl:2: field 'response_a' "
                     r"is missing"):
    hf_check.read_requests(str(pairs))
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(ValueError, match=r"empty.jsonl: no pairs"):
    hf_check.read_requests(str(tmp_path / "empty.jsonl"))
