"""Evaluation: top-N retrieval metrics, AUC / GAUC / logloss, and activity buckets (see metrics.py)."""

from facetrec.eval.metrics import (auc, bucket_labels, bucket_of, gauc, logloss, ranking_by_bucket, topn_by_bucket,
                                   topn_metrics, topn_per_user)

__all__ = ["auc", "bucket_labels", "bucket_of", "gauc", "logloss", "ranking_by_bucket", "topn_by_bucket",
           "topn_metrics", "topn_per_user"]
