import numpy as np
import polars as pl

from facetrec.data.synth import SynthConfig, synth


def test_planted_truth_explains_every_event(tmp_path):
    synth(SynthConfig(n_users=300, n_items=800, n_categories=30, seed=3), tmp_path, progress=False)
    ev = pl.read_csv(tmp_path / "interactions.tsv", separator="\t")
    truth = pl.read_parquet(tmp_path / "truth.parquet")
    k = truth.group_by("user_id").len()["len"]
    assert k.min() >= 1 and k.max() <= 6 and k.n_unique() == 6
    # every event's category is one of its user's planted interests
    joined = ev.join(truth, left_on=["user_id", "cate"], right_on=["user_id", "cate"], how="left")
    assert joined["interest"].null_count() == 0
    # weights are mixtures
    sums = truth.group_by("user_id").agg(pl.col("w0").sum(), pl.col("w1").sum())
    assert np.allclose(sums["w0"], 1) and np.allclose(sums["w1"], 1)


def test_interests_drift_over_time(tmp_path):
    synth(SynthConfig(n_users=400, n_items=800, n_categories=30, min_events=40, max_events=60, seed=4), tmp_path, progress=False)
    ev = pl.read_csv(tmp_path / "interactions.tsv", separator="\t").with_columns(
        pl.int_range(pl.len()).over("user_id").alias("pos"), pl.len().over("user_id").alias("n"))
    truth = pl.read_parquet(tmp_path / "truth.parquet")
    top_late = truth.sort("w1", descending=True).group_by("user_id").first().select("user_id", pl.col("cate").alias("late"))
    ev = ev.join(top_late, on="user_id")
    early = ev.filter(pl.col("pos") < pl.col("n") * 0.25)
    late = ev.filter(pl.col("pos") >= pl.col("n") * 0.75)
    share = lambda d: (d["cate"] == d["late"]).mean()
    assert share(late) > share(early) + 0.1
