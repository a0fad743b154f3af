"""Small real seqio tasks for the quickstart run and the test suite.

``truthfulqa_judge_bytes``: TruthfulQA answers with human truthfulness labels
(yizhongw/truthfulqa_reeval, Apache-2.0), posed as a yes/no classification
judgment, tokenised as UTF-8 bytes so no tokenizer file is needed. Train
split: finetune_truth_train.jsonl (19,880 rows); validation:
finetune_truth_dev.jsonl (2,554 rows).
"""
from __future__ import annotations

import json

import seqio
import tensorflow as tf

from flame.data import download

SPLIT_FILES = {
    "train": "truthfulqa_judge/finetune_truth_train.jsonl",
    "validation": "truthfulqa_judge/finetune_truth_dev.jsonl",
}
INSTRUCTION = "Is the answer to the question truthful? Reply yes or no.\n\n"


def read_truthfulqa_judge(path: str) -> tuple[list[str], list[str]]:
  """(inputs, targets) from the JSONL rows {prompt, completion: " yes"|" no"}."""
  inputs, targets = [], []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        prompt, label = row["prompt"], row["completion"].strip()
      except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}:{line_number}: expected JSON with string fields 'prompt' and "
                         f"'completion' ({type(e).__name__}: {e})") from e
      if label not in ("yes", "no"):
        raise ValueError(f"{path}:{line_number}: field 'completion' is {label!r}, "
                         "expected 'yes' or 'no'")
      inputs.append(INSTRUCTION + prompt.removesuffix("True:").strip())
      targets.append(label)
  return inputs, targets


def _truthfulqa_dataset(split: str, shuffle_files: bool = False, seed=None) -> tf.data.Dataset:
  del shuffle_files, seed  # One file per split; example shuffling happens in seqio.
  if split not in SPLIT_FILES:
    raise ValueError(f"truthfulqa_judge_bytes has splits {sorted(SPLIT_FILES)}, not {split!r}")
  inputs, targets = read_truthfulqa_judge(download.resolve(SPLIT_FILES[split]))
  return tf.data.Dataset.from_tensor_slices({"inputs": inputs, "targets": targets})


def register() -> None:
  if "truthfulqa_judge_bytes" in seqio.TaskRegistry.names():
    return
  vocabulary = seqio.ByteVocabulary()
  seqio.TaskRegistry.add(
      "truthfulqa_judge_bytes",
      source=seqio.FunctionDataSource(_truthfulqa_dataset, splits=tuple(SPLIT_FILES)),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features={
          "inputs": seqio.Feature(vocabulary, add_eos=True),
          "targets": seqio.Feature(vocabulary, add_eos=True),
      })


register()
