"""Every script in benchmarks/ imports and parses its arguments (`--help`): a renamed module or
argument in src/ fails here, not months later when someone reruns a benchmark. Scripts that read
a trained run are run for real where the tests train one (uie_probe: tests/models/test_ple.py;
dump_vectors, index_recall, exact_backends, aux_diagnostics, routing_salt_probe: tests/report/test_report.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name not in ("envinfo.py", "timing.py"))
RUN_ELSEWHERE = {"uie_probe.py", "dump_vectors.py", "index_recall.py", "exact_backends.py", "aux_diagnostics.py",
                 "routing_salt_probe.py", "mind_throughput.py", "ranking_speed.py", "retrieval_speed.py"}  # for real


def test_the_list_is_not_empty():
    assert {"retrieval_quality.py", "ranking_quality.py", "coldstart_quality.py", "uie_probe.py"} <= set(SCRIPTS)
    assert RUN_ELSEWHERE <= set(SCRIPTS)  # a renamed script leaves its smoke test behind: say so here


@pytest.mark.parametrize("script", sorted(set(SCRIPTS) - RUN_ELSEWHERE))
def test_benchmark_script_help(script):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, f"benchmarks/{script} --help failed:\n{r.stderr[-2000:]}"
    assert "usage:" in r.stdout


TINY = {  # the speed scripts on a toy workload (peers are installed only in the benchmark's environment: skipped here)
    "mind_throughput.py": ["--items", "500", "--cates", "10", "--hist", "10", "--batch", "32", "--n-neg", "50",
                           "--warmup", "1", "--steps", "2", "--repeats", "1", "--threads", "1"],
    "ranking_speed.py": ["--items", "500", "--cates", "10", "--hist", "10", "--min-len", "2", "--batch", "32", "--warmup", "1",
                         "--steps", "2", "--repeats", "1", "--threads", "1", "--only", "dien", "--serve-calls", "3",
                         "--candidates", "10"],
    "retrieval_speed.py": ["--items", "500", "--cates", "10", "--users", "100", "--hist", "10", "--min-len", "2",
                           "--batch", "32", "--n-neg", "50", "--warmup", "1", "--steps", "2", "--infer-steps", "2",
                           "--repeats", "1", "--threads", "1", "--in-batch", "--negative-scores", "max", "--phases"],
}


@pytest.mark.parametrize("script", sorted(TINY))
def test_speed_script_runs_on_a_toy_workload(script, tmp_path):
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *TINY[script], "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, f"benchmarks/{script} failed:\n{r.stderr[-3000:]}"
    res = json.loads(out.read_text())
    assert "samples/s" in r.stdout and res
    if script == "retrieval_speed.py":  # --phases: forward / backward / optimizer ms, the item tower's backward inside
        ph = res["phases_ms"]["facetrec MIND"]
        assert all(ph[k] > 0 for k in ("forward", "backward", "optimizer"))
        assert 0 < ph["of which item-tower backward"] < ph["backward"]


def test_coldstart_slices_compares_jobs_with_the_base(tmp_path):
    def metrics(test, sparse, h1):
        return {"tasks": ["click"], "test": {"click": {"auc": test}}, "buckets": {"<=5": {"click": {"auc": sparse}}},
                "cold_start": {"1": {"click": {"auc": h1}}}}

    for job, seed, m in [("ple", 0, metrics(0.80, 0.70, 0.60)), ("ple", 1, metrics(0.82, 0.70, 0.62)),
                         ("uie", 0, metrics(0.81, 0.73, 0.60)), ("uie", 1, metrics(0.81, 0.75, 0.64))]:
        (tmp_path / f"{job}-s{seed}").mkdir()
        (tmp_path / f"{job}-s{seed}" / "metrics.json").write_text(json.dumps(m))
    out = tmp_path / "slices.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "coldstart_slices.py"), "--runs", str(tmp_path),
                        "--base", "ple", "--seeds", "0", "1", "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| uie | 0.8100 ± 0.0000 (+0.0000) | 0.7400 ± 0.0141 (+0.0400) | 0.6200 ± 0.0283 (+0.0100) |" in r.stdout
    res = json.loads(out.read_text())
    assert res["summary"]["uie"]["bucket <=5"][0] == pytest.approx(0.74)
