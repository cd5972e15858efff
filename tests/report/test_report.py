"""`facetrec report` on tiny trained runs: every figure is drawn, non-blank and embedded; missing inputs
become notes; the page renders in headless Chromium without console errors; the numbers behind it."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from facetrec.report.analysis import (bucket_sort_key, interest_diversity, js_distance, mean_pairwise_js, mean_std,
                                      random_split_js)

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ("curves_retrieval.png", "curves_ranking.png", "metrics.png", "interest_diversity.png", "interest_counts.png",
           "dien_attention.png", "buckets.png", "ann_recall_latency.png")


@pytest.fixture(scope="module")
def runs(synth_prepared, tmp_path_factory):
    """Tiny runs on the synthetic log: MIND (seeds 0 and 1), popularity, DIEN; the prepared-data cache in tmp."""
    from facetrec.config import load_config
    from facetrec.train.run import train

    raw = synth_prepared[1]
    base = tmp_path_factory.mktemp("report-runs")
    common = [f"data.root={raw}", "train.epochs=1", "train.threads=1", "train.batch_size=128", "train.n_negatives=200"]
    specs = {
        "mind-s0": ["model.name=mind", "model.dim=16", "model.hidden=[32]", "train.seed=0", "train.max_steps=20"],
        "mind-s1": ["model.name=mind", "model.dim=16", "model.hidden=[32]", "train.seed=1", "train.max_steps=20"],
        "popularity-s0": ["model.name=popularity"],
        "dien-s0": ["model.name=dien", "model.embed_dim=8", "model.mlp=[16]", "train.max_steps=10"],
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FACETREC_CACHE", str(base / "cache"))
        dirs = {}
        for name, sets in specs.items():
            cfg = load_config(ROOT / "configs" / "synthetic.yaml", common + sets + [f"run.dir={base / name}"])
            # train.n_negatives is a retrieval key: DIEN says it ignores it
            ignored = pytest.warns(UserWarning, match="train.n_negatives=200 is read by retrieval models only")
            with ignored if name.startswith("dien") else nullcontext():
                train(cfg, progress=False)
            dirs[name] = base / name
        yield dirs


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    """The report over all runs, written through the CLI command."""
    from facetrec.cli import app

    out = tmp_path_factory.mktemp("report")
    result = CliRunner().invoke(app, ["report", *map(str, runs.values()), "--out", str(out), "--users", "2"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'index.html'}" in result.output
    return out


def test_evaluate_scores_a_retrieval_run_under_a_changed_setting_without_touching_the_run(runs, tmp_path):
    from facetrec.cli import app

    run = runs["mind-s0"]
    before = (run / "metrics.json").read_bytes()
    out = tmp_path / "top20.json"
    result = CliRunner().invoke(app, ["evaluate", str(run), "--set", "train.top_m=20", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "\ntest recall@20 " in result.output and f"wrote {out}" in result.output
    scored = json.loads(out.read_text())
    assert scored["evaluated_with"] == ["train.top_m=20"] and 0 <= scored["test"]["recall@50"] <= 1
    assert (run / "metrics.json").read_bytes() == before
    bad = CliRunner().invoke(app, ["evaluate", str(run), "--set", "model.dim=32", "--out", str(tmp_path / "x.json")])
    assert bad.exit_code == 2 and "changes the model's shape" in bad.output
    for key in ("train.lr=0.1", "train.n_negatives=5", "run.dir=elsewhere"):  # read by training only: refused
        bad = CliRunner().invoke(app, ["evaluate", str(run), "--set", key, "--out", str(tmp_path / "x.json")])
        assert bad.exit_code == 2 and f"--set {key}: {key.split('=')[0]} is not read" in bad.output, bad.output
    for key in ("model.temperature=0.5", "model.warm_start=elsewhere"):  # model keys only training reads: refused
        bad = CliRunner().invoke(app, ["evaluate", str(run), "--set", key, "--out", str(tmp_path / "x.json")])
        assert bad.exit_code == 2 and f"--set {key}: {key.split('=')[0]} is read only by training" in bad.output, bad.output
    for key in ("data.root=/elsewhere", "prepare.min_item_events=1"):  # other data under the same ids: refused
        bad = CliRunner().invoke(app, ["evaluate", str(run), "--set", key, "--out", str(tmp_path / "x.json")])
        assert bad.exit_code == 2 and "changes the prepared data" in bad.output, bad.output
    assert not (tmp_path / "x.json").exists() and (run / "metrics.json").read_bytes() == before


def test_a_run_records_the_settings_its_trainer_ignored(runs):
    # the common overrides above give DIEN train.n_negatives, which only the retrieval trainer reads
    dien = json.loads((runs["dien-s0"] / "metrics.json").read_text())
    mind = json.loads((runs["mind-s0"] / "metrics.json").read_text())
    assert dien["train"]["ignored_settings"] == {"n_negatives": 200}
    assert "ignored_settings" not in mind["train"]


def _pixels(path: Path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(path)[..., :3]


def test_every_figure_is_written_non_blank_and_embedded(report):
    users = sorted(report.glob("interests_user*.png"))
    assert len(users) == 2  # --users 2
    page = (report / "index.html").read_text()
    embedded = [base64.b64decode(b) for b in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]
    for path in [report / f for f in FIGURES] + users:
        assert path.exists(), f"{path.name} not written"
        px = _pixels(path)
        assert px.std() > 0.05, f"{path.name} looks blank (pixel std {px.std():.4f})"
        assert path.read_bytes() in embedded, f"{path.name} is not embedded in index.html"
    assert len(embedded) == len(FIGURES) + len(users)
    assert "http://" not in page and "https://" not in page  # self-contained: nothing to fetch
    summary = json.loads((report / "report.json").read_text())
    assert summary["skipped"] == {}


def test_metrics_table_groups_seeds(report, runs):
    summary = json.loads((report / "report.json").read_text())
    rows = {r["model"]: r for r in summary["metrics"]["retrieval"]}
    assert set(rows) == {"mind", "popularity"}
    assert rows["mind"]["seeds"] == [0, 1] and rows["popularity"]["baseline"]
    got = [json.loads((runs[f"mind-s{s}"] / "metrics.json").read_text())["test"]["recall@50"] for s in (0, 1)]
    assert rows["mind"]["recall@50"]["mean"] == pytest.approx(np.mean(got))
    assert rows["mind"]["recall@50"]["std"] == pytest.approx(np.std(got, ddof=1))
    assert rows["popularity"]["recall@50"]["n"] == 1 and rows["popularity"]["recall@50"]["std"] is None
    page = (report / "index.html").read_text()
    assert f"{np.mean(got):.4f} ± {np.std(got, ddof=1):.4f}" in page


def test_interest_numbers_are_consistent(report, runs):
    s = json.loads((report / "report.json").read_text())
    div = s["interest_diversity"]
    assert div["users"] > 0 and 0 <= div["interest_js"] <= 1 and 0 <= div["random_js"] <= 1
    page = (report / "index.html").read_text()
    assert f"<b>{div['interest_js']:.3f}</b>" in page and f"<b>{div['random_js']:.3f}</b>" in page
    assert f"interests are <b>{div['verdict']}</b> random splits" in page
    hs = s["history_split_diversity"]  # null 2: random history groups' mean vectors retrieving
    assert hs["users"] > 0 and 0 <= hs["random_js"] <= 1
    assert f"<b>{hs['random_js']:.3f}</b> — interests are <b>{hs['verdict']}</b> random history splits" in page
    assert [u["k_prime"] for u in s["sample_users"]] == [max(int(k) for k, c in s["k_prime"]["histogram"].items() if c)] * 2
    assert all(0 <= u["history_split_js"] <= 1 for u in s["sample_users"])
    routed = s["routing_diversity"]
    assert routed["users"] > 0 and f"are {routed['interest_js']:.3f} apart" in page
    k_hist = s["k_prime"]["histogram"]
    metrics = json.loads((runs["mind-s0"] / "metrics.json").read_text())
    assert k_hist == {k: v for k, v in metrics["interests"]["k_prime_histogram"].items()}  # same users, same K'_u
    att = s["dien_attention"]["attention_on_same_category"]
    assert len(att) == 2 and all(0 <= a <= 1 for a in att)
    assert set(s["buckets"]) == {"dien (without UIE)", "mind", "popularity"}  # retrieval: by history length
    shown = [label for label, b in metrics["buckets"].items() if b["users"]]  # empty buckets are left out
    assert list(s["buckets"]["mind"]) == shown and set(shown) <= {"<=3", "4-7", "8-15", ">15"}
    for label in shown:  # the report's numbers are the runs' own
        assert s["buckets"]["mind"][label]["samples"] == metrics["buckets"][label]["users"]
    assert "no UIE run among the inputs" in page


@pytest.mark.parametrize("run", ["mind-s0", "popularity-s0"])
def test_retrieval_history_buckets_partition_the_test_users(runs, run):
    """metrics.json "buckets" of a retrieval run: history lengths cut where K'_u changes; together the
    buckets are the test set (users add up, the user-weighted mean of each metric is the test metric)."""
    m = json.loads((runs[run] / "metrics.json").read_text())
    b = m["buckets"]
    assert list(b) == ["<=3", "4-7", "8-15", ">15"]
    users = sum(v["users"] for v in b.values())
    assert users == (m["test"] if run == "popularity-s0" else m["eval"])["users"] > 0  # MIND's count sits under "eval"
    assert all(set(v) == {"users"} for v in b.values() if not v["users"])  # an empty bucket: no NaN in the JSON
    for metric in ("recall@50", "ndcg@20", "hr@50"):
        pooled = sum(v[metric] * v["users"] for v in b.values() if v["users"]) / users
        assert pooled == pytest.approx(m["test"][metric])
    if run == "mind-s0":  # with K = 4, users with 4-7 events have K'_u = 2, and so on
        k_hist = m["interests"]["k_prime_histogram"]
        assert [b[label]["users"] for label in ("4-7", "8-15", ">15")] == [k_hist.get(k, 0) for k in ("2", "3", "4")]


def test_benchmark_scripts_read_the_tiny_runs(runs, tmp_path):
    """The benchmark scripts that read a trained run, run on the tiny ones (a smoke test: they import
    from src/ and broke unseen once); each writes what its docstring says."""
    py = [sys.executable]
    env = {**os.environ, "FACETREC_CACHE": str(runs["mind-s0"].parent / "cache")}

    def run(script: str, *args) -> str:
        r = subprocess.run([*py, str(ROOT / "benchmarks" / script), *map(str, args)], capture_output=True, text=True,
                           env=env, cwd=ROOT, timeout=300)
        assert r.returncode == 0, f"benchmarks/{script} failed:\n{r.stderr[-3000:]}"
        return r.stdout

    vec = tmp_path / "vectors"
    run("dump_vectors.py", runs["mind-s0"], vec)
    items, queries = np.load(vec / "item_vectors.npy"), np.load(vec / "interests.npy")
    assert items.ndim == 2 and queries.shape[1] == items.shape[1] == 16
    out = tmp_path / "recall.json"
    run("index_recall.py", "--vectors", vec / "item_vectors.npy", "--queries", vec / "interests.npy", "--k", 10,
        "--n-queries", 50, "--latency-queries", 10, "--ef", 16, 64, "--nlist", 8, "--nprobe", 2, "--out", out)
    rows = json.loads(out.read_text())["rows"]
    assert {r["index"] for r in rows} >= {"exact", "hnsw"} and all(0 <= r["recall@10"] <= 1 for r in rows)
    assert "test" in run("exact_backends.py", runs["mind-s0"])
    assert "aux loss" in run("aux_diagnostics.py", runs["dien-s0"])
    probe = tmp_path / "salts.json"
    run("routing_salt_probe.py", runs["mind-s0"], "--salts", 2, "--out", probe)
    salts = json.loads(probe.read_text())["rows"]
    metrics = json.loads((runs["mind-s0"] / "metrics.json").read_text())
    assert salts[0]["recall@50"] == pytest.approx(metrics["test"]["recall@50"])  # salt 0 is eval mode's own


def test_missing_inputs_become_notes(runs, tmp_path):
    """A baseline without weights and a run still training: sections are skipped with notes, nothing crashes."""
    from facetrec.report.build import ReportOptions, write_report

    training = tmp_path / "still-training"
    training.mkdir()
    shutil.copy(runs["mind-s0"] / "config.yaml", training / "config.yaml")  # no metrics.json, no best.pt yet
    out = tmp_path / "out"
    out.mkdir()  # an earlier report's figure (another sample user) goes; files it did not write stay
    (out / "report.json").write_text(json.dumps({"figures": ["interests_user999.png"]}))
    (out / "interests_user999.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    page = write_report([runs["popularity-s0"], training], out, ReportOptions(results_dir=tmp_path / "none")).read_text()
    summary = json.loads((out / "report.json").read_text())
    assert summary["figures"] == ["metrics.png", "buckets.png"]  # popularity's metrics.json has history buckets
    assert sorted(p.name for p in out.iterdir()) == ["buckets.png", "index.html", "metrics.png", "notes.txt", "report.json"]
    assert set(summary["skipped"]) == {"curves", "interests", "kprime", "attention", "ann"}
    assert "no metrics.json yet" in page
    assert page.count("class='note'") >= 6


def test_run_whose_data_is_gone_keeps_its_metrics(runs, tmp_path, monkeypatch):
    """Weights without their data (raw log moved, no cached preparation): model sections become notes."""
    import yaml

    from facetrec.report.build import ReportOptions, write_report

    moved = tmp_path / "moved-run"
    shutil.copytree(runs["mind-s0"], moved)
    cfg = yaml.safe_load((moved / "config.yaml").read_text())
    cfg["data"]["root"] = str(tmp_path / "no-such-data")
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("FACETREC_CACHE", str(tmp_path / "empty-cache"))
    write_report([moved], tmp_path / "out", ReportOptions(results_dir=tmp_path / "none"))
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    assert summary["figures"] == ["curves_retrieval.png", "metrics.png", "buckets.png"]  # buckets come from metrics.json
    assert "prepared data cannot be loaded" in " ".join(summary["skipped"]["interests"])


def test_bad_run_dir_is_a_clear_error(tmp_path):
    from facetrec.cli import app

    result = CliRunner().invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "not a run directory" in result.output


def test_ann_section_reads_benchmark_json(runs, tmp_path):
    from facetrec.report.build import Report, ReportOptions
    from facetrec.report.runs import MissingInput

    bench = tmp_path / "index_recall_test.json"
    bench.write_text(json.dumps({"source": "unit test", "n": 1000, "k": 10, "rows": [
        {"index": "exact", "params": {}, "recall@10": 1.0, "p50_ms": 0.5},
        {"index": "hnsw", "params": {"efSearch": 16}, "recall@10": 0.8, "p50_ms": 0.05},
        {"index": "hnsw", "params": {"efSearch": 64}, "recall@10": 0.97, "p50_ms": 0.1}]}))
    rep = Report([runs["popularity-s0"]], tmp_path / "out", ReportOptions(ann_results=(bench,)))
    section = rep.ann()  # popularity has no item vectors: only the JSON can feed this section
    assert [p.name for p, _ in section.figures] == ["ann_recall_latency.png"]
    assert rep.numbers["ann"][0]["rows"][2]["recall@10"] == 0.97
    assert _pixels(section.figures[0][0]).std() > 0.05
    found = Report([runs["popularity-s0"]], tmp_path / "out2", ReportOptions(results_dir=tmp_path))  # found there
    found.ann()
    assert found.numbers["ann"][0]["source"].startswith("index_recall_test.json")
    with pytest.raises(MissingInput):  # nothing given or found, and no model to sweep on
        Report([runs["popularity-s0"]], tmp_path / "out3", ReportOptions(results_dir=tmp_path / "none")).ann()


# ---------------------------------------------------------------- headless Chromium


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it with apt-get")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return exe


def _render(page: Path, shot: Path) -> list[str]:
    """Screenshot `page` in headless Chromium; return the page's console messages."""
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}",
           "--window-size=1280,1600", "--enable-logging=stderr", "--v=0", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


