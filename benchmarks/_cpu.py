"""What CPU a benchmark ran on and the most it could compute: quoted with every figure.

Peak FLOP/s = cores × clock × FLOPs per cycle per core. FLOPs per cycle (fused multiply-add =
2 FLOPs) follow the vector units `/proc/cpuinfo` reports, as published for each family:

- float32: AMD Zen 2/3/4 (AVX2, or AVX-512 run as two 256-bit halves on Zen 4): 2 FMA pipes
  × 8 lanes × 2 = 32; Intel with AVX-512: 2 × 16 × 2 = 64; AVX2 only: 32.
- bfloat16: with AMX_BF16 (Intel Sapphire Rapids and later: the tile unit does 1,024 bf16
  multiply-adds per cycle per core) 2,048; else with AVX512_BF16 (`vdpbf16ps`: two bf16
  products per float32 lane) twice the float32 figure; without either bf16 is converted and
  multiplied as float32: the same figure.

The clock is the one `/proc/cpuinfo` reports (nominal under a hypervisor); cores that boost
above it can measure more than this "peak".
"""
from __future__ import annotations

import os
import platform


def _cpuinfo() -> dict[str, str]:
  info = {}
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if ":" in line:
          key, value = line.split(":", 1)
          info.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return info


def cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover - non-Linux
    return os.cpu_count() or 1


def cpu_model() -> str:
  return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def describe() -> dict:
  """{"cpu", "cores", "clock_ghz", "flags", "peak_gflops": {"float32", "bfloat16"}}."""
  info = _cpuinfo()
  flags = set(info.get("flags", "").split())
  clock = float(info.get("cpu MHz", 0.0)) / 1000
  amd = info.get("vendor_id") == "AuthenticAMD"
  fp32 = 64 if ("avx512f" in flags and not amd) else 32 if "fma" in flags else 16
  bf16 = 2048 if "amx_bf16" in flags else 2 * fp32 if "avx512_bf16" in flags else fp32
  n = cores()
  return {"cpu": cpu_model(), "cores": n, "clock_ghz": clock,
          "flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))),
          "peak_gflops": {"float32": n * clock * fp32, "bfloat16": n * clock * bf16}}


def quote() -> str:
  d = describe()
  return (f"{d['cpu']}, {d['cores']} cores at {d['clock_ghz']:.2f} GHz; peak "
          f"{d['peak_gflops']['float32']:.0f} GFLOP/s float32, "
          f"{d['peak_gflops']['bfloat16']:.0f} bfloat16 "
          f"({_bf16_units(d['flags'])})")


def _bf16_units(flags: list[str]) -> str:
  if "amx_bf16" in flags:
    return "AMX_BF16 and AVX512_BF16" if "avx512_bf16" in flags else "AMX_BF16"
  return "AVX512_BF16" if "avx512_bf16" in flags else "no AVX512_BF16"
