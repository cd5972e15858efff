"""Command line: a thin typer shell over plain functions (each command is callable from Python)."""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer

from facetrec.errors import ConfigError, FacetrecError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="facetrec: multi-interest retrieval (MIND), interest-evolution ranking (DIEN), cold start (UIE), serving.")

SET_HELP = "Override a config key, e.g. --set train.epochs=3 --set data.root=~/data/x (repeatable)."


_format_warning = warnings.formatwarning


def _cli_warning(message, category, filename, lineno, line=None) -> str:
    """facetrec's own warnings as one plain line ('warning: ...'); others (torch's, ...) as Python prints them."""
    if category is UserWarning and "facetrec" in str(filename):
        return f"warning: {message}\n"
    return _format_warning(message, category, filename, lineno, line)


@app.callback()
def _setup() -> None:
    warnings.formatwarning = _cli_warning


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def synth(
    out_dir: Path = typer.Argument(..., help="Folder to write interactions.tsv, items.tsv, truth.parquet."),
    users: int = typer.Option(2000, help="Number of users."),
    items: int = typer.Option(5000, help="Number of items."),
    categories: int = typer.Option(50, help="Number of categories (interest clusters)."),
    min_events: int = typer.Option(10, help="Fewest events per user."),
    max_events: int = typer.Option(60, help="Most events per user."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Write a synthetic log whose users have 1-6 planted, drifting interests."""
    from facetrec.data.synth import SynthConfig, synth as run_synth

    try:
        meta = run_synth(SynthConfig(n_users=users, n_items=items, n_categories=categories, min_events=min_events,
                                     max_events=max_events, seed=seed), out_dir)
    except (FacetrecError, ValueError) as e:
        _fail(e)
    typer.echo(f"wrote {meta['events']:,} events for {users:,} users to {out_dir}")


@app.command()
def prepare(
    config: Path = typer.Argument(..., help="YAML config, e.g. configs/amazon-beauty.yaml."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    lenient: bool = typer.Option(False, "--lenient", help="Skip bad rows and count them in summary.json instead of failing."),
) -> None:
    """Read a raw log, filter, remap ids, split; write Parquet files and summary.json to run.dir."""
    from facetrec.config import load_config
    from facetrec.data.prepare import prepare as run_prepare

    overrides = list(set_ or []) + (["prepare.lenient=true"] if lenient else [])
    try:
        cfg = load_config(config, overrides)
        run_prepare(cfg)
    except FacetrecError as e:
        _fail(e)


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML config, e.g. configs/amazon-beauty/mind.yaml."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train a model (preparing its data first when needed); writes checkpoints and metrics.json to run.dir."""
    from facetrec.config import load_config
    from facetrec.train.distributed import launch

    try:
        launch(load_config(config, list(set_ or [])), progress=not quiet)
    except FacetrecError as e:
        _fail(e)


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="A run directory written by `facetrec train`."),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", help="Score the best weights under a changed config key, e.g. --set model.uie.memory_at_eval=false "
                            "(repeatable; needs --out; refused: a key that changes the model's shape, keys that only training "
                            "reads — run.*, train.* but top_m, index, index_params, max_eval_users, threads and device, "
                            "model.* keys such as temperature, aux_alpha, dropout, warm_start and uie.rho — and "
                            "data.* / prepare.* keys but prepare.max_history, which change what the ids mean)."),
    out: Optional[Path] = typer.Option(None, "--out", help="With --set: write the metrics here, not to the run's metrics.json."),
) -> None:
    """Recompute a run's metrics.json from its config and best weights (or, with --set, score them under a changed config)."""
    from facetrec.train.run import evaluate as run_evaluate, format_test_metrics

    if out is not None and not set_:
        _fail(ConfigError("--out is for --set: without overrides evaluate rewrites the run's own metrics.json"))
    try:
        metrics = run_evaluate(run_dir, overrides=list(set_ or []), out_path=out)
    except FacetrecError as e:
        _fail(e)
    typer.echo(format_test_metrics(metrics))  # a multi-task run's numbers are per task
    if out is not None:
        typer.echo(f"wrote {out}")


