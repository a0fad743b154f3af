"""Test setup: 8 simulated CPU devices and the offline data mirror.

The environment must be set before jax (or anything importing it) loads.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("FLAME_DATA_MIRROR", os.path.join(os.path.dirname(_REPO), "shared", "data",
                                                        "raw"))

import contextlib  # noqa: E402

import gin  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes more than ~30 s; run with -m slow")


@pytest.fixture(autouse=True)
def _clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@contextlib.contextmanager
def _prepared_data_dir(path, tasks=()):
  """FLAME_TFDS_DIR set to `path`, the bytes tasks registered over it and `tasks` (FLAMe task
  names) prepared there from the mirror; the default data directory registered again after."""
  # pylint: disable=import-outside-toplevel  (jax must not load before the settings above)
  import tensorflow_datasets as tfds
  from flame.data import mixtures, sources, tasks as flame_tasks
  from flame.data.sources import base
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv(base.TFDS_DIR_ENV, path)
    mixtures.register(vocabularies=("bytes",))
    for task in tasks:
      builder_cls, spec = sources.task_specs()[task]
      tfds.builder(flame_tasks.tfds_name(builder_cls, spec), data_dir=path).download_and_prepare()
    yield path
  mixtures.register(vocabularies=("bytes",))


@pytest.fixture(scope="session")
def prepared_data_dir():
  """`with prepared_data_dir(path, tasks) as path:` (for module-scoped data fixtures)."""
  return _prepared_data_dir
