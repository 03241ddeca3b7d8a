"""aiohttp's log of unparsable requests is one line; real errors keep their traceback."""

from __future__ import annotations

import logging
import sys

from aiohttp.http_exceptions import BadHttpMessage

from plexus.logs import MalformedRequestFilter


def record_of(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        exc_info = sys.exc_info()
    return logging.LogRecord(
        "aiohttp.server",
        logging.ERROR,
        __file__,
        1,
        "Error handling request from %s",
        ("10.0.0.7",),
        exc_info,
    )


def test_an_unparsable_request_becomes_one_info_line() -> None:
    record = record_of(BadHttpMessage("Invalid header token:\n\n  b'Bad Header'\n     ^"))
    assert MalformedRequestFilter().filter(record)
    assert record.exc_info is None
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        "bad HTTP request from 10.0.0.7: 400 Invalid header token: b'Bad Header' ^"
    )


def test_a_server_bug_keeps_its_traceback() -> None:
    record = record_of(KeyError("bug"))
    assert MalformedRequestFilter().filter(record)
    assert record.exc_info is not None
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "Error handling request from 10.0.0.7"
