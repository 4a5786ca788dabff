"""Accounts: sign up, log in, log out, sessions, login rate limit, CSRF -- on SQLite and MariaDB."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx
import pytest
import sqlalchemy as sa
from app_helpers import table_counts
from page_helpers import PASSWORD, Browser, error_texts, log_in, sign_up

from watchbuy.db import queries
from watchbuy.db.schema import login_attempts, sessions, users
from watchbuy.settings import ConfigError
from watchbuy.site import accounts, security
from watchbuy.site.config import load_site_settings
from watchbuy.site.upkeep import repeat_until

pytest_plugins = ["site_fixtures"]


def set_cookie(response, name: str) -> str:
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(f"{name}="):
            return header
    raise AssertionError(f"no {name} cookie in {response.headers.get_list('set-cookie')}")


async def test_shopper_signs_up_logs_out_and_in(site) -> None:
    browser = await site.browser()
    response = await sign_up(browser, "Ann@Example.test", "Ann")
    # the same answer as for a taken email: log in (see test_sign_up_does_not_tell_...)
    assert response.status_code == 303
    assert response.headers["location"] == "/login?signed_up=1&next=/"
    assert browser.session_cookie is None
    page = await browser.get(response.headers["location"])
    assert "your account is ready: log in below" in page.text
    response = await log_in(browser, "ann@example.test", next_url="/")
    assert response.status_code == 303 and response.headers["location"] == "/"
    cookie = set_cookie(response, security.SESSION_COOKIE)
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie

    user = await queries.user_by_email(site.db, "ann@example.test")
    assert user["password_hash"].startswith("$argon2id$")
    assert PASSWORD not in user["password_hash"]
    assert security.verify_password(user["password_hash"], PASSWORD)
    assert not user["is_host"]
    # the database keeps only the cookie's hash
    token = browser.session_cookie
    stored = await site.db.fetch_all(sa.select(sessions.c.id).where(sessions.c.user_id == user["id"]))
    assert [row[0] for row in stored] == [security.session_hash(token)]

    page = await browser.get("/orders")
    assert page.status_code == 200 and "Your orders" in page.text
    assert (await browser.get("/studio")).status_code == 403  # a shopper is not a host

    response = await browser.post("/logout")
    assert response.status_code == 303
    assert "Max-Age=0" in set_cookie(response, security.SESSION_COOKIE)
    # logout revokes on the server: the old cookie no longer works anywhere
    replay = await site.browser()
    replay.login_with(token)
    response = await replay.get("/orders")
    assert response.status_code == 303 and response.headers["location"].startswith("/login")

    response = await log_in(browser, "ann@example.test", next_url="/orders")
    assert response.status_code == 303 and response.headers["location"] == "/orders"
    assert (await browser.get("/orders")).status_code == 200


async def test_host_signs_up_and_gets_a_studio_and_can_shop(site) -> None:
    browser = await site.browser()
    response = await sign_up(browser, "bo@example.test", "Bo's <b>Shop</b>", host=True)
    assert response.status_code == 303
    assert response.headers["location"] == "/login?signed_up=1&next=/studio"
    response = await log_in(browser, "bo@example.test", next_url="/studio")
    assert response.status_code == 303 and response.headers["location"] == "/studio"
    page = await browser.get("/studio")
    assert page.status_code == 200
    user = await queries.user_by_email(site.db, "bo@example.test")
    channel = await queries.channel_by_host(site.db, user["id"])
    assert channel["stream_key"] in page.text and f"/room/{channel['slug']}" in page.text
    assert "Settings → Stream" in page.text  # the OBS note
    assert "<b>Shop</b>" not in page.text  # the name is text, not markup
    assert (await browser.get("/cart")).status_code == 200  # a host can shop too
    assert (await browser.post("/logout")).status_code == 303
    assert (await browser.get("/studio")).status_code == 303
    response = await log_in(browser, "BO@example.test", next_url="/studio")
    assert response.status_code == 303 and response.headers["location"] == "/studio"
    assert (await browser.get("/studio")).status_code == 200
    # the stream key is secret: the public room page never shows it
    room = await (await site.browser()).get(f"/room/{channel['slug']}")
    assert room.status_code == 200 and channel["stream_key"] not in room.text


async def test_sign_up_mistakes_get_messages_and_change_nothing(site) -> None:
    await site.user("Cy")
    browser = await site.browser()
    before = await table_counts(site.db)
    response = await sign_up(browser, "not-an-email", "C", "short")
    assert response.status_code == 400
    assert error_texts(response.text) == [
        "Enter a valid email address.", "Your name must be 2 to 60 characters.",
        "Choose a password of at least 10 characters."]
    # the password policy: length, the common ones, the email itself
    for password, message in [
            ("123456789", "Choose a password of at least 10 characters."),
            ("Password123", "That password is one of the most common ones: choose another."),
            ("QWERTYUIOP", "That password is one of the most common ones: choose another."),
            ("dee@example.test", "Your password cannot be your email address."),
            ("DeeDee1234", None)]:
        response = await sign_up(browser, "deedee1234@example.test", "Dee", password) \
            if password == "DeeDee1234" else \
            await sign_up(browser, "dee@example.test", "Dee", password)
        if message is None:  # the local part of the email counts as the email
            message = "Your password cannot be your email address."
        assert response.status_code == 400 and error_texts(response.text) == [message]
    # names that would pass for the host or the site's staff, look-alike letters included
    for name in ["Cy (Host)", "HOST", "Оfficial store", "the h0st", "Site Admin"]:
        response = await sign_up(browser, "dee@example.test", name)
        assert response.status_code == 400, name
        [message] = error_texts(response.text)
        assert message.startswith("Your name cannot contain"), name
    assert await table_counts(site.db) == before
    assert browser.session_cookie is None


async def test_invisible_characters_are_stripped_from_names(site) -> None:
    browser = await site.browser()
    response = await sign_up(browser, "eve@example.test", "E\u202ev\u200be\u2066 Shop")
    assert response.status_code == 303
    user = await queries.user_by_email(site.db, "eve@example.test")
    assert user["display_name"] == "Eve Shop"


async def test_sign_up_does_not_tell_whether_an_email_has_an_account(site,
                                                                      monkeypatch) -> None:
    existing = await site.user("Cy")
    before = await queries.user_by_email(site.db, existing["email"])
    work = PasswordWork(monkeypatch)
    fresh = await sign_up(await site.browser(), "new@example.test", "Newbie")
    stranger = await site.browser()
    taken = await sign_up(stranger, existing["email"].upper(), "Cy again", "another secret pw")
    assert work.calls == 2  # one hash each: the same cost, so the same time
    # the same answer, word for word: the login page with a notice fit for both cases
    for response in (fresh, taken):
        assert response.status_code == 303
        assert response.headers["location"] == "/login?signed_up=1&next=/"
        assert security.SESSION_COOKIE not in response.headers.get("set-cookie", "")
    assert stranger.session_cookie is None
    # nothing about the existing account changed, and its owner still logs in
    assert await queries.user_by_email(site.db, existing["email"]) == before
    assert (await log_in(stranger, existing["email"], "another secret pw")).status_code == 400
    assert (await log_in(stranger, existing["email"])).status_code == 303
    assert (await log_in(await site.browser(), "new@example.test")).status_code == 303


class PasswordWork:
    """Counts argon2 calls (the real ones run): on which thread, how many at once."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        self.running = 0
        self.most = 0
        self.on_loop_thread = 0
        self.loop_thread = threading.get_ident()
        self._lock = threading.Lock()
        for name in ("hash_password", "verify_password"):
            monkeypatch.setattr(security, name, self._counted(getattr(security, name)))

    def _counted(self, real):
        def counted(*args):
            with self._lock:
                self.calls += 1
                self.running += 1
                self.most = max(self.most, self.running)
                self.on_loop_thread += threading.get_ident() == self.loop_thread
            try:
                return real(*args)
            finally:
                with self._lock:
                    self.running -= 1
        return counted


