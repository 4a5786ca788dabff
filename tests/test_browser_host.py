"""Running the show from a phone (issue 14), in a real browser: the studio's product cards act
without reloading or jumping, the go-live checklist turns into "you're live" with a preview,
stream health shows what ffmpeg publishes and warns on a 10 s keyframe interval, and the host
panel in the room pins, changes stock, starts a flash sale and moderates chat, reaching a
shopper's page without a reload.

A real ``watchbuy serve``, ffmpeg publishing as OBS does and Debian's Chromium through
Playwright with phone emulation (390×844), as in tests/test_browser.py; the screenshots go to
docs/screenshots/.
"""

from __future__ import annotations

import io
import json
import re
import urllib.request
import uuid

import pytest
from browser_helpers import (
    DESKTOP,
    PHONE,
    Publisher,
    log_in,
    screenshot,
    sign_up,
)
from PIL import Image

pytestmark = [pytest.mark.ffmpeg, pytest.mark.timeout(180)]
pytest_plugins = ["browser_fixtures"]

HOST_EMAIL = "host@watchbuy.local"


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def within_phone_width(page, locator) -> None:
    box = locator.bounding_box()
    assert box is not None, f"{locator} is not rendered"
    assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"] + 0.5, \
        f"{locator} sticks out of the 390 px screen: {box}"


def same_document(page) -> bool:
    return page.evaluate("window.__sameDocument === true")


def test_studio_on_a_phone_acts_on_cards_without_reload_or_jump(server, phone):
    context = phone()
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page = context.new_page()
    log_in(page, server.url, HOST_EMAIL, server.password, "/studio")
    if not page.url.endswith("/studio"):
        page.goto(server.url + "/studio")

    # the checklist: three steps, copy buttons, the recommended settings, a phone app line
    steps = page.locator(".checklist > li")
    assert steps.count() == 3
    checklist = page.inner_text(".checklist")
    for expected in ("Copy the server", "Copy the stream key", "Keyframe interval: 2 s",
                     "zerolatency", "x264", "3500 kbps", "1080×1920"):
        assert expected in checklist, expected
    assert "speaks RTMP" in page.inner_text("#stream-settings")
    assert page.inner_text("#stream-line") == "Waiting for your stream…"
    steps.nth(0).locator("[data-copy]").click()
    page.wait_for_function("() => document.querySelector('[data-copy=\"rtmp-url\"]')"
                           ".textContent === 'Copied'")
    assert page.evaluate("navigator.clipboard.readText()") == \
        page.input_value("#rtmp-url") == f"rtmp://127.0.0.1:{server.rtmp_port}/live"
    steps.nth(1).locator("[data-copy]").click()
    page.wait_for_function("() => navigator.clipboard.readText().then(t => t.length > 10)")
    assert page.evaluate("navigator.clipboard.readText()") == server.stream_key
    page.wait_for_selector("#stream-health .health-head")  # the first health poll answered
    screenshot(page, "studio-onboarding-phone.png")

    # nothing scrolls sideways, and every card action is on the screen
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    card = page.locator(".studio-product", has_text="Linen tote bag")
    card.scroll_into_view_if_needed()
    for action in ("[data-pin]", "[data-shown]", "a:text('Edit')", "button:text('Delete')",
                   "button:text('Set')", "input[name=stock]"):
        within_phone_width(page, card.locator(action))

    page.evaluate("window.__sameDocument = true")
    page.evaluate("window.scrollBy(0, 40)")
    scrolled = page.evaluate("window.scrollY")
    top = card.bounding_box()["y"]
    card.locator("[data-pin]").click()
    card.locator("[data-pinned-badge]").wait_for(state="visible", timeout=5_000)
    assert card.locator("[data-pin]").inner_text() == "Unpin"
    assert page.inner_text("#studio-status") == "Pinned Linen tote bag: viewers see it now."
    assert abs(page.evaluate("window.scrollY") - scrolled) <= 1, "the studio jumped"
    assert abs(card.bounding_box()["y"] - top) <= 1, "the card moved on the screen"
    screenshot(page, "studio-phone.png")

    card.locator("input[name=stock]").fill("12")
    card.locator("button:text('Set')").click()
    page.wait_for_function("() => document.getElementById('studio-status').textContent === "
                           "'Stock saved.'")
    assert card.locator("input[name=stock_was]").input_value() == "12"
    card.locator("input[name=stock]").fill("a dozen")
    card.locator("button:text('Set')").click()
    error = card.locator("[data-error]")
    error.wait_for(state="visible")
    assert error.inner_text() == "Stock must be a whole number."  # beside the field

    card.locator("[data-shown]").click()  # hiding the pinned product unpins it
    card.locator("[data-hidden-badge]").wait_for(state="visible")
    assert card.locator("[data-pin]").is_disabled()
    assert card.locator("[data-pinned-badge]").is_hidden()
    card.locator("[data-shown]").click()
    card.locator("[data-hidden-badge]").wait_for(state="hidden")
    assert same_document(page), "a studio action reloaded the page"

    # a product form that fails keeps the chosen image and every field
    page.goto(server.url + "/studio/products/new")
    page.fill("input[name=name]", "Blue bowl")
    page.fill("textarea[name=description]", "Stoneware")
    page.fill("input[name=price]", "twelve")
    page.fill("input[name=stock]", "6")
    page.set_input_files("input[name=image]", files=[
        {"name": "bowl.png", "mimeType": "image/png", "buffer": png_bytes()}])
    with page.expect_navigation():
        page.click("main form button[type=submit]")
    assert "The price must be a positive number" in page.inner_text(".errors")
    assert (page.input_value("input[name=name]"), page.input_value("textarea[name=description]"),
            page.input_value("input[name=price]"), page.input_value("input[name=stock]")) == \
        ("Blue bowl", "Stoneware", "twelve", "6")
    kept = page.locator(".pending-image img")
    kept.wait_for(state="visible")
    assert page.evaluate("img => img.naturalWidth", kept.element_handle()) == 64
    page.fill("input[name=price]", "12")
    with page.expect_navigation():
        page.click("main form button[type=submit]")
    assert page.url.startswith(server.url + "/studio")
    new_card = page.locator(".studio-product", has_text="Blue bowl")
    assert new_card.locator("img.thumb").count() == 1


