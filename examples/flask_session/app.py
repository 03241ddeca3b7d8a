"""A Flask app with its own login, whose session decides who connects to Plexus.

Plexus asks this app (its connect and subscribe proxies, see plexus.toml)
with the browser's own Cookie header: the Flask session says who the
connection is, and whether it may join a team's channel. A view notifies a
user on `#user` with the backend SDK, which needs the standard library only.

Run it beside Plexus (see README.md):

    python examples/flask_session/app.py          # http://127.0.0.1:5000
    plexus serve --config examples/flask_session/plexus.toml
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from flask import Flask, jsonify, request, session

from plexus.api import ApiError, PlexusApi

# The app's own users and teams (a real app has them in its database).
USERS = {"alice": "wonderland", "bob": "builder"}
TEAMS = {"wonder": {"alice"}, "builders": {"bob", "alice"}}

PAGE = """<!doctype html>
<meta charset="utf-8"><title>Flask + Plexus</title>
<form method="post" action="/login"><input name="user" placeholder="alice">
<input name="password" type="password" placeholder="wonderland"><button>Log in</button></form>
<pre id="log"></pre>
<script type="module">
  // The browser sends this site's session cookie with the upgrade: Plexus asks
  // /plexus/connect who that is (no token to hand out).
  const log = (line) => { document.getElementById("log").textContent += line + "\\n"; };
  const ws = new WebSocket("ws://127.0.0.1:8000/ws");
  ws.onmessage = (e) => log(e.data);
  ws.onclose = (e) => log(`closed ${e.code} ${e.reason}`);
</script>
"""


def create_app(
    plexus_url: str | None = None, api_key: str | None = None, secret_key: str | None = None
) -> Flask:
    """The Flask application; `plexus_url` is the Plexus server its views publish through."""
    app = Flask(__name__)
    app.secret_key = secret_key or os.environ.get("FLASK_SECRET_KEY") or secrets.token_hex(32)
    # Lax: the cookie goes along with the WebSocket upgrade to Plexus on the same site.
    app.config.update(SESSION_COOKIE_SAMESITE="Lax", SESSION_COOKIE_HTTPONLY=True)
    plexus = PlexusApi(
        plexus_url or os.environ.get("PLEXUS_API_URL", "http://127.0.0.1:8000"),
        api_key=api_key or os.environ.get("PLEXUS_API_KEY"),
    )

    @app.get("/")
    def index() -> str:
        return PAGE

    @app.post("/login")
    def login() -> Any:
        user = request.form.get("user", "")
        if USERS.get(user) != request.form.get("password"):
            return jsonify(error="wrong user or password"), 401
        session.clear()
        session["user"] = user
        return jsonify(user=user)

    @app.post("/logout")
    def logout() -> Any:
        session.clear()
        return jsonify(user=None)

    @app.post("/notify")
    def notify() -> Any:
        """A view that notifies a user: one publish to `#user` reaches all their tabs."""
        sender = session.get("user")
        if sender is None:
            return jsonify(error="log in first"), 401
        to, text = request.form.get("to", ""), request.form.get("text", "")
        if to not in USERS:
            return jsonify(error=f"no user {to!r}"), 404
        try:
            offset = plexus.publish(f"#{to}", {"from": sender, "text": text})
        except ApiError as exc:  # Plexus down after its retries: say so, keep serving
            return jsonify(error=str(exc)), 503
        return jsonify(offset=offset)

    # ----- what Plexus asks (shared/spec/proxy.md): the browser's cookie comes along

    @app.post("/plexus/connect")
    def plexus_connect() -> Any:
        user = session.get("user")
        if user is None:
            return jsonify(error={"code": "unauthorized", "message": "log in first"})
        return jsonify(
            result={"user": user, "info": {"name": user.title()}, "channels": [f"#{user}"]}
        )

    @app.post("/plexus/subscribe")
    def plexus_subscribe() -> Any:
        body = request.get_json()
        user, channel = session.get("user"), body["channel"]
        team = channel.removeprefix("team:")
        if user is None or user not in TEAMS.get(team, set()):
            return jsonify(
                error={"code": "permission_denied", "message": f"not a member of {team}"}
            )
        return jsonify(result={})

    return app


if __name__ == "__main__":
    create_app().run(host="127.0.0.1", port=5000)
