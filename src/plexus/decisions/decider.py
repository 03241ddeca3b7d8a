"""Asking the application: the hook of a call if there is one, else its proxy.

Every call is bounded by `proxy_timeout`, logged with its name and duration,
and counted in `/metrics` (`CallStats`). Its outcome is one of three:
accepted (the `result`), refused (`Refused`, with the application's code and
message) or failed (`Unavailable`: the application is unreachable, too slow,
answered non-2xx or something the contract does not allow, or a hook raised).
The caller turns those into a reply, an error or a close.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from plexus.decisions.calls import CALLS, BadAnswer, Handshake, Refused, Request, accepted
from plexus.decisions.hooks import Hook, load_hooks, run_hook
from plexus.decisions.proxy import CallFailed, HttpProxy
from plexus.exceptions import ConfigError, Unavailable
from plexus.metrics import CallStats

if TYPE_CHECKING:
    from plexus.config import Settings

log = logging.getLogger("plexus.decisions")

# An HTTP header name (RFC 9110 5.1: a token).
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Upgrade headers that must not be passed on: they describe the upgrade's own
# connection, and the proxy call sets its own.
NOT_FORWARDED: Final = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        "trailer",
        "keep-alive",
        "proxy-connection",
    }
)
UNAVAILABLE_MESSAGE: Final = "the application is unavailable: try again later"


def check_header_names(names: Iterable[str]) -> None:
    """Raise ConfigError unless every `proxy_headers` entry is a header that may be passed on."""
    for name in names:
        if not _HEADER_NAME.fullmatch(name):
            raise ConfigError(f"proxy_headers: {name!r} is not an HTTP header name")
        if name.lower() in NOT_FORWARDED:
            raise ConfigError(f"proxy_headers: {name} belongs to the upgrade itself: not passed on")


class Decider:
    """The application's decisions for one server.

    Args:
        settings: the `proxy_*` settings, `hooks` and the namespaces' switches.
        stats: where calls are counted (the node's metrics).
        hooks: hooks to use instead of the `hooks` setting: a module, any
            object with hook functions, or a dotted module name.

    Raises:
        ConfigError: the hooks cannot be loaded, or a namespace asks the
            application (`proxy_subscribe`, `proxy_publish`) and neither a
            proxy URL nor a hook answers that call.
    """

    def __init__(
        self, settings: Settings, stats: CallStats | None = None, hooks: object = None
    ) -> None:
        self.stats = stats or CallStats()
        self.timeout = settings.proxy_timeout
        self.urls: dict[str, str] = {}
        for call in CALLS:
            url = getattr(settings, f"proxy_{call}_url")
            if url:
                self.urls[call] = url
        source = hooks if hooks is not None else settings.hooks
        self.hooks: dict[str, Hook] = load_hooks(source) if source else {}
        self.enabled: frozenset[str] = frozenset(self.urls) | frozenset(self.hooks)
        check_header_names(settings.proxy_headers)
        self.forwarded = frozenset(name.lower() for name in settings.proxy_headers)
        for name, options in settings.all_namespaces():
            for call in ("subscribe", "publish"):
                if getattr(options, f"proxy_{call}") and call not in self.enabled:
                    raise ConfigError(
                        f"{name}.proxy_{call}: set proxy_{call}_url, or give the hooks"
                        f" module an on_{call}"
                    )
        self._http: HttpProxy | None = None

    def handshake(self, headers: Iterable[tuple[str, str]], data: str | None) -> Handshake | None:
        """What of an upgrade request later calls pass on; None when nothing is asked."""
        if not self.enabled:
            return None
        kept: dict[str, str] = {}
        names: dict[str, str] = {}  # lower-case name -> the name as first sent
        for name, value in headers:
            key = name.lower()
            if key not in self.forwarded:
                continue
            first = names.setdefault(key, name)
            if first in kept:
                # Several lines of one header are one list (RFC 9110 5.3);
                # cookies are joined as the Cookie header joins them.
                joiner = "; " if key == "cookie" else ", "
                kept[first] = f"{kept[first]}{joiner}{value}"
            else:
                kept[first] = value
        return Handshake(kept, data)

    async def ask(self, request: Request) -> dict[str, Any]:
        """Ask the application `request.call`; return its `result`.

        Raises:
            Refused: the application said no.
            Unavailable: it could not answer (logged with the reason).
        """
        call = request.call
        hook = self.hooks.get(call)
        via = "hook" if hook is not None else "proxy"
        started = time.perf_counter()
        outcome, reason = "failed", ""
        try:
            async with asyncio.timeout(self.timeout):
                if hook is not None:
                    answer = await run_hook(hook, request)
                else:
                    answer = await self._post(call, request)
            result = accepted(call, answer)
            outcome = "accepted"
            return result
        except Refused as exc:
            outcome, reason = "refused", f"{exc.reason}: {exc.message}"
            raise
        except TimeoutError:
            reason = "timeout"
            detail = f"no answer within {self.timeout:g} s"
        except BadAnswer as exc:
            reason, detail = "bad_answer", str(exc)
        except CallFailed as exc:
            reason, detail = exc.kind, str(exc)
        except Exception as exc:
            reason, detail = "exception", f"{type(exc).__name__}: {exc}"
            log.error("%s %s of %s raised", via, call, request.client, exc_info=exc)
        finally:
            elapsed = time.perf_counter() - started
            self.stats.observe(call, via, outcome, elapsed)
            if outcome == "accepted":
                log.info(
                    "%s %s of %s: accepted in %.1f ms", via, call, request.client, elapsed * 1e3
                )
            elif outcome == "refused":
                log.info(
                    "%s %s of %s: refused in %.1f ms (%s)",
                    via,
                    call,
                    request.client,
                    elapsed * 1e3,
                    reason,
                )
        self.stats.errors[call, reason] += 1
        log.warning(
            "%s %s of %s failed after %.1f ms: %s", via, call, request.client, elapsed * 1e3, detail
        )
        raise Unavailable(UNAVAILABLE_MESSAGE)

    async def _post(self, call: str, request: Request) -> Any:
        if self._http is None:
            self._http = HttpProxy()
        return await self._http.post(self.urls[call], request.body(), request.headers)

    async def close(self) -> None:
        """Close the HTTP session, if one was opened."""
        if self._http is not None:
            await self._http.close()
            self._http = None
