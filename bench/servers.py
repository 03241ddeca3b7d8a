"""Start and stop the servers under test, and read their CPU time and memory from /proc.

Every server runs as a child process on an ephemeral loopback port; the
`listening on http://127.0.0.1:PORT` line it prints tells the port. Its
output goes to a log file (never a pipe nobody drains). CPU time is
utime + stime from /proc/PID/stat (all threads, including exited ones);
RSS is VmRSS from /proc/PID/status.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
NODE_PEER = BENCH_DIR / "peers" / "node-ws"
PLEXUS_CONFIG = BENCH_DIR / "plexus-bench.toml"
# `plexus serve` says "listening on", uvicorn "Uvicorn running on".
LISTENING = re.compile(rb"(?:listening on|running on) http://127\.0\.0\.1:(\d+)")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1

# Server kinds: name -> what it is. `plexus-sqlite` differs from `plexus` only
# in its history backend (sqlite in a fresh temporary data dir). `floor` is
# bench/peers/floor.py: one bare write per delivery and nothing else.
# `plexus-redis` is two Plexus nodes on the Redis engine with their own
# redis-server: the measured node (subscribers connect there) and a second
# node where the fan-out workloads publish, so the measured node delivers
# what another node published.
# `plexus-deflate` and `node-deflate` negotiate permessage-deflate (Plexus with
# `compression = "on"`, Node ws with its defaults and no size threshold).
# `plexus-asgi` is the `plexus` settings mounted at /rt in a FastAPI app
# (bench/asgi_host.py) served by uvicorn, one process: the mount's cost.
# `plexus-default` is Plexus with its built-in settings (no bench config, rate
# limits on, the default engine): what the soak runs.
KINDS = (
    "plexus",
    "plexus-sqlite",
    "plexus-redis",
    "plexus-deflate",
    "plexus-default",
    "plexus-asgi",
    "node",
    "node-deflate",
    "floor",
)
FLOOR_PEER = BENCH_DIR / "peers" / "floor.py"


@dataclass
class Server:
    """A running server under test."""

    kind: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    tmpdir: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)
    # Started with it and stopped after it: the publishing node and redis-server.
    companions: list[Server] = field(default_factory=list)
    publisher_port: int = 0  # where fan-out publishes go (its own port unless set)
    prefix: str = ""  # the path Plexus is mounted at (`/ws` and `/api/*` are below it)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the whole process so far (10 ms resolution)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the whole process so far."""
        return sum(self.cpu_times())

    def rss_bytes(self) -> int:
        """Resident set size (VmRSS) in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def open_files(self) -> int:
        with contextlib.suppress(OSError):
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        return 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for companion in self.companions:
            companion.stop(timeout)
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle (all cores, softirq included)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def plexus_command() -> list[str]:
    """The `plexus` console script of the venv running the bench (or `python -m plexus.cli`)."""
    script = Path(sys.executable).parent / "plexus"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "plexus.cli"]


def ensure_node_peer() -> None:
    """Install the Node peer's dependencies (from its lock file) if missing."""
    if (NODE_PEER / "node_modules" / "ws").is_dir():
        return
    if shutil.which("npm") is None:
        raise RuntimeError("npm not found: the Node ws peer needs Node.js 18+ and npm")
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--silent"],
        cwd=NODE_PEER,
        check=True,
    )


