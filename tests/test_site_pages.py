"""Public pages kept rendered (site/pagecache.py): each visitor still gets their own CSRF token,
and a kept page goes the moment its room changes, in every site process (the cache lifetime in
these tests is ten minutes, so only the events can make a page change)."""

from __future__ import annotations

import asyncio
import os
import re
import uuid

import pytest
import redis.asyncio as aioredis
from page_helpers import csrf_from_html

from watchbuy.db import queries
from watchbuy.db import shows as show_queries
from watchbuy.settings import ConfigError
from watchbuy.site import security
from watchbuy.site.broker import InMemoryBroker
from watchbuy.site.chat import publish_room_event
from watchbuy.site.config import load_site_settings
from watchbuy.site.pagecache import (
    HOME,
    PAGES_TOPIC,
    VISITOR_COOKIE,
    VISITORS_TOPIC,
    PageCache,
    VisitorCache,
)

pytest_plugins = ["site_fixtures"]

LONG = 600.0  # seconds: longer than any test, so a page that changes was dropped by an event


async def kept_page(site, path: str) -> str:
    """``path`` for a new anonymous visitor, once the page is being served from the cache."""
    pages = site.app.state.pages
    for _ in range(100):
        hits = pages.hits
        response = await (await site.browser()).get(path)
        assert response.status_code == 200
        if pages.hits > hits:
            return response.text
        await asyncio.sleep(0.02)  # the cache's subscription is not live yet
    raise AssertionError(f"{path} was never served from the cache")


async def test_a_kept_room_page_gives_each_visitor_their_own_token(make_site) -> None:
    site = await make_site(page_cache_seconds=LONG)
    host = await site.user("Host", host=True)
    await site.product(host, name="Mug")
    path = f"/room/{host['channel']['slug']}"
    await kept_page(site, path)
    for _ in range(3):
        visitor = await site.browser()
        page = await visitor.get(path)
        cookie = visitor.http.cookies.get(security.CSRF_COOKIE)
        assert cookie and csrf_from_html(page.text) == security.csrf_token_for(
            site.settings.secret_key, cookie)
        assert site.app.state.pages.marker not in page.text and "Mug" in page.text
        # the token works: the visitor can add to a cart form (CSRF accepted, then a login ask)
        response = await visitor.post("/cart/add", {"product_id": "1", "quantity": "1"})
        assert response.status_code != 403
    # a logged-in visitor gets a page of their own, never the kept one
    shopper = await site.user("Sue")
    page = await (await site.browser(shopper)).get(path)
    assert "Log out" in page.text and 'id="chat-input"' in page.text


async def test_a_kept_room_page_changes_with_its_room(make_site) -> None:
    site = await make_site(page_cache_seconds=LONG)
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", stock=5)
    path = f"/room/{host['channel']['slug']}"
    studio = await site.browser(host)
    assert 'id="pinned" class="pinned-card" hidden>' in await kept_page(site, path)

    assert (await studio.post("/studio/pin", {"product_id": str(mug["id"])})).status_code == 303
    page = await kept_page(site, path)
    assert 'id="pinned" class="pinned-card">' in page

    assert (await studio.post("/studio/title", {"title": "Friday deals"})).status_code == 303
    assert "Friday deals" in await kept_page(site, path)
    assert "Friday deals" in await kept_page(site, "/")

    # a sale: the stock event drops the page
    shopper = await site.user("Sue")
    buyer = await site.browser(shopper)
    await buyer.post("/cart/add", {"product_id": str(mug["id"]), "quantity": "2"})
    assert (await buyer.post("/checkout")).status_code == 303
    for _ in range(100):  # stock events are coalesced: one per stock_event_interval
        page = await (await site.browser()).get(path)
        if "Only 3 left" in page.text:
            break
        await asyncio.sleep(0.05)
    assert "Only 3 left" in page.text  # the low-stock threshold is 10


