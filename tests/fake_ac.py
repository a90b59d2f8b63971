"""A fake ActiveCampaign (AC) account for tests and benchmarks.

This is a test double: a real HTTP server on loopback that answers the requests
documented in ../shared/activecampaign-api.md the way that file says AC does.
It holds only made-up personal data: the emails and hashes that tests add.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

DEFAULT_ACTID = "223344556"
DEFAULT_EVENT_KEY = "0123456789abcdef0123456789abcdef01234567"
DEFAULT_API_KEY = "fake-api-token-for-tests-only"
FORM_TYPE = "application/x-www-form-urlencoded"
MODES = ("up", "down", "slow", "rate_limit", "unavailable", "html", "error")
HTTP_MODES = tuple(mode for mode in MODES if mode != "down")
V1_METHODS = ["GET", "POST"]
ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
MAX_EVENT_NAME = 32
MAINTENANCE_PAGE = "<html><body>Down for maintenance</body></html>"
ERROR_PAGE = "<html><body>Internal Server Error</body></html>"
V1_SUCCESS = {
    "result_code": 1,
    "result_message": "Success: Something is returned",
    "result_output": "json",
}

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class RecordedRequest:
    """One request the fake received, with the status it answered."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    form: dict[str, str]
    status: int
    # When the request arrived, by this machine's monotonic clock.
    arrived: float


@dataclass(frozen=True)
class _Contact:
    contact_id: str
    email: str
    hash: str


@dataclass(frozen=True)
class _Mode:
    name: str = "up"
    delay: float = 0.0
    retry_after: int = 1


