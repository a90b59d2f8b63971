"""End to end in headless Chromium: an email link, the cookie, one event to AC.

The browser clicks a made-up contact's link, lands on a test shop page and
clicks a button; the tests check what the fake AC received and sweep all the
browser saw, and mapper's log, for the email, the hash and the keys.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from playwright.sync_api import (
    Browser,
    Error,
    Request,
    Response,
    sync_playwright,
)

from tests.fake_ac import DEFAULT_ACTID, DEFAULT_API_KEY, DEFAULT_EVENT_KEY, FakeAC
from tests.helpers import ac_env, wait_until
from tests.service import SECRET_KEY, WEBHOOK_SECRET, MapperProcess

CHROMIUM = Path("/usr/bin/chromium")
# Without these the offline machine's Chromium keeps dialling Google services.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EMAIL = "browser.person@example.com"
HASH = "9c4e1f7a2b8d3e6f0a5c7b9d1e3f5a7c"
CONTACT_ID = "77"
COOKIE_NAME = "mapper_vid"
BROWSER_TIMEOUT_MS = 5_000
EVENT_WAIT_SECONDS = 10.0

EMAIL_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Your newsletter</title></head>
<body><a id="email-link" href="{link}">See the offer</a></body></html>
"""
SHOP_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Shop</title>
<script src="{mapper_url}/mapper.js"></script></head>
<body><button id="buy" onclick="mapper.track('clicked_buy', {{plan: 'pro'}})">
Buy</button></body></html>
"""


class Site:
    """The shop on its own loopback port, plus a page standing in for the email.

    The email page holds the hashed link, as a real email would; the shop
    page never sees the hash.
    """

    def __init__(self) -> None:
        self.pages: dict[str, bytes] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="site", daemon=True
        )

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        pages = self.pages

        class PageHandler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = pages.get(self.path.split("?", 1)[0])
                self.send_response(404 if body is None else 200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, format: str, *args: Any) -> None:
                # The default handler writes every request line to stderr.
                return

        return PageHandler

    def add_pages(self, mapper_url: str) -> str:
        """Serve both pages; return the email's link to mapper's `/go`."""
        target = f"{self.url}/page.html?from=email"
        link = f"{mapper_url}/go?{urlencode({'h': HASH, 'to': target})}"
        self.pages["/email.html"] = EMAIL_PAGE.format(link=link).encode()
        self.pages["/page.html"] = SHOP_PAGE.format(mapper_url=mapper_url).encode()
        return link

    def __enter__(self) -> Site:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@dataclass
class Traffic:
    """What the browser sent and received after leaving the email."""

    request_urls: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def on_request(self, request: Request) -> None:
        # URLs are kept apart: the click on the email link carries the hash
        # by design, and the test checks that it is the only one.
        self.request_urls.append(request.url)
        self.texts.append(json.dumps(request.all_headers()))
        self.texts.append(request.post_data or "")

    def on_response(self, response: Response) -> None:
        self.texts.append(f"{response.status} {json.dumps(response.all_headers())}")
        try:
            body = response.body()
        except Error:
            # Redirects have no body, and beacons expose none to Playwright.
            return
        self.texts.append(body.decode("utf-8", "replace"))


@dataclass
class Journey:
    """The observations from one walk through the email link and the shop."""

    link: str
    site_url: str
    landed_url: str
    cookies: list[dict[str, Any]]
    document_cookie: str
    events: list[dict[str, str]]
    traffic: Traffic
    log: str = ""


def require_chromium() -> str:
    if CHROMIUM.exists():
        return str(CHROMIUM)
    message = f"The browser tests need Chromium at {CHROMIUM}."
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def mapper_env(fake: FakeAC, site_url: str) -> dict[str, str]:
    return ac_env(fake) | {
        "MAPPER_ALLOWED_HOSTS": "127.0.0.1",
        "MAPPER_ALLOWED_ORIGINS": site_url,
    }


def walk(browser: Browser, site: Site, link: str, fake: FakeAC) -> Journey:
    """Click the email link, land on the shop, click "buy", wait for AC."""
    context = browser.new_context()
    context.set_default_timeout(BROWSER_TIMEOUT_MS)
    page = context.new_page()
    page.goto(f"{site.url}/email.html")

    traffic = Traffic()
    context.on("request", traffic.on_request)
    context.on("response", traffic.on_response)
    page.click("#email-link")
    page.wait_for_url(f"{site.url}/page.html?from=email")
    cookies = [dict(cookie) for cookie in context.cookies()]
    document_cookie: str = page.evaluate("document.cookie")

    page.click("#buy")
    wait_until(fake.events, seconds=EVENT_WAIT_SECONDS)
    events = fake.events()
    landed_url = page.url
    context.close()
    return Journey(
        link=link,
        site_url=site.url,
        landed_url=landed_url,
        cookies=cookies,
        document_cookie=document_cookie,
        events=events,
        traffic=traffic,
    )


@pytest.fixture(scope="module")
def journey(tmp_path_factory: pytest.TempPathFactory) -> Journey:
    # One walk serves both tests; every server and the browser are stopped
    # before the tests look at what was seen.
    chromium = require_chromium()
    with FakeAC() as fake, Site() as site:
        fake.add_contact(contact_id=CONTACT_ID, email=EMAIL, hash=HASH)
        folder = tmp_path_factory.mktemp("mapper")
        mapper = MapperProcess(folder, mapper_env(fake, site.url))
        link = site.add_pages(mapper.url)
        try:
            mapper.start()
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=chromium, args=CHROMIUM_ARGS
                )
                try:
                    seen = walk(browser, site, link, fake)
                finally:
                    browser.close()
        finally:
            # Also when start() fails after spawning, which `with` would skip.
            mapper.stop()
    seen.log = mapper.log()
    return seen


def test_browser_lands_without_hash(journey: Journey) -> None:
    assert journey.landed_url == f"{journey.site_url}/page.html?from=email"


def test_browser_cookie_hidden_from_page(journey: Journey) -> None:
    cookie = next(c for c in journey.cookies if c["name"] == COOKIE_NAME)

    assert (cookie["httpOnly"], cookie["sameSite"]) == (True, "Lax")
    assert COOKIE_NAME not in journey.document_cookie


def test_browser_click_reaches_ac(journey: Journey) -> None:
    assert journey.events == [
        {
            "actid": DEFAULT_ACTID,
            "key": DEFAULT_EVENT_KEY,
            "event": "clicked_buy",
            "visit": json.dumps({"email": EMAIL}),
            "eventdata": '{"plan":"pro"}',
        }
    ]


def test_browser_sees_no_identifiers(journey: Journey) -> None:
    secrets = [DEFAULT_EVENT_KEY, DEFAULT_API_KEY, SECRET_KEY, WEBHOOK_SECRET]
    planted = [EMAIL, quote(EMAIL, safe=""), HASH, *secrets]
    seen = [
        *journey.traffic.texts,
        json.dumps(journey.cookies),
        journey.document_cookie,
        journey.landed_url,
        journey.log,
    ]
    carrying_hash = [url for url in journey.traffic.request_urls if HASH in url]
    urls = [url for url in journey.traffic.request_urls if url != journey.link]

    assert carrying_hash == [journey.link]
    assert [s for s in planted if any(s in text for text in seen + urls)] == []