async def test_password_work_runs_in_threads_a_few_at_a_time(make_site, monkeypatch) -> None:
    site = await make_site(password_hash_concurrency=2)
    user = await site.user("Gil")
    work = PasswordWork(monkeypatch)
    browsers = [await site.browser() for _ in range(6)]
    for browser in browsers:
        await browser.get("/login")

    async def sign_up_one(n: int):
        return await browsers[n].post("/signup", {
            "email": f"gil{n}@example.test", "display_name": f"Gil {n}",
            "password": PASSWORD, "account_type": "shopper"})

    results = await asyncio.gather(
        *(sign_up_one(n) for n in range(3)),
        *(browsers[n].post("/login", {"email": user["email"], "password": PASSWORD})
          for n in range(3, 6)))
    assert [r.status_code for r in results] == [303] * 6
    assert work.calls == 6 and work.on_loop_thread == 0  # never on the event loop
    assert work.most <= 2  # the semaphore


async def test_an_unknown_email_costs_a_verification_too(site, monkeypatch) -> None:
    user = await site.user("Hope")
    browser = await site.browser()
    await browser.get("/login")
    work = PasswordWork(monkeypatch)
    response = await browser.post("/login", {"email": "nobody@example.test",
                                             "password": "wrong password"})
    assert response.status_code == 400
    unknown_calls = work.calls
    assert unknown_calls >= 1  # a real argon2 verification against a dummy hash
    response = await browser.post("/login", {"email": user["email"], "password": "wrong pw!"})
    assert response.status_code == 400
    assert work.calls - unknown_calls == 1
    # and the answers are the same words
    assert "That email and password do not match an account." in response.text


