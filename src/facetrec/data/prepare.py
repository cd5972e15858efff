"""`facetrec prepare`: raw log -> k-core -> ids -> feature map -> splits -> Parquet (SPEC §1.2-1.3).

Outputs, in the prepared directory:
  events.parquet      user, item, time, aux_neg (+ rating, behavior): sorted by user, then time,
                      ties in file order; ids contiguous from 1 (0 = padding)
  users.parquet       id, raw_id, split (train | valid | test), n_events
  items.parquet       id, raw_id, count
  item_features.npz   field -> int32 (n_items, W) attribute ids, 0 = padding (row 0 all zeros)
  ranking.parquet     DIEN samples: user, pos (index of the target in the user's sequence),
                      target, label, split (train | valid | test)
                      (+ rating, behavior of the positive target where the log has them)
  feature_map.json    vocab sizes, fields, settings: the contract between training and serving
  summary.json        counts before/after filtering, split sizes, skipped rows, seconds

All steps are columnar (polars / numpy); no Python object per event.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from facetrec.config import Config, PrepareConfig
from facetrec.data.readers import RawLog, read_log, served_event_files
from facetrec.errors import DataError

FORMAT_VERSION = 1


def prepare(cfg: Config, out_dir: str | Path | None = None, verbose: bool = True) -> dict[str, Any]:
    """Run the whole preparation and write the outputs; returns the summary dict."""
    t0 = time.perf_counter()
    out = Path(out_dir or cfg.run.dir)
    out.mkdir(parents=True, exist_ok=True)
    p = cfg.prepare
    _check_settings(p)

    log = read_log(cfg.data, lenient=p.lenient)
    raw_stats = _stats(log.events)
    events = log.events.filter(pl.col("behavior").is_in(list(cfg.data.behaviors))) if cfg.data.behaviors and "behavior" in log.events.columns else log.events
    events = kcore(events, p.min_user_events, p.min_item_events)
    if events.height == 0:
        raise DataError(
            f"no events left after the {p.min_user_events}/{p.min_item_events}-core filter of {raw_stats['events']} events; "
            f"lower prepare.min_user_events / prepare.min_item_events"
        )
    # stable time sort within each user: ties keep the file's order (line number)
    events = events.sort(["user", "time", "__line"], maintain_order=True)

    users = events.select(pl.col("user").unique(maintain_order=True).alias("raw_id")).with_row_index("id", offset=1)
    items = events.select(pl.col("item").unique(maintain_order=True).alias("raw_id")).with_row_index("id", offset=1)
    events = (events.join(users.rename({"raw_id": "user", "id": "uid"}), on="user", how="left", maintain_order="left")
                    .join(items.rename({"raw_id": "item", "id": "iid"}), on="item", how="left", maintain_order="left"))
    n_users, n_items = users.height + 1, items.height + 1  # vocab sizes incl. padding 0

    uid = events["uid"].to_numpy().astype(np.int32)
    iid = events["iid"].to_numpy().astype(np.int32)
    ts = events["time"].to_numpy().astype(np.int64)
    # user u's events are offsets[u-1]:offsets[u] (events are sorted by user, ids follow that order)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(uid, minlength=n_users)[1:])]).astype(np.int64)
    counts = np.diff(offsets)

    rng = np.random.default_rng(p.seed)
    keys = pair_keys(uid, iid, n_items)
    aux_neg = sample_aux_negatives(rng, iid, n_items)
    split = _user_split(rng, n_users - 1, p.split)
    ranking = _ranking_samples(rng, uid, iid, offsets, counts, n_items, keys)
    ranking = _with_target_signals(ranking, events, offsets)

    features, field_info = _item_features(log, items, n_items)

    cols: dict[str, Any] = {"user": uid, "item": iid, "time": ts, "aux_neg": aux_neg}
    for extra in ("rating", "behavior"):
        if extra in events.columns:
            cols[extra] = events[extra].to_numpy() if extra == "rating" else events[extra]
    _write_parquet(pl.DataFrame(cols), out / "events.parquet")
    _write_parquet(users.with_columns(split_labels(split), pl.Series("n_events", counts.astype(np.int32)))
                   .select("id", "raw_id", "split", "n_events"), out / "users.parquet")
    _write_parquet(items.with_columns(pl.Series("count", np.bincount(iid, minlength=n_items)[1:].astype(np.int32))),
                   out / "items.parquet")
    _write_parquet(ranking, out / "ranking.parquet")
    tmp = out / "item_features.npz.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **features)
    os.replace(tmp, out / "item_features.npz")

    n_split = np.bincount(split, minlength=3)
    rk = ranking.group_by("split").len()
    rk_sizes = {r["split"]: int(r["len"]) for r in rk.iter_rows(named=True)}
    feature_map = {
        "format_version": FORMAT_VERSION,
        "dataset": cfg.data.name,
        "n_users": int(n_users),
        "n_items": int(n_items),
        "item_fields": field_info,
        "has_rating": "rating" in cols,
        # the API takes ids as integers when every raw id is one (as in the public datasets)
        "raw_id_type": "int" if _all_int(users["raw_id"]) and _all_int(items["raw_id"]) else "str",
        "behaviors": sorted(events["behavior"].unique().to_list()) if "behavior" in events.columns else [],
        "max_history": p.max_history,
        "prepare": asdict(p),
    }
    (out / "feature_map.json").write_text(json.dumps(feature_map, indent=2))
    summary = {
        "dataset": cfg.data.name,
        "source": [str(f) for f in log.files],
        "before": raw_stats,
        "after": {"events": int(len(iid)), "users": int(n_users - 1), "items": int(n_items - 1)},
        "skipped_rows": sum(log.skipped.values()),
        "skipped_by_reason": log.skipped,
        "kcore": {"min_user_events": p.min_user_events, "min_item_events": p.min_item_events},
        "users_split": {"train": int(n_split[0]), "valid": int(n_split[1]), "test": int(n_split[2])},
        "ranking_samples": rk_sizes,
        "history": {"mean": float(counts.mean()), "median": float(np.median(counts)), "max": int(counts.max())},
        "item_fields": {k: v["vocab"] - 1 for k, v in field_info.items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if verbose:
        print(format_summary(summary, out))
    return summary


SPLIT_ENUM = pl.Enum(["train", "valid", "test"])


def split_labels(codes: np.ndarray) -> pl.Series:
    """0/1/2 codes -> a compact train/valid/test column."""
    return pl.Series("split", codes.astype(np.uint8)).replace_strict({0: "train", 1: "valid", 2: "test"}, return_dtype=SPLIT_ENUM)


def _all_int(s: pl.Series) -> bool:
    return bool(s.str.contains(r"^(0|[1-9][0-9]{0,17})$").all())


def _check_settings(p: PrepareConfig) -> None:
    if len(p.split) != 3 or any(x < 0 for x in p.split) or abs(sum(p.split) - 1) > 1e-6:
        raise DataError(f"prepare.split {p.split} must be three non-negative shares summing to 1, e.g. [0.8, 0.1, 0.1]")
    if not 0 < p.history_frac < 1:
        raise DataError(f"prepare.history_frac {p.history_frac} must be in (0, 1)")
    if p.max_history < 1:
        raise DataError(f"prepare.max_history {p.max_history} must be >= 1")


def _stats(events: pl.DataFrame) -> dict[str, int]:
    return {"events": events.height, "users": events["user"].n_unique(), "items": events["item"].n_unique()}


def kcore(events: pl.DataFrame, min_user: int, min_item: int) -> pl.DataFrame:
    """Drop users and items with too few events, repeated until nothing changes."""
    while True:
        before = events.height
        if min_user > 1:
            events = events.filter(pl.len().over("user") >= min_user)
        if min_item > 1:
            events = events.filter(pl.len().over("item") >= min_item)
        if events.height == before:
            return events


def sample_aux_negatives(rng: np.random.Generator, items: np.ndarray, n_items: int,
                         probs: np.ndarray | None = None, max_rounds: int = 100) -> np.ndarray:
    """For each event an item id in 1..n_items-1 different from the event's item (DIEN aux negatives):
    uniform over the other n-2 ids, or drawn from `probs` ((n_items,), 0 at padding) and redrawn
    where it hit the event's own item."""
    if n_items <= 2:
        raise DataError("need at least two items to sample negatives")
    if probs is None:
        neg = rng.integers(1, n_items - 1, size=len(items), dtype=np.int32)
        neg += (neg >= items).astype(np.int32)  # skip the clicked id: uniform over the other n-2 ids
        return neg
    if len(probs) != n_items or probs[0] != 0 or np.count_nonzero(probs) < 2:
        raise DataError(f"auxiliary-negative probabilities must be (n_items={n_items},) with 0 at padding and at "
                        f"least two items > 0 (got {len(probs)} entries, {np.count_nonzero(probs)} > 0)")
    neg = rng.choice(n_items, size=len(items), p=probs).astype(np.int32)
    todo = np.nonzero(neg == items)[0]
    for _ in range(max_rounds):
        if len(todo) == 0:
            return neg
        neg[todo] = rng.choice(n_items, size=len(todo), p=probs)
        todo = todo[neg[todo] == items[todo]]
    raise DataError("could not draw auxiliary negatives different from the clicked items: one item holds almost all "
                    "the probability; use train.aux_negatives=uniform")


