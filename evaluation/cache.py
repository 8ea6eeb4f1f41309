"""SQLite response cache: one row per (model, compression, task, sample, generation settings).

Every finished sample is committed at once, so a killed run restarted with the same `--use_cache`
directory regenerates nothing it had finished. Several data-parallel ranks may share one file.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def cache_key(model: dict, compression: dict, task: str, sample_id, prompt: str, gen_kwargs: dict) -> str:
    """A stable key; the prompt text is part of it, so an edited prompt or dataset is not served stale answers."""
    payload = canonical({"model": model, "compression": compression, "task": task, "sample": str(sample_id),
                         "prompt": hashlib.sha256(prompt.encode()).hexdigest(), "gen": gen_kwargs})
    return hashlib.sha256(payload.encode()).hexdigest()


LOCK_TIMEOUT_S = 120


def switch_to_wal(conn: sqlite3.Connection) -> None:
    """WAL lets ranks read while another commits. Switching a new file to it needs a moment alone with the file,
    and SQLite answers "database is locked" at once then, without waiting on its busy timeout: wait here."""
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    delay = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


class ResponseCache:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "responses.sqlite"
        self.conn = sqlite3.connect(str(self.path), timeout=LOCK_TIMEOUT_S, isolation_level=None)
        switch_to_wal(self.conn)
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, task TEXT, sample_id TEXT, config TEXT,"
            " response TEXT, stats TEXT, created REAL)"
        )

    def get(self, key: str):
        row = self.conn.execute("SELECT response, stats FROM responses WHERE key=?", (key,)).fetchone()
        if row is None:
            return None
        return row[0], json.loads(row[1] or "{}")

    def put(self, key: str, task: str, sample_id, config: dict, response: str, stats: dict) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO responses VALUES (?,?,?,?,?,?,?)",
            (key, task, str(sample_id), canonical(config), response, canonical(stats), time.time()),
        )

    def __len__(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self.conn.close()