def test_console_check_catches_a_broken_page(tmp_path):
    """The console check below is real: a page with a broken figure and a script error is caught."""
    page = tmp_path / "broken.html"
    page.write_text("<!doctype html><html><head><script>" + _check_images_script() + "</script></head><body>"
                    "<img alt='bad.png' src='data:image/png;base64,AAAA'><script>notAFunction()</script></body></html>")
    console = _render(page, tmp_path / "broken.png")
    text = "\n".join(console)
    assert "figure failed to load: bad.png" in text and "notAFunction" in text


def _check_images_script() -> str:
    from facetrec.report.build import _CHECK_IMAGES

    return _CHECK_IMAGES


def test_report_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "report.png"
    console = _render(report / "index.html", shot)
    assert console == [], "console messages while rendering the report:\n" + "\n".join(console)
    px = _pixels(shot)
    assert px.std() > 0.05, "the screenshot is blank"
    assert (px.min(axis=2) < 0.5).mean() > 0.01  # dark pixels: text and plotted figures were painted


# ---------------------------------------------------------------- the numbers


def test_js_distance_matches_scipy():
    scipy_distance = pytest.importorskip("scipy.spatial.distance")
    rng = np.random.default_rng(0)
    for _ in range(20):
        p, q = rng.random(7) * (rng.random(7) > 0.3), rng.random(7) + 1e-3
        assert js_distance(p, q) == pytest.approx(scipy_distance.jensenshannon(p, q, base=2), abs=1e-12)
    assert js_distance(np.array([1.0, 0, 0]), np.array([0, 0, 5.0])) == 1.0