async def test_a_logged_in_room_page_shows_each_shopper_their_own_parts(make_site) -> None:
    site = await make_site(page_cache_seconds=LONG)
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", stock=9)
    path = f"/room/{host['channel']['slug']}"
    pages = site.app.state.pages
    ann, bob = await site.user("Ann"), await site.user("Bob")
    await queries.set_cart_quantity(site.db, ann["id"], mug["id"], 2)
    await queries.set_cart_quantity(site.db, bob["id"], mug["id"], 3)
    await show_queries.set_follow(site.db, ann["id"], host["id"], True)
    as_ann, as_bob = await site.browser(ann), await site.browser(bob)
    await kept_page(site, path)  # the room's data is kept once the cache is live
    hits = pages.hits
    for browser, count, follow in ((as_ann, 2, "Following ✓"), (as_bob, 3, "Follow Host"),
                                   (as_ann, 2, "Following ✓"), (as_bob, 3, "Follow Host")):
        page = await browser.get(path)
        assert f'class="cart-count">{count}</span>' in page.text
        assert follow in page.text and "Log out" in page.text
        assert csrf_from_html(page.text) == security.csrf_token_for(
            site.settings.secret_key, browser.http.cookies.get(security.CSRF_COOKIE),
            browser.session_cookie)
        assert pages.marker not in page.text and pages.count_marker not in page.text
    assert pages.hits >= hits + 6  # the room data every time, Ann's and Bob's page once more
    assert site.app.state.visitors.hits >= 2  # their own bits were read once each
    # their own changes show at once (made through the site, which announces them); the
    # room's change drops their kept page
    assert (await as_bob.post("/cart/update", {"product_id": str(mug["id"]),
                                               "quantity": "0"})).status_code == 303
    assert 'class="cart-count" hidden>0</span>' in (await as_bob.get(path)).text
    assert (await as_bob.post(f"{path}/follow", {"on": "1"})).status_code == 303
    assert "Following ✓" in (await as_bob.get(path)).text
    studio = await site.browser(host)
    assert (await studio.post("/studio/title", {"title": "Friday deals"})).status_code == 303
    assert "Friday deals" in (await as_ann.get(path)).text
    # the host gets the host panel, a shopper never does
    host_page = (await studio.get(path)).text
    assert 'id="host-panel"' in host_page and 'id="host-panel"' not in \
        (await as_ann.get(path)).text


async def test_a_shoppers_own_bits_change_with_their_writes_in_every_process(
        make_site, redis_url) -> None:
    prefix = f"wb-test-{uuid.uuid4().hex[:8]}:"
    one = await make_site(page_cache_seconds=LONG, broker_url=redis_url, broker_prefix=prefix)
    two = await make_site(page_cache_seconds=LONG, broker_url=redis_url, broker_prefix=prefix)
    host = await one.user("Host", host=True)
    mug = await one.product(host, name="Mug", stock=9)
    cup = await one.product(host, name="Cup", stock=9)
    path = f"/room/{host['channel']['slug']}"
    sue = await one.user("Sue")
    on_one = await one.browser(sue)
    on_two = await two.browser()
    on_two.login_with(on_one.session_cookie)
    await kept_page(two, path)
    visitors = two.app.state.visitors

    async def page_on_two(wanted: str) -> str:
        for _ in range(100):  # through Redis: a moment
            hits = visitors.hits
            text = (await on_two.get(path)).text
            if wanted in text and visitors.hits > hits:  # from the cache, and current
                return text
            await asyncio.sleep(0.02)
        raise AssertionError(f"process two never showed {wanted!r} from its visitor cache")

    await page_on_two('class="cart-count" hidden>0</span>')
    for product, quantity in ((mug, 2), (cup, 3)):
        response = await on_one.post("/cart/add", {"product_id": str(product["id"]),
                                                   "quantity": str(quantity)})
        assert response.status_code == 303
    await page_on_two('class="cart-count">5</span>')
    assert (await on_one.post(f"{path}/follow", {"on": "1"})).status_code == 303
    await page_on_two("Following ✓")
    # the host deletes a product in her cart: its units leave every cart (a "products" event)
    studio = await one.browser(host)
    assert (await studio.post(f"/studio/products/{cup['id']}/delete")).status_code in (200, 303)
    await page_on_two('class="cart-count">2</span>')
    # checkout empties the cart
    assert (await on_one.post("/checkout")).status_code == 303
    await page_on_two('class="cart-count" hidden>0</span>')


