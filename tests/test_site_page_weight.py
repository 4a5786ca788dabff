"""Page weight and accessibility basics: compressed text, a year's cache for versioned vendor files, no cookies on static
files, and nothing compressed that must not be (pages with the CSRF token, websockets, SSE)."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from ws_helpers import ws_receive

from watchbuy.site import app as app_module
from watchbuy.site.app import vendor_version

pytest_plugins = ["site_fixtures"]


def test_player_script_is_compressed_and_cached_for_a_year(sync_site) -> None:
    host = sync_site.user("Hana", host=True)
    page = sync_site.client.get(f"/room/{host['channel']['slug']}")
    version = vendor_version("mpegts")
    assert version and f'src="/static/vendor/mpegts@{version}/mpegts.js"' in page.text
    # the page itself is not compressed: it carries the CSRF token (BREACH)
    assert "content-encoding" not in page.headers
    url = f"/static/vendor/mpegts@{version}/mpegts.js"
    plain = sync_site.client.get(url, headers={"accept-encoding": "identity"})
    packed = sync_site.client.get(url, headers={"accept-encoding": "gzip, br"})
    assert plain.status_code == packed.status_code == 200
    assert "content-encoding" not in plain.headers
    assert packed.headers["content-encoding"] == "gzip"
    assert packed.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert "set-cookie" not in packed.headers and "set-cookie" not in plain.headers
    assert packed.headers["vary"] == "Accept-Encoding"
    # httpx decodes: the same bytes, and far fewer on the wire
    assert packed.content == plain.content and len(plain.content) > 200_000
    with sync_site.client.stream("GET", url, headers={"accept-encoding": "gzip"}) as raw:
        wire = b"".join(raw.iter_raw())
    assert gzip.decompress(wire) == plain.content
    print(f"\nmpegts.js: {len(plain.content)} bytes, {len(wire)} gzipped on the wire")
    assert len(wire) < len(plain.content) / 3


def test_site_files_and_json_are_compressed_without_cookies(sync_site) -> None:
    host = sync_site.user("Hana", host=True)
    for url in ("/static/js/room.js", "/static/css/site.css"):
        response = sync_site.client.get(url, headers={"accept-encoding": "gzip"})
        assert response.headers["content-encoding"] == "gzip", url
        assert "set-cookie" not in response.headers, url
        # site files are not versioned: revalidated, never cached for a year
        assert "immutable" not in response.headers.get("cache-control", "")
    state = sync_site.client.get(f"/api/rooms/{host['channel']['slug']}",
                                 headers={"accept-encoding": "gzip"})
    assert state.json()["slug"] == host["channel"]["slug"]


def test_websockets_still_work_behind_compression(sync_site) -> None:
    host = sync_site.user("Hana", host=True)
    with sync_site.websocket(host["channel"]["slug"]) as ws:
        assert ws_receive(ws)["type"] == "hello"


def test_room_page_has_a_skip_link_and_named_images(sync_site) -> None:
    host = sync_site.user("Hana", host=True)
    sync_site.product(host, name="Blue mug")
    page = sync_site.client.get(f"/room/{host['channel']['slug']}").text
    assert re.search(r'<a class="skip-link" href="#[\w-]+"', page)
    assert 'alt="Blue mug"' in page or "noimage" in page


def contrast(a: str, b: str) -> float:
    """WCAG 2 contrast ratio of two #rrggbb colours."""
    def luminance(colour: str) -> float:
        channels = [int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_text_colours_pass_wcag_aa() -> None:
    css = (Path(app_module.__file__).parent / "static" / "css" / "site.css").read_text()
    colours = dict(re.findall(r"--([\w-]+): (#[0-9a-f]{6})", css.split("}", 1)[0]))
    pairs = {  # text on background, as the style sheet uses them
        "accent on white (links, prices)": (colours["accent"], "#ffffff"),
        "white on accent (buttons, badges)": ("#ffffff", colours["accent"]),
        "accent on the page": (colours["accent"], colours["bg"]),
        "muted on the page": (colours["muted"], colours["bg"]),
        "muted on a badge": (colours["muted"], "#ecebe6"),
        "ok on white": (colours["ok"], "#ffffff"),
        "warn on the test-mode note": (colours["warn"], "#fff4e0"),
    }
    for what, (ink, paper) in pairs.items():
        assert contrast(ink, paper) >= 4.5, f"{what}: {contrast(ink, paper):.2f}:1"
