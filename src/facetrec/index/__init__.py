"""ANN indexes over item vectors (exact, HNSW, IVF, IVF-PQ) and the multi-interest search (see ann.py)."""

from facetrec.index.ann import (KINDS, ANNIndex, ExactIndex, HNSWIndex, IVFIndex, IVFPQIndex, ShardedIndex, ann_recall,
                                build_index, load_index, memory_estimate_bytes, multi_interest_search)

__all__ = ["KINDS", "ANNIndex", "ExactIndex", "HNSWIndex", "IVFIndex", "IVFPQIndex", "ShardedIndex", "ann_recall", "build_index",
           "load_index", "memory_estimate_bytes", "multi_interest_search"]