def test_host_panel_in_the_room_reaches_a_shopper_without_reload(server, phone):
    run = uuid.uuid4().hex[:6]
    host = phone().new_page()
    log_in(host, server.url, HOST_EMAIL, server.password, f"/room/{server.room_slug}")
    if "/room/" not in host.url:
        host.goto(server.room_url)
    shopper = phone().new_page()
    sign_up(shopper, server.url, f"panel-{run}@example.com", f"Pat {run[:4]}", "correct horse 42")
    shopper.goto(server.room_url)
    assert shopper.locator("#host-panel").count() == 0  # the panel is the host's alone
    for page in (host, shopper):
        page.wait_for_function("() => document.querySelector('.room').dataset.socket === 'open'",
                               timeout=15_000)
        page.evaluate("window.__sameDocument = true")
    # on a phone the panel is a sheet behind the rail's "Host" button: closed, it is off screen
    panel = host.locator("#host-panel")
    assert not panel.is_visible()
    host.tap("#open-host")
    host.wait_for_function("() => document.getElementById('host-panel').classList.contains('open')")
    assert host.get_attribute("#open-host", "aria-expanded") == "true"
    assert host.evaluate("document.getElementById('host-panel').contains(document.activeElement)")
    for _ in range(8):  # Tab stays inside the sheet
        host.keyboard.press("Tab")
        assert host.evaluate("document.getElementById('host-panel').contains(document.activeElement)")
    host.wait_for_selector("#host-products .host-product")
    within_phone_width(host, panel)
    candle = host.locator(".host-product", has_text="Scented candle")
    candle_id = candle.get_attribute("data-product-id")

    # pin: the shopper's page shows the card, no reload
    candle.locator("[data-host-pin]").click()
    shopper.wait_for_selector("#pinned >> text=Scented candle", timeout=5_000)
    host.wait_for_function("() => document.getElementById('host-status').textContent === "
                           "'Pinned Scented candle.'")

    # stock: the shopper's cards show it
    candle = host.locator(".host-product", has_text="Scented candle")
    candle.locator("input[name=stock]").fill("3")
    candle.locator("button:text('Set stock')").click()
    shopper.wait_for_function(
        """id => [...document.querySelectorAll('[data-product-id="' + id + '"] .stock')]
             .every(el => el.textContent === 'Only 3 left')""", arg=candle_id, timeout=5_000)

    # flash sale: the form posts what POST /studio/flash takes, and says what happened
    candle = host.locator(".host-product", has_text="Scented candle")
    candle.locator("button:text('Flash sale')").click()
    host.fill("#flash-form input[name=sale_price]", "9.99")
    host.fill("#flash-form input[name=duration_minutes]", "2")
    with host.expect_request(lambda r: r.url.endswith("/studio/flash")) as sent:
        host.click("#flash-form button[type=submit]")
    body = dict(re.findall(r"([^&=]+)=([^&]*)", sent.value.post_data))
    assert body == {"product_id": candle_id, "duration_seconds": "120", "sale_price": "9.99"}
    host.wait_for_function(
        """() => !document.getElementById('flash-error').hidden
             || document.getElementById('host-status').textContent.startsWith('Flash sale started')""")
    response = sent.value.response()
    assert response.ok, response.text()
    assert host.inner_text("#host-status") == "Flash sale started: viewers see it now."
    # the shopper's card counts the sale down at the sale price
    shopper.wait_for_selector(f'#product-list .product[data-product-id="{candle_id}"] .sale-badge',
                              state="attached")  # the product sheet is closed on a phone
    assert "$9.99" in shopper.text_content(
        f'#product-list .product[data-product-id="{candle_id}"]')
    # a second sale on the same product is refused, in the form
    candle.locator("button:text('Flash sale')").click()
    host.fill("#flash-form input[name=sale_price]", "8.00")
    host.click("#flash-form button[type=submit]")
    host.wait_for_selector("#flash-error", state="visible")
    assert host.inner_text("#flash-error") != ""
    host.click("#flash-cancel")

    # moderation: delete a message, then mute its writer
    shopper.fill("#chat-input", f"spam {run}")
    shopper.click("#chat-form button")
    line = host.locator("#host-chat li", has_text=f"spam {run}")
    line.wait_for(timeout=5_000)
    line.locator("button:text('Delete')").click()
    shopper.wait_for_function("t => !document.getElementById('messages').textContent.includes(t)",
                              arg=f"spam {run}", timeout=5_000)
    shopper.fill("#chat-input", f"more spam {run}")
    shopper.click("#chat-form button")
    line = host.locator("#host-chat li", has_text=f"more spam {run}")
    line.wait_for(timeout=5_000)
    line.locator("button:text('Mute')").click()
    shopper.wait_for_selector("#chat-error >> text=The host has muted you.", timeout=5_000)

    # the host's own messages carry the Host badge on the shopper's page; Escape closes the
    # sheet and gives the focus back to the "Host" button
    host.keyboard.press("Escape")
    host.wait_for_function("() => !document.getElementById('host-panel').classList.contains('open')")
    assert host.evaluate("document.activeElement.id") == "open-host"
    host.fill("#chat-input", f"Thanks for watching {run}")
    host.click("#chat-form button")
    shopper.wait_for_selector(f"#messages li:has-text('Thanks for watching {run}') .host-badge",
                              timeout=5_000)
    assert host.locator("#host-chat li", has_text="Thanks for watching").locator(
        "button").count() == 0  # no moderation buttons on the host's own lines

    host.tap("#open-host")
    host.wait_for_function("() => document.getElementById('host-panel').classList.contains('open')")
    host.wait_for_timeout(400)  # the sheet's slide-in
    assert host.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    screenshot(host, "room-host-panel-phone.png")
    assert same_document(host) and same_document(shopper), "a page reloaded"
    host.locator(".host-product", has_text="Scented candle").locator("[data-host-pin]").click()
    shopper.wait_for_selector("#pinned", state="hidden", timeout=5_000)


