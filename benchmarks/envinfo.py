"""The package versions a benchmark ran with, stored beside its numbers.

A seed's run is reproducible only within one environment: the same command and seed gave MIND
Recall@50 0.1750 on 2026-11-23 and 0.1875 (twice) on 2026-11-30 with the code unchanged, on
another machine, while DIEN reproduced to four decimals (docs/benchmarks.md, Retrieval quality).
So results files record the versions and the CPU's vector extensions (math libraries pick their
code paths from them).
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("torch", "numpy", "polars", "pyarrow", "faiss-cpu", "scikit-learn")


def cpu_simd() -> str:
    """The CPU's widest vector extensions among AVX2 / AVX-512F ("" where /proc/cpuinfo is not readable)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ""
    return " ".join(f for f in ("avx2", "avx512f") if f in flags)


def package_versions() -> dict[str, str]:
    """Python, the CPU's vector extensions and the versions of the packages that shape training and evaluation."""
    out = {"python": platform.python_version(), "machine": platform.machine(), "cpu_simd": cpu_simd()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
