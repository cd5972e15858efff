"""The package versions a benchmark ran with, stored beside its numbers.

Training is deterministic for a seed only within one set of versions: the same command and seed
gave MIND Recall@50 0.1750 on 2026-11-23 and 0.1875 (twice) on 2026-11-30 with the code unchanged
(docs/benchmarks.md, Retrieval quality), so results files record what they ran on.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("torch", "numpy", "polars", "pyarrow", "faiss-cpu", "scikit-learn")


def package_versions() -> dict[str, str]:
    """Python and the versions of the packages that shape training and evaluation (those installed)."""
    out = {"python": platform.python_version(), "machine": platform.machine()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