async def test_a_page_stored_while_its_change_waits_unread_is_never_served() -> None:
    # The race to rule out: a page built from what was read just before a change (a room going
    # live), stored after the change arrived but before anything applied it, then served for
    # the cache's whole lifetime.  The in-memory broker puts the event in the cache's queue at
    # once; the cache's own task has not run when the page is stored.
    broker = InMemoryBroker()
    await broker.start()
    pages = PageCache(broker, LONG, 10)
    try:
        await pages.start()
        for _ in range(100):
            if pages.put(("room", "a"), 1, "page", pages.mark()):
                break
            await asyncio.sleep(0.01)
        assert pages.get(("room", "a")) == "page"
        mark = pages.mark()  # a visitor's request reads the room: offline
        await publish_room_event(broker, 1, {"type": "live", "play_url": "x"})  # committed
        pages.put(("room", "a"), 1, "offline page", mark)  # stored after the change arrived
        assert pages.get(("room", "a")) is None  # never the offline page
        assert pages.put(("room", "a"), 1, "live page", pages.mark())  # read after it: kept
        assert pages.get(("room", "a")) == "live page"
        await asyncio.sleep(0.05)  # the cache's task reads what get() already applied
        assert pages.get(("room", "a")) == "live page"
    finally:
        await pages.close()
        await broker.close()


async def test_checkout_prices_on_the_server_whatever_a_kept_page_shows(make_site) -> None:
    site = await make_site(page_cache_seconds=LONG)
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", price_minor=1800, stock=5)
    path = f"/room/{host['channel']['slug']}"
    assert "$18.00" in await kept_page(site, path)
    # changed behind the site's back (no event): the kept page is stale on purpose here
    await site.db.execute("UPDATE products SET price_minor = 2500 WHERE id = :id",
                          {"id": mug["id"]})
    assert "$18.00" in await kept_page(site, path)
    buyer = await site.browser(await site.user("Sue"))
    await buyer.post("/cart/add", {"product_id": str(mug["id"]), "quantity": "1"})
    response = await buyer.post("/checkout")
    order_id = int(re.fullmatch(r"/checkout/(\d+)/pay", response.headers["location"]).group(1))
    assert (await queries.order(site.db, order_id))["total_minor"] == 2500


async def test_pages_change_in_every_process_through_redis(make_site, redis_url) -> None:
    prefix = f"wb-test-{uuid.uuid4().hex[:8]}:"
    one = await make_site(page_cache_seconds=LONG, broker_url=redis_url, broker_prefix=prefix)
    two = await make_site(page_cache_seconds=LONG, broker_url=redis_url, broker_prefix=prefix)
    host = await one.user("Host", host=True)
    mug = await one.product(host, name="Mug")
    path = f"/room/{host['channel']['slug']}"
    assert 'class="pinned-card" hidden>' in await kept_page(two, path)
    studio = await one.browser(host)
    assert (await studio.post("/studio/pin", {"product_id": str(mug["id"])})).status_code == 303
    for _ in range(100):  # through Redis: a moment
        page = await (await two.browser()).get(path)
        if 'id="pinned" class="pinned-card">' in page.text:
            break
        await asyncio.sleep(0.02)
    assert 'id="pinned" class="pinned-card">' in page.text


