"""Registered data files: mirror lookup, sha256 refusal, the offline error, TFDS checksums."""
import os
import shutil
import time

import pytest
import tensorflow_datasets as tfds

from flame import files
from flame.data import download
from flame.data.sources import summac

NAME = "summac/summeval.json"  # a small registered file (286 kB)
MIRROR = os.environ["FLAME_DATA_MIRROR"]


@pytest.fixture
def fake_mirror(tmp_path, monkeypatch):
  """An empty mirror, an empty cache and no network: only what a test puts there exists."""
  mirror, cache = tmp_path / "mirror", tmp_path / "cache"
  mirror.mkdir()
  monkeypatch.setenv(download.MIRROR_ENV, str(mirror))
  monkeypatch.setenv(download.CACHE_ENV, str(cache))

  def offline(url, dest):
    raise OSError(f"network unreachable (test) for {url}")

  monkeypatch.setattr(download, "_download", offline)
  return mirror


def test_every_mirrored_file_is_registered_and_verifies():
  for name, remote in download.FILES.items():
    path = os.path.join(MIRROR, name)
    assert os.path.getsize(path) == remote.size, name
  assert files.sha256_of(download.resolve(NAME)) == download.FILES[NAME].sha256
  assert download.FILES[NAME].url == ("https://raw.githubusercontent.com/tingofurro/summac/"
                                      "46056e54e3f30a47655d2d2e76150ad428f58224/data/summeval.json")
  # The '^' of "LLMEval^2" is escaped in the address.
  assert "LLMEval%5E2" in download.FILES["llmbar_processed/llmeval2/dataset.json"].url


def test_a_corrupt_mirror_file_is_refused(fake_mirror):
  target = fake_mirror / NAME
  target.parent.mkdir(parents=True)
  data = open(os.path.join(MIRROR, NAME), "rb").read()
  target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped
  with pytest.raises(download.DataFileError, match="does not match the recorded"):
    download.resolve(NAME)
  builder = summac.FlameSummac(config="summac_summeval_consistency",
                               data_dir=str(fake_mirror.parent / "tfds"))
  with pytest.raises(download.DataFileError, match="summeval.json: sha256"):
    builder.download_and_prepare()


def test_a_missing_file_offline_names_the_file_and_both_ways_to_get_it(fake_mirror):
  with pytest.raises(download.DataFileError) as error:
    download.resolve(NAME)
  message = str(error.value)
  assert NAME in message and download.MIRROR_ENV in message
  assert download.FILES[NAME].url in message and "go online" in message


def test_the_cache_is_used_when_the_mirror_lacks_the_file(fake_mirror, tmp_path):
  cached = tmp_path / "cache" / NAME
  cached.parent.mkdir(parents=True)
  shutil.copy(os.path.join(MIRROR, NAME), cached)
  assert download.resolve(NAME) == str(cached)


def test_builders_give_tfds_the_recorded_checksums():
  infos = summac.FlameSummac.url_infos
  remote = download.FILES[NAME]
  assert infos[remote.url] == tfds.core.download.checksums.UrlInfo(
      size=remote.size, checksum=remote.sha256, filename="summeval.json")


def test_a_builder_offline_with_a_file_missing_fails_at_once(tmp_path, monkeypatch):
  """Really offline (this machine reaches only package registries): no downloader retries."""
  if download.unreachable(download.FILES[NAME].url, timeout=2) is None:
    pytest.skip("the upstream host is reachable: this machine is online")
  monkeypatch.setenv(download.MIRROR_ENV, str(tmp_path / "mirror"))
  monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "cache"))
  builder = summac.FlameSummac(config="summac_summeval_consistency",
                               data_dir=str(tmp_path / "tfds"))
  start = time.monotonic()
  with pytest.raises(download.DataFileError, match="host unreachable") as error:
    builder.download_and_prepare()
  assert time.monotonic() - start < 3 * download.PROBE_TIMEOUT
  assert NAME in str(error.value) and download.MIRROR_ENV in str(error.value)
