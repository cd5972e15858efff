"""Readers for the interaction-log formats users already have (SPEC §1.1).

Every reader returns a `RawLog`: one polars frame of events (string ids, integer time, the
file line of each event) plus item attribute tables in long form (item, value). Nothing here
builds a Python object per event. Bad rows stop the read with an error that names the file,
the line and what to do — or, in lenient mode, are dropped and counted in `RawLog.skipped`.

| format    | files                                                                     |
|-----------|---------------------------------------------------------------------------|
| generic   | CSV / TSV / Parquet + column mapping (`data.user`, `data.item`, `data.time`) |
| amazon    | ratings CSV `user,item,rating,timestamp` (+ `data.metadata` JSON lines)    |
| movielens | `u.data`, `ratings.dat` (`u::i::r::t`), `ratings.csv` (+ `movies.dat/csv`)   |
| taobao    | UserBehavior.csv `user,item,category,behavior,timestamp`                   |
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import polars as pl

from facetrec.config import DataConfig, ItemTable, resolve_data_root
from facetrec.errors import DataError

LINE = "__line"  # column holding each row's 1-based line number in its file


@dataclass
class RawLog:
    """A raw interaction log, read but not yet filtered or remapped.

    events:     user (str), item (str), time (int64), line (int64), optional rating (float64),
                behavior (str), and item fields carried in the log (str)
    item_attrs: field name -> frame (item str, value str), one row per item-value pair
    multi:      fields that are multi-valued
    skipped:    reason -> number of rows skipped (lenient mode)
    files:      the files read (for hashing and summaries)
    """

    events: pl.DataFrame
    item_attrs: dict[str, pl.DataFrame] = field(default_factory=dict)
    multi: set[str] = field(default_factory=set)
    skipped: dict[str, int] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def read_log(cfg: DataConfig, lenient: bool = False) -> RawLog:
    """Read the raw log that `cfg` describes (dispatch on `cfg.format`)."""
    readers = {"generic": read_generic, "amazon": read_amazon, "movielens": read_movielens, "taobao": read_taobao}
    if cfg.format not in readers:
        raise DataError(f"data.format {cfg.format!r} is not supported; use one of {', '.join(readers)}")
    root = resolve_data_root(cfg.root)
    if not root.is_dir():
        raise DataError(
            f"data.root {str(root)!r} is not a directory; point it at the dataset's folder, "
            f"e.g. --set data.root=/path/to/{cfg.name} (or set $FACETREC_DATA for ../shared/data)"
        )
    log = readers[cfg.format](cfg, root, lenient)
    for path in served_event_files(cfg):
        log = add_served_events(log, path, lenient)
    return log


def served_event_files(cfg: DataConfig) -> list[Path]:
    """The `data.extra_events` files (`~` and environment variables expanded; relative to the working folder)."""
    return [Path(os.path.expandvars(os.path.expanduser(name))) for name in cfg.extra_events]


SERVED_COLUMNS = ("user_id", "item_id", "timestamp")  # what `facetrec dump-events` writes (tab-separated, header)


def add_served_events(log: RawLog, path: Path, lenient: bool = False) -> RawLog:
    """Append the events of a `facetrec dump-events` file to a log read from any format.

    A row whose (user, item, timestamp) the log already holds is dropped (a store preloaded with
    the training histories dumps them again) and counted under skipped. Served events carry no
    rating or behaviour, so a log that has either column is refused. Appended rows sort after the
    log's own at equal timestamps (their line numbers continue the log's).
    """
    for col, what in (("rating", "data.rating"), ("behavior", "data.behavior")):
        if col in log.events.columns:
            raise DataError(f"data.extra_events {path}: served events carry no {col}, but this log reads one ({what}); "
                            f"retraining on served events works for click-only logs (leave data.extra_events empty here)")
    df = read_table(path, "\t", True, (), what="served events")
    _require(df, list(SERVED_COLUMNS), path, "the columns `facetrec dump-events` writes")
    ev = _events_from(df, path, dict(zip(("user", "item", "time"), SERVED_COLUMNS)), len(SERVED_COLUMNS), lenient, log.skipped)
    read = ev.height
    ev = ev.join(log.events.select("user", "item", "time"), on=["user", "item", "time"], how="anti", maintain_order="left")
    dropped = read - ev.height
    if dropped:
        log.skipped["served event already in the log"] = log.skipped.get("served event already in the log", 0) + dropped
    base = int(log.events[LINE].max() or 0) if log.events.height else 0
    ev = ev.with_columns((pl.col(LINE) + base).alias(LINE))
    extra = [c for c in log.events.columns if c not in ev.columns]  # columns only the log has: empty for served rows
    ev = ev.with_columns([pl.lit(None, dtype=log.events.schema[c]).alias(c) for c in extra]).select(log.events.columns)
    log.events = pl.concat([log.events, ev.cast(log.events.schema)])
    log.files.append(path)
    return log


# ---------------------------------------------------------------- low-level table reading


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        hint = ", ".join(sorted(p.name for p in path.parent.iterdir())[:10]) if path.parent.is_dir() else "folder missing"
        raise DataError(f"{what} file {str(path)!r} not found (that folder has: {hint}); check data.root and the file name in the config")
    if path.stat().st_size == 0:
        raise DataError(f"{what} file {str(path)!r} is empty; it needs at least one row")


def _bad_utf8_line(path: Path) -> tuple[int, str]:
    """Find the first line of `path` that is not valid UTF-8 (error path only)."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return n, repr(raw[max(0, e.start - 10): e.end + 10])
    return 0, ""


