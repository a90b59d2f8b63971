"""The ASGI app: routes, error handling, CORS, and the delivery loop.

`create_app` builds everything from a `Settings`; nothing is read from the
environment here. The app itself holds no personal data: emails live in the
database, and the answers it sends carry none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from importlib.resources import files

from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mapper.clients import ACClient
from mapper.db import check_schema, make_engine, make_sessionmaker
from mapper.delivery import DeliveryWorker
from mapper.errors import (
    BadRequest,
    SafeErrors,
    SchemaError,
    error_response,
    handle_bad_request,
)
from mapper.landing import go, landed
from mapper.metrics import Metrics
from mapper.settings import Settings, require_secret_keys
from mapper.tokens import VisitorSigner
from mapper.tracking import make_intake, track
from mapper.web import Runtime, get_runtime
from mapper.webhooks import activecampaign_webhook

logger = logging.getLogger(__name__)

SNIPPET = files("mapper").joinpath("static/mapper.js").read_text("utf-8")


async def snippet(request: Request) -> Response:
    """Serve the browser snippet; it holds no key, email or visitor id."""
    return Response(
        SNIPPET,
        media_type="text/javascript",
        headers={"Cache-Control": "public, max-age=300"},
    )


async def health(request: Request) -> JSONResponse:
    """Answer while the process runs; it checks nothing else."""
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> JSONResponse:
    """Answer 200 only while the database is reachable and current."""
    state = get_runtime(request)
    try:
        await run_in_threadpool(check_schema, state.engine)
    except SchemaError as exc:
        # The message names what to do and never the URL.
        return JSONResponse({"status": "not ready", "reason": str(exc)}, 503)
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    """This process's metrics and the outbox's counts, for Prometheus."""
    state = get_runtime(request)
    text = await run_in_threadpool(state.metrics.render)
    return Response(text, media_type=CONTENT_TYPE_LATEST)


async def missing_webhook_secret(request: Request) -> Response:
    """Answer a webhook URL without its secret as a wrong secret."""
    raise BadRequest("Invalid webhook secret.", status=401)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Give Starlette's own errors (404, 405) mapper's JSON shape."""
    assert isinstance(exc, HTTPException)
    return error_response(str(exc.detail), exc.status_code, headers=exc.headers)


class OriginCheck(CORSMiddleware):
    """Starlette's CORS, with refused preflights in mapper's error shape."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response

        headers = {
            name: value
            for name, value in response.headers.items()
            if name not in {"content-type", "content-length"}
        }
        message = "Expected a preflight from an allowed origin, for POST."
        return error_response(message, 400, headers=headers)


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    deliver: bool = True,
) -> Starlette:
    """Build the app; with `deliver`, its lifespan runs the delivery loop.

    An engine passed in stays the caller's to dispose of; one made here is
    disposed of when the app shuts down.
    """
    require_secret_keys(settings)
    bound = engine or make_engine(settings.database_url)
    sessions = make_sessionmaker(bound)
    state = Runtime(
        settings=settings,
        engine=bound,
        sessions=sessions,
        signer=VisitorSigner(settings.secret_keys, max_age=settings.cookie_max_age),
        intake=make_intake(settings, sessions),
        ac=ACClient(settings),
        metrics=Metrics(sessions),
    )

    app = Starlette(
        routes=_routes(),
        middleware=[Middleware(SafeErrors), _cors(settings)],
        exception_handlers={
            BadRequest: handle_bad_request,
            HTTPException: handle_http_exception,
        },
        lifespan=_lifespan(state, deliver=deliver, owns_engine=engine is None),
    )
    # A redirect would answer a mistyped webhook URL with an empty 307.
    app.router.redirect_slashes = False
    app.state.runtime = state
    return app


def _lifespan(
    state: Runtime, *, deliver: bool, owns_engine: bool
) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        stop = asyncio.Event()
        worker = DeliveryWorker(
            state.settings,
            sessions=state.sessions,
            client=state.ac,
            metrics=state.metrics,
        )
        task = asyncio.create_task(worker.run(stop)) if deliver else None
        yield

        stop.set()
        if task is not None:
            await task
        await state.ac.aclose()
        if owns_engine:
            state.engine.dispose()
        logger.info("mapper has stopped.")

    return lifespan


def _routes() -> list[Route]:
    return [
        Route("/go", go, methods=["GET"]),
        Route("/landed", landed, methods=["GET"]),
        Route("/track", track, methods=["POST"]),
        Route("/mapper.js", snippet, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
        Route("/readyz", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route(
            "/webhooks/activecampaign/{secret}",
            activecampaign_webhook,
            methods=["POST"],
        ),
        Route("/webhooks/activecampaign", missing_webhook_secret, methods=["POST"]),
    ]


def _cors(settings: Settings) -> Middleware:
    # Credentials are allowed, so origins are always listed, never "*".
    origins = [origin for origin in settings.allowed_origins if origin != "*"]
    return Middleware(
        OriginCheck,
        allow_origins=origins,
        allow_credentials=True,
        allow_methods=["POST"],
        allow_headers=["Content-Type"],
        max_age=600,
    )