def test_host_panel_sits_beside_the_chat_on_desktop(server, new_context):
    page = new_context().new_page()
    log_in(page, server.url, HOST_EMAIL, server.password, f"/room/{server.room_slug}")
    if "/room/" not in page.url:
        page.goto(server.room_url)
    page.wait_for_selector("#host-products .host-product")
    assert page.is_hidden("#open-host")  # no button needed: the panel is always there
    panel, dock = page.locator("#host-panel").bounding_box(), page.locator(".dock").bounding_box()
    # a column of its own right of the products and chat, as tall as they are
    assert panel["x"] >= dock["x"] + dock["width"] - 1, (panel, dock)
    assert panel["x"] + panel["width"] <= DESKTOP["width"] + 0.5
    assert abs(panel["y"] - dock["y"]) < 1 and abs(panel["height"] - dock["height"]) < 1, \
        (panel, dock)
    assert page.evaluate("document.documentElement.scrollWidth") <= DESKTOP["width"]
    screenshot(page, "room-host-panel-desktop.png")


def test_stream_health_shows_what_ffmpeg_publishes_and_warns_on_g300(server, phone, tmp_path):
    context = phone()
    page = context.new_page()
    log_in(page, server.url, HOST_EMAIL, server.password, "/studio")
    if not page.url.endswith("/studio"):
        page.goto(server.url + "/studio")
    page.evaluate("window.__sameDocument = true")
    publisher = Publisher(server.rtmp_url, tmp_path / "ffmpeg.log").start()
    try:
        # waiting → live, the badge and the preview, without a reload
        page.wait_for_function(
            """() => document.getElementById('stream-line').textContent === "You're live"
                 && document.getElementById('studio-live').textContent === 'LIVE'""",
            timeout=30_000)
        page.wait_for_function("() => document.getElementById('preview').videoWidth === 1280",
                               timeout=30_000)
        page.wait_for_function(
            """() => { const t = document.getElementById('stream-health').textContent;
                       return t.includes('1280×720') && /Keyframesevery 1(\\.0)? s/.test(t)
                         && /Bitrate[1-9][0-9,]* kbps/.test(t); }""", timeout=20_000)
        health = page.inner_text("#stream-health")
        kbps = int(re.search(r"Bitrate\s+([\d,]+) kbps", health).group(1).replace(",", ""))
        audio = int(re.search(r"audio ([\d,]+) kbps", health).group(1).replace(",", ""))
        print(f"\nstream health of ffmpeg's 1280×720 test pattern: {kbps} kbps, audio {audio} kbps")
        # the node's own figure, read straight from its stats API: the studio shows that
        with urllib.request.urlopen(
                f"http://127.0.0.1:{server.http_port}/api/streams", timeout=5) as answer:
            (stream,) = json.load(answer)["streams"]
        node_kbps = stream["bitrate_in"] / 1000
        print(f"the node measures {node_kbps:.0f} kbps at the same time")
        assert abs(kbps - node_kbps) < 0.3 * node_kbps and 30 < audio < 130, health
        assert "H.264 + AAC" in health, health
        # frames per second as they arrive (measured over a few seconds): ffmpeg's 30, give or
        # take a catch-up burst on a busy machine
        fps = int(re.search(r"Frame rate\s+(\d+) fps", health).group(1))
        assert 24 <= fps <= 38, health
        # ffmpeg -preset ultrafast without a rate cap: the test pattern may come out above
        # the 6000 kbps a phone viewer plays well; then, and only then, the studio says so
        if kbps > 6000:  # the bitrate warning waits for 3 s of stream: wait for it too
            page.wait_for_function(
                "() => document.querySelectorAll('.health-warnings li').length > 0",
                timeout=10_000)
        warnings = page.locator(".health-warnings li").all_inner_texts()
        assert warnings == ([w for w in warnings if w.startswith("Your bitrate is")]
                            if kbps > 6000 else []), health
        assert len(warnings) == (1 if kbps > 6000 else 0), health
        assert same_document(page)
        # the same health in the room's host panel
        room = context.new_page()
        room.goto(server.room_url)
        room.wait_for_function(
            """() => document.getElementById('host-health').textContent.includes('1280×720')
                 && document.getElementById('host-live').textContent === 'LIVE'""",
            timeout=20_000)
        room.close()
        # a phone without Media Source (older iPhones): the preview plays the LL-HLS playlist
        old_phone = phone()
        old_phone.add_init_script("delete window.MediaSource; delete window.ManagedMediaSource;"
                                  "delete window.WebKitMediaSource;")
        studio = old_phone.new_page()
        log_in(studio, server.url, HOST_EMAIL, server.password, "/studio")
        if not studio.url.endswith("/studio"):
            studio.goto(server.url + "/studio")
        studio.wait_for_function(
            "() => document.getElementById('preview').videoWidth === 1280", timeout=30_000)
        assert studio.evaluate("document.getElementById('preview').currentSrc").endswith(
            "/index.m3u8")
        studio.close()

        publisher.stop()
        page.wait_for_function("() => document.getElementById('stream-line').textContent === "
                               "'Waiting for your stream…'", timeout=30_000)
        publisher = Publisher(server.rtmp_url, tmp_path / "ffmpeg-g300.log", gop=300).start()
        page.wait_for_selector(".health-warnings >> text=A keyframe comes only every",
                               timeout=40_000)
        page.locator("#stream-health").scroll_into_view_if_needed()
        screenshot(page, "studio-health-warning-phone.png")
        assert same_document(page), "the studio reloaded"
    finally:
        publisher.stop()
