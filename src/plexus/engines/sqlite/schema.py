"""The SQLite engine's database: its schema, statements and migrations."""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any, Final

import msgpack

from plexus.channels import namespace_of
from plexus.engines.memory import now_ms

logger = logging.getLogger("plexus.engines.sqlite")

DB_FILE: Final = "history.sqlite3"
SCHEMA_VERSION: Final = "4"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS channels (
    channel TEXT PRIMARY KEY, epoch TEXT NOT NULL,
    top_offset INTEGER NOT NULL, updated_ms INTEGER NOT NULL, expires_ms INTEGER,
    namespace TEXT NOT NULL DEFAULT '', size INTEGER, max_bytes INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idempotency (
    channel TEXT NOT NULL, key TEXT NOT NULL, "offset" INTEGER NOT NULL,
    epoch TEXT NOT NULL, expires INTEGER NOT NULL, PRIMARY KEY (channel, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS channels_expires ON channels (expires_ms)
    WHERE expires_ms IS NOT NULL;
CREATE TABLE IF NOT EXISTS batches (data BLOB NOT NULL);
"""
# A channel's messages, a run of consecutive offsets per row (`last` is the
# newest), packed with MessagePack as [offset, time, expires, client, user,
# data] each: one row per channel and move of the journal, so writing a
# message costs a share of one row instead of a row and its index entries.
# `expires` is its newest message's (the sweep deletes the chunk then; reads
# skip its older messages once they expired), `bytes` its payload bytes.
CHUNKS = """
CREATE TABLE IF NOT EXISTS chunks (
    channel TEXT NOT NULL, last INTEGER NOT NULL, expires INTEGER,
    bytes INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (channel, last)
);
CREATE INDEX IF NOT EXISTS chunks_expires ON chunks (expires) WHERE expires IS NOT NULL;
"""
# `batches` is the journal: each batch of appends commits one row there, its
# messages packed as [channel, offset, time, expires, client, user, data,
# size, max_bytes] (the last two: the retention the move trims with, should
# it run after a restart). No index, one row: a commit writes a page or two.


def pack(value: object) -> bytes:
    """MessagePack, as the journal and chunks store it."""
    return msgpack.packb(value)


def unpack(data: bytes) -> Any:
    """The value `pack` made (arrays come back as lists)."""
    return msgpack.unpackb(data)


# Messages per chunk when a version 2 or 3 database is converted.
MIGRATED_CHUNK: Final = 1024
# The grace an idle channel gets in migrations (the default `channel_grace`).
GRACE_MS: Final = 300_000


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
    they hold none. Version 3 added a journal of one row per message;
    version 4 keeps messages in chunks (`CHUNKS`) and the journal in
    `batches`, and each channel's retention in `channels`. An older Plexus
    would not find the messages, so a database is not opened again by one.
    """
    tables = {str(row[0]) for row in conn.execute("SELECT name FROM sqlite_master")}
    if "channels" not in tables:
        return  # a new database
    columns = {str(row[1]) for row in conn.execute("PRAGMA table_info(channels)")}
    if "expires_ms" not in columns:
        _to_version_2(conn)
    if "messages" in tables:
        _to_chunks(conn, "journal" in tables)


def _to_version_2(conn: sqlite3.Connection) -> None:
    from plexus.protocol.codec import encode_data

    grace = GRACE_MS
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
            [(encode_data(unpack(data)), channel, offset) for channel, offset, data in rows],
        )
        conn.execute("COMMIT")
    except BaseException:
        roll_back(conn)
        raise
    logger.info("history: migrated %d messages to schema 2", len(rows))


# Each channel's newest row in a version 3 journal, with the retention it carries.
_V3_JOURNAL_TOPS = (
    'SELECT j.channel, j."offset", j.time, j.expires, j.size, j.max_bytes FROM journal j'
    " JOIN (SELECT max(rowid) AS last FROM journal GROUP BY channel) c ON j.rowid = c.last"
)


def _to_chunks(conn: sqlite3.Connection, journal: bool) -> None:
    """Version 2 or 3 to 4: every channel's messages into chunks, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        columns = {str(row[1]) for row in conn.execute("PRAGMA table_info(channels)")}
        if "size" not in columns:
            conn.execute("ALTER TABLE channels ADD COLUMN size INTEGER")
            conn.execute("ALTER TABLE channels ADD COLUMN max_bytes INTEGER")
        for statement in CHUNKS.split(";"):
            if statement.strip():
                conn.execute(statement)
        if journal:
            # What a crash left in a version 3 journal: moved as version 3 would.
            conn.execute(
                'INSERT INTO messages (channel, "offset", time, expires, client, user, data)'
                ' SELECT channel, "offset", time, expires, client, user, data FROM journal'
                " ORDER BY rowid"
            )
            for channel, top, at, expires, size, max_bytes in conn.execute(
                _V3_JOURNAL_TOPS
            ).fetchall():
                forget = None if expires is None else expires + GRACE_MS
                conn.execute(
                    "UPDATE channels SET top_offset = ?, updated_ms = ?, expires_ms = ?,"
                    " size = ?, max_bytes = ? WHERE channel = ?",
                    (top, at, forget, size, max_bytes or None, channel),
                )
                conn.execute(
                    'DELETE FROM messages WHERE channel = ? AND "offset" <= ?',
                    (channel, top - size),
                )
            conn.execute("DROP TABLE journal")
        moved = 0
        chunk: list[list[Any]] = []
        current: str | None = None

        def write() -> None:
            conn.execute(
                "INSERT INTO chunks (channel, last, expires, bytes, data) VALUES (?, ?, ?, ?, ?)",
                (current, chunk[-1][0], chunk[-1][2], sum(len(r[5]) for r in chunk), pack(chunk)),
            )

        for channel, *row in conn.execute(
            'SELECT channel, "offset", time, expires, client, user, data FROM messages'
            ' ORDER BY channel, "offset"'
        ).fetchall():
            if chunk and (channel != current or len(chunk) >= MIGRATED_CHUNK):
                write()
                chunk = []
            current = channel
            row[5] = bytes(row[5])
            chunk.append(row)
            moved += 1
        if chunk:
            write()
        conn.execute("DROP TABLE messages")
        conn.execute("COMMIT")
    except BaseException:
        roll_back(conn)
        raise
    logger.info("history: moved %d messages into chunks (schema %s)", moved, SCHEMA_VERSION)


def roll_back(conn: sqlite3.Connection) -> None:
    """End the transaction under way, if any, undoing it."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")
