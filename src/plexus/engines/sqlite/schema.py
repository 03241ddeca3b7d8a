"""The SQLite engine's database: its schema, statements and migrations."""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Final

from plexus.channels import namespace_of
from plexus.engines.memory import now_ms

logger = logging.getLogger("plexus.engines.sqlite")

DB_FILE: Final = "history.sqlite3"
SCHEMA_VERSION: Final = "3"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS channels (
    channel TEXT PRIMARY KEY, epoch TEXT NOT NULL,
    top_offset INTEGER NOT NULL, updated_ms INTEGER NOT NULL, expires_ms INTEGER,
    namespace TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    channel TEXT NOT NULL, "offset" INTEGER NOT NULL, time INTEGER NOT NULL,
    expires INTEGER, client TEXT, user TEXT, data BLOB NOT NULL,
    PRIMARY KEY (channel, "offset")
);
CREATE INDEX IF NOT EXISTS messages_expires ON messages (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS idempotency (
    channel TEXT NOT NULL, key TEXT NOT NULL, "offset" INTEGER NOT NULL,
    epoch TEXT NOT NULL, expires INTEGER NOT NULL, PRIMARY KEY (channel, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS channels_expires ON channels (expires_ms)
    WHERE expires_ms IS NOT NULL;
CREATE TABLE IF NOT EXISTS journal (
    channel TEXT NOT NULL, "offset" INTEGER NOT NULL, time INTEGER NOT NULL,
    expires INTEGER, client TEXT, user TEXT, data BLOB NOT NULL,
    size INTEGER NOT NULL, max_bytes INTEGER NOT NULL
);
"""
# An append commits one row here: no index, so a batch's rows fill the same
# pages whatever their channels. `size` and `max_bytes` are the retention the
# move trims with, should it run after a restart.
JOURNAL_COLUMNS: Final = 9
# Most rows one INSERT of the journal writes: 64 x 9 parameters stay under
# the 999 that SQLite builds before 3.32 allow.
JOURNAL_CHUNK: Final = 64


@functools.cache
def journal_insert(rows: int) -> str:
    """An INSERT of `rows` journal rows: one statement, one step (and one
    release of the GIL) for many rows, where `executemany` steps once per row."""
    one = "(" + ", ".join("?" * JOURNAL_COLUMNS) + ")"
    return "INSERT INTO journal VALUES " + ", ".join([one] * rows)


MOVE = (
    'INSERT INTO messages (channel, "offset", time, expires, client, user, data)'
    ' SELECT channel, "offset", time, expires, client, user, data FROM journal ORDER BY rowid'
)
# Each channel's newest journal row, and how many rows and payload bytes it has there.
JOURNAL_STATE = (
    'SELECT j.channel, j."offset", j.time, j.expires, j.size, j.max_bytes, c.rows, c.bytes'
    " FROM journal j JOIN (SELECT max(rowid) AS last, count(*) AS rows,"
    " sum(length(data)) AS bytes FROM journal GROUP BY channel) c ON j.rowid = c.last"
)
SELECT = (
    'SELECT "offset", time, client, user, data FROM messages WHERE channel = ?'
    ' AND "offset" > ? AND (expires IS NULL OR expires > ?) ORDER BY "offset" LIMIT ?'
)


def boot_id() -> str:
    """Return an id that changes when the machine reboots ("" where unknown)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def count_namespaces(conn: sqlite3.Connection) -> Counter[str]:
    rows = conn.execute("SELECT namespace, count(*) FROM channels GROUP BY namespace")
    return Counter({str(namespace): int(count) for namespace, count in rows})


def migrate(conn: sqlite3.Connection) -> None:
    """Bring a database written by an older Plexus to the current schema.

    Version 1 kept payloads as MessagePack and channels forever; version 2
    keeps the payload's JSON and an expiry per channel. Version 1 channels
    with messages that never expire keep living; the others expire after
    their last message does (plus five minutes), or in five minutes when
    they hold none. Version 3 adds `journal`, created with the schema
    (nothing to convert); a version 2 Plexus would ignore the rows a crash
    left there, so a database is not opened again by an older Plexus.
    """
    tables = {str(row[0]) for row in conn.execute("SELECT name FROM sqlite_master")}
    if "channels" not in tables:
        return  # a new database
    columns = {str(row[1]) for row in conn.execute("PRAGMA table_info(channels)")}
    if "expires_ms" in columns:
        return
    import msgpack

    from plexus.protocol.codec import encode_data

    grace = 300_000
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("ALTER TABLE channels ADD COLUMN expires_ms INTEGER")
        conn.execute("ALTER TABLE channels ADD COLUMN namespace TEXT NOT NULL DEFAULT ''")
        conn.executemany(
            "UPDATE channels SET namespace = ? WHERE channel = ?",
            [
                (namespace_of(str(channel)), channel)
                for (channel,) in conn.execute("SELECT channel FROM channels").fetchall()
            ],
        )
        conn.execute(
            "UPDATE channels SET expires_ms = (SELECT CASE"
            " WHEN count(*) = 0 THEN ? WHEN count(m.expires) < count(*) THEN NULL"
            " ELSE max(m.expires) + ? END FROM messages m WHERE m.channel = channels.channel)",
            (now_ms() + grace, grace),
        )
        rows = conn.execute('SELECT channel, "offset", data FROM messages').fetchall()
        conn.executemany(
            'UPDATE messages SET data = ? WHERE channel = ? AND "offset" = ?',
            [
                (encode_data(msgpack.unpackb(data, raw=False)), channel, offset)
                for channel, offset, data in rows
            ],
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    logger.info("history: migrated %d messages to schema %s", len(rows), SCHEMA_VERSION)