def test_interest_diversity_separates_planted_structure_from_random_splits():
    """Interests that each retrieve one category are far apart (JS = 1); random splits of the same items are not."""
    cate = np.repeat(np.arange(1, 5), 50)  # items 0..199, 4 categories
    planted = [[np.arange(c * 50, c * 50 + 40) for c in range(3)]]  # three interests, disjoint categories
    mixed = [[np.arange(0, 200, 5), np.arange(1, 200, 5), np.arange(2, 200, 5)]]  # every interest: all categories
    d = interest_diversity([1], planted, cate, 5, top_m=40)
    assert d.interest_js == pytest.approx(1.0) and d.random_js < 0.5 and d.share_above == 1.0
    m = interest_diversity([1], mixed, cate, 5, top_m=40)
    assert m.interest_js == pytest.approx(0.0) and m.share_above == 0.0
    assert interest_diversity([1], [[np.arange(10)]], cate, 5, top_m=10).users == 0  # one interest: nothing to compare
    many = interest_diversity(range(5), planted * 5, cate, 5, top_m=40)
    assert many.verdict == "further apart than" and many.diff_ci[0] > 0
    same = interest_diversity(range(5), mixed * 5, cate, 5, top_m=40)
    assert same.verdict == "closer than"  # identical interests: less apart than the noise of random splits


