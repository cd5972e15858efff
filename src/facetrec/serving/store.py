"""Durable per-user state: behaviour sequences (and per-user memories) behind one interface.

Two backends, run through the same test suite:
  SQLiteStore  the embedded default: WAL journal, synchronous=FULL — a commit is on disk
               before `append` returns, so an acknowledged event survives kill -9.
  RedisStore   for several server processes sharing state; durable when the server runs with
               `appendonly yes` + `appendfsync always` (the store checks and warns otherwise).

Events carry a client-chosen id; a repeated id is stored once (the second append reports it
as a duplicate). Ids are the raw (dataset) user and item ids as strings, so the state outlives
a retrained model whose internal ids differ.

    store = open_store("sqlite:///var/facetrec/state.db")
    store.append([Event("e1", "u42", "B0001", 1700000000)])   # -> AppendResult(stored=1, duplicates=0)
    store.history("u42", limit=50)                             # -> [("B0001", 1700000000)]
"""

from __future__ import annotations

import sqlite3
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence
from urllib.parse import urlparse

from facetrec.errors import ConfigError


def _store_errors() -> tuple[type[BaseException], ...]:
    """What the backends raise when they cannot read or write (the server answers 503, commands exit 2)."""
    errors: list[type[BaseException]] = [sqlite3.Error, ConnectionError, TimeoutError]
    try:
        import redis

        errors.append(redis.exceptions.RedisError)
    except ImportError:  # pragma: no cover - redis is a dependency; SQLite-only installs still work
        pass
    return tuple(errors)


STORE_ERRORS = _store_errors()


@dataclass(frozen=True)
class Event:
    event_id: str
    user: str
    item: str
    ts: int


@dataclass(frozen=True)
class AppendResult:
    stored: int  # new events written
    duplicates: int  # events whose id was already stored
    duplicate_ids: tuple[str, ...] = ()


class UserStore(Protocol):
    def append(self, events: Sequence[Event]) -> AppendResult: ...
    def history(self, user: str, limit: int) -> list[tuple[str, int]]: ...
    def count(self, user: str) -> int: ...
    def events(self) -> Iterator[tuple[str, str, int]]: ...
    def get_memory(self, user: str) -> bytes | None: ...
    def set_memory(self, user: str, value: bytes) -> None: ...
    def ping(self) -> bool: ...
    def close(self) -> None: ...


