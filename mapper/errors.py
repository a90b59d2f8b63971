"""The errors mapper raises, and the one JSON shape HTTP errors take.

It also holds the guard that keeps unexpected exceptions' text, which can
quote emails and keys, out of answers and logs.

No message here carries a personal or secret value: each names the field or
setting and what was expected.

    MapperError
    ├── SettingsError      a setting is missing or malformed
    ├── SchemaError        the database is missing or behind the code
    ├── InvalidEmail       an address failed normalization
    ├── ACUnavailable      AC could not be asked, or gave no usable answer
    ├── StoreConflict      concurrent writers kept colliding
    └── BadRequest         a request was refused; carries its HTTP status
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Mapping
from pathlib import Path

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

PACKAGE = str(Path(__file__).resolve().parent) + os.sep


class MapperError(Exception):
    """Base class of every error mapper raises on purpose."""


class SettingsError(MapperError):
    """A setting is missing or malformed."""


class SchemaError(MapperError):
    """The database is missing or its schema is behind the code."""


class InvalidEmail(MapperError):
    """An email address cannot be normalized."""


class ACUnavailable(MapperError):
    """AC could not be reached or answered something unreadable."""


class StoreConflict(MapperError):
    """A transaction lost to concurrent writers every time it was tried."""


class BadRequest(MapperError):
    """A request that is refused with a 4xx status and a safe message."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def error_response(
    message: str, status: int, *, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """Build the `{"error": ..., "status": N}` body every HTTP error uses."""
    body = {"error": message, "status": status}
    return JSONResponse(body, status_code=status, headers=headers)


async def handle_bad_request(request: Request, exc: Exception) -> JSONResponse:
    """Answer a refused request with its status and safe message."""
    assert isinstance(exc, BadRequest)
    return error_response(exc.message, exc.status)


class SafeErrors:
    """Answers an unexpected exception with a bare 500, logging no message.

    A database error's text can quote the row it failed on (an email, in a
    unique-key violation) and an HTTP client error quotes its URL, so
    neither the message nor the traceback may reach a log or a browser.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except ClientDisconnect:
            # A beacon cut off by a closing page: nothing to answer or fix.
            return
        except Exception as exc:
            logger.error("Unexpected error (%s).", describe_exception(exc))
            if not started:
                response = error_response("Internal Server Error", 500)
                await response(scope, receive, send)


def describe_exception(exc: BaseException) -> str:
    """Name an exception's type and where it was raised, without its message.

    The place is the innermost frame in mapper's own code; library frames
    below it say little more than the type does.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__

    ours = [
        frame
        for frame in frames
        if frame.filename.startswith(PACKAGE) and frame.filename != __file__
    ]
    frame = (ours or frames)[-1]
    place = f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
    return f"{type(exc).__name__} at {place}"
