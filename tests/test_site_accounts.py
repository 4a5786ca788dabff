"""Accounts: sign up, log in, log out, sessions, login rate limit, CSRF -- on SQLite and MariaDB."""

from __future__ import annotations

import sqlalchemy as sa
from site_helpers import PASSWORD, Browser, error_texts, log_in, sign_up, table_counts

from watchbuy.db import queries
from watchbuy.db.schema import sessions, users
from watchbuy.site import security

pytest_plugins = ["site_fixtures"]


def set_cookie(response, name: str) -> str:
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(f"{name}="):
            return header
    raise AssertionError(f"no {name} cookie in {response.headers.get_list('set-cookie')}")


async def test_shopper_signs_up_logs_out_and_in(site) -> None:
    browser = await site.browser()
    response = await sign_up(browser, "Ann@Example.test", "Ann")
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
    existing = await site.user("Cy")
    browser = await site.browser()
    before = await table_counts(site.db)
    response = await sign_up(browser, "not-an-email", "C", "short")
    assert response.status_code == 400
    assert error_texts(response.text) == [
        "Enter a valid email address.", "Your name must be 2 to 60 characters.",
        "Choose a password of at least 8 characters."]
    response = await sign_up(browser, existing["email"].upper(), "Cy again")
    assert response.status_code == 400
    assert "An account with this email exists already. Log in instead." in response.text
    assert await table_counts(site.db) == before
    assert browser.session_cookie is None


async def test_expired_session_is_rejected(site) -> None:
    user = await site.user("Di")
    browser = await site.browser(user)
    assert (await browser.get("/orders")).status_code == 200
    async with site.db.transaction():
        await site.db.execute(sessions.update().where(sessions.c.user_id == user["id"])
                              .values(expires_at=1.0))
    response = await browser.get("/orders")
    assert response.status_code == 303 and response.headers["location"] == "/login?next=/orders"


async def test_login_is_rate_limited(site) -> None:
    user = await site.user("Ed")
    browser = await site.browser()
    await browser.get("/login")
    for _ in range(site.settings.login_attempts):
        response = await browser.post("/login", {"email": user["email"], "password": "wrong!!!"})
        assert response.status_code == 400
        assert "That email and password do not match an account." in response.text
    response = await browser.post("/login", {"email": user["email"], "password": "wrong!!!"})
    assert response.status_code == 429
    assert "Too many attempts. Wait a few minutes, then try again." in response.text
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