def test_random_split_keeps_group_sizes_and_items():
    groups = [np.array([1, 1, 1, 2]), np.array([2, 2])]
    # with two categories of counts 3/3 split 4/2, the distance is that of some 4/2 split: at most js([3,1],[0,2])
    v = random_split_js(groups, 3, np.random.default_rng(0), repeats=50)
    assert 0 <= v <= js_distance(np.array([0, 3, 1]), np.array([0, 0, 2])) + 1e-12
    assert mean_pairwise_js(groups, 3) == pytest.approx(js_distance(np.array([0, 3, 1]), np.array([0, 0, 2])))


def test_mean_std_and_bucket_order():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5), 2)
    m, sd, n = mean_std([0.5])
    assert m == 0.5 and np.isnan(sd) and n == 1
    assert sorted(["6-20", ">20", "<=5"], key=bucket_sort_key) == ["<=5", "6-20", ">20"]


def test_explanations_follow_the_routing_weights():
    from facetrec.models.mind import MIND, MINDConfig
    from facetrec.report.explain import coupling_matrix, explain_interests

    torch.manual_seed(0)
    m = MIND(MINDConfig(n_items=30, dim=8, hidden=(8,)), {}, {}).eval()
    hist = torch.tensor([[3, 5, 7, 9, 11, 0, 0], [4, 6, 0, 0, 0, 0, 0]])
    r = m.route(hist, hist > 0, torch.tensor([16, 2]))  # K'_u = 4 and 1
    w, pos, ks = coupling_matrix(r, 0)
    assert pos.tolist() == [0, 1, 2, 3, 4] and ks.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-5)  # each behaviour splits its vote over the valid interests
    ex = explain_interests(r, 0, top=2)
    assert [e.index for e in ex] == [0, 1, 2, 3]
    for e in ex:
        col = r.weights[0, :, e.index]
        assert e.positions == torch.argsort(-col, stable=True)[:2].tolist()
        assert e.strength == pytest.approx(float(r.lengths[0, e.index]))
    rep = torch.tensor([[3, 5, 3, 5, 3, 0, 0]])  # two distinct items, repeated
    r2 = m.route(rep, rep > 0, torch.tensor([16]))
    for e in explain_interests(r2, 0, top=3, hist=rep[0].numpy()):
        items = rep[0, e.positions].tolist()
        assert sorted(items) == [3, 5]  # each item once, however often it was seen
        col = r2.weights[0, :, e.index]
        assert e.weights[0] == pytest.approx(float(col.max()), abs=1e-4)  # strongest occurrence first
    w1, pos1, ks1 = coupling_matrix(r, 1)
    assert pos1.tolist() == [0, 1] and ks1.tolist() == [0] and np.allclose(w1, 1.0)


