"""flame: T5X-style JAX/Flax post-training (FLAMe autoraters, model merging).

Importing flame first keeps a CPU-only machine's first screen quieter: where the machine has
neither TPU nor NVIDIA device files, JAX is told to use the CPU (``JAX_PLATFORMS=cpu``)
instead of probing for a TPU through libtpu (installed for AOT compiles) and printing its
errors; TensorFlow's later C++ info and warning lines are hidden (``TF_CPP_MIN_LOG_LEVEL=2``,
only when unset: the environment wins), and the few it prints while being imported are
filtered out (`flame.quiet_imports`); library log records about nothing wrong (Orbax's
read-only notices, TFDS's unprepared folders, gin's file lookups) are dropped on every machine.
"""
import glob as _glob
import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if not (_glob.glob("/dev/accel*") or _glob.glob("/dev/vfio/*") or _glob.glob("/dev/nvidia*")):
  _os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from flame import quiet_imports as _quiet_imports
  _quiet_imports.install()

from flame import quiet_imports as _quiet  # noqa: E402

_quiet.filter_library_notices()
