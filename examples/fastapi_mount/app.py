"""A FastAPI app with its own login, with Plexus mounted in it: one port, one process.

- The app's login sets its own session cookie (signed with the app's secret;
  no JWT anywhere).
- Plexus is mounted at `/realtime`: the browser's WebSocket goes to
  `/realtime/ws` on the app's own origin, so the session cookie comes along.
- Hooks (Python, in-process: no HTTP round trip) decide from that cookie
  who connects and who may join a team's channel.
- A view notifies a user on `#user` with `plexus_app.publish`, in-process.
- An `rpc` (`teams`) is answered by app code, with the connection's user.

Run it (see README.md):

    uvicorn --factory app:create_app --app-dir examples/fastapi_mount
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Annotated, Any

from fastapi import Cookie, FastAPI, HTTPException, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

from plexus.asgi import PlexusApp
from plexus.asgi import create_app as create_plexus
from plexus.decisions import ConnectRequest, SubscribeRequest
from plexus.rpc import RpcCall

HERE = Path(__file__).resolve().parent
COOKIE = "session"

# The app's own users and teams (a real app has them in its database).
USERS = {"alice": "wonderland", "bob": "builder"}
TEAMS = {"wonder": {"alice"}, "builders": {"bob", "alice"}}

PAGE = """<!doctype html>
<meta charset="utf-8"><title>FastAPI + Plexus</title>
<pre id="log"></pre>
<script type="module">
  // Same origin as the app: the upgrade carries its session cookie.
  const log = (line) => { document.getElementById("log").textContent += line + "\\n"; };
  const ws = new WebSocket(`ws://${location.host}/realtime/ws`);
  ws.onmessage = (e) => log(e.data);
  ws.onclose = (e) => log(`closed ${e.code} ${e.reason}`);
</script>
"""


class Sessions:
    """The app's sessions: a cookie that names the user, signed with the app's secret.

    Nothing is stored server-side, so every `uvicorn --workers` process reads
    the same cookie the same way.
    """

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, user: str) -> str:
        return hmac.new(self._secret, user.encode(), hashlib.sha256).hexdigest()

    def cookie(self, user: str) -> str:
        """The cookie value of a logged-in `user`."""
        name = base64.urlsafe_b64encode(user.encode()).decode()
        return f"{name}.{self._mac(user)}"

    def user(self, cookie: str | None) -> str | None:
        """The user of a cookie value; None if missing, forged or of an unknown user."""
        if not cookie:
            return None
        name, _, mac = cookie.partition(".")
        try:
            user = base64.urlsafe_b64decode(name.encode()).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        if not hmac.compare_digest(mac, self._mac(user)) or user not in USERS:
            return None
        return user

    def user_of_headers(self, headers: Any) -> str | None:
        """The user of the `Cookie` header among a Plexus request's headers."""
        raw = next((v for k, v in headers.items() if k.lower() == "cookie"), "")
        morsel = SimpleCookie(raw).get(COOKIE)
        return self.user(morsel.value if morsel is not None else None)


class Hooks:
    """What Plexus asks the app (`shared/spec/proxy.md`), answered from its sessions."""

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    async def on_connect(self, request: ConnectRequest) -> dict[str, Any]:
        user = self.sessions.user_of_headers(request.headers)
        if user is None:
            return {"error": {"code": "unauthorized", "message": "log in first"}}
        # Subscribed server-side to their personal channel: notifications
        # published while they were away arrive when they come back.
        return {"result": {"user": user, "info": {"name": user.title()}, "channels": [f"#{user}"]}}

    async def on_subscribe(self, request: SubscribeRequest) -> dict[str, Any]:
        team = request.channel.removeprefix("team:")
        if request.user not in TEAMS.get(team, set()):
            return {"error": {"code": "permission_denied", "message": f"not a member of {team}"}}
        return {"result": {}}


class Login(BaseModel):
    user: str
    password: str


class Note(BaseModel):
    to: str
    text: str


def create_app(secret_key: str | None = None) -> FastAPI:
    """The FastAPI application, with Plexus at `/realtime` (settings: plexus.toml, PLEXUS_*)."""
    secret = secret_key or os.environ.get("APP_SECRET_KEY") or secrets.token_hex(32)
    sessions = Sessions(secret.encode())
    plexus_app: PlexusApp = create_plexus(
        config_file=os.environ.get("PLEXUS_CONFIG") or HERE / "plexus.toml",
        hooks=Hooks(sessions),
    )
    # Starlette does not pass lifespan events to mounted apps: the host's
    # lifespan starts Plexus, and stops it (1001 to every client) on shutdown.
    app = FastAPI(lifespan=plexus_app.lifespan)

    @plexus_app.rpc("teams")
    async def teams(call: RpcCall) -> list[str]:
        """App code answering an `rpc` from its own tables, knowing who asks."""
        return sorted(team for team, members in TEAMS.items() if call.user in members)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return PAGE

    @app.post("/login")
    async def login(body: Login, response: Response) -> dict[str, str]:
        if USERS.get(body.user) != body.password:
            raise HTTPException(401, "wrong user or password")
        # Lax: sent with the same-site WebSocket upgrade, not with other sites' requests.
        response.set_cookie(
            COOKIE, sessions.cookie(body.user), httponly=True, samesite="lax", path="/"
        )
        return {"user": body.user}

    @app.post("/logout")
    async def logout(response: Response) -> dict[str, None]:
        response.delete_cookie(COOKIE, path="/")
        return {"user": None}

    @app.post("/notify")
    async def notify(note: Note, session: Annotated[str | None, Cookie()] = None) -> dict[str, Any]:
        """A view that notifies a user: one publish to `#user` reaches all their tabs."""
        sender = sessions.user(session)
        if sender is None:
            raise HTTPException(401, "log in first")
        if note.to not in USERS:
            raise HTTPException(404, f"no user {note.to!r}")
        return await plexus_app.publish(f"#{note.to}", {"from": sender, "text": note.text})

    app.mount("/realtime", plexus_app)
    return app