def test_ann_sweep_rows():
    """IVF visits a superset of lists as nprobe grows, so its recall cannot fall; all lists = exact."""
    pytest.importorskip("faiss")
    from facetrec.index.ann import default_nlist
    from facetrec.report.analysis import ann_sweep

    rng = np.random.default_rng(0)
    items = rng.normal(size=(2000, 16)).astype(np.float32)
    nlist = default_nlist(len(items))
    rows = ann_sweep(items, rng.normal(size=(100, 16)).astype(np.float32), k=20, timed=20, rounds=1,
                     ef=(8, 64), nprobe=(1, 4, nlist))
    assert [r["index"] for r in rows] == ["exact", "hnsw", "hnsw", "ivf", "ivf", "ivf"]
    ivf = [r["recall@20"] for r in rows if r["index"] == "ivf"]
    assert ivf == sorted(ivf) and ivf[-1] == 1.0 and ivf[0] < 1.0
    assert all(r["p50_ms"] > 0 for r in rows) and rows[0]["recall@20"] == 1.0


def test_buckets_compare_with_and_without_uie(runs, tmp_path):
    """A PLE + UIE run (multi-task metrics.json: {task: {...}} per bucket) is drawn beside DIEN, marked "with UIE"."""
    import yaml

    from facetrec.report.build import Report, ReportOptions

    uie = tmp_path / "ple-uie-s0"
    uie.mkdir()
    cfg = yaml.safe_load((runs["dien-s0"] / "config.yaml").read_text())
    cfg["model"] = {"name": "ple-uie", "uie": {"clusters": 8}}
    (uie / "config.yaml").write_text(yaml.safe_dump(cfg))
    buckets = {"<=5": {"click": {"auc": 0.71, "samples": 10}}, "6-20": {"click": {"auc": 0.74, "samples": 20}}}
    (uie / "metrics.json").write_text(json.dumps({"model": "ple-uie", "tasks": ["click"], "buckets": buckets,
                                                 "test": {"click": {"auc": 0.73, "gauc": 0.7, "logloss": 0.5}}}))
    rep = Report([runs["dien-s0"], uie], tmp_path / "out", ReportOptions())
    section = rep.buckets()
    table = rep.numbers["buckets"]
    assert set(table) == {"dien (without UIE)", "ple-uie (with UIE)"}
    assert table["ple-uie (with UIE)"]["<=5"]["mean"] == 0.71
    assert not any("no UIE run" in n for n in section.notes)
    assert _pixels(section.figures[0][0]).std() > 0.05
    rep.metrics()
    rows = {r["model"]: r for r in rep.numbers["metrics"]["ranking"]}
    assert rows["ple-uie"]["auc"]["mean"] == 0.73  # the primary (click) task of a multi-task run