@app.command()
def export(
    retrieval: Path = typer.Option(..., help="Run directory of a mind / youtubednn training."),
    out: Path = typer.Option(..., help="Artifact root; a new version is written under it and made current."),
    ranking: Optional[Path] = typer.Option(None, help="Run directory of a dien / din / base training, or of a multi-task "
                                                       "ple / ple-uie one (the cold-start ranker)."),
    index: Optional[str] = typer.Option(None, help="ANN index kind: exact | hnsw | ivf | ivfpq (default: the run's train.index)."),
    index_param: Optional[List[str]] = typer.Option(None, "--index-param", help="Index parameter KEY=VALUE, e.g. efSearch=256 or space=l2 (hnsw) (repeatable)."),
    top_m: Optional[int] = typer.Option(None, help="Candidates per interest from the index (default: the run's train.top_m)."),
    candidates: int = typer.Option(200, help="Merged candidates the ranker scores per request."),
    rank_task: Optional[str] = typer.Option(None, help="Multi-task ranker only: the task whose probability orders the "
                                                       "results (default: its first, engaged / click)."),
) -> None:
    """Package trained runs as a versioned, verified serving artifact."""
    from facetrec.serving.export import export as run_export

    try:
        params = None
        if index_param:
            params = {}
            for kv in index_param:
                k, sep, v = kv.partition("=")
                if not sep or not k.strip() or not v.strip():
                    raise FacetrecError(f"--index-param {kv!r}: write KEY=VALUE, e.g. efSearch=256 or space=l2")
                v = v.strip()
                params[k.strip()] = int(v) if v.lstrip("-").isdigit() else v  # the index checks names and values
        version = run_export(retrieval, out, ranking, index_kind=index, index_params=params, candidates=candidates,
                             top_m=top_m, rank_task=rank_task)
    except FacetrecError as e:
        _fail(e)
    typer.echo(f"exported {version}")


