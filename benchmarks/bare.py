"""The bare server that `/track` is measured against.

One Starlette endpoint that answers 202 with mapper's body and does no
work, run by uvicorn with the options `mapper serve` uses, so that the
difference between the two is what mapper does. It reads no request and
keeps nothing.
"""

from __future__ import annotations

import click
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mapper.cli import SERVER_OPTIONS


async def accept(request: Request) -> JSONResponse:
    return JSONResponse({"accepted": True}, status_code=202)


app = Starlette(routes=[Route("/track", accept, methods=["POST"])])


@click.command()
@click.option("--port", type=int, required=True, help="Port on 127.0.0.1.")
def main(port: int) -> None:
    """Serve the bare endpoint on 127.0.0.1:PORT until stopped."""
    uvicorn.run(app, host="127.0.0.1", port=port, **SERVER_OPTIONS)


if __name__ == "__main__":
    main()