def visitor_from(site, address: str) -> Browser:
    """A visitor from another address (the HTTP layer's request.client)."""
    browser = Browser(site.app)
    browser.http = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=site.app, client=(address, 40000)),
        base_url="http://testserver")
    site.stack.push_async_callback(browser.aclose)
    return browser


async def test_concurrent_wrong_passwords_see_each_other(make_site, monkeypatch) -> None:
    site = await make_site(login_backoff_base=600.0)
    user = await site.user("Ivy")
    browser = await site.browser()
    await browser.get("/login")
    work = PasswordWork(monkeypatch)
    results = await asyncio.gather(*(
        browser.post("/login", {"email": user["email"], "password": f"guess {n}"})
        for n in range(30)))
    codes = [r.status_code for r in results]
    assert set(codes) <= {400, 429}
    # recorded before counted: at most the free attempts ever reached a verification (a burst
    # that arrives all at once may see itself whole and get none)
    assert codes.count(400) <= site.settings.login_attempts
    assert work.calls == codes.count(400)
    # refused attempts are taken back: the burst counts only what was verified
    failures = codes.count(400)
    if failures < site.settings.login_attempts:
        response = await browser.post("/login", {"email": user["email"], "password": "again"})
        assert response.status_code == 400
        failures += 1
    assert await queries.recent_login_attempts(site.db, f"acct:{user['email']}", 900) == failures


async def test_one_address_cannot_spray_passwords_across_emails(make_site) -> None:
    site = await make_site(login_per_ip=4)
    user = await site.user("Jo")
    sprayer = visitor_from(site, "203.0.113.7")
    await sprayer.get("/login")
    for n in range(4):
        response = await sprayer.post("/login", {"email": f"guess{n}@example.test",
                                                 "password": "Password1!"})
        assert response.status_code == 400
    response = await sprayer.post("/login", {"email": user["email"], "password": PASSWORD})
    assert response.status_code == 429 and sprayer.session_cookie is None
    assert "Too many attempts from your network. Wait 15 minutes" in response.text
    # another address is not affected, and successful logins do not use up the budget
    other = visitor_from(site, "198.51.100.20")
    for _ in range(5):
        assert (await log_in(other, user["email"])).status_code == 303


async def test_a_stranger_cannot_lock_an_account_for_its_owner(make_site, site_clock) -> None:
    site = await make_site(login_attempts=3, login_account_attempts=6, login_backoff_base=600.0,
                           login_backoff_max=900.0)
    user = await site.user("Kit")
    stranger = visitor_from(site, "203.0.113.9")
    await stranger.get("/login")
    wrong = {"email": user["email"], "password": "not the password"}
    for _ in range(3):
        assert (await stranger.post("/login", wrong)).status_code == 400
    response = await stranger.post("/login", wrong)
    assert response.status_code == 429
    assert "Too many failed attempts for this account. Wait 10 minutes" in response.text
    # the owner, elsewhere, logs in as ever
    owner = visitor_from(site, "198.51.100.4")
    assert (await log_in(owner, user["email"])).status_code == 303
    # the stranger's wait grows: after it, one more failure and the next wait is longer
    await site_clock(site, 601)
    assert (await stranger.post("/login", wrong)).status_code == 400
    response = await stranger.post("/login", wrong)
    assert response.status_code == 429 and "Wait 15 minutes" in response.text
    # failures from many addresses together slow the account down for everyone...
    for address in ("192.0.2.1", "192.0.2.2"):
        other = visitor_from(site, address)
        await other.get("/login")
        for _ in range(3):
            await other.post("/login", wrong)
    response = await log_in(visitor_from(site, "192.0.2.3"), user["email"])
    assert response.status_code == 429 and "Wait 10 minutes" in response.text
    # ...until the wait is over; the right password then clears the account's record
    await site_clock(site, 901)
    assert (await log_in(owner, user["email"])).status_code == 303
    assert await queries.recent_login_attempts(site.db, f"acct:{user['email']}", 900) == 0