def aux_negative_probs(items: np.ndarray, offsets: np.ndarray, n_items: int, held_out: int = 2,
                       power: float = 0.75) -> np.ndarray:
    """(n_items,) sampling probabilities ∝ count^power (word2vec's 0.75), counted over every user's
    events but the last `held_out` (the ranking protocol's valid and test targets), 0 at padding."""
    left = np.repeat(offsets[1:], np.diff(offsets)) - np.arange(len(items))  # (E,): events from here to the user's end
    counts = np.bincount(items[left > held_out], minlength=n_items).astype(np.float64)
    counts[0] = 0
    w = counts ** power
    if w.sum() <= 0:
        raise DataError("no training events to count item popularity from; use train.aux_negatives=uniform")
    return w / w.sum()


def _user_split(rng: np.random.Generator, n: int, shares: tuple[float, float, float]) -> np.ndarray:
    """0/1/2 = train/valid/test for users 1..n (index 0 is padding, reported as train)."""
    perm = rng.permutation(n)
    n_train = int(round(n * shares[0]))
    n_valid = int(round(n * shares[1]))
    split = np.zeros(n + 1, dtype=np.int8)
    split[1 + perm[n_train:n_train + n_valid]] = 1
    split[1 + perm[n_train + n_valid:]] = 2
    return split[1:]


