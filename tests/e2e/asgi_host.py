"""Host apps that mount Plexus, for tests/e2e/test_asgi.py (served by uvicorn in a child).

Every app is a factory (`uvicorn --factory tests.e2e.asgi_host:NAME`) whose
Plexus takes its settings from the `PLEXUS_*` environment the test sets.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from plexus.asgi import PlexusApp, Receive, Scope, Send, create_app, mount
from plexus.rpc import RpcCall


def _plexus() -> PlexusApp:
    plexus_app = create_app()

    @plexus_app.rpc("whoami")
    async def whoami(call: RpcCall) -> Any:
        return {"user": call.user, "client": call.client}

    return plexus_app


def _routes(app: FastAPI, plexus_app: PlexusApp) -> None:
    @app.get("/")
    async def home() -> dict[str, str]:
        return {"app": "host"}

    @app.post("/announce/{channel}")
    async def announce(channel: str, text: str) -> dict[str, Any]:
        """A view of the host app publishing in-process."""
        return await plexus_app.publish(channel, {"text": text})

    app.mount("/realtime", plexus_app)


def fastapi_app() -> FastAPI:
    """FastAPI with Plexus at /realtime, started and stopped by the host's lifespan."""
    plexus_app = _plexus()
    app = FastAPI(lifespan=plexus_app.lifespan)
    _routes(app, plexus_app)
    return app


def lazy_app() -> FastAPI:
    """The same, without telling the host about Plexus's lifespan: it starts at a request."""
    plexus_app = _plexus()
    app = FastAPI()
    _routes(app, plexus_app)
    return app


async def _plain(scope: Scope, receive: Receive, send: Send) -> None:
    """A host app with no router for ASGI apps that refuses lifespan, as Django's does."""
    if scope["type"] != "http":
        raise ValueError(f"this app handles HTTP only, not {scope['type']}")
    head = [(b"content-type", b"text/plain")]
    await send({"type": "http.response.start", "status": 200, "headers": head})
    await send({"type": "http.response.body", "body": b"host " + scope["path"].encode()})


def django_like_app() -> Any:
    """A plain ASGI host with Plexus beside it through `plexus.asgi.mount`."""
    return mount(_plain, _plexus(), "/realtime")
