"""One process per unshared engine: a second process that would split one is refused.

The memory engine keeps channels in one process, and SQLite history keeps its
offsets in one process's writer. Two processes serving one address
(`uvicorn --workers 2`, gunicorn, `SO_REUSEPORT`) would each hold some of the
clients and never deliver to the others; two processes on one SQLite
`data_dir` would number one channel's messages twice. Only the Redis engine
is shared by many processes.

So such a process claims, with an exclusive `flock`, what it must not share:

- the SQLite data directory (its `plexus.lock` file), whatever serves it;
- each listening address the process serves that it did not bind itself
  (the sockets a server's supervisor binds and its workers inherit), when
  the memory or SQLite engine is mounted in an ASGI server: the workers of
  one server hold the same listening socket, and a second one finds the
  claim of the first.

The kernel drops a claim when its process ends, however it ends: a crash
leaves nothing stale. Claims are process-wide (two apps in one process take
the same claim once each; it is released with the last). On platforms
without `fcntl` (Windows) nothing is claimed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import tempfile
from pathlib import Path

from plexus.exceptions import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("plexus")

# SQLite takes a `data_dir` with one of these suffixes as the database file itself.
_DB_SUFFIXES = (".db", ".sqlite", ".sqlite3")

# Lock file path -> [its open descriptor, how many holders in this process].
_held: dict[str, list[int]] = {}


class Claim:
    """Exclusive claims of this process on lock files, released together."""

    __slots__ = ("_paths",)

    def __init__(self) -> None:
        self._paths: list[str] = []

    def take(self, path: Path, refusal: str) -> None:
        """Hold `path`'s lock, or raise ConfigError with `refusal` (`{pid}`: the holder's pid).

        Raises:
            ConfigError: another process holds the lock.
        """
        if fcntl is None:  # pragma: no cover - Windows
            return
        key = str(path)
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
            self._paths.append(key)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise ConfigError(refusal.format(pid=holder)) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[key] = [fd, 1]
        self._paths.append(key)

    def release(self) -> None:
        """Let go of every claim taken (idempotent)."""
        paths, self._paths = self._paths, []
        for key in paths:
            entry = _held.get(key)
            if entry is None:
                continue
            entry[1] -= 1
            if entry[1] <= 0:
                del _held[key]
                os.close(entry[0])  # closing the descriptor drops the flock


def data_dir_lock(data_dir: str) -> Path:
    """The lock file of a SQLite `data_dir` (a directory, or the database file itself)."""
    path = Path(data_dir).resolve()
    if path.suffix in _DB_SUFFIXES:
        return path.with_name(path.name + ".lock")
    return path / "plexus.lock"


def claim_data_dir(claim: Claim, data_dir: str) -> None:
    """Claim a SQLite data directory for this process, or raise ConfigError in one line."""
    claim.take(
        data_dir_lock(data_dir),
        f"data_dir: {data_dir} is in use by another process (pid {{pid}}): SQLite history"
        ' belongs to one process; run one worker, or share channels with engine = "redis"',
    )


def listening_addresses() -> list[str]:
    """The addresses of the listening TCP sockets this process holds, as `host:port`.

    Read from the process's descriptors (`/proc/self/fd`, or `/dev/fd`):
    what a supervisor bound and handed to its workers is there before the
    worker's application starts.
    """
    directory = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    accepting = getattr(socket, "SO_ACCEPTCONN", None)
    found: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            copy = os.dup(fd)
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
        try:
            sock = socket.socket(fileno=copy)
        except OSError:
            os.close(copy)
            continue
        with sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            if sock.type != socket.SOCK_STREAM or accepting is None:
                continue
            with contextlib.suppress(OSError):
                if sock.getsockopt(socket.SOL_SOCKET, accepting):
                    host, port = sock.getsockname()[:2]
                    found.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return sorted(set(found))


def claim_addresses(claim: Claim, addresses: list[str], engine: str) -> None:
    """Claim each listening address for this process's unshared `engine`, or raise ConfigError."""
    directory = Path(tempfile.gettempdir())
    uid = os.getuid() if hasattr(os, "getuid") else 0
    for address in addresses:
        safe = "".join(c if c.isalnum() else "_" for c in address)
        claim.take(
            directory / f"plexus-{uid}-listen-{safe}.lock",
            f"engine: another process (pid {{pid}}) serves {address} with the {engine} engine,"
            " and processes share channels only through the redis engine: run one worker,"
            ' or set engine = "redis" (PLEXUS_ENGINE=redis) and redis_url',
        )
