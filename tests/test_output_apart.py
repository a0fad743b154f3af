"""An output never is, contains or sits inside an input, with or without --overwrite: the rule
(`flame.files.check_output_apart`) and each command that writes (flame-rate, flame-evaluate,
flame-merge, flame-convert, flame-tailpatch), each refusal leaving the files as they were."""
import os

import pytest

from flame import files
from flame.autorater import evaluate, rate
from flame.checkpoints import convert
from merging import merge

from test_autorater_rate import _jsonl, _rb_rows, _write_checkpoint  # noqa: F401


def listing(root):
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return _write_checkpoint(tmp_path_factory.mktemp("ckpt") / "random")


def test_the_rule(tmp_path):
  data = tmp_path / "data"
  (data / "sub").mkdir(parents=True)
  (data / "pairs.jsonl").write_text("{}\n")
  os.symlink(data / "pairs.jsonl", tmp_path / "link.jsonl")
  pairs = data / "pairs.jsonl"
  cases = [(pairs, pairs, "is"), (tmp_path / "link.jsonl", pairs, "is"),
           (data / "sub" / "out", data, "is inside"), (tmp_path, data, "contains")]
  for output, given, relation in cases:
    with pytest.raises(files.OutputOverlapsInputError,
                       match=f"--output={output} {relation} the input --input={given}:"):
      files.check_output_apart("--output", str(output), [("--input", str(given))])
  files.check_output_apart("--output", str(tmp_path / "data2"), [("--input", str(data)),
                                                                 ("--other", None)])
  files.check_output_apart("--output", str(data / "verdicts.jsonl"),
                           [("--input", str(data / "pairs.jsonl"))])  # a sibling is fine


def test_flame_rate_never_writes_over_its_input(tmp_path, checkpoint, capsys):
  pairs = _jsonl(tmp_path / "pairs.jsonl", _rb_rows(3))
  before = listing(tmp_path)
  for output in (pairs, os.path.join(checkpoint, "verdicts.jsonl")):
    code = rate.main([f"--checkpoint={checkpoint}", f"--input={pairs}", f"--output={output}",
                      "--overwrite", "--no_progress"])
    assert code == 2
    assert "an output never touches an input" in capsys.readouterr().err
  assert listing(tmp_path) == before
  assert not os.path.exists(os.path.join(checkpoint, "verdicts.jsonl"))


def test_flame_evaluate_output_dir_inside_a_checkpoint(tmp_path, checkpoint, capsys):
  pairs = _jsonl(tmp_path / "pairs.jsonl", _rb_rows(3))
  before = listing(checkpoint)
  code = evaluate.main([f"--checkpoint={checkpoint}", f"--input={pairs}", "--no_progress",
                        f"--output_dir={os.path.join(checkpoint, 'eval')}"])
  assert code == 2
  assert (f"--output_dir={os.path.join(checkpoint, 'eval')} is inside the input "
          f"--checkpoint={checkpoint}") in capsys.readouterr().err
  assert listing(checkpoint) == before


@pytest.mark.parametrize("output_format", ["orbax", "hf"])
def test_flame_merge_into_one_of_its_inputs(tmp_path, output_format):
  base = _write_checkpoint(tmp_path / "base", seed=1)
  expert = _write_checkpoint(tmp_path / "expert", seed=2)
  before = listing(tmp_path)
  for target, relation in ((expert, "is"), (os.path.join(expert, "merged"), "is inside"),
                           (str(tmp_path), "contains")):
    with pytest.raises(files.OutputOverlapsInputError, match=f"{relation} the input"):
      merge.merge(base, [expert, expert], target, "linear", overwrite=True,
                  output_format=output_format, progress_bar=False)
  assert listing(tmp_path) == before


def test_flame_convert_into_its_source(tmp_path, checkpoint):
  before = listing(checkpoint)
  target = os.path.join(checkpoint, "hf")
  with pytest.raises(files.OutputOverlapsInputError, match=f"--to={target} is inside the input "
                     f"--from={checkpoint}"):
    convert.main([f"--from=orbax:{checkpoint}", f"--to=hf:{target}", "--no_progress"])
  assert listing(checkpoint) == before


def test_flame_tailpatch_out_dir_inside_its_init_checkpoint(checkpoint):
  import argparse  # pylint: disable=import-outside-toplevel
  from flame.tailpatch import run  # pylint: disable=import-outside-toplevel
  before = listing(checkpoint)
  args = argparse.Namespace(init=checkpoint, out_dir=os.path.join(checkpoint, "patches"))
  with pytest.raises(files.OutputOverlapsInputError, match="--out_dir=.* is inside the input "
                     "--init="):
    run.run(None, args)  # refused before the settings are looked at
  assert listing(checkpoint) == before