def pair_keys(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """Sorted user * n_items + item of every event: membership tests by searchsorted."""
    return np.sort(users.astype(np.int64) * n_items + items)


def sample_negatives_for_users(rng: np.random.Generator, users: np.ndarray, n_items: int, pair_keys: np.ndarray,
                               max_rounds: int = 100) -> np.ndarray:
    """For each user an item the user never interacted with (pair_keys: sorted user*n_items+item)."""
    neg = rng.integers(1, n_items, size=len(users), dtype=np.int64)
    todo = np.arange(len(users))
    for _ in range(max_rounds):
        keys = users[todo].astype(np.int64) * n_items + neg[todo]
        pos = np.searchsorted(pair_keys, keys)
        hit = (pos < len(pair_keys)) & (pair_keys[np.minimum(pos, len(pair_keys) - 1)] == keys)
        todo = todo[hit]
        if len(todo) == 0:
            return neg.astype(np.int32)
        neg[todo] = rng.integers(1, n_items, size=len(todo))
    raise DataError("could not sample negatives outside some users' histories: those users interacted with almost every item")


def _ranking_samples(rng, uid, iid, offsets, counts, n_items, pair_keys) -> pl.DataFrame:
    """DIEN protocol: the event at position t >= 1 is a positive with history b_0..b_{t-1}, paired
    with a sampled negative the user never interacted with. The user's last target is test,
    the one before it valid, the rest train."""
    n = len(iid)
    pos_in_user = np.arange(n, dtype=np.int64) - np.repeat(offsets[:-1], counts)
    keep = pos_in_user >= 1
    idx = np.nonzero(keep)[0]
    users = uid[idx]
    t = pos_in_user[idx].astype(np.int32)
    last = counts[users - 1] - 1
    split = np.where(t == last, 2, np.where(t == last - 1, 1, 0)).astype(np.int8)
    neg = sample_negatives_for_users(rng, users, n_items, pair_keys)
    both = lambda a, b: np.stack([a, b], axis=1).ravel()  # positive then its negative, sample by sample
    return pl.DataFrame({
        "user": both(users, users),
        "pos": both(t, t),
        "target": both(iid[idx], neg).astype(np.int32),
        "label": both(np.ones(len(idx), np.int8), np.zeros(len(idx), np.int8)),
        "split": split_labels(both(split, split)),
    })


def _with_target_signals(ranking: pl.DataFrame, events: pl.DataFrame, offsets: np.ndarray) -> pl.DataFrame:
    """Extra label columns for multi-task ranking (SPEC §4.1): the positive target event's `rating`
    (0 for sampled negatives) and `behavior` (null for negatives), where the log has them."""
    if "rating" not in events.columns and "behavior" not in events.columns:
        return ranking
    ev = offsets[ranking["user"].to_numpy().astype(np.int64) - 1] + ranking["pos"].to_numpy()  # the positive's event row
    pos = ranking["label"].to_numpy() == 1
    cols = []
    if "rating" in events.columns:
        r = events["rating"].cast(pl.Float32).to_numpy()[ev]
        cols.append(pl.Series("rating", np.where(pos, r, 0).astype(np.float32)))
    if "behavior" in events.columns:
        b = events["behavior"].cast(pl.Utf8).gather(ev)
        cols.append(pl.Series("behavior", b).zip_with(pl.Series(pos), pl.Series([None] * len(ev), dtype=pl.Utf8)).cast(pl.Categorical))
    return ranking.with_columns(cols)


def _item_features(log: RawLog, items: pl.DataFrame, n_items: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Remap each attribute's values to 1..V per field and lay them out as (n_items, W) id arrays."""
    features: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {}
    for name, frame in sorted(log.item_attrs.items()):
        f = frame.join(items.rename({"raw_id": "item"}), on="item", how="inner").unique(["id", "value"], maintain_order=True)
        vocab = f.select(pl.col("value").unique(maintain_order=True)).with_row_index("vid", offset=1)
        f = f.join(vocab, on="value", how="left")
        ids = f["id"].to_numpy().astype(np.int64)
        vids = f["vid"].to_numpy().astype(np.int32)
        order = np.argsort(ids, kind="stable")
        ids, vids = ids[order], vids[order]
        per = np.bincount(ids, minlength=n_items)
        width = max(1, int(per.max())) if len(ids) else 1
        starts = np.concatenate([[0], np.cumsum(per)[:-1]])
        col = np.arange(len(ids)) - starts[ids]
        arr = np.zeros((n_items, width), dtype=np.int32)
        arr[ids, col] = vids
        features[name] = arr
        info[name] = {"vocab": int(vocab.height + 1), "width": width, "multi": name in log.multi,
                      "coverage": float((per[1:] > 0).mean())}
    return features, info


def _write_parquet(df: pl.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    df.write_parquet(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def format_summary(s: dict[str, Any], out: Path) -> str:
    b, a = s["before"], s["after"]
    lines = [
        f"prepared {s['dataset']} -> {out}",
        f"  events {b['events']:,} -> {a['events']:,}   users {b['users']:,} -> {a['users']:,}   items {b['items']:,} -> {a['items']:,}",
        f"  skipped rows: {s['skipped_rows']}" + (f" {s['skipped_by_reason']}" if s["skipped_rows"] else ""),
        f"  user split train/valid/test: {s['users_split']['train']:,} / {s['users_split']['valid']:,} / {s['users_split']['test']:,}",
        f"  ranking samples: " + ", ".join(f"{k} {v:,}" for k, v in sorted(s["ranking_samples"].items())),
        f"  history length mean {s['history']['mean']:.1f}, median {s['history']['median']:.0f}, max {s['history']['max']}",
        f"  item fields: " + (", ".join(f"{k} ({v} values)" for k, v in s["item_fields"].items()) or "none"),
        f"  {s['seconds']} s",
    ]
    return "\n".join(lines)


def prepared_key(cfg: Config) -> str:
    """Cache key: the raw files (size, mtime, first and last MiB) and the data/prepare settings."""
    from facetrec.config import resolve_data_root

    h = hashlib.sha256()
    data = cfg.to_dict()["data"]
    if not data["extra_events"]:
        del data["extra_events"]  # the keys of data prepared before the setting existed stay valid
    h.update(json.dumps({"data": data, "prepare": cfg.to_dict()["prepare"], "v": FORMAT_VERSION,
                         "ranking_signals": 1},  # ranking.parquet carries rating / behavior columns
                        sort_keys=True).encode())
    root = resolve_data_root(cfg.data.root)
    names = [cfg.data.interactions, cfg.data.metadata, cfg.data.movies, *[t.file for t in cfg.data.item_tables]]
    for path in [root / n for n in filter(None, names)] + served_event_files(cfg.data):
        if not path.exists():
            continue
        st = path.stat()
        h.update(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            if st.st_size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("FACETREC_CACHE", Path.home() / ".cache" / "facetrec"))


def ensure_prepared(cfg: Config, verbose: bool = True) -> Path:
    """Prepared directory for `cfg`, built on first use and reused while raw files and settings match."""
    path = cache_dir() / "prepared" / f"{cfg.data.name}-{prepared_key(cfg)}"
    if (path / "summary.json").exists() and (path / "feature_map.json").exists():
        if verbose:
            print(f"using prepared data {path}")
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    prepare(cfg, tmp, verbose=verbose)
    try:
        os.replace(tmp, path)
    except OSError:  # another process won the race: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path
