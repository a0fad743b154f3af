"""Public data files: upstream address + sha256, found in a mirror or a cache.

`resolve("truthfulqa_judge/finetune_truth_dev.jsonl")` returns a local path to
the verified file, looking in order at

1. the mirror folder (``FLAME_DATA_MIRROR`` or `set_mirror_dir`), e.g. a
   byte-identical copy of the upstream files for offline machines;
2. the cache (``FLAME_DATA_CACHE``, default ``~/.cache/flame/data``);
3. the upstream address, downloaded into the cache (atomically) when online.

Every file is checked against its recorded sha256; a mismatch is refused.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
import urllib.parse
import urllib.request
from typing import Callable, Optional

from flame import errors, files

MIRROR_ENV = "FLAME_DATA_MIRROR"
CACHE_ENV = "FLAME_DATA_CACHE"


@dataclasses.dataclass(frozen=True)
class RemoteFile:
  repo: str  # owner/name on GitHub
  commit: str
  path: str  # inside the repository
  sha256: str
  size: int  # bytes
  license: str

  @property
  def url(self) -> str:
    path = urllib.parse.quote(self.path)
    return f"https://raw.githubusercontent.com/{self.repo}/{self.commit}/{path}"


_HALUEVAL = ("RUCAIBox/HaluEval", "b7253db3cdaa0ab2c382f92b26b390109174f77e")
_HH_RLHF = ("anthropics/hh-rlhf", "354e5c3cb8960630860dd5774a6ac2a58313bf4d")
_PROMETHEUS_EVAL = ("prometheus-eval/prometheus-eval", "dcfb44272d5d0414832f5dbb8c2a05ebc2614234")
_LLMBAR = ("princeton-nlp/LLMBar", "900616bff90b6c6c8e1681f7d079250637c55992")
_MODERATION_API_RELEASE = ("openai/moderation-api-release",
                           "f4ab51b5edd3bfbcb349a56324274235b674e0e4")
_PANDALM = ("WeOpenML/PandaLM", "3871806e72b4832f815ecafd24d3503c73403f48")
_SUMMAC = ("tingofurro/summac", "46056e54e3f30a47655d2d2e76150ad428f58224")
_TRUTHFULQA_REEVAL = ("yizhongw/truthfulqa_reeval", "2de12d7832345d6bf97bc9050bdae48c50e67bf0")
_UNIEVAL = ("maszhongming/UniEval", "d33e7b6cfebe97b2bafe435adbd818230d5a416a")
_WMT_MQM_HUMAN_EVALUATION = ("google/wmt-mqm-human-evaluation",
                             "7fadea281aff8db61cc72fc3d469a4dca78b82a6")
_EXAGGERATED_SAFETY = ("paul-rottger/exaggerated-safety",
                       "d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d")

# Local name (relative to the mirror root) → upstream file (mirrored in ../shared/data/raw).
FILES: dict[str, RemoteFile] = {
    "halueval/general_data.json": RemoteFile(
        *_HALUEVAL, "data/general_data.json",
        "73302cd97666b808fb94b5d8a4a2c924049c9484e609017a2f808c4a6d539219", 3307122, "MIT"),
    "hh_rlhf/harmless-base/test.jsonl.gz": RemoteFile(
        *_HH_RLHF, "harmless-base/test.jsonl.gz",
        "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03", 742801, "MIT"),
    "hhh_alignment/hhh_alignment_eval.json": RemoteFile(
        *_PROMETHEUS_EVAL, "eval/benchmark/data/hhh_alignment_eval.json",
        "fe6655dfeec99d04d582692767c736f2385b5e067f0b894d1b73a32af7be9c9e", 1207596, "Apache-2.0"),
    "llmbar/Adversarial/GPTInst/dataset.json": RemoteFile(
        *_LLMBAR, "Dataset/LLMBar/Adversarial/GPTInst/dataset.json",
        "1002425f73c2cf54b6e6de99bce3f6c60fa2a17d13194772e37d7481c1351d42", 211768, "MIT"),
    "llmbar/Adversarial/GPTOut/dataset.json": RemoteFile(
        *_LLMBAR, "Dataset/LLMBar/Adversarial/GPTOut/dataset.json",
        "1ff56e520d7607750a9866a3be0f5b850392ca4477a1f69d80f32bd3e310f561", 32640, "MIT"),
    "llmbar/Adversarial/Manual/dataset.json": RemoteFile(
        *_LLMBAR, "Dataset/LLMBar/Adversarial/Manual/dataset.json",
        "0d9598769a39cdbbd265778c37e49939d41d5f76dcfb17bd75dcfa07516d3837", 79050, "MIT"),
    "llmbar/Adversarial/Neighbor/dataset.json": RemoteFile(
        *_LLMBAR, "Dataset/LLMBar/Adversarial/Neighbor/dataset.json",
        "6712c7eda6342602e0bc7c06c282fa95e2110d4e741a284026a62d937f9780a0", 131988, "MIT"),
    "llmbar/Natural/dataset.json": RemoteFile(
        *_LLMBAR, "Dataset/LLMBar/Natural/dataset.json",
        "f7127b7aa78104cb8e03a2b1b3ac0077e95b125714dd441a8ee63666145a3375", 91269, "MIT"),
    "llmbar_processed/faireval/dataset.json": RemoteFile(
        *_LLMBAR, "Dataset/Processed/FairEval/dataset.json",
        "5b4a129258c1efa273a1b10fec399f5462b458facf900e8e1948f4acb1b37dd6", 185654, "MIT"),
    "llmbar_processed/llmeval2/dataset.json": RemoteFile(
        *_LLMBAR, "Dataset/Processed/LLMEval^2/dataset.json",
        "deffdaeccda39c0fb9337c7e20925ec2b973bfd456832c2f1ba0e9ca4cf107de", 298957, "MIT"),
    "llmbar_processed/mt_bench_human/dataset.json": RemoteFile(
        *_LLMBAR, "Dataset/Processed/MT-Bench/dataset.json",
        "c152249bc095d152485954bd2abd9ea79528ee5e4c045bfe9ef78755b03c20d8", 468579, "MIT"),
    "openai_moderation/samples-1680.jsonl.gz": RemoteFile(
        *_MODERATION_API_RELEASE, "data/samples-1680.jsonl.gz",
        "ef3f7de86ee394fe337b0a566ba4b9c7db058f3caa8d6a4a0006138b663ab9a8", 477573, "MIT"),
    "pandalm/testset-v1.json": RemoteFile(
        *_PANDALM, "data/testset-v1.json",
        "cc154f9067c7382d7ea86f8f246511a5e1ac87e1fddd845c5938d789505b07a4", 937899, "Apache-2.0"),
    "summac/factcc.json": RemoteFile(
        *_SUMMAC, "data/factcc.json",
        "e6465180d59f8153a1cf96e2b2cc3c9a524e7b2c7a04aa3a6d4184cb8faeacd6", 1151781, "Apache-2.0"),
    "summac/summeval.json": RemoteFile(
        *_SUMMAC, "data/summeval.json",
        "5a0615322704d8e75870221573619031b8b37777fd08039e6a5eed37f7df9c6e", 286185, "Apache-2.0"),
    "truthfulqa_judge/finetune_truth_dev.jsonl": RemoteFile(
        *_TRUTHFULQA_REEVAL, "data/finetune_truth_dev.jsonl",
        "4469a6a91f23a2d98eff26d0d8464970b278b2f9cfc80b132fe807ef06932810", 404297, "Apache-2.0"),
    "truthfulqa_judge/finetune_truth_train.jsonl": RemoteFile(
        *_TRUTHFULQA_REEVAL, "data/finetune_truth_train.jsonl",
        "6b57271582f6a877fdd869ee604581d3694b6193e9a8e307f3695836f0b10d15", 3172052, "Apache-2.0"),
    "unieval/qags_cnndm.json": RemoteFile(
        *_UNIEVAL, "reproduce/data/fact/qags_cnndm.json",
        "de8d216db28b0ce89edf761bf639d1917adca6704c29d807a1e99a0aaaa4b2c5", 975258, "MIT"),
    "unieval/qags_xsum.json": RemoteFile(
        *_UNIEVAL, "reproduce/data/fact/qags_xsum.json",
        "1403b4d1abed008d0303f883d35d71c88597c49d5a6e4ef2e1d2d22a283b49df", 1098956, "MIT"),
    "unieval/sfres.json": RemoteFile(
        *_UNIEVAL, "reproduce/data/data2text/sfres.json",
        "8e024cab8e202d572c554a1f44ee765d74690da008d47dca37e61ee5b5ce093f", 506399, "MIT"),
    "unieval/topical_chat.json": RemoteFile(
        *_UNIEVAL, "reproduce/data/dialogue/topical_chat.json",
        "f6361daa6fe162f636d2071a60322a784acd770be0bf3a6920ac949d751b978a", 669279, "MIT"),
    "wmt_mqm/ted_ende/mqm_ted_ende.tsv": RemoteFile(
        *_WMT_MQM_HUMAN_EVALUATION, "ted/ende/mqm_ted_ende.tsv",
        "3952dc904997dda31c03421243862cb8a093f9a712fd90dc97b9709b4bb387b3", 2341948, "Apache-2.0"),
    "xstest/xstest_prompts.csv": RemoteFile(
        *_EXAGGERATED_SAFETY, "xstest_prompts.csv",
        "11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a", 38719, "CC-BY-4.0"),
    "xstest/xstest_v2_completions_gpt4.csv": RemoteFile(
        *_EXAGGERATED_SAFETY, "model_completions/xstest_v2_completions_gpt4.csv",
        "71af323af8ecdec0efae23992317721441d2cfedddedeef3248f842f4e15c9ca", 259111, "CC-BY-4.0"),
    "xstest/xstest_v2_completions_mistralguard.csv": RemoteFile(
        *_EXAGGERATED_SAFETY, "model_completions/xstest_v2_completions_mistralguard.csv",
        "0ac03817b65e019a8f5b4b3eed805086f9f7fafe538ac9ebd156f80210af6903", 303726, "CC-BY-4.0"),
}

_mirror_override: Optional[str] = None


class DataFileError(errors.InputError, RuntimeError):
  """A data file is unknown, unavailable or fails its checksum."""


def set_mirror_dir(path: Optional[str]) -> None:
  global _mirror_override
  _mirror_override = path


def mirror_dir() -> Optional[str]:
  return _mirror_override or os.environ.get(MIRROR_ENV)


def cache_dir() -> str:
  return os.environ.get(CACHE_ENV, os.path.join(os.path.expanduser("~"), ".cache", "flame",
                                                "data"))


def _verified(path: str, name: str, remote: RemoteFile) -> str:
  actual = files.sha256_of(path)
  if actual != remote.sha256:
    raise DataFileError(f"{path}: sha256 {actual} does not match the recorded {remote.sha256} "
                        f"for {name} ({remote.url}); the file is corrupt or a different version")
  return path


def _download(url: str, dest: str) -> None:
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".partial-")
  try:
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
      for chunk in iter(lambda: response.read(1 << 20), b""):
        out.write(chunk)
    os.replace(tmp, dest)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


Fetch = Callable[[RemoteFile, str], str]
PROBE_TIMEOUT = 5.0  # seconds to wait for the upstream host before calling the machine offline


def unreachable(url: str, timeout: float = PROBE_TIMEOUT) -> Optional[str]:
  """Why `url`'s host cannot be reached (name lookup or TCP connect), or None if it can."""
  parts = urllib.parse.urlsplit(url)
  try:
    with socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout):
      return None
  except OSError as e:
    return f"{type(e).__name__}: {e}"