@app.command()
def serve(
    artifact: Path = typer.Argument(..., help="Artifact root (follows CURRENT) or one version directory."),
    store: str = typer.Option("sqlite:///runs/state.db", help="sqlite:///path/state.db or redis://host:port/0"),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8000, help="Port to bind."),
    workers: int = typer.Option(1, help="Server processes (use a redis:// store to share state between hosts)."),
    search_param: Optional[List[str]] = typer.Option(
        None, "--search-param", help="Index search parameter KEY=INT without re-exporting: efSearch (hnsw), nprobe (ivf, ivfpq)."),
    device: str = typer.Option("cpu", help="Where the models run: cpu (default: one request is a few small kernels, "
                                          "the CPU answers sooner), cuda or auto."),
    reload_every: float = typer.Option(0.0, "--reload-every", help="Seconds between looks at the artifact root's CURRENT: "
                                       "a new export is loaded, verified and swapped in without a restart; one that "
                                       "fails to load is reported on /readyz and the old one keeps serving "
                                       "(0 = off; needs the artifact root, not a version directory)."),
) -> None:
    """Serve recommendations over HTTP (FastAPI + uvicorn): POST /recommend, POST /events, GET /users/{id}/interests,
    GET /items/{id}/similar."""
    import json
    import os
    import socket

    import uvicorn

    from facetrec.serving.artifacts import resolve_version
    from facetrec.serving.pipeline import Pipeline
    from facetrec.serving.store import open_store

    params: dict[str, int] = {}
    for kv in search_param or []:
        key, _, value = kv.partition("=")
        if not key or not value.strip().isdigit():
            _fail(FacetrecError(f"--search-param {kv!r}: write KEY=INT, e.g. efSearch=1024"))
        params[key.strip()] = int(value)
    if reload_every < 0 or (reload_every > 0 and not (artifact / "CURRENT").exists()):
        _fail(FacetrecError(f"--reload-every {reload_every:g}: give a number of seconds >= 0, and the artifact root "
                            f"(the folder with CURRENT) rather than a version directory, so that new exports can be found"))
    try:
        version = resolve_version(artifact)
        Pipeline(version, search_params=params, device=device)  # refuse a broken or inconsistent artifact before starting workers
        open_store(store).close()
    except FacetrecError as e:
        _fail(e)
    except Exception as e:  # e.g. redis not reachable
        _fail(RuntimeError(f"store {store!r} cannot be opened: {e}"))
    # a taken port fails here with the fix, not in uvicorn after the workers start (checked after the artifact
    # and the store, whose refusals say more)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            _fail(FacetrecError(f"cannot listen on {host}:{port} ({e.strerror}): another server may hold the port; "
                                f"stop it or pass another --port"))
    os.environ["FACETREC_ARTIFACT"] = str(version)
    os.environ["FACETREC_STORE"] = store
    os.environ["FACETREC_SEARCH_PARAMS"] = json.dumps(params)
    os.environ["FACETREC_DEVICE"] = device
    os.environ["FACETREC_ARTIFACT_ROOT"] = str(artifact) if reload_every > 0 else ""
    os.environ["FACETREC_RELOAD_EVERY"] = str(reload_every)
    uvicorn.run("facetrec.serving.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level="warning", limit_concurrency=512, timeout_keep_alive=30)


@contextmanager
def _reading_store(store: str):
    """A store the service wrote, opened to read: a missing SQLite file, an unreachable server or a failed
    read stops the command with exit 2 and what happened; the store is closed either way."""
    from facetrec.serving.store import STORE_ERRORS, open_store

    try:
        s = open_store(store, must_exist=True)
    except FacetrecError as e:
        _fail(e)
    except Exception as e:  # e.g. redis not reachable
        _fail(RuntimeError(f"store {store!r} cannot be opened: {e}"))
    try:
        yield s
    except FacetrecError as e:
        _fail(e)
    except STORE_ERRORS as e:  # redis connects on first use
        _fail(RuntimeError(f"store {store!r} cannot be read: {e}"))
    finally:
        s.close()


@app.command()
def recommend(
    artifact: Path = typer.Argument(..., help="Artifact root (follows CURRENT) or one version directory."),
    store: str = typer.Option(..., help="The server's store, read for the users' histories: sqlite:///path/state.db or redis://..."),
    out: Path = typer.Option(..., help="JSON lines to write, one user per line."),
    users: Optional[Path] = typer.Option(None, help="A file of user ids, one per line (default: every user in the store)."),
    n: int = typer.Option(20, help="Recommendations per user."),
    device: str = typer.Option("cpu", help="Where the models run: cpu, cuda or auto."),
    workers: int = typer.Option(1, help="Processes answering users side by side (one model thread each; e.g. the number "
                                        "of cores). The same lines in the same order, scores to float rounding."),
) -> None:
    """Recommendations for many users at once, offline: what POST /recommend would answer each of them."""
    from facetrec.serving.batch import batch_recommend
    from facetrec.serving.pipeline import Pipeline

    ids = None
    try:
        p = Pipeline(artifact, device=device)
        if not 1 <= n <= p.n_items - 1:
            raise FacetrecError(f"--n {n} must be in [1, {p.n_items - 1}] (the catalogue size)")
        if workers < 1:
            raise FacetrecError(f"--workers {workers} must be >= 1")
        if users is not None:
            if not users.is_file():
                raise FacetrecError(f"--users {users}: no such file; give one user id per line")
            ids = [line.strip() for line in users.read_text().splitlines() if line.strip()]
    except FacetrecError as e:
        _fail(e)
    from concurrent.futures.process import BrokenProcessPool

    with _reading_store(store) as s:
        try:
            stats = batch_recommend(p, s, out, n=n, users=ids, workers=workers)
        except BrokenProcessPool:
            _fail(FacetrecError(f"a worker process stopped (out of memory, or the artifact's files changed under it); "
                                f"nothing was written to {out}. Run again, with fewer --workers if memory is short"))
    typer.echo(f"wrote {out}: {stats['users']} users ({stats['personal']} personal, {stats['cold_start']} cold start) "
               f"in {stats['seconds']} s")


@app.command("dump-events")
def dump_events(
    store: str = typer.Option(..., help="The server's store: sqlite:///path/state.db or redis://host:port/0."),
    out: Path = typer.Option(..., help="TSV to write (user_id, item_id, timestamp, with a header)."),
) -> None:
    """Write every event the service has stored to a TSV, to retrain on it (data.extra_events)."""
    from facetrec.serving.store import dump_events as run_dump

    with _reading_store(store) as s:
        n, users, skipped = run_dump(s, out)
    typer.echo(f"wrote {n} events of {users} users to {out}")
    if skipped:
        typer.secho(f"warning: {skipped} events skipped: their user or item id holds a tab or a line break", err=True,
                    fg=typer.colors.YELLOW)
    typer.echo(f"retrain on them with: facetrec train CONFIG --set 'data.extra_events=[{out}]'")


@app.command()
def report(
    run_dirs: List[Path] = typer.Argument(..., help="Run directories written by `facetrec train` (seeds and models overlay)."),
    out: Path = typer.Option(Path("runs/report"), "--out", help="Folder for the PNG figures, index.html and report.json."),
    ann_results: Optional[List[Path]] = typer.Option(
        None, "--ann-results", help="JSON written by benchmarks/index_recall.py --out (repeatable); default: "
                                    "benchmarks/results/index_recall*.json, else a small sweep on the first MIND "
                                    "run's item vectors."),
    users: int = typer.Option(3, help="Sample users shown with coupling-coefficient heatmaps."),
    diversity_users: int = typer.Option(500, help="Test users over which interest diversity is averaged (0 = all)."),
    top_m: int = typer.Option(50, help="Items each interest retrieves for the category analysis."),
    seed: int = typer.Option(0, help="Seed for sampling users and the random splits."),
) -> None:
    """Write PNG figures and one self-contained HTML page (figures embedded) about trained runs."""
    from facetrec.report.build import ReportOptions, write_report

    opts = ReportOptions(sample_users=users, diversity_users=diversity_users, top_m=top_m, seed=seed,
                         ann_results=tuple(ann_results or ()))
    try:
        path = write_report(run_dirs, out, opts)
    except FacetrecError as e:
        _fail(e)
    typer.echo(f"wrote {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
