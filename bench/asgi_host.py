"""The host app of the `plexus-asgi` bench server: FastAPI with Plexus mounted at `/rt`.

`uvicorn --factory bench.asgi_host:create_app`; Plexus reads the same
environment (PLEXUS_CONFIG, PLEXUS_*) as the native `plexus` bench server,
so the two differ only in who serves the sockets.
"""

from __future__ import annotations

from fastapi import FastAPI

from plexus.asgi import create_app as create_plexus

MOUNT = "/rt"


def create_app() -> FastAPI:
    """FastAPI with one route of its own and Plexus at MOUNT, run by its lifespan."""
    plexus_app = create_plexus()
    app = FastAPI(lifespan=plexus_app.lifespan)

    @app.get("/")
    async def home() -> dict[str, str]:
        return {"app": "bench host"}

    app.mount(MOUNT, plexus_app)
    return app
