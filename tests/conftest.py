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

import gin  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes more than ~30 s; run with -m slow")


@pytest.fixture(autouse=True)
def _clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()