@pytest.fixture
def site_clock():
    """Moves a site's login records into the past (time passing, as the database sees it)."""

    async def forward(site, seconds: float) -> None:
        async with site.db.transaction():
            await site.db.execute(login_attempts.update().values(
                attempted_at=login_attempts.c.attempted_at - seconds))

    return forward


async def test_sign_ups_per_address_are_limited(make_site) -> None:
    site = await make_site(signup_per_ip=2)
    browser = visitor_from(site, "203.0.113.50")
    for n in range(2):
        assert (await sign_up(browser, f"lee{n}@example.test", "Lee")).status_code == 303
    before = await table_counts(site.db)
    response = await sign_up(browser, "lee9@example.test", "Lee")
    assert response.status_code == 429
    assert error_texts(response.text) == ["Too many sign-ups from your network. Try again in "
                                          "60 minutes."]
    assert await table_counts(site.db) == before
    other = visitor_from(site, "198.51.100.50")
    assert (await sign_up(other, "lee9@example.test", "Lee")).status_code == 303


async def test_ended_sessions_and_old_attempts_are_pruned(site) -> None:
    user = await site.user("Max")
    live = security.session_hash(await security.start_session(site.db, user["id"], 1))
    expired = security.session_hash(await security.start_session(site.db, user["id"], 1))
    revoked = security.session_hash(await security.start_session(site.db, user["id"], 1))
    async with site.db.transaction():
        await site.db.execute(sessions.update().where(sessions.c.id == expired)
                              .values(expires_at=time.time() - 1))
    await queries.revoke_session(site.db, revoked)
    await queries.record_login_attempt(site.db, "ip:old")
    async with site.db.transaction():
        await site.db.execute(login_attempts.update().values(
            attempted_at=time.time() - 2 * site.settings.signup_window))
    await queries.record_login_attempt(site.db, "ip:new")
    assert await accounts.prune(site.db, site.settings) == (2, 1)
    rows = await site.db.fetch_all(sa.select(sessions.c.id))
    assert [row[0] for row in rows] == [live]
    rows = await site.db.fetch_all(sa.select(login_attempts.c.key))
    assert [row[0] for row in rows] == ["ip:new"]


async def test_pruning_runs_by_itself(make_site) -> None:
    site = await make_site(prune_interval=0.2)
    user = await site.user("Ned")
    token = await security.start_session(site.db, user["id"], 1)
    await queries.revoke_session(site.db, security.session_hash(token))
    stopping = asyncio.Event()
    pruner = asyncio.ensure_future(repeat_until(
        stopping, site.settings.prune_interval, lambda: accounts.prune_and_log(site.db, site.settings),
        "pruning"))
    try:
        for _ in range(200):  # bounded: gives up after 200 looks
            if not await site.db.fetch_all(sa.select(sessions.c.id)):
                break
            await asyncio.sleep(0.05)
        assert await site.db.fetch_all(sa.select(sessions.c.id)) == []
    finally:
        stopping.set()  # as the app's lifespan does: it stops between rounds
        await pruner


@pytest.mark.parametrize("name", ["WATCHBUY_WS_MAX_PER_IP", "WATCHBUY_LOGIN_PER_IP",
                                  "WATCHBUY_PASSWORD_HASH_CONCURRENCY"])
def test_a_bad_limit_is_one_clear_config_error(name, tmp_path) -> None:
    with pytest.raises(ConfigError) as error:
        load_site_settings(environ={"WATCHBUY_ENV_FILE": "/dev/null", name: "0"},
                           data_dir=str(tmp_path))
    assert str(error.value) == f"{name}: must be positive"


async def test_expired_session_is_rejected(site) -> None:
    user = await site.user("Di")
    browser = await site.browser(user)
    assert (await browser.get("/orders")).status_code == 200
    async with site.db.transaction():
        await site.db.execute(sessions.update().where(sessions.c.user_id == user["id"])
                              .values(expires_at=1.0))
    response = await browser.get("/orders")
    assert response.status_code == 303 and response.headers["location"] == "/login?next=/orders"


async def test_login_is_rate_limited(make_site) -> None:
    # a long first wait, so that no slow machine outlasts it within this test
    site = await make_site(login_backoff_base=600.0)
    user = await site.user("Ed")
    browser = await site.browser()
    await browser.get("/login")
    for _ in range(site.settings.login_attempts):
        response = await browser.post("/login", {"email": user["email"], "password": "wrong!!!"})
        assert response.status_code == 400
        assert "That email and password do not match an account." in response.text
    response = await browser.post("/login", {"email": user["email"], "password": "wrong!!!"})
    assert response.status_code == 429
    assert "Too many failed attempts for this account. Wait " in response.text
    # even the right password waits now: the limit is what stops guessing
    response = await browser.post("/login", {"email": user["email"], "password": PASSWORD})
    assert response.status_code == 429 and browser.session_cookie is None