def start(
    kind: str,
    log_dir: Path,
    cpus: list[int] | None = None,
    env_extra: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Server:
    """Start a server of `kind` (see KINDS) and wait until it listens."""
    if kind == "plexus-redis":
        return _start_redis_pair(log_dir, cpus, env_extra, timeout)
    env = dict(os.environ)
    tmpdir: Path | None = None
    if kind in ("node", "node-deflate"):
        ensure_node_peer()
        cmd = ["node", str(NODE_PEER / "server.js"), "0"]
        if kind == "node-deflate":
            env["PERMESSAGE_DEFLATE"] = "1"
    elif kind == "floor":
        cmd = [sys.executable, str(FLOOR_PEER), "0"]
    elif kind in ("plexus", "plexus-sqlite", "plexus-redis-node", "plexus-deflate", "plexus-asgi"):
        tmpdir = Path(tempfile.mkdtemp(prefix="plexus-bench-"))
        env.update(
            PLEXUS_PUBLISH_RATE="0",
            PLEXUS_HISTORY_BACKEND="sqlite" if kind == "plexus-sqlite" else "memory",
            PLEXUS_DATA_DIR=str(tmpdir),
            PLEXUS_CONFIG=str(PLEXUS_CONFIG),
            PLEXUS_COMPRESSION="on" if kind == "plexus-deflate" else "off",
        )
        cmd = [*plexus_command(), "serve", "--port", "0"]
        if kind == "plexus-asgi":
            # uvicorn picks uvloop and httptools as the native server uses uvloop;
            # no access log (the native server keeps none either).
            cmd = [
                sys.executable, "-m", "uvicorn", "--factory", "bench.asgi_host:create_app",
                "--host", "127.0.0.1", "--port", "0", "--no-access-log",
            ]  # fmt: skip
    elif kind == "plexus-default":
        tmpdir = Path(tempfile.mkdtemp(prefix="plexus-soak-"))
        env = {k: v for k, v in env.items() if not k.startswith("PLEXUS_")}
        env["PLEXUS_DATA_DIR"] = str(tmpdir)
        cmd = [*plexus_command(), "serve", "--port", "0"]
    else:
        raise ValueError(f"unknown server kind {kind!r}; expected one of {KINDS}")
    env.update(env_extra or {})
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"server-{kind}-{int(time.time() * 1000)}.log"

    def pin() -> None:
        # Runs in the child before exec: stop the server if the bench dies, and pin it.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if cpus:
            os.sched_setaffinity(0, cpus)

    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=pin,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = LISTENING.search(log.read_bytes())
        if found:
            prefix = "/rt" if kind == "plexus-asgi" else ""
            return Server(kind, proc, int(found.group(1)), log, tmpdir, prefix=prefix)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    server = Server(kind, proc, 0, log, tmpdir)
    server.stop()
    raise RuntimeError(f"{kind} did not start (exit {proc.returncode}):\n{server.log_tail()}")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_redis(log_dir: Path, timeout: float) -> Server:
    executable = shutil.which("redis-server")
    if executable is None:
        raise RuntimeError("redis-server not found (apt install redis-server)")
    port = _free_port()
    log = log_dir / f"redis-{int(time.time() * 1000)}.log"
    tmpdir = Path(tempfile.mkdtemp(prefix="plexus-bench-redis-"))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(tmpdir),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + timeout
    import socket

    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as c:
            c.sendall(b"PING\r\n")
            if c.recv(16).startswith(b"+PONG"):
                return Server("redis", proc, port, log, tmpdir)
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def _start_redis_pair(
    log_dir: Path, cpus: list[int] | None, env_extra: dict[str, str] | None, timeout: float
) -> Server:
    log_dir.mkdir(parents=True, exist_ok=True)
    redis = _start_redis(log_dir, timeout)
    redis_env = {
        "PLEXUS_ENGINE": "redis",
        "PLEXUS_REDIS_URL": f"redis://127.0.0.1:{redis.port}/0",
        **(env_extra or {}),
    }
    others = [c for c in range(os.cpu_count() or 1) if not cpus or c not in cpus] or None
    try:
        publisher = start("plexus-redis-node", log_dir, others, redis_env, timeout)
        measured = start("plexus-redis-node", log_dir, cpus, redis_env, timeout)
    except BaseException:
        redis.stop()
        raise
    measured.kind = "plexus-redis"
    measured.companions = [publisher, redis]
    measured.publisher_port = publisher.port
    return measured