async def test_a_lost_redis_connection_drops_every_kept_page(make_site, redis_url) -> None:
    # What Redis would have delivered while the connection was down never arrives: a change
    # made then (here: straight in the database, no event at all) must still show afterwards.
    prefix = f"wb-test-{uuid.uuid4().hex[:8]}:"
    site = await make_site(page_cache_seconds=LONG, broker_url=redis_url, broker_prefix=prefix)
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug")
    path = f"/room/{host['channel']['slug']}"
    assert 'class="pinned-card" hidden>' in await kept_page(site, path)
    broker = site.app.state.broker
    old_id = broker.pubsub_client_id
    plain = aioredis.Redis.from_url(redis_url)
    try:
        killed = await plain.execute_command("CLIENT", "KILL", "TYPE", "pubsub", "ID",
                                             str(old_id))
        assert killed == 1
    finally:
        await plain.connection_pool.disconnect()
    channel = await queries.channel_by_host(site.db, host["id"])
    await queries.set_pinned(site.db, channel["id"], mug["id"])
    for _ in range(500):
        if broker.pubsub_client_id not in (None, old_id):
            break
        await asyncio.sleep(0.01)
    assert broker.pubsub_client_id not in (None, old_id)
    page = await kept_page(site, path)  # kept again once the subscription is live again
    assert 'id="pinned" class="pinned-card">' in page


async def test_a_page_built_across_a_change_is_not_kept() -> None:
    broker = InMemoryBroker()
    await broker.start()
    pages = PageCache(broker, LONG, 10)
    try:
        mark = pages.mark()
        assert not pages.put(("room", "a"), 1, "page", mark)  # not following the events yet
        await pages.start()
        for _ in range(100):
            if pages.put(("room", "a"), 1, "page", pages.mark()):
                break
            await asyncio.sleep(0.01)
        assert pages.get(("room", "a")) == "page"
        mark = pages.mark()
        await publish_room_event(broker, 1, {"type": "stock", "product_id": 1, "stock": 0})
        await asyncio.sleep(0.05)
        assert pages.get(("room", "a")) is None
        assert not pages.put(("room", "a"), 1, "stale", mark)  # built before the change
        assert pages.put(("room", "b"), 2, "other room", mark)  # another room's change
        assert pages.put(("home",), HOME, "home", pages.mark())
        await publish_room_event(broker, 1, {"type": "chat", "text": "hi"})  # changes nothing
        await publish_room_event(broker, 2, {"type": "live"})
        await asyncio.sleep(0.05)
        assert pages.get(("room", "b")) is None and pages.get(("home",)) is None
    finally:
        await pages.close()
        await broker.close()


async def test_no_page_is_kept_when_the_cache_is_off(make_site) -> None:
    site = await make_site(page_cache_seconds=0)
    host = await site.user("Host", host=True)
    for _ in range(3):
        response = await (await site.browser()).get(f"/room/{host['channel']['slug']}")
        assert response.status_code == 200
    assert site.app.state.pages.hits == 0


@pytest.mark.parametrize("name, value", [("PAGE_CACHE_SECONDS", "-1"),
                                         ("PAGE_CACHE_ENTRIES", "0"),
                                         ("PAGE_CACHE_SECONDS", "soon")])
def test_a_bad_page_cache_setting_is_one_clear_line(tmp_path, name, value) -> None:
    with pytest.raises(ConfigError) as bad:
        load_site_settings(environ={"WATCHBUY_ENV_FILE": os.devnull, f"WATCHBUY_{name}": value},
                           data_dir=str(tmp_path))
    assert f"WATCHBUY_{name}" in str(bad.value) and "\n" not in str(bad.value)