class FakeAC:
    """An AC account (v1, v3 and trackcmp) served on 127.0.0.1.

    The credentials are made up; requests must carry these to succeed.
    """

    def __init__(
        self,
        *,
        actid: str = DEFAULT_ACTID,
        event_key: str = DEFAULT_EVENT_KEY,
        api_key: str = DEFAULT_API_KEY,
        port: int = 0,
    ) -> None:
        self.actid = actid
        self.event_key = event_key
        self.api_key = api_key
        self._port = port
        self._lock = threading.Lock()
        self._contacts: dict[str, _Contact] = {}
        self._requests: list[RecordedRequest] = []
        self._events: list[dict[str, str]] = []
        self._mode = _Mode()
        self._refused: dict[str, str] = {}
        self._in_flight = 0
        self.most_in_flight = 0
        self._down = False
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._app = Starlette(routes=self._routes())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def track_url(self) -> str:
        return f"{self.url}/event"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def __enter__(self) -> FakeAC:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("The fake AC is already running.")
        self._serve()

    def stop(self) -> None:
        self._halt()
        self._down = False

    def add_contact(self, *, contact_id: str, email: str, hash: str) -> None:
        """Store a made-up contact; the same id replaces the earlier one."""
        with self._lock:
            self._contacts[contact_id] = _Contact(contact_id, email, hash)

    def set_mode(self, mode: str, *, delay: float = 0.0, retry_after: int = 1) -> None:
        if mode not in MODES:
            raise ValueError(f"Expected a mode in {MODES}, got {mode!r}.")

        self._mode = _Mode(mode, delay, retry_after)
        if mode == "down":
            self._halt()
        elif self._down:
            # Rebind the same port, so clients configured with url keep working.
            self._serve()
        self._down = mode == "down"

    def refuse_event(self, name: str, message: str | None) -> None:
        """Refuse events called `name` with `message`; None accepts them again.

        The refusal is `"success": 0` with the message. AC documents none
        of its reasons to refuse a single event; this stands in for them.
        """
        with self._lock:
            if message is None:
                self._refused.pop(name, None)
            else:
                self._refused[name] = message

    @property
    def in_flight(self) -> int:
        """Requests received and not yet answered."""
        return self._in_flight

    def events(self) -> list[dict[str, str]]:
        with self._lock:
            return [dict(event) for event in self._events]

    def lookups(self) -> int:
        """Count contact lookups received, whatever they were answered."""
        return sum(1 for recorded in self.requests if _is_lookup(recorded))

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self._events.clear()
        self.most_in_flight = 0

    def _serve(self) -> None:
        # Lifespan and websockets are off: the fake needs neither, and skipping
        # them keeps optional imports (and their warnings) out of the tests.
        config = uvicorn.Config(
            self._app,
            host="127.0.0.1",
            port=self._port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="fake-ac", daemon=True)
        thread.start()

        deadline = time.monotonic() + 5.0
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError(f"The fake AC could not listen on {self._port}.")
            time.sleep(0.01)

        self._port = server.servers[0].sockets[0].getsockname()[1]
        self._server, self._thread = server, thread

    def _halt(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=5.0)
        self._server = self._thread = None

    def _routes(self) -> list[Route]:
        return [
            Route("/event", self._answer(self._track_event), methods=["POST"]),
            Route("/admin/api.php", self._answer(self._v1_api), methods=V1_METHODS),
            Route("/api/3/contacts", self._answer(self._v3_contacts)),
            Route("/api/3/contacts/{contact_id}", self._answer(self._v3_contact)),
            Route("/_fake/mode", self._control_mode, methods=["POST"]),
            Route("/_fake/contacts", self._control_contacts, methods=["POST"]),
            Route("/_fake/stats", self._control_stats, methods=["GET"]),
            Route("/_fake/reset", self._control_reset, methods=["POST"]),
            # Anything else is answered 404 and still recorded, so a test can
            # see a client calling an endpoint the fake does not model.
            Route("/{rest:path}", self._answer(_not_found), methods=ALL_METHODS),
        ]

    def _answer(self, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            arrived = time.monotonic()
            body = await request.body()
            self._in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self._in_flight)
            try:
                response = await self._apply_mode(request, handler)
            finally:
                self._in_flight -= 1
            self._record(request, body, response.status_code, arrived)
            return response

        return endpoint

    async def _apply_mode(self, request: Request, handler: Handler) -> Response:
        mode = self._mode
        # Any mode may answer late: "slow" is "up" with a delay.
        if mode.delay:
            await asyncio.sleep(mode.delay)

        if mode.name == "rate_limit":
            # Headers per section 2.6; AC documents no body for a 429.
            headers = {
                "Retry-After": str(mode.retry_after),
                "RateLimit-Limit": "5",
                "RateLimit-Remaining": "0",
            }
            return JSONResponse({"message": "Too Many Requests"}, 429, headers)
        if mode.name == "unavailable":
            # The 503 some clients met at the limit (section 2.6), no header.
            return JSONResponse({"message": "Service Unavailable"}, 503)
        if mode.name == "html":
            return HTMLResponse(MAINTENANCE_PAGE)
        if mode.name == "error":
            return HTMLResponse(ERROR_PAGE, status_code=500)
        return await handler(request)

    def _record(
        self, request: Request, body: bytes, status: int, arrived: float
    ) -> None:
        if request.url.path.startswith("/_fake/"):
            return
        recorded = RecordedRequest(
            arrived=arrived,
            method=request.method,
            path=request.url.path,
            query=dict(request.query_params),
            headers=dict(request.headers),
            body=body,
            form=_form(request, body),
            status=status,
        )
        with self._lock:
            self._requests.append(recorded)

    async def _track_event(self, request: Request) -> Response:
        if _media_type(request) != FORM_TYPE:
            return JSONResponse({}, status_code=400)

        form = _form(request, await request.body())
        problem = self._event_problem(form)
        if problem is not None:
            return JSONResponse({"success": 0, "message": problem})

        with self._lock:
            self._events.append(form)
        return JSONResponse({"success": 1, "message": "Event spawned"})

    def _event_problem(self, form: dict[str, str]) -> str | None:
        # Only the missing-actid text is observed from AC (section 1.3); the
        # other messages are UNCONFIRMED stand-ins, as AC publishes none.
        if not form.get("actid"):
            return "An account ID must be provided."
        if form["actid"] != self.actid or form.get("key") != self.event_key:
            return "Invalid key or account ID."
        if any("[" in name for name in form):
            return "Nested form fields are not accepted."
        event = form.get("event", "")
        if not event:
            return "An event name must be provided."
        if len(event) > MAX_EVENT_NAME:
            return "The event name is longer than 32 characters."
        if _visit_email(form.get("visit", "")) is None:
            return "The visit must be a JSON object with an email."
        with self._lock:
            return self._refused.get(event)

    async def _v1_api(self, request: Request) -> Response:
        params = dict(request.query_params)
        if params.get("api_key") != self.api_key:
            return _v1_failure("You are not authorized to access this file")
        # Real v1 answers XML by default; this fake speaks JSON only, so a
        # client that forgets api_output=json still sees a failure.
        if params.get("api_output") != "json":
            return _v1_failure("This fake answers only api_output=json.")
        if params.get("api_action") != "contact_view_hash":
            return _v1_failure("This fake knows only contact_view_hash.")

        contact = self._find(lambda contact: contact.hash == params.get("hash"))
        if contact is None:
            return _v1_failure("Failed: Nothing is returned")
        return JSONResponse(_v1_contact(contact) | V1_SUCCESS)

    async def _v3_contacts(self, request: Request) -> Response:
        if request.headers.get("api-token") != self.api_key:
            return JSONResponse({"message": "Forbidden"}, status_code=403)

        # "email" is an exact match (section 2.3); whether AC folds case is
        # not documented, so the fake does not.
        email = request.query_params.get("email")
        with self._lock:
            contacts = list(self._contacts.values())
        found = [c for c in contacts if email is None or c.email == email]

        base = str(request.base_url).rstrip("/")
        # The fake returns a single page of up to AC's default 20 contacts.
        page = [_v3_contact(c, base) for c in found[:20]]
        meta = {"limit": 20, "offset": 0}
        return JSONResponse(
            {
                "scoreValues": [],
                "contacts": page,
                "meta": {"total": str(len(found)), "page_input": meta},
            }
        )

    async def _v3_contact(self, request: Request) -> Response:
        if request.headers.get("api-token") != self.api_key:
            return JSONResponse({"message": "Forbidden"}, status_code=403)

        contact_id = request.path_params["contact_id"]
        contact = self._find(lambda contact: contact.contact_id == contact_id)
        if contact is None:
            message = f"No Result found for Subscriber with id {contact_id}"
            return JSONResponse({"message": message}, status_code=404)

        base = str(request.base_url).rstrip("/")
        return JSONResponse({"contact": _v3_contact(contact, base), "contactLists": []})

    def _find(self, matches: Callable[[_Contact], bool]) -> _Contact | None:
        with self._lock:
            return next((c for c in self._contacts.values() if matches(c)), None)

    async def _control_mode(self, request: Request) -> Response:
        data = await _json_object(request)
        if data.get("mode") not in HTTP_MODES:
            return _control_error(f"Expected mode to be one of {HTTP_MODES}.")
        try:
            delay = float(data.get("delay", 0.0))
            retry_after = int(data.get("retry_after", 1))
        except (TypeError, ValueError):
            return _control_error("Expected delay and retry_after to be numbers.")

        self.set_mode(data["mode"], delay=delay, retry_after=retry_after)
        return Response(status_code=204)

    async def _control_contacts(self, request: Request) -> Response:
        data = await _json_object(request)
        names = ("contact_id", "email", "hash")
        if not all(isinstance(data.get(name), str) for name in names):
            return _control_error("Expected contact_id, email and hash strings.")

        self.add_contact(
            contact_id=data["contact_id"], email=data["email"], hash=data["hash"]
        )
        return Response(status_code=204)

    async def _control_stats(self, request: Request) -> Response:
        counts = {"events": len(self.events()), "lookups": self.lookups()}
        return JSONResponse(counts | {"requests": len(self.requests)})

    async def _control_reset(self, request: Request) -> Response:
        self.reset()
        return Response(status_code=204)


