"""The SQLite engine: one process, history on disk (stdlib `sqlite3`, WAL mode).

Channels that keep history live in SQLite; channels that keep none are served
by an in-process `MemoryBroker` (their offsets need no durability: recovery
is never possible there), so publishing to them costs no I/O.

One writer thread owns the only connection (`writer.py`); the loop queues
jobs (`jobs.py`) and hands them over once per loop iteration. Group commit:
the thread runs all jobs handed over while its previous commit ran in ONE
transaction (a batch of plain appends is one INSERT of one journal row, its
own transaction), then hands the results back with one `call_soon_threadsafe`
callback per batch, which delivers the batch's messages to the node and
answers each job (its future, or the `publish_then` callback) in queue
order. With `synchronous="NORMAL"` the loop commits a batch of plain appends
itself (that INSERT only writes into the OS cache) when nothing it handed
over is outstanding and the thread is not using the connection: the
hand-over and its wake-ups cost more than the commit. Moves, checkpoints,
reads and everything else stay on the thread. Jobs are queued
synchronously in call order, so a channel's messages get offsets, commit
and reach subscribers in call order. Offsets are assigned from the writer's
cache of each channel's top: a failed batch is rolled back and the cache
reloaded, so a failure leaves no gap and no duplicate. `close()` commits
what is queued, records a clean shutdown and joins the thread.

Durability when `publish` returns: with `synchronous="NORMAL"` (default) the
commit is in the WAL file in the OS cache. It survives a crash or `kill -9`
of the process, but a power loss or OS crash may lose the last transactions
(without corruption), and their offsets would be issued again under the same
epoch. So an open after an unclean shutdown followed by a reboot (or with an
unknown boot id) gives every channel a new epoch: clients reload instead of
recovering across a silent gap. `synchronous="FULL"` fsyncs each commit
(amortised by group commit) and also survives a power loss.

Storage (`schema.py`): `channels(channel, epoch, top_offset, updated_ms,
expires_ms, namespace, size, max_bytes)` outlives messages, so epochs and
offset counters survive expiry and restarts until `expires_ms` (NULL: never,
for channels whose messages never expire) has passed while no local client
subscribed: then the sweep forgets the channel. `chunks(channel, last,
expires, bytes, data)` keeps a channel's messages in runs of consecutive
offsets, MessagePack-packed, each payload as its compact JSON exactly as it
is sent to clients. `idempotency(channel, key, offset, epoch, expires)`
remembers idempotency keys durably. A batch of appends commits one row in
`batches` (the journal: a table without index, so a commit writes a page or
two whatever the channels). The journal moves into `chunks`, one row per
channel, when it is big enough, after a second without jobs, before a read
of a channel it holds, before a sweep and at close; the move drops the
chunks that retention left wholly behind and writes each channel's
`channels` row with its retention, and reads filter what is left in the
chunks they unpack, so they see exactly what trimming at each append would
leave. An open moves what a crash left in the journal before anything
else. Reads skip expired messages; the sweep deletes a chunk once its
newest message expired. The file is locked exclusively, so two servers
cannot hand out the same offsets.
"""

from __future__ import annotations

from plexus.engines.sqlite.broker import SqliteBroker

__all__ = ["SqliteBroker"]