@pytest.mark.parametrize("module", ["analysis", "explain", "runs"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"facetrec.report.{module}"), extraglobs={"np": np})
    assert result.attempted > 0 and result.failed == 0


def test_seeds_anywhere_in_the_model_section_group_together(runs, tmp_path):
    """ple-uie runs carry model.uie.seed next to train.seed: they are seeds of one model, not three models."""
    import yaml

    from facetrec.report.runs import group_key, group_label, load_run

    base = yaml.safe_load((runs["dien-s0"] / "config.yaml").read_text())
    made = []
    for name, seed, clusters in (("a", 0, 64), ("b", 1, 64), ("c", 0, 32)):
        d = tmp_path / name
        d.mkdir()
        cfg = {**base, "model": {"name": "ple-uie", "uie": {"clusters": clusters, "seed": seed}},
               "train": {**base["train"], "seed": seed}}
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        made.append(load_run(d))
    a, b, c = made
    assert group_key(a) == group_key(b) != group_key(c)
    assert group_label(a, made) == "ple-uie (uie={'clusters': 64})"


def test_retrieval_headroom_reproduces_the_library_and_bounds_the_merges(runs, tmp_path):
    out = tmp_path / "headroom.json"
    cache = runs["mind-s0"].parent / "cache"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "retrieval_headroom.py"), str(runs["mind-s0"]),
                        "--offsets", "0", "0.05", "--out", str(out)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "FACETREC_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text())["mind"][0]
    assert row["recall@50_max"] == pytest.approx(row["recall@50_library"], abs=1e-9)  # its ranks are the library's
    assert row["recall@50_max"] <= row["recall_at_50_kprime_slots"] and 0 <= row["recall@50_quota"] <= 1
    # a target the max-merged top 50 holds is in its best interest's own top 50: the oracle is never below max
    assert row["recall@50_oracle"] >= row["recall@50_max"] - 1e-12
    assert row["offsets"]["test"]["0.0"] == pytest.approx(row["recall@50_max"], abs=1e-12)  # b = 0 is the max merge
