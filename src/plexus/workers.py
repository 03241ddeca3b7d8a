"""`plexus serve --workers N`: N server processes on one port, sharing channels through Redis.

Each worker is an ordinary `plexus serve` process whose listening socket has
`SO_REUSEPORT`, so the kernel spreads new connections over them; they share
channels, history and presence through the Redis engine (the settings refuse
`workers > 1` with any other). This process only watches them: it restarts a
worker that dies (with a backoff, giving up on a crash loop), forwards their
output, and passes SIGTERM/SIGINT on so that every client gets 1001.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Final, TextIO

from plexus.config import Settings

log = logging.getLogger("plexus.workers")

RESTART_BACKOFF_MAX: Final = 10.0
HEALTHY_AFTER: Final = 30.0  # a worker up this long was not a crash loop
GIVE_UP_AFTER: Final = 5  # consecutive quick deaths


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[str] | None = None
    started_at: float = 0.0
    quick_deaths: int = 0
    ready: threading.Event = field(default_factory=threading.Event)


def _forward(stream: TextIO, worker: _Worker, out: TextIO) -> None:
    for line in stream:
        if "listening on" in line:
            worker.ready.set()
        out.write(line)
        out.flush()
    worker.ready.set()  # it exited: do not wait for it


class Workers:
    """Runs and watches the worker processes.

    Args:
        settings: the validated settings (`workers`, `host`, `port`, `node_name`, ...).
        args: the `plexus serve` arguments each worker gets (without `--workers`
            and `--port`: the port is the one this process reserved).
    """

    def __init__(self, settings: Settings, args: list[str]) -> None:
        self.settings = settings
        self.args = args
        self.port = settings.port
        self.workers = [_Worker(index) for index in range(settings.workers)]
        self.stopping = threading.Event()
        base = settings.node_name or f"{socket.gethostname()}-{os.getpid()}"
        self.base_name = base
        self.env: dict[str, str] = {}
        if settings.admin_enabled and settings.admin_secret is None:
            # The kernel spreads requests over the workers: an admin session
            # must hold on each, so they sign with one key made here.
            self.env["PLEXUS_ADMIN_SECRET"] = secrets.token_urlsafe(32)

    def _reserve_port(self) -> socket.socket:
        # Binding port 0 with SO_REUSEPORT picks the port every worker then
        # binds too; this socket never listens and is closed once they do.
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((self.settings.host, self.settings.port))
        self.port = sock.getsockname()[1]
        return sock

    def _spawn(self, worker: _Worker) -> None:
        env = {
            **os.environ,
            **self.env,
            "PLEXUS_WORKERS": "1",
            "PLEXUS_REUSE_PORT": "1",
            "PLEXUS_NODE_NAME": f"{self.base_name}-w{worker.index}",
        }
        command = [sys.executable, "-m", "plexus", "serve", *self.args, "--port", str(self.port)]
        worker.ready.clear()
        worker.proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        worker.started_at = time.monotonic()
        assert worker.proc.stdout is not None
        threading.Thread(
            target=_forward, args=(worker.proc.stdout, worker, sys.stderr), daemon=True
        ).start()

    def run(self) -> int:
        """Start the workers and watch them until SIGTERM or SIGINT; return the exit status."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            reserved = self._reserve_port()
        except OSError as exc:
            print(
                f"plexus: cannot listen on {self.settings.host}:{self.settings.port}:"
                f" {exc.strerror or exc}",
                file=sys.stderr,
            )
            return 2
        with reserved:
            for worker in self.workers:
                self._spawn(worker)
            for worker in self.workers:
                worker.ready.wait(self.settings.shutdown_timeout + 30)
        scheme = "https" if self.settings.tls else "http"
        host = f"[{self.settings.host}]" if ":" in self.settings.host else self.settings.host
        log.info(
            "listening on %s://%s:%d with %d workers", scheme, host, self.port, len(self.workers)
        )
        status = self._watch()
        self._stop_all()
        return status

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping.set()

    def _watch(self) -> int:
        while not self.stopping.wait(0.2):
            for worker in self.workers:
                proc = worker.proc
                if proc is None or proc.poll() is None:
                    continue
                quick = time.monotonic() - worker.started_at < HEALTHY_AFTER
                worker.quick_deaths = worker.quick_deaths + 1 if quick else 0
                if worker.quick_deaths >= GIVE_UP_AFTER:
                    log.error(
                        "worker %d keeps dying (exit %s): stopping", worker.index, proc.returncode
                    )
                    return 1
                delay = min(RESTART_BACKOFF_MAX, 0.25 * 2**worker.quick_deaths)
                log.warning(
                    "worker %d exited with %s: restarting in %.2fs",
                    worker.index,
                    proc.returncode,
                    delay if quick else 0.0,
                )
                if quick and self.stopping.wait(delay):
                    return 0
                self._spawn(worker)
        return 0

    def _stop_all(self) -> None:
        procs = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_timeout + 5
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.info("stopped %d workers", len(procs))
