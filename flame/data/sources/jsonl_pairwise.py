"""A user's own preference pairs, one JSON object per line (pairwise; capability chosen).

Schema (RewardBench's): ``{"prompt": str, "chosen": str, "rejected": str[, "subset": str]}``,
one object per non-blank line (``.gz`` read transparently); other fields are ignored. The file
is not registered: a `JsonlPairwiseConfig` names the task and gives the path, the capability,
optionally a title, a description, the file's expected sha256 (checked when preparing; a
mismatch is refused), a license note and the subsets to keep. ``BUILDER_CONFIGS`` is empty::

  builder = tfds.builder("flame_jsonl_pairwise", data_dir=...,
                         config=JsonlPairwiseConfig(name="my_prefs", path="prefs.jsonl",
                                                    capability="quality"))
  builder.download_and_prepare()

Conversion: ``prompt`` = prompt; the chosen response goes to ``response_a`` or ``response_b``
by `base.chosen_first` of the example id (a stable hash, so about half the answers are A and
half B), ``answer`` names its position; training pairs are also seen in the other order
(the base's swap augmentation). Example ids are ``<file name>:line <N>``; the split unit is
the prompt, so every pair for one prompt lands in the same split.

Bad rows (raise `base.BadRowError` naming the file, line and field; with
``skip_bad_rows=True`` they are skipped and counted in ``info.metadata["skipped_rows"]``): a
line that is not JSON or not an object, a missing, non-string or blank prompt / chosen /
rejected, a non-string subset, and a pair whose chosen and rejected responses are identical.
A row whose subset is not among the config's ``subsets`` (when given; rows without a subset
then count as not among them) is left out silently.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from flame.data import format
from flame.data.sources import base, user_files

DEFAULT_TITLE = "Better response"
DEFAULT_DESCRIPTION = ("Given a prompt and two responses, decide which response is better. "
                       "Reply A or B.")


def pairwise_spec(name: str, capability: str | format.Capability, title: Optional[str] = None,
                  description: Optional[str] = None) -> format.TaskSpec:
  return format.TaskSpec(
      name=name, kind=format.TaskKind.PAIRWISE, capability=capability,
      title=title or DEFAULT_TITLE, description=description or DEFAULT_DESCRIPTION,
      context_fields=("prompt", "response_a", "response_b"), output_fields=("answer",),
      labels=("A", "B"))


class JsonlPairwiseConfig(user_files.UserFileConfig):
  """Task `name` (capability, title, description) read from the JSONL file at `path`."""

  def __init__(self, *, name: str, path: str | os.PathLike,
               capability: str | format.Capability, title: Optional[str] = None,
               description: Optional[str] = None, sha256: Optional[str] = None,
               license: str = user_files.UNSPECIFIED_LICENSE,  # pylint: disable=redefined-builtin
               subsets: Optional[Sequence[str]] = None):
    super().__init__(pairwise_spec(name, capability, title, description), path, sha256, license)
    if isinstance(subsets, str):
      subsets = (subsets,)
    self.subsets = None if subsets is None else frozenset(subsets)


class FlameJsonlPairwise(user_files.UserFileBuilder):
  """Builder ``flame_jsonl_pairwise`` (configs come from users; see the module docstring)."""

  DESCRIPTION = __doc__

  def rows(self, paths):
    path = paths[user_files.USER_FILE]
    yield from base.read_jsonl(path, label=path, keep_unparsed=True)

  def convert(self, row):
    prompt, chosen, rejected = (row.get(name) for name in ("prompt", "chosen", "rejected"))
    subset = row.get("subset") if "subset" in row.data else None
    if chosen == rejected:
      raise row.error("rejected", "is identical to 'chosen': there is nothing to prefer")
    wanted = self.user_config.subsets
    if wanted is not None and subset not in wanted:
      return
    example_id = f"{os.path.basename(row.file)}:{row.position}"
    first = base.chosen_first(example_id)
    example = format.Example(
        task=self.spec.name, example_id=example_id,
        context={"prompt": prompt, "response_a": chosen if first else rejected,
                 "response_b": rejected if first else chosen},
        outputs={"answer": "A" if first else "B"})
    yield base.Converted(example, group=prompt)