async def test_login_refuses_wrong_password_and_foreign_next(site) -> None:
    user = await site.user("Fay")
    browser = await site.browser()
    await browser.get("/login")
    response = await browser.post("/login", {"email": user["email"], "password": "nope-nope"})
    assert response.status_code == 400 and browser.session_cookie is None
    response = await browser.post("/login", {"email": user["email"], "password": PASSWORD,
                                             "next": "//evil.example/steal"})
    assert response.status_code == 303 and response.headers["location"] == "/"


async def test_forms_without_the_csrf_token_are_refused(site) -> None:
    user = await site.user("Gus")
    host = await site.user("Hal", host=True)
    product = await site.product(host)
    browser = await site.browser(user)
    await browser.get("/")
    hosts = await site.browser(host)
    await hosts.get("/studio")
    before = await table_counts(site.db)
    response = await hosts.post("/studio/products/new", {
        "name": "Sneaky", "price": "1", "stock": "1"}, csrf=False)
    assert response.status_code == 403
    response = await hosts.post(f"/studio/products/{product['id']}/delete", csrf=False)
    assert response.status_code == 403
    response = await browser.http.post("/cart/add", data={"product_id": str(product["id"])},
                                       headers={"Accept": "application/json"})
    assert response.status_code == 403  # a fetch without the X-CSRF-Token header
    response = await browser.fetch("/cart/add", {"product_id": str(product["id"])})
    assert response.status_code == 200 and response.json()["ok"] is True  # with it
    await queries.set_cart_quantity(site.db, user["id"], product["id"], 0)
    # no token at all
    response = await browser.post("/logout", csrf=False)
    assert response.status_code == 403 and "did not come from this site" in response.text
    response = await browser.post("/signup", {"email": "x@example.test", "display_name": "Xx",
                                              "password": PASSWORD}, csrf=False)
    assert response.status_code == 403
    # another visitor's token (another CSRF cookie) is no good either
    other = await site.browser()
    await other.get("/")
    response = await browser.post("/logout", {"csrf_token": other.csrf}, csrf=False)
    assert response.status_code == 403
    # a cross-site request has no CSRF cookie at all
    bare = Browser(site.app)
    bare.login_with(browser.session_cookie)
    response = await bare.post("/logout", {"csrf_token": browser.csrf}, csrf=False)
    assert response.status_code == 403
    await bare.aclose()
    assert await table_counts(site.db) == before
    assert (await browser.get("/orders")).status_code == 200  # still logged in
    rows = await site.db.fetch_all(sa.select(users.c.id))
    assert len(rows) == 2
    assert await queries.product(site.db, product["id"]) == product


async def test_sign_up_from_a_room_returns_there_with_the_action(site) -> None:
    """A sign-up begun in a room ("Add to cart" as a visitor) goes back to the room through
    the log-in, with what was begun in the address (the room's script then does it)."""
    back = "/room/hana?add=7"
    browser = await site.browser()
    page = await browser.get("/signup?next=/room/hana%3Fadd%3D7")  # as the room links it
    assert f'name="next" value="{back}"' in page.text
    assert 'href="/login?next=%2Froom%2Fhana%3Fadd%3D7"' in page.text
    response = await browser.post("/signup", {
        "email": "ann@example.test", "display_name": "Ann", "password": PASSWORD,
        "account_type": "shopper", "next": back})
    assert response.status_code == 303
    login = response.headers["location"]
    assert login == "/login?signed_up=1&next=/room/hana%3Fadd%3D7"
    page = await browser.get(login)
    assert f'name="next" value="{back}"' in page.text
    response = await log_in(browser, "ann@example.test", next_url=back)
    assert response.headers["location"] == back
    # another site is never a destination
    page = await browser.get("/signup?next=//evil.example/x")
    assert "evil.example" not in page.text


async def test_start_selling_live_preselects_a_host_account(site) -> None:
    browser = await site.browser()
    home = await browser.get("/")
    assert 'href="/signup?host=1">Start selling live' in home.text
    page = await browser.get("/signup?host=1")
    assert re.search(r'value="host"\s+checked', page.text)
    assert not re.search(r'value="shopper"\s+checked', page.text)
    response = await sign_up(browser, "hana@example.test", "Hana", host=True)
    assert response.headers["location"] == "/login?signed_up=1&next=/studio"
