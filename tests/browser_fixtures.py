"""Fixtures of the browser tests (test_browser.py, test_browser_room.py, test_browser_host.py,
test_browser_integ.py): one ``watchbuy serve``
per test module, Debian's Chromium through Playwright, browser contexts checked against the CSP,
and an ffmpeg publisher; helpers that read the room's state from the site's API."""

from __future__ import annotations

import pytest
from browser_helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    DESKTOP,
    PHONE,
    Publisher,
    Server,
    require_browser,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_browser()
    srv = Server(tmp_path_factory.mktemp("watchbuy-serve")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=60_000)
        yield chromium
        chromium.close()


@pytest.fixture
def publisher(server, tmp_path):
    pub = Publisher(server.rtmp_url, tmp_path / "ffmpeg.log")
    yield pub
    pub.stop()


@pytest.fixture
def make_publisher(server, tmp_path):
    """ffmpeg publishers of a given size (``make_publisher("720x1280")``), stopped after the
    test; one at a time publishes the room's key."""
    made: list[Publisher] = []

    def make(size: str = "1280x720") -> Publisher:
        for earlier in made:
            earlier.stop()
        pub = Publisher(server.rtmp_url, tmp_path / f"ffmpeg-{len(made)}.log", size=size)
        made.append(pub)
        return pub

    yield make
    for pub in made:
        pub.stop()


@pytest.fixture
def new_context(browser):
    """Browser contexts (separate cookie jars: separate people), closed after the test.

    Every page must work under the site's Content-Security-Policy: a violation Chromium
    reports on the console fails the test."""
    contexts = []
    violations: list[str] = []

    def on_console(message) -> None:
        if "Content Security Policy" in message.text:
            violations.append(message.text)

    def make(**options):
        options.setdefault("viewport", DESKTOP)
        context = browser.new_context(**options)
        context.on("console", on_console)
        context.set_default_timeout(20_000)
        context.set_default_navigation_timeout(30_000)
        contexts.append(context)
        return context

    yield make
    for context in contexts:
        context.close()
    assert not violations, f"CSP violations: {violations}"


PHONE_OPTIONS = {"viewport": PHONE, "is_mobile": True, "has_touch": True, "device_scale_factor": 2}


@pytest.fixture
def phone(new_context):
    """Phone contexts (390×844, touch; separate people), under the same CSP check."""

    def make(**options):
        return new_context(**{**PHONE_OPTIONS, **options})

    return make
