"""What ops get from the site: Prometheus metrics at /metrics, request ids on responses and log
lines (site/metrics.py, site/observe.py)."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
from prometheus_client.parser import text_string_to_metric_families

from watchbuy.site import shop
from watchbuy.site.observe import REQUEST_ID_FILTER
from watchbuy.site.state import app_state

pytest_plugins = ["site_fixtures"]


def client(app, address: str = "127.0.0.1", headers: dict | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(address, 40000)),
                             base_url="http://testserver", headers=headers or {})


def samples(text: str) -> dict[tuple, float]:
    """``{(name, (label, value), ...): value}`` of a /metrics page."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return found


async def test_metrics_count_requests_by_route_template(site) -> None:
    async with client(site.app) as http:
        for slug in ("one", "two", "three"):
            assert (await http.get(f"/room/{slug}")).status_code == 404
        assert (await http.get("/no/such/page/xyz")).status_code == 404
        assert (await http.get("/login")).status_code == 200
        assert (await http.post("/webhooks/stripe", content=b"{}")).status_code == 404
        page = await http.get("/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    found = samples(page.text)
    requests = "watchbuy_site_requests_total"
    # three raw paths, one series: the label is the route's template
    assert found[(requests, ("route", "/room/{slug}"), ("status", "404"))] == 3
    assert found[(requests, ("route", "<unmatched>"), ("status", "404"))] == 1
    assert found[(requests, ("route", "/login"), ("status", "200"))] == 1
    assert not any("one" in str(key) or "xyz" in str(key) for key in found)
    assert found[("watchbuy_site_broker_up", ("backend", "memory"))] == 1
    assert found[("watchbuy_site_websocket_connections",)] == 0
    assert found[("watchbuy_site_webhooks_total", ("outcome", "not_configured"))] == 1


async def test_metrics_are_not_public(make_site) -> None:
    site = await make_site(metrics_token="s3cret-token")
    async with client(site.app, "203.0.113.7") as http:
        assert (await http.get("/metrics")).status_code == 404
        wrong = await http.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 404
        right = await http.get("/metrics", headers={"Authorization": "Bearer s3cret-token"})
        assert right.status_code == 200 and "watchbuy_site_requests_total" in right.text
    plain = await make_site()  # no token: loopback only
    async with client(plain.app, "203.0.113.7") as http:
        assert (await http.get("/metrics", headers={"Authorization": "Bearer "})).status_code \
            == 404


async def test_each_app_has_its_own_registry(make_site) -> None:
    first, second = await make_site(), await make_site()
    async with client(first.app) as http:
        for _ in range(4):
            await http.get("/login")
    async with client(second.app) as http:
        page = await http.get("/metrics")
    login = ("watchbuy_site_requests_total", ("route", "/login"), ("status", "200"))
    assert login not in samples(page.text)
    registry = app_state(first.app)["metrics"].registry
    assert registry.get_sample_value("watchbuy_site_requests_total",
                                     {"route": "/login", "status": "200"}) == 4


async def test_checkouts_are_counted_by_result(site) -> None:
    host = await site.user("Hana", host=True)
    mug = await site.product(host, name="Mug", stock=1)
    browser = await site.browser(await site.user("Sue"))
    await browser.get("/cart")
    assert (await browser.post("/cart/add", {"product_id": str(mug["id"])})).status_code == 303
    assert (await browser.post("/checkout")).status_code == 303
    assert (await browser.post("/cart/add", {"product_id": str(mug["id"])})).status_code == 400
    registry = app_state(site.app)["metrics"].registry
    assert registry.get_sample_value("watchbuy_site_checkouts_total", {"result": "test"}) == 1
    # the sale reaches the room as a stock event, counted (the rush's coalescing shows here)
    notifier = shop._notifiers[site.app.state.broker]
    for _ in range(500):
        if notifier.published:
            break
        await asyncio.sleep(0.02)
    assert registry.get_sample_value("watchbuy_site_stock_events_total") == \
        notifier.published == 1


def test_open_room_sockets_are_a_gauge(sync_site) -> None:
    site = sync_site
    host = site.user("Hana", host=True)
    registry = app_state(site.app)["metrics"].registry

    def open_now() -> float:
        return registry.get_sample_value("watchbuy_site_websocket_connections")

    with site.websocket(host["channel"]["slug"]) as one, \
            site.websocket(host["channel"]["slug"], host) as two:
        assert one.receive_json()["type"] == two.receive_json()["type"] == "hello"
        assert open_now() == 2
    for _ in range(100):  # the server side notices the close a moment later; bounded
        if open_now() == 0:
            break
        site.call(asyncio.sleep, 0.02)
    assert open_now() == 0


async def test_request_ids_are_made_and_echoed(make_site) -> None:
    site = await make_site(trusted_proxies="10.0.0.0/8")
    async with client(site.app) as http:
        first, second = await http.get("/login"), await http.get("/login")
        assert len(first.headers["x-request-id"]) >= 8
        assert first.headers["x-request-id"] != second.headers["x-request-id"]
        # from a client that is no trusted proxy, an incoming id is not taken
        spoofed = await http.get("/login", headers={"X-Request-Id": "chosen-by-client"})
        assert spoofed.headers["x-request-id"] != "chosen-by-client"
    async with client(site.app, "10.1.2.3") as http:  # the load balancer
        kept = await http.get("/login", headers={"X-Request-Id": "lb-4f2a"})
        assert kept.headers["x-request-id"] == "lb-4f2a"
        # not an id to write into a log line
        odd = await http.get("/login", headers={"X-Request-Id": "a b\nforged line"})
        assert odd.headers["x-request-id"] != "a b\nforged line"


async def test_a_requests_log_lines_carry_its_id(site) -> None:
    """The line a request logs carries the request's id: on the record, and in the JSON line
    of the JSON formatter (watchbuy/cli.py, WATCHBUY_LOG_FORMAT=json)."""
    handler = logging.Handler()
    handler.addFilter(REQUEST_ID_FILTER)
    records: list[logging.LogRecord] = []
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("watchbuy.site")
    logger.addHandler(handler)
    try:
        async with client(site.app) as http:
            # an unsigned engine hook call: refused with one warning line
            response = await http.post("/hooks/rtmp", content=b"{}")
    finally:
        logger.removeHandler(handler)
    assert response.status_code == 401
    refused = [r for r in records if "refused an engine hook call" in r.getMessage()]
    assert len(refused) == 1
    assert refused[0].request_id == response.headers["x-request-id"]
    from watchbuy import cli

    line = json.loads(cli.JsonFormatter().format(refused[0]))
    assert line["request_id"] == response.headers["x-request-id"]
    assert "refused an engine hook call" in line["message"]


# -- the ops dashboard ---------------------------------------------------------------------------


async def test_dashboard_line_and_chart_show_one_number_and_rooms_show_their_sales(site) -> None:
    from watchbuy.db import queries
    from watchbuy.site import security

    media = app_state(site.app)["media"]
    # the engine moved 575,000 B/s in (4,600 kb/s); the machine's interfaces saw 500 B/s (the
    # stream came over loopback, which the status agent does not count)
    media.local_server = lambda: {"node_id": "local", "publishers": 1, "viewers": 2,
                                  "bytes_in_per_s": 575_000, "bytes_out_per_s": 1_150_000}
    media.local_agent = lambda: {"rx_bytes_per_s": 500.0, "tx_bytes_per_s": 250.0,
                                 "cpu_load": 0.5}
    host = await site.user("Hana", host=True)
    other = await site.user("Olga", host=True)
    mug = await site.product(host, name="Mug", price_minor=1800, stock=50)
    vase = await site.product(other, name="Vase", price_minor=5000, stock=50)
    shopper = await site.user("Sue")

    async def order(product: dict, test_mode: bool = False, paid: bool = True) -> None:
        await queries.set_cart_quantity(site.db, shopper["id"], product["id"], 1)
        made = await queries.create_order_from_cart(site.db, shopper["id"], "stripe",
                                                    test_mode=test_mode)
        if paid:
            assert await queries.mark_paid(site.db, made["id"])

    await order(mug)  # before the show: not the show's
    await asyncio.sleep(0.02)
    await queries.set_live(site.db, host["channel"]["id"], True, "local")
    await order(mug)
    await order(mug)
    await order(mug, test_mode=True)  # no money
    await order(mug, paid=False)  # not paid
    await order(vase)  # another host's product
    site.node.streams.append({"name": host["channel"]["slug"], "viewers": 2,
                              "bitrate_in": 2_500_000, "uptime": 12.0})

    admin_id = await queries.create_user(site.db, "ops@example.test", "Ops",
                                         security.hash_password("a long password"), False,
                                         is_admin=True)
    ops = await site.browser({"id": admin_id})
    data = (await ops.get("/dashboard/data")).json()
    node = data["nodes"][0]
    assert node["in_kbps"] == node["series"][-1][1] == 4600
    assert node["out_kbps"] == node["series"][-1][2] == 9200
    assert node["nic_in_kbps"] == 4 and data["units"]["rates"] == "kb/s"
    [stream] = data["streams"]
    assert stream["bitrate_kbps"] == 2500
    assert stream["orders"] == 2 and stream["revenue"] == ["$36.00"]
    page = (await ops.get("/dashboard")).text
    # the node's line says what the chart's last point says, in the same unit
    assert "in 4600 kb/s · out 9200 kb/s" in page
    assert "machine interfaces in 4 / out 2 kb/s" in page
    assert "<td>2500 kb/s</td>" in page and "<td>2</td><td>$36.00</td>" in page


async def test_the_dashboard_stream_ends_when_the_operator_logs_out(site, monkeypatch) -> None:
    """The event stream outlives the request that opened it: a log-out ends it."""
    from watchbuy.db import queries
    from watchbuy.site import dashboard, security

    monkeypatch.setattr(dashboard, "INTERVAL", 0.05)
    admin_id = await queries.create_user(site.db, "ops@example.test", "Ops",
                                         security.hash_password("a long password"), False,
                                         is_admin=True)
    ops = await site.browser({"id": admin_id})
    token = ops.http.cookies.get(security.SESSION_COOKIE)

    async def log_out_soon() -> None:
        await asyncio.sleep(0.3)
        await queries.revoke_session(site.db, security.session_hash(token))

    revoke = asyncio.ensure_future(log_out_soon())
    # The ASGI test transport returns once the stream ends; without the check it never would.
    response = await asyncio.wait_for(ops.get("/dashboard/events"), 15)
    await revoke
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
