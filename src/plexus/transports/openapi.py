"""The OpenAPI 3.1 description of the backend HTTP API (`/api/*`), served at `/api/openapi.json`.

The document is plain data, kept next to the handlers it describes
(`transports/http_api.py`) and checked against them: the end-to-end API tests
validate every response the server sends against these schemas. Its schemas
are JSON Schema 2020-12, the dialect OpenAPI 3.1 uses, so any JSON Schema
validator can check a request or response with them.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from aiohttp import web

from plexus import __version__
from plexus.protocol.codes import ErrorCode
from plexus.protocol.commands import MAX_HISTORY_LIMIT, MAX_OFFSET

OPENAPI_PATH: Final = "/api/openapi.json"

_JSON: Final = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _body(schema: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {_JSON: {"schema": schema}}}


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


# Every operation that reads a JSON body can fail in these ways.
_BODY_ERRORS: Final = {
    "400": {"$ref": "#/components/responses/BadRequest"},
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "403": {"$ref": "#/components/responses/Forbidden"},
    "408": {"$ref": "#/components/responses/RequestTimeout"},
    "413": {"$ref": "#/components/responses/TooLarge"},
    "415": {"$ref": "#/components/responses/UnsupportedMediaType"},
    "500": {"$ref": "#/components/responses/Internal"},
    "503": {"$ref": "#/components/responses/Unavailable"},
}
_AUTH_ERRORS: Final = {
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "403": {"$ref": "#/components/responses/Forbidden"},
    "500": {"$ref": "#/components/responses/Internal"},
}


def _post(
    operation_id: str,
    summary: str,
    request: dict[str, Any],
    result: str,
    *,
    body_required: bool = True,
) -> dict[str, Any]:
    return {
        "post": {
            "operationId": operation_id,
            "summary": summary,
            "requestBody": _body(request, required=body_required),
            "responses": {"200": _ok(summary, _ref(result)), **_BODY_ERRORS},
        }
    }


# Where /api/subscribe and /api/unsubscribe act.
_CHANNEL_TARGET: Final[dict[str, Any]] = {
    "type": "object",
    "description": "The channel and exactly one of `user` and `client`.",
    "properties": {
        "channel": _ref("Channel"),
        "user": {
            "type": "string",
            "minLength": 1,
            "description": "Every connection of this user.",
        },
        "client": {
            "type": "string",
            "minLength": 1,
            "description": "The connection with this client id (from `welcome`).",
        },
    },
    "required": ["channel"],
    "oneOf": [{"required": ["user"]}, {"required": ["client"]}],
}

_SCHEMAS: Final[dict[str, Any]] = {
    "Channel": {
        "type": "string",
        "description": (
            "A channel name: 1 to 255 characters of `A-Z a-z 0-9 _ - : . @ # / =`. The"
            " namespace is the part before the first `:`; `#USER` is USER's personal channel."
            " Any other string is refused with 400 `invalid_channel`."
        ),
        "pattern": "^[A-Za-z0-9_\\-:.@#/=]{1,255}$",
    },
    "Data": {
        "description": (
            "Any JSON value, nested at most 250 levels deep. Binary data travels as"
            ' `{"$bytes": "<base64>"}`, anywhere inside it: an object whose only key is'
            " `$bytes` must hold standard, padded base64."
        ),
        "if": {"type": "object", "required": ["$bytes"], "maxProperties": 1},
        "then": {"properties": {"$bytes": _ref("Base64")}},
        "else": {"items": _ref("Data"), "additionalProperties": _ref("Data")},
    },
    "Base64": {
        "type": "string",
        "contentEncoding": "base64",
        "pattern": "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$",
    },
    "Offset": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET},
    "Epoch": {
        "type": "string",
        "description": "Changes only when the channel's history and offset counter are lost.",
    },
    "Since": {
        "type": "object",
        "description": "A stream position: read what came after it.",
        "properties": {"offset": _ref("Offset"), "epoch": _ref("Epoch")},
        "required": ["offset", "epoch"],
    },
    "Error": {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "code": {"type": "string", "enum": [code.value for code in ErrorCode]},
                    "message": {"type": "string"},
                },
                "required": ["code", "message"],
                "additionalProperties": False,
            }
        },
        "required": ["error"],
        "additionalProperties": False,
    },
    "PublishRequest": {
        "type": "object",
        "properties": {"channel": _ref("Channel"), "data": _ref("Data")},
        "required": ["channel", "data"],
    },
    "PublishResult": {
        "type": "object",
        "properties": {
            "offset": {**_ref("Offset"), "description": "The message's offset in its channel."},
            "epoch": _ref("Epoch"),
        },
        "required": ["offset", "epoch"],
        "additionalProperties": False,
    },
    "BroadcastRequest": {
        "type": "object",
        "properties": {
            "channels": {
                "type": "array",
                "items": _ref("Channel"),
                "minItems": 1,
                "maxItems": 1000,
                "description": "More than 1000 channels are refused with 413 `too_large`.",
            },
            "data": _ref("Data"),
        },
        "required": ["channels", "data"],
    },
    "BroadcastResult": {
        "type": "object",
        "properties": {
            "results": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"channel": _ref("Channel"), "offset": _ref("Offset")},
                    "required": ["channel", "offset"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["results"],
        "additionalProperties": False,
    },
    "HistoryRequest": {
        "type": "object",
        "properties": {
            "channel": _ref("Channel"),
            "since": _ref("Since"),
            "limit": {
                "type": "integer",
                "minimum": 0,
                "default": 100,
                "description": f"At most this many messages (capped at {MAX_HISTORY_LIMIT}).",
            },
        },
        "required": ["channel"],
    },
    "Message": {
        "type": "object",
        "description": "A stored message, shaped like the WebSocket `message` push.",
        "properties": {
            "type": {"const": "message"},
            "channel": _ref("Channel"),
            "data": _ref("Data"),
            "offset": _ref("Offset"),
            "epoch": _ref("Epoch"),
            "time": {"type": "integer", "description": "Milliseconds since the Unix epoch."},
            "from": {
                "type": "object",
                "description": "The publishing connection; absent for HTTP API messages.",
                "properties": {
                    "client": {"type": "string"},
                    "user": {"type": ["string", "null"]},
                },
                "required": ["client", "user"],
                "additionalProperties": False,
            },
        },
        "required": ["type", "channel", "data", "offset", "epoch", "time"],
        "additionalProperties": False,
    },
    "HistoryResult": {
        "type": "object",
        "properties": {
            "messages": {"type": "array", "items": _ref("Message")},
            "offset": {**_ref("Offset"), "description": "The channel's last offset."},
            "epoch": _ref("Epoch"),
            "complete": {
                "type": "boolean",
                "description": (
                    "With `since`: whether every message after it is still in history"
                    " (same epoch, nothing expired)."
                ),
            },
        },
        "required": ["messages", "offset", "epoch", "complete"],
        "additionalProperties": False,
    },
    "ChannelRequest": {
        "type": "object",
        "properties": {"channel": _ref("Channel")},
        "required": ["channel"],
    },
    "PresenceResult": {
        "type": "object",
        "properties": {
            "clients": {
                "type": "object",
                "description": "Keyed by client id.",
                "additionalProperties": {
                    "type": "object",
                    "properties": {"user": {"type": ["string", "null"]}, "info": {}},
                    "required": ["user", "info"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["clients"],
        "additionalProperties": False,
    },
    "ChannelsResult": {
        "type": "object",
        "properties": {
            "channels": {
                "type": "object",
                "description": "Channels with subscribers on this node, keyed by name.",
                "additionalProperties": {
                    "type": "object",
                    "properties": {"subscribers": {"type": "integer", "minimum": 1}},
                    "required": ["subscribers"],
                },
            }
        },
        "required": ["channels"],
        "additionalProperties": False,
    },
    "DisconnectRequest": {
        "type": "object",
        "description": "Exactly one of `user` and `client`.",
        "properties": {
            "user": {
                "type": "string",
                "minLength": 1,
                "description": "Every connection of this user.",
            },
            "client": {
                "type": "string",
                "minLength": 1,
                "description": "The connection with this client id (from `welcome`).",
            },
        },
        "oneOf": [{"required": ["user"]}, {"required": ["client"]}],
    },
    "DisconnectResult": {
        "type": "object",
        "properties": {
            "disconnected": {
                "type": "integer",
                "minimum": 0,
                "description": "Connections closed with 4001, on every node.",
            }
        },
        "required": ["disconnected"],
        "additionalProperties": False,
    },
    "UnsubscribeRequest": _CHANNEL_TARGET,
    "SubscribeRequest": _CHANNEL_TARGET,
    "SubscribeResult": {
        "type": "object",
        "properties": {
            "subscribed": {
                "type": "integer",
                "minimum": 0,
                "description": (
                    "Subscriptions made, on every node; each connection got the `subscribed`"
                    " push. Connections already subscribed, or that may not read the channel"
                    " (they got an `error` push), are not counted. 0 when nothing matched."
                ),
            }
        },
        "required": ["subscribed"],
        "additionalProperties": False,
    },
    "UnsubscribeResult": {
        "type": "object",
        "properties": {
            "unsubscribed": {
                "type": "integer",
                "minimum": 0,
                "description": (
                    "Subscriptions ended on every node; each connection got the `unsubscribed`"
                    " push. 0 when nothing matched (not an error)."
                ),
            }
        },
        "required": ["unsubscribed"],
        "additionalProperties": False,
    },
    "Info": {
        "type": "object",
        "description": "Version and counters of this node (more counters may be added).",
        "properties": {
            "version": {"type": "string"},
            "connections": {"type": "integer", "minimum": 0},
            "users": {"type": "integer", "minimum": 0},
            "channels": {"type": "integer", "minimum": 0},
            "subscriptions": {"type": "integer", "minimum": 0},
            "uptime": {"type": "number", "minimum": 0, "description": "Seconds."},
        },
        "required": ["version", "connections", "users", "channels", "subscriptions", "uptime"],
    },
}


def _error_response(description: str) -> dict[str, Any]:
    return _ok(description, _ref("Error"))


_DOCUMENT: Final[dict[str, Any]] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Plexus backend HTTP API",
        "version": __version__,
        "description": (
            "Publish to channels, read history and presence, and manage connections from"
            ' a backend. Errors are `{"error": {"code", "message"}}` with the'
            " WebSocket protocol's error codes. Without `api_keys` configured the API"
            " accepts loopback callers only (others get 403 `permission_denied`)."
        ),
        "license": {"name": "MIT", "identifier": "MIT"},
    },
    "security": [{"apiKey": []}],
    "paths": {
        "/api/publish": _post(
            "publish", "Publish one message to a channel", _ref("PublishRequest"), "PublishResult"
        ),
        "/api/broadcast": _post(
            "broadcast",
            "Publish the same message to several channels",
            _ref("BroadcastRequest"),
            "BroadcastResult",
        ),
        "/api/history": _post(
            "history", "Read a channel's stored messages", _ref("HistoryRequest"), "HistoryResult"
        ),
        "/api/presence": _post(
            "presence",
            "Clients subscribed to a channel (needs presence on its namespace)",
            _ref("ChannelRequest"),
            "PresenceResult",
        ),
        "/api/channels": _post(
            "channels",
            "Active channels of this node",
            {"type": "object"},
            "ChannelsResult",
            body_required=False,
        ),
        "/api/disconnect": _post(
            "disconnect",
            "Close every connection of a user, or one connection, on every node (close code 4001)",
            _ref("DisconnectRequest"),
            "DisconnectResult",
        ),
        "/api/subscribe": _post(
            "subscribe",
            "Subscribe the connections of a user, or one connection, to a channel (every node)",
            _ref("SubscribeRequest"),
            "SubscribeResult",
        ),
        "/api/unsubscribe": _post(
            "unsubscribe",
            "End the subscriptions to a channel of a user or a connection on every node",
            _ref("UnsubscribeRequest"),
            "UnsubscribeResult",
        ),
        "/api/info": {
            "get": {
                "operationId": "info",
                "summary": "Version and counters of this node",
                "responses": {"200": _ok("Version and counters", _ref("Info")), **_AUTH_ERRORS},
            }
        },
        OPENAPI_PATH: {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "security": [],
                "responses": {"200": _ok("The OpenAPI document", {"type": "object"})},
            }
        },
    },
    "components": {
        "schemas": _SCHEMAS,
        "responses": {
            "BadRequest": _error_response(
                "`bad_request` (malformed JSON, not an object, a missing or ill-typed field)"
                " or `invalid_channel`"
            ),
            "Unauthorized": _error_response("`unauthorized`: missing or wrong API key"),
            "Forbidden": _error_response(
                "`permission_denied`: a browser `Origin` that is not allowed; or no API key"
                " configured and the caller is not loopback or its `Host` is not a loopback"
                " name or one of `allowed_hosts`"
            ),
            "TooLarge": _error_response("`too_large`: the body is over `max_body_size`"),
            "RequestTimeout": _error_response(
                "`bad_request`: the body did not arrive whole within `http_request_timeout`;"
                " the connection is closed"
            ),
            "UnsupportedMediaType": _error_response(
                "`bad_request`: a body not sent as `Content-Type: application/json`"
            ),
            "Internal": _error_response("`internal`: a server bug (logged)"),
            "Unavailable": _error_response("`unavailable`: a broker or store is down; retry"),
        },
        "securitySchemes": {
            "apiKey": {
                "type": "http",
                "scheme": "bearer",
                "description": "`Authorization: Bearer <key>` with one of the `api_keys`.",
            }
        },
    },
}


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the OpenAPI 3.1 document of `/api/*` (callers may change it)."""
    return copy.deepcopy(_DOCUMENT)


async def openapi_handler(request: web.Request) -> web.Response:
    """aiohttp handler for `GET /api/openapi.json`: public, like any API reference."""
    return web.json_response(_DOCUMENT)
