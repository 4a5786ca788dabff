"""The per-process session cache (site/security.py SessionCache): a session found is kept for
at most WATCHBUY_SESSION_CACHE_SECONDS, and a logout ends it at once, in every site process,
through the broker's session_revoked event.  The cache lifetime in these tests is the longest
allowed (2 s) and nothing here waits that long, so only the event can end a kept session."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
import redis.asyncio as aioredis

from watchbuy.db import queries
from watchbuy.settings import ConfigError
from watchbuy.site import security
from watchbuy.site.broker import InMemoryBroker
from watchbuy.site.chat import publish_session_ended
from watchbuy.site.config import load_site_settings

pytest_plugins = ["site_fixtures"]

KEPT = 2.0  # the longest a session may be kept


async def kept_session(site, browser) -> str:
    """The browser's session hash, once ``site`` answers it from its cache."""
    cache = site.app.state.sessions
    hashed = security.session_hash(browser.session_cookie)
    for _ in range(200):
        hits = cache.hits
        assert "Log out" in (await browser.get("/")).text
        if cache.hits > hits:
            return hashed
        await asyncio.sleep(0.01)  # the subscription to logouts is not live yet
    raise AssertionError("the session was never served from the cache")


async def logout_ends_a_kept_copy(site) -> None:
    """A shopper's session kept by the cache; a copy of their cookie elsewhere is signed in;
    they log out, and with no wait at all (the revocation is applied before the next lookup)
    the copy is signed out."""
    browser = await site.browser(await site.user("Sue"))
    await kept_session(site, browser)
    stolen = await site.browser()  # someone holding a copy of the cookie
    stolen.login_with(browser.session_cookie)
    assert "Log out" in (await stolen.get("/")).text
    assert (await browser.post("/logout")).status_code == 303
    page = await stolen.get("/")
    assert "Log out" not in page.text and "Log in" in page.text


async def test_a_logout_ends_a_kept_session_at_once(make_site) -> None:
    site = await make_site(session_cache_seconds=KEPT)
    await logout_ends_a_kept_copy(site)


async def test_a_logout_in_one_process_ends_the_session_in_another(make_site, redis_url) -> None:
    prefix = f"wb-test-{uuid.uuid4().hex[:8]}:"
    one = await make_site(session_cache_seconds=KEPT, broker_url=redis_url, broker_prefix=prefix)
    two = await make_site(session_cache_seconds=KEPT, broker_url=redis_url, broker_prefix=prefix)
    shopper = await one.user("Sue")
    browser = await one.browser(shopper)
    on_two = await two.browser()
    on_two.login_with(browser.session_cookie)
    hashed = await kept_session(two, on_two)
    assert (await browser.post("/logout")).status_code == 303
    # the event, not the expiry, takes it out: an expired entry stays until it is looked up
    cache = two.app.state.sessions
    for _ in range(100):
        if hashed not in cache._entries:
            break
        await asyncio.sleep(0.01)
    assert hashed not in cache._entries
    assert "Log in" in (await on_two.get("/")).text


async def test_a_logout_ends_the_session_here_even_when_redis_refuses_to_publish(
        make_site, redis_url_refusing_publish) -> None:
    # The process that logs out drops the session from its own cache itself, before it
    # publishes: it does not wait for the revocation to come back through Redis (here it
    # never does: Redis refuses this process's PUBLISH, which must not become a 500 either).
    site = await make_site(session_cache_seconds=KEPT, broker_url=redis_url_refusing_publish,
                           broker_prefix=f"wb-test-{uuid.uuid4().hex[:8]}:")
    await logout_ends_a_kept_copy(site)


async def test_a_lost_redis_connection_drops_kept_sessions_and_keeps_again(make_site,
                                                                           redis_url) -> None:
    # A logout published while the connection was down never arrives (here: revoked straight
    # in the database, no event at all): no session kept before may be answered after, and
    # sessions are kept again once the subscription is live again.
    prefix = f"wb-test-{uuid.uuid4().hex[:8]}:"
    site = await make_site(session_cache_seconds=KEPT, broker_url=redis_url,
                           broker_prefix=prefix)
    sue, bob = await site.user("Sue"), await site.user("Bob")
    as_sue, as_bob = await site.browser(sue), await site.browser(bob)
    await kept_session(site, as_sue)
    broker = site.app.state.broker
    old_id = broker.pubsub_client_id
    plain = aioredis.Redis.from_url(redis_url)
    try:
        assert await plain.execute_command("CLIENT", "KILL", "TYPE", "pubsub", "ID",
                                           str(old_id)) == 1
    finally:
        await plain.connection_pool.disconnect()
    await queries.revoke_session(site.db, security.session_hash(as_sue.session_cookie))
    for _ in range(500):
        if broker.pubsub_client_id not in (None, old_id):
            break
        await asyncio.sleep(0.01)
    assert broker.pubsub_client_id not in (None, old_id)
    assert "Log in" in (await as_sue.get("/")).text
    await kept_session(site, as_bob)


async def test_a_lookup_across_a_logout_is_not_kept() -> None:
    broker = InMemoryBroker()
    await broker.start()
    cache = security.SessionCache(broker, KEPT)
    await cache.start()
    try:
        for _ in range(100):
            if cache._live_at is not None:
                break
            await asyncio.sleep(0.01)
        found = ({"id": "h", "expires_at": 4e9}, {"id": 1})
        mark = cache.mark()  # a request starts reading the session...
        await publish_session_ended(broker, "h")  # ...a logout lands meanwhile...
        cache.put("h", found, mark)  # ...what it read is not kept
        assert cache.get("h") is None
        cache.put("h", found, cache.mark())
        assert cache.get("h") == found
    finally:
        await cache.close()
        await broker.close()


@pytest.mark.parametrize("value", ["-1", "2.5", "soon"])
def test_a_bad_session_cache_setting_is_one_clear_line(tmp_path, value) -> None:
    with pytest.raises(ConfigError) as bad:
        load_site_settings(environ={"WATCHBUY_ENV_FILE": os.devnull,
                                    "WATCHBUY_SESSION_CACHE_SECONDS": value},
                           data_dir=str(tmp_path))
    assert "WATCHBUY_SESSION_CACHE_SECONDS" in str(bad.value) and "\n" not in str(bad.value)