def _urllib_fetch(remote: RemoteFile, dest: str) -> str:
  _download(remote.url, dest)
  return dest


def resolve(name: str, fetch: Optional[Fetch] = None) -> str:
  """Local, checksum-verified path of the registered file `name`.

  `fetch(remote, cache_path) -> local path` downloads a missing file (default: urllib into
  the cache; TFDS builders pass their download manager, which checks the sha256 too).
  """
  if name not in FILES:
    raise DataFileError(f"unknown data file {name!r}; registered: {sorted(FILES)}")
  remote = FILES[name]
  mirror = mirror_dir()
  if mirror and os.path.exists(os.path.join(mirror, name)):
    return _verified(os.path.join(mirror, name), name, remote)
  cached = os.path.join(cache_dir(), name)
  if os.path.exists(cached):
    return _verified(cached, name, remote)
  where = f"the mirror {mirror} has no {name} and " if mirror else "no mirror is set and "

  def unavailable(reason: str) -> DataFileError:
    return DataFileError(
        f"data file {name} is not available: {where}downloading {remote.url} failed "
        f"({reason}). Either set {MIRROR_ENV} to a folder holding {name} "
        f"(e.g. ../shared/data/raw), or go online so it can be downloaded into "
        f"{cache_dir()}")
  offline = unreachable(remote.url)  # Fail at once offline, before any downloader retries.
  if offline:
    raise unavailable(f"host unreachable: {offline}")
  try:
    path = (fetch or _urllib_fetch)(remote, cached)
  except Exception as e:  # urllib raises OSError; TFDS its own download errors.
    raise unavailable(f"{type(e).__name__}: {e}") from e
  return _verified(path, name, remote)