async def test_a_rush_of_shoppers_writes_leaves_the_page_cache_alone(make_site,
                                                                    redis_url) -> None:
    # A flash-sale rush: thousands of shoppers add to their carts at once.  Their visitor
    # events used to go on the page cache's topic, one per write, and filled its queue: the
    # anonymous crowd lost the page cache exactly then.  Now they go on their own topic,
    # several shoppers per message, and the page cache never hears them.
    prefix = f"wb-test-{uuid.uuid4().hex[:8]}:"
    one = await make_site(page_cache_seconds=LONG, broker_url=redis_url, broker_prefix=prefix)
    two = await make_site(page_cache_seconds=LONG, broker_url=redis_url, broker_prefix=prefix)
    host = await one.user("Host", host=True)
    path = f"/room/{host['channel']['slug']}"
    await kept_page(two, path)
    pages_heard = two.app.state.broker.subscribe(PAGES_TOPIC, queue_size=100000)
    await pages_heard.ready()
    visitors = two.app.state.visitors
    for _ in range(100):  # once its subscription is live
        if visitors.put((1, 0, None, ""), 1, "stale", visitors.mark()):
            break
        await asyncio.sleep(0.02)
    assert visitors.put((99999, 0, None, ""), 99999, "not in the rush", visitors.mark())
    rush = range(1, 5001)
    for user_id in rush:  # what visitor_changed does for each write, as fast as it can come
        one.app.state.visitors.announce(user_id)
    for _ in range(200):
        if visitors.get((1, 0, None, "")) is None:
            break
        await asyncio.sleep(0.02)
    assert visitors.get((1, 0, None, "")) is None  # heard in the other process
    # ... without losing what it keeps of others (a queue that overflowed drops everything)
    assert visitors.get((99999, 0, None, "")) == "not in the rush"
    for _ in range(250):  # the batches after the first may still be on their way out
        if one.app.state.visitors.announced == len(rush):
            break
        await asyncio.sleep(0.02)
    assert one.app.state.visitors.announced == len(rush)
    # the page cache heard none of it and still answers the crowd from memory
    studio = await one.browser(host)
    assert (await studio.post("/studio/title", {"title": "Rush hour"})).status_code == 303
    heard = [await anext(pages_heard)]
    while heard[-1].get("event") != "title":
        heard.append(await anext(pages_heard))
    await pages_heard.close()
    assert [message["type"] for message in heard] == ["changed"]
    assert "Rush hour" in await kept_page(two, path)


async def test_a_write_answers_while_redis_holds_its_announcement(make_site, redis_url,
                                                                 redis_hold) -> None:
    # Redis blackholed: the cart add must not wait for the announcement (it used to, up to
    # the client's timeouts and retries, ~15 s, and then the announcement was lost).  Here
    # the relay lets the held PUBLISH through only once the answer came back: a write that
    # waits for it gives up and the other process never hears of it.
    prefix = f"wb-test-{uuid.uuid4().hex[:8]}:"
    one = await make_site(page_cache_seconds=LONG, broker_url=redis_hold.url,
                          broker_prefix=prefix)
    two = await make_site(page_cache_seconds=LONG, broker_url=redis_url, broker_prefix=prefix)
    host = await one.user("Host", host=True)
    mug = await one.product(host, name="Mug", stock=9)
    path = f"/room/{host['channel']['slug']}"
    sue = await one.user("Sue")
    on_one = await one.browser(sue)
    on_two = await two.browser()
    on_two.login_with(on_one.session_cookie)
    await kept_page(two, path)
    await kept_visitor_page(two, on_two, path, 'class="cart-count" hidden>0</span>')
    await on_one.get("/login")  # the CSRF token, before Redis stops answering
    redis_hold.hold()
    try:
        response = await on_one.post("/cart/add", {"product_id": str(mug["id"]),
                                                   "quantity": "2"})
    finally:
        redis_hold.release()
    assert response.status_code == 303
    # this process dropped Sue's bits at once; the other one hears the held announcement
    assert 'class="cart-count">2</span>' in (await on_one.get(path)).text
    await kept_visitor_page(two, on_two, path, 'class="cart-count">2</span>')