async def _not_found(request: Request) -> Response:
    return JSONResponse({"message": "Not Found"}, status_code=404)


def _media_type(request: Request) -> str:
    content_type = request.headers.get("content-type", "")
    return content_type.split(";", 1)[0].strip().lower()


def _form(request: Request, body: bytes) -> dict[str, str]:
    if _media_type(request) != FORM_TYPE:
        return {}
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def _visit_email(raw: str) -> str | None:
    try:
        visit = json.loads(raw)
    except ValueError:
        return None
    email = visit.get("email") if isinstance(visit, dict) else None
    return email if isinstance(email, str) and email else None


def _is_lookup(recorded: RecordedRequest) -> bool:
    if recorded.path == "/admin/api.php":
        return recorded.query.get("api_action") == "contact_view_hash"
    # Both the list (/api/3/contacts) and one contact (/api/3/contacts/{id})
    # count; deeper paths such as .../trackingLogs are not lookups.
    parts = recorded.path.strip("/").split("/")
    in_contacts = parts[:3] == ["api", "3", "contacts"] and len(parts) <= 4
    return recorded.method == "GET" and in_contacts


def _v1_failure(message: str) -> Response:
    body = {"result_code": 0, "result_message": message, "result_output": "json"}
    return JSONResponse(body)


def _v1_contact(contact: _Contact) -> dict[str, Any]:
    return {
        "id": contact.contact_id,
        "subscriberid": contact.contact_id,
        "email": contact.email,
        "first_name": "",
        "last_name": "",
        "hash": contact.hash,
        "ip": "0",
        "cdate": "2024-05-01 10:00:00",
        "lists": {},
        "fields": {},
        "tags": [],
    }


def _v3_contact(contact: _Contact, base: str) -> dict[str, Any]:
    links = f"{base}/api/3/contacts/{contact.contact_id}"
    return {
        "cdate": "2024-05-01T10:00:00-05:00",
        "email": contact.email,
        "phone": "",
        "firstName": "",
        "lastName": "",
        "orgid": "0",
        "hash": contact.hash,
        "deleted": "0",
        "anonymized": "0",
        "udate": "2024-05-01T10:00:00-05:00",
        "links": {"trackingLogs": f"{links}/trackingLogs"},
        "id": contact.contact_id,
        "organization": None,
    }


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        data = json.loads(await request.body())
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _control_error(message: str) -> Response:
    return JSONResponse({"error": message, "status": 400}, status_code=400)


def main(argv: list[str] | None = None) -> None:
    """Run the fake in the foreground and print its base URL."""
    # The credentials are made up, so taking them as flags leaks nothing.
    parser = argparse.ArgumentParser(description="Run a fake ActiveCampaign.")
    parser.add_argument("--port", type=int, default=0, help="Port; 0 picks one.")
    parser.add_argument("--actid", default=DEFAULT_ACTID, help="Account id.")
    parser.add_argument("--event-key", default=DEFAULT_EVENT_KEY, help="Event key.")
    parser.add_argument("--api-key", default=DEFAULT_API_KEY, help="API token.")
    args = parser.parse_args(argv)

    fake = FakeAC(
        actid=args.actid,
        event_key=args.event_key,
        api_key=args.api_key,
        port=args.port,
    )
    # SIGTERM raises KeyboardInterrupt, so a benchmark's terminate() stops the
    # server the same clean way as Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with fake:
        print(fake.url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