def _ragged_line(path: Path, sep: str, n_fields: int) -> tuple[int, int]:
    """Find the first line with more fields than expected (error path only)."""
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            k = line.rstrip("\r\n").count(sep) + 1
            if k > n_fields:
                return n, k
    return 0, 0


def _line_text(path: Path, line_no: int) -> str:
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if n == line_no:
                return line.rstrip("\r\n")
    return ""


def read_table(path: Path, sep: str, header: bool, columns: tuple[str, ...] = (), what: str = "interactions",
               encoding: str = "utf8") -> pl.DataFrame:
    """Read a delimited file (or Parquet) with every column as a string plus its line number.

    Raises DataError naming the file and line for: missing file, empty file, invalid UTF-8,
    a line with too many fields.
    """
    _check_file(path, what)
    if path.suffix == ".parquet":
        df = pl.read_parquet(path)
        df = df.with_columns(pl.all().cast(pl.Utf8))
        return df.with_row_index(LINE, offset=1).with_columns(pl.col(LINE).cast(pl.Int64))
    if len(sep) != 1:
        raise DataError(f"{path}: separator {sep!r} must be one character (multi-character separators are handled by the format readers)")
    try:
        df = pl.read_csv(
            path, separator=sep, has_header=header, new_columns=list(columns) or None,
            infer_schema=False, encoding=encoding, quote_char='"' if sep == "," else None,
        )
    except pl.exceptions.ComputeError as e:
        msg = str(e)
        if "utf-8" in msg.lower() or "utf8" in msg.lower():
            n, snippet = _bad_utf8_line(path)
            raise DataError(f"{path}, line {n}: bytes that are not UTF-8 ({snippet}); re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
        if "more fields" in msg:
            expected = len(columns) if columns else len(_line_text(path, 1).split(sep))
            n, k = _ragged_line(path, sep, expected)
            raise DataError(f"{path}, line {n}: {k} fields where {expected} were expected; fix that line or check data.sep ({sep!r})") from None
        raise DataError(f"{path}: could not be read as a {sep!r}-separated table: {msg.splitlines()[0]}") from None
    if df.height == 0:
        raise DataError(f"{what} file {str(path)!r} has a header but no rows")
    return df.with_row_index(LINE, offset=2 if header else 1).with_columns(pl.col(LINE).cast(pl.Int64))


def _require(df: pl.DataFrame, cols: list[str], path: Path, key: str) -> None:
    have = [c for c in df.columns if c != LINE]
    for c in cols:
        if c and c not in have:
            raise DataError(f"column {c!r} missing in {path}; have {have}; set {key} to the right column name")


def _validate_events(df: pl.DataFrame, path: Path, n_fields: int, lenient: bool, skipped: dict[str, int]) -> pl.DataFrame:
    """Check required fields and numeric time; fail with the first bad line or skip and count."""
    time_num = pl.col("time").str.strip_chars().cast(pl.Float64, strict=False)
    df = df.with_columns(time_num.alias("__t"))
    missing = pl.col("user").is_null() | pl.col("item").is_null() | pl.col("time").is_null()
    nonnum = pl.col("time").is_not_null() & (pl.col("__t").is_null() | pl.col("__t").is_nan() | pl.col("__t").is_infinite())
    bad = df.filter(missing | nonnum)
    if bad.height:
        n_missing = bad.filter(missing).height
        n_nonnum = bad.height - n_missing
        if not lenient:
            first = bad.row(0, named=True)
            line = first[LINE]
            text = _line_text(path, line)
            if first["time"] is None or first["user"] is None or first["item"] is None:
                got = len(text.split(_sep_of(path, text))) if text else 0
                trunc = (f" (the last line, after {line - 1:,} complete lines: the file looks truncated)"
                         if line == df[LINE].max() else "")
                why = f"has {got} of {n_fields} fields{trunc}: {text!r}"
            else:
                why = f"timestamp {first['time']!r} is not a number"
            raise DataError(
                f"{path}, line {line}: {why}. {bad.height} bad row(s) in all; fix the file, "
                f"or pass --lenient to skip bad rows (they are counted in summary.json)"
            )
        if n_missing:
            skipped["missing field"] = skipped.get("missing field", 0) + n_missing
        if n_nonnum:
            skipped["non-numeric timestamp"] = skipped.get("non-numeric timestamp", 0) + n_nonnum
        df = df.filter(~(missing | nonnum))
    return df.with_columns(pl.col("__t").cast(pl.Int64).alias("time")).drop("__t")


def _sep_of(path: Path, text: str) -> str:
    for s in ("\t", ",", "::", ";", " "):
        if s in text:
            return s
    return ","


def _events_from(df: pl.DataFrame, path: Path, cols: dict[str, str], n_fields: int, lenient: bool,
                 skipped: dict[str, int]) -> pl.DataFrame:
    """Select and rename mapped columns to user/item/time/(rating, behavior, fields); validate."""
    exprs = [pl.col(src).str.strip_chars().alias(dst) if dst in ("user", "item") else pl.col(src).alias(dst)
             for dst, src in cols.items() if src]
    df = df.select([*exprs, pl.col(LINE)])
    df = df.with_columns([pl.when(pl.col(c) == "").then(None).otherwise(pl.col(c)).alias(c) for c in ("user", "item")])
    df = _validate_events(df, path, n_fields, lenient, skipped)
    if "rating" in df.columns:
        df = df.with_columns(pl.col("rating").cast(pl.Float64, strict=False))
    return df


# ---------------------------------------------------------------- item side tables


def read_item_table(table: ItemTable, root: Path) -> dict[str, pl.DataFrame]:
    """Read one item side table into long (item, value) frames, one per field.

    Example (long layout, like amazon-hin/item_category.dat):
        ItemTable(file="item_category.dat", layout="long", sep=",", header=False,
                  columns=("item_id", "category"), fields={"cate": "category"}, multi=("cate",))
    """
    path = root / table.file
    df = read_table(path, table.sep, table.header, table.columns, what="item table")
    _require(df, [table.key, *table.fields.values()], path, f"item_tables[{table.file}]")
    out: dict[str, pl.DataFrame] = {}
    for name, col in table.fields.items():
        part = df.select(pl.col(table.key).str.strip_chars().alias("item"), pl.col(col).alias("value"))
        if table.layout == "wide" and name in table.multi:
            part = part.with_columns(pl.col("value").str.split(table.multi_sep)).explode("value")
        elif table.layout not in ("wide", "long"):
            raise DataError(f"item table {table.file}: layout {table.layout!r} must be 'wide' or 'long'")
        part = part.with_columns(pl.col("value").str.strip_chars()).filter(
            pl.col("item").is_not_null() & pl.col("value").is_not_null() & (pl.col("value") != "")
        )
        out[name] = part
    return out


def _attach_tables(log: RawLog, cfg: DataConfig, root: Path) -> RawLog:
    for table in cfg.item_tables:
        for name, frame in read_item_table(table, root).items():
            log.item_attrs[name] = pl.concat([log.item_attrs[name], frame]) if name in log.item_attrs else frame
            if name in table.multi or table.layout == "long":
                log.multi.add(name)
        log.files.append(root / table.file)
    # a long-layout field whose items all have exactly one value is single-valued after all
    for name in list(log.multi):
        counts = log.item_attrs[name].group_by("item").len()
        if counts["len"].max() == 1:
            log.multi.discard(name)
    return log


def _log_fields(df: pl.DataFrame, fields: dict[str, str]) -> dict[str, pl.DataFrame]:
    """Item attributes carried in the event log (e.g. Taobao's category): first value per item."""
    out = {}
    for name in fields:
        out[name] = (df.select(pl.col("item"), pl.col(name).alias("value"))
                     .filter(pl.col("value").is_not_null()).unique(subset="item", keep="first", maintain_order=True))
    return out


# ---------------------------------------------------------------- formats


def read_generic(cfg: DataConfig, root: Path, lenient: bool = False) -> RawLog:
    """CSV / TSV / Parquet with a column mapping (`data.user`, `data.item`, `data.time`, ...)."""
    path = root / cfg.interactions
    df = read_table(path, cfg.sep, cfg.header, cfg.columns)
    cols = {"user": cfg.user, "item": cfg.item, "time": cfg.time, "rating": cfg.rating, "behavior": cfg.behavior,
            **cfg.item_fields}
    _require(df, [c for c in cols.values() if c], path, "the data.* column settings")
    skipped: dict[str, int] = {}
    n_fields = len(df.columns) - 1
    events = _events_from(df, path, cols, n_fields, lenient, skipped)
    log = RawLog(events=events, skipped=skipped, files=[path])
    log.item_attrs.update(_log_fields(events, cfg.item_fields))
    log.events = events.drop(list(cfg.item_fields))
    return _attach_tables(log, cfg, root)


def read_amazon(cfg: DataConfig, root: Path, lenient: bool = False) -> RawLog:
    """Amazon (McAuley) ratings CSV `user,item,rating,timestamp`, no header; optional metadata.

    `data.metadata` names a JSON-lines file (strict JSON or the Python-literal lines of the
    2014 release) with `asin` and `categories` (list of category paths) or `category` (list).
    """
    gen = replace(cfg, sep=",", header=False, columns=("user", "item", "rating", "timestamp"),
                  user="user", item="item", rating="rating", time="timestamp")
    log = read_generic(gen, root, lenient)
    if cfg.metadata:
        path = root / cfg.metadata
        _check_file(path, "metadata")
        items, values = [], []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    try:
                        rec = ast.literal_eval(line)
                    except (ValueError, SyntaxError):
                        raise DataError(f"{path}, line {n}: neither JSON nor a Python literal; each line must be one item record") from None
                cats = rec.get("categories") or rec.get("category") or []
                flat = [c for path_ in cats for c in (path_ if isinstance(path_, list) else [path_])]
                for c in dict.fromkeys(flat):
                    items.append(str(rec.get("asin", "")))
                    values.append(str(c))
        log.item_attrs["cate"] = pl.DataFrame({"item": items, "value": values})
        log.multi.add("cate")
        log.files.append(path)
    return log


def read_movielens(cfg: DataConfig, root: Path, lenient: bool = False) -> RawLog:
    """MovieLens `u.data` (tab), `ratings.dat` (`::`) or `ratings.csv` (header); genres from movies.*."""
    name = cfg.interactions
    path = root / name
    cols4 = ("user", "item", "rating", "timestamp")
    if name.endswith(".dat"):
        _check_file(path, "interactions")
        # '::' is two characters: read on ':' and keep every other column (ratings have no ':' inside)
        df = read_table(path, ":", False, ("user", "_a", "item", "_b", "rating", "_c", "timestamp"))
        df = df.drop(["_a", "_b", "_c"])
        skipped: dict[str, int] = {}
        events = _events_from(df, path, {"user": "user", "item": "item", "time": "timestamp", "rating": "rating"}, 4, lenient, skipped)
        log = RawLog(events=events, skipped=skipped, files=[path])
    elif name.endswith(".csv"):
        log = read_generic(replace(cfg, sep=",", header=True, columns=(), user="userId", item="movieId",
                                   time="timestamp", rating="rating", item_tables=()), root, lenient)
    else:  # u.data
        log = read_generic(replace(cfg, sep="\t", header=False, columns=cols4, user="user", item="item",
                                   time="timestamp", rating="rating", item_tables=()), root, lenient)
    if cfg.movies:
        mpath = root / cfg.movies
        _check_file(mpath, "movies")
        items, genres = [], []
        if cfg.movies.endswith(".csv"):
            mdf = pl.read_csv(mpath, infer_schema=False)
            _require(mdf, ["movieId", "genres"], mpath, "data.movies")
            items, genres = mdf["movieId"].to_list(), mdf["genres"].to_list()
        else:  # movies.dat: id::title::genres, latin-1 in the ML-1M release
            for n, line in enumerate(mpath.read_text(encoding="latin-1").splitlines(), 1):
                parts = line.split("::")
                if len(parts) != 3:
                    raise DataError(f"{mpath}, line {n}: expected id::title::genres, got {line!r}")
                items.append(parts[0])
                genres.append(parts[2])
        frame = pl.DataFrame({"item": items, "value": genres}).with_columns(pl.col("value").str.split("|")).explode("value")
        log.item_attrs["genre"] = frame.filter(pl.col("value") != "(no genres listed)")
        log.multi.add("genre")
        log.files.append(mpath)
    return _attach_tables(log, cfg, root)


def read_taobao(cfg: DataConfig, root: Path, lenient: bool = False) -> RawLog:
    """Taobao UserBehavior `user,item,category,behavior,timestamp`, no header."""
    gen = replace(cfg, sep=",", header=False, columns=("user", "item", "category", "behavior", "timestamp"),
                  user="user", item="item", time="timestamp", behavior="behavior", item_fields={"cate": "category"})
    return read_generic(gen, root, lenient)