async def test_a_write_answers_when_redis_refuses_its_announcement(
        make_site, redis_url_refusing_publish) -> None:
    # An unexpected Redis error (here NOPERM) on the announcement after the write committed
    # used to become a 500: logged instead, and this process still drops what it kept.
    site = await make_site(page_cache_seconds=LONG, broker_url=redis_url_refusing_publish,
                           broker_prefix=f"wb-test-{uuid.uuid4().hex[:8]}:")
    host = await site.user("Host", host=True)
    mug = await site.product(host, name="Mug", stock=9)
    path = f"/room/{host['channel']['slug']}"
    sue = await site.browser(await site.user("Sue"))
    await kept_visitor_page(site, sue, path, 'class="cart-count" hidden>0</span>')
    visitors = site.app.state.visitors
    assert (await sue.post("/cart/add", {"product_id": str(mug["id"]),
                                         "quantity": "2"})).status_code == 303
    assert (await sue.post(f"{path}/follow", {"on": "1"})).status_code == 303
    page = (await sue.get(path)).text
    assert 'class="cart-count">2</span>' in page and "Following ✓" in page
    for _ in range(100):
        if visitors.announce_failures:
            break
        await asyncio.sleep(0.02)
    assert visitors.announce_failures and not visitors.announced


async def test_the_page_after_a_write_is_fresh_where_the_write_was_not_heard(
        make_site, redis_url, redis_url_refusing_publish) -> None:
    # A no-JS follow or cart add answered by process one redirects to the room, and process
    # two may answer that before it heard the write (here: never, one cannot publish).  The
    # write's answer gives the browser a new version of its bits, which two has not kept.
    prefix = f"wb-test-{uuid.uuid4().hex[:8]}:"
    one = await make_site(page_cache_seconds=LONG, broker_url=redis_url_refusing_publish,
                          broker_prefix=prefix)
    two = await make_site(page_cache_seconds=LONG, broker_url=redis_url, broker_prefix=prefix)
    host = await one.user("Host", host=True)
    mug = await one.product(host, name="Mug", stock=9)
    path = f"/room/{host['channel']['slug']}"
    sue = await one.user("Sue")
    on_one = await one.browser(sue)
    on_two = await two.browser()  # the same browser, its next request balanced to two
    on_two.login_with(on_one.session_cookie)
    await kept_page(two, path)
    await kept_visitor_page(two, on_two, path, "Follow Host")

    def same_browser() -> None:
        for name in (VISITOR_COOKIE, "wb_cart"):
            if (value := on_one.http.cookies.get(name)) is not None:
                on_two.http.cookies.set(name, value)

    assert (await on_one.post(f"{path}/follow", {"on": "1"})).status_code == 303
    same_browser()
    assert "Following ✓" in (await on_two.get(path)).text
    assert (await on_one.post("/cart/add", {"product_id": str(mug["id"]), "quantity": "3",
                                            "next": path})).status_code == 303
    same_browser()
    page = await on_two.get(path)
    assert 'class="cart-count">3</span>' in page.text
    assert on_two.http.cookies.get("wb_cart") == f"{sue['id']}.3"  # the badge's, not stale
    # the version is only ever a key, and one that is not of the site's making counts as none
    on_two.http.cookies.set(VISITOR_COOKIE, "<script>" * 4)
    page = await on_two.get(path)
    assert page.status_code == 200 and "<script><script>" not in page.text


async def kept_visitor_page(site, browser, path: str, wanted: str) -> str:
    """``path`` for a logged-in ``browser`` once it shows ``wanted`` from ``site``'s visitor
    cache (the cache's subscription live, and what it keeps current)."""
    visitors = site.app.state.visitors
    for _ in range(100):
        hits = visitors.hits
        text = (await browser.get(path)).text
        if wanted in text and visitors.hits > hits:
            return text
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} never showed {wanted!r} from the visitor cache")


async def test_a_shoppers_writes_before_the_announcement_goes_are_announced_once() -> None:
    broker = InMemoryBroker()
    await broker.start()
    visitors = VisitorCache(broker, LONG, 10)
    heard = broker.subscribe(VISITORS_TOPIC)
    try:
        await heard.ready()
        for _ in range(50):  # a shopper's quick writes (and another's) in one turn of the loop
            visitors.announce(7)
        visitors.announce(8)
        assert await anext(heard) == {"type": "visitors", "users": [7, 8]}
        visitors.announce(7)  # a later write goes again
        assert await anext(heard) == {"type": "visitors", "users": [7]}
        assert visitors.announced == 3
    finally:
        await heard.close()
        await visitors.close()
        await broker.close()