class SQLiteStore:
    """SQLite in WAL mode with synchronous=FULL; safe to share across threads of one process.

    Each user's event count is kept in `counts`, updated in the transaction that stores the events,
    so `count` is one row read however long the history (COUNT(*) over the user's index entries took
    4.8 ms at 100,000 events and 43 ms at 1,000,000, with the store's lock held: `benchmarks/store_count.py`).
    A database written before the table existed gets it filled from `events` when first opened.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS events (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                event_id TEXT NOT NULL UNIQUE,
                user TEXT NOT NULL,
                item TEXT NOT NULL,
                ts INTEGER NOT NULL
            );
            CREATE INDEX IF NOT EXISTS events_user ON events (user, seq);
            CREATE TABLE IF NOT EXISTS memories (user TEXT PRIMARY KEY, value BLOB NOT NULL);
            """
        )
        self._ensure_counts()

    def _ensure_counts(self) -> None:
        """Create `counts` and, for a database written before it existed, fill it from `events`: in one
        write transaction, so of several processes opening the same file one creates and fills it."""
        exists = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'counts'"
        if self._db.execute(exists).fetchone() is not None:
            return  # the usual case: no write lock taken
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            if cur.execute(exists).fetchone() is None:  # looked again under the lock: another process may have made it
                cur.execute("CREATE TABLE counts (user TEXT PRIMARY KEY, n INTEGER NOT NULL)")
                cur.execute("INSERT INTO counts (user, n) SELECT user, COUNT(*) FROM events GROUP BY user")
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def append(self, events: Sequence[Event]) -> AppendResult:
        if not events:
            return AppendResult(0, 0)
        dups: list[str] = []
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                per_user: dict[str, int] = {}
                for e in events:
                    cur.execute("INSERT OR IGNORE INTO events (event_id, user, item, ts) VALUES (?, ?, ?, ?)",
                                (e.event_id, e.user, e.item, int(e.ts)))
                    if cur.rowcount == 1:
                        per_user[e.user] = per_user.get(e.user, 0) + 1
                    else:
                        dups.append(e.event_id)
                cur.executemany("INSERT INTO counts (user, n) VALUES (?, ?) ON CONFLICT(user) DO UPDATE SET n = n + excluded.n",
                                per_user.items())
                stored = sum(per_user.values())
                cur.execute("COMMIT")  # synchronous=FULL: durable (events and counts together) when this returns
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return AppendResult(stored, len(dups), tuple(dups))

    def history(self, user: str, limit: int) -> list[tuple[str, int]]:
        with self._lock:
            rows = self._db.execute("SELECT item, ts FROM events WHERE user = ? ORDER BY seq DESC LIMIT ?",
                                    (user, int(limit))).fetchall()
        return [(item, ts) for item, ts in reversed(rows)]

    def count(self, user: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT n FROM counts WHERE user = ?", (user,)).fetchone()
        return 0 if row is None else int(row[0])

    def events(self, chunk: int = 10_000) -> Iterator[tuple[str, str, int]]:
        """Every stored event as (user, item, ts), each user's in arrival order, users one after another;
        read in chunks, so serving goes on while a large store is dumped."""
        last = ("", -1)
        while True:
            with self._lock:
                rows = self._db.execute("SELECT user, seq, item, ts FROM events WHERE (user, seq) > (?, ?) "
                                        "ORDER BY user, seq LIMIT ?", (*last, int(chunk))).fetchall()
            if not rows:
                return
            for user, _, item, ts in rows:
                yield user, item, int(ts)
            last = (rows[-1][0], rows[-1][1])

    def get_memory(self, user: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM memories WHERE user = ?", (user,)).fetchone()
        return None if row is None else bytes(row[0])

    def set_memory(self, user: str, value: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT INTO memories (user, value) VALUES (?, ?) ON CONFLICT(user) DO UPDATE SET value = excluded.value",
                             (user, value))

    def ping(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1").fetchone()[0] == 1

    def close(self) -> None:
        with self._lock:
            self._db.close()


# KEYS: event-id keys..., then per event the user's list key; ARGV: per event "item\tts".
# All-or-nothing per call; returns for each event 1 (stored) or 0 (duplicate).
_APPEND_LUA = """
local n = #ARGV
local out = {}
for i = 1, n do
  if redis.call('SET', KEYS[i], '1', 'NX') then
    redis.call('RPUSH', KEYS[n + i], ARGV[i])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""


class RedisStore:
    """Redis lists per user + a set-once key per event id, appended atomically by a Lua script."""

    def __init__(self, url: str, prefix: str = "facetrec") -> None:
        import redis

        self._r = redis.Redis.from_url(url)
        self.prefix = prefix
        self._append = self._r.register_script(_APPEND_LUA)
        try:
            cfg = self._r.config_get("append*")
            if cfg.get("appendonly") != "yes" or cfg.get("appendfsync") != "always":
                warnings.warn(f"redis at {url} runs with appendonly={cfg.get('appendonly')} appendfsync={cfg.get('appendfsync')}: "
                              "acknowledged events may be lost in a crash; run it with --appendonly yes --appendfsync always")
        except redis.exceptions.ResponseError:  # CONFIG disabled on managed servers
            pass

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def append(self, events: Sequence[Event]) -> AppendResult:
        if not events:
            return AppendResult(0, 0)
        keys = [self._k("event", e.event_id) for e in events] + [self._k("user", e.user, "events") for e in events]
        args = [f"{e.item}\t{int(e.ts)}" for e in events]
        flags = self._append(keys=keys, args=args)
        dups = tuple(e.event_id for e, f in zip(events, flags) if not f)
        return AppendResult(len(events) - len(dups), len(dups), dups)

    def history(self, user: str, limit: int) -> list[tuple[str, int]]:
        raw = self._r.lrange(self._k("user", user, "events"), -int(limit), -1)
        out = []
        for v in raw:
            item, ts = v.decode().rsplit("\t", 1)
            out.append((item, int(ts)))
        return out

    def count(self, user: str) -> int:
        return int(self._r.llen(self._k("user", user, "events")))

    def events(self, chunk: int = 10_000) -> Iterator[tuple[str, str, int]]:
        """Every stored event as (user, item, ts), each user's in arrival order (users in SCAN order)."""
        head, tail = self._k("user", ""), ":events"
        done: set[bytes] = set()  # SCAN may return a key more than once
        for key in self._r.scan_iter(match=self._k("user", "*", "events"), count=1000):
            if key in done:
                continue
            done.add(key)
            user = key.decode()[len(head):-len(tail)]
            for start in range(0, self._r.llen(key), chunk):
                for v in self._r.lrange(key, start, start + chunk - 1):
                    item, ts = v.decode().rsplit("\t", 1)
                    yield user, item, int(ts)

    def get_memory(self, user: str) -> bytes | None:
        return self._r.get(self._k("user", user, "memory"))

    def set_memory(self, user: str, value: bytes) -> None:
        self._r.set(self._k("user", user, "memory"), value)

    def ping(self) -> bool:
        try:
            return bool(self._r.ping())
        except Exception:
            return False

    def close(self) -> None:
        self._r.close()


def dump_events(store: UserStore, out: str | Path) -> tuple[int, int, int]:
    """Write every stored event to a tab-separated file with the header `user_id item_id timestamp`,
    the file `data.extra_events` reads to retrain on what the service received (written to a temp
    file and renamed: a crash leaves no half file). Returns (events, users, skipped): an id holding a
    tab or a line break cannot be written to a TSV, so its events are skipped and counted.
    """
    from facetrec.io import atomic_write

    counts = [0, 0, 0]

    def write(f) -> None:
        f.write(b"user_id\titem_id\ttimestamp\n")
        last = None
        for user, item, ts in store.events():
            if any(c in x for x in (user, item) for c in "\t\n\r"):
                counts[2] += 1
                continue
            f.write(f"{user}\t{item}\t{ts}\n".encode())
            counts[0] += 1
            if user != last:
                counts[1], last = counts[1] + 1, user

    atomic_write(out, write)
    return counts[0], counts[1], counts[2]


def sqlite_path(url: str) -> Path | None:
    """The file of a `sqlite:///...` (or plain path) store URL; None for other schemes."""
    parsed = urlparse(url)
    if parsed.scheme not in ("", "sqlite"):
        return None
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else (parsed.path if parsed.scheme else url)
    if not path:
        raise ConfigError(f"store {url!r}: give a file, e.g. sqlite:///runs/state.db")
    return Path(path)


def open_store(url: str, must_exist: bool = False) -> UserStore:
    """`sqlite:///path/to/state.db` (or a plain path) or `redis://host:port/db`; with must_exist a missing
    SQLite file is an error (reading a store) instead of a new empty store (serving)."""
    path = sqlite_path(url)
    if path is not None:
        if must_exist and not path.is_file():
            raise ConfigError(f"store {url!r}: {path} does not exist; give the file `facetrec serve --store` wrote")
        return SQLiteStore(path)
    parsed = urlparse(url)
    if parsed.scheme in ("redis", "rediss", "unix"):
        return RedisStore(url)
    raise ConfigError(f"store {url!r}: use sqlite:///path/to/state.db or redis://host:port/0")
