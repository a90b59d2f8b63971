"""The errors mapper raises, and the one JSON shape HTTP errors take.

No message here carries a personal or secret value: each names the field or
setting and what was expected.

    MapperError
    ├── SettingsError      a setting is missing or malformed
    ├── SchemaError        the database schema is not at the current revision
    ├── InvalidEmail       an address failed normalization
    ├── ACUnavailable      AC could not be asked, or gave no usable answer
    └── BadRequest         a request was refused; carries its HTTP status
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse


class MapperError(Exception):
    """Base class of every error mapper raises on purpose."""


class SettingsError(MapperError):
    """A setting is missing or malformed."""


class SchemaError(MapperError):
    """The database schema is behind the code."""


class InvalidEmail(MapperError):
    """An email address cannot be normalized."""


class ACUnavailable(MapperError):
    """AC could not be reached or answered something unreadable."""


class BadRequest(MapperError):
    """A request that is refused with a 4xx status and a safe message."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def error_response(message: str, status: int) -> JSONResponse:
    """Build the `{"error": ..., "status": N}` body every HTTP error uses."""
    return JSONResponse({"error": message, "status": status}, status_code=status)


async def handle_bad_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BadRequest)
    return error_response(exc.message, exc.status)


async def handle_server_error(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the log through Starlette's ServerErrorMiddleware;
    # the browser learns nothing about what failed.
    return error_response("Internal Server Error", 500)
