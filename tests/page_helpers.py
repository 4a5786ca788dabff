"""One visitor of the shop site and the forms they fill in.

:class:`Browser` is an ``httpx.AsyncClient`` over ``httpx.ASGITransport`` with the visitor's own
cookies, sending the CSRF token of the page they last saw with every form, as a browser does.
:func:`sign_up` and :func:`log_in` use the real forms (each costs an argon2 hash, 0.2-0.4 s on a
small machine); most tests make users directly with app_helpers.make_user instead.
"""

from __future__ import annotations

import re

import httpx
from starlette.applications import Starlette

from watchbuy.site import security

PASSWORD = "correct horse battery"

CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)"')
CSRF_INPUT = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_from_html(html: str) -> str | None:
    found = CSRF_META.search(html) or CSRF_INPUT.search(html)
    return found.group(1) if found else None


def error_texts(html: str) -> list[str]:
    """The messages of the page's error list (``<ul class="errors">``)."""
    block = re.search(r'<ul class="errors">(.*?)</ul>', html, re.S)
    return re.findall(r"<li>(.*?)</li>", block.group(1), re.S) if block else []


class Browser:
    """One visitor: their own cookies, and the CSRF token of the last page they saw."""

    def __init__(self, app: Starlette) -> None:
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                      base_url="http://testserver")
        self.csrf: str | None = None

    async def get(self, url: str, **kwargs) -> httpx.Response:
        response = await self.http.get(url, **kwargs)
        token = csrf_from_html(response.text) if "html" in \
            response.headers.get("content-type", "") else None
        if token:
            self.csrf = token
        return response

    async def post(self, url: str, data: dict | None = None, files=None, csrf: bool = True,
                   **kwargs) -> httpx.Response:
        data = dict(data or {})
        if csrf:
            if self.csrf is None:
                await self.get("/login")  # any page: it sets the CSRF cookie and shows the token
            data = {"csrf_token": self.csrf, **data}
        return await self.http.post(url, data=data, files=files, **kwargs)

    async def fetch(self, url: str, data: dict, accept_json: bool = True) -> httpx.Response:
        """A script's fetch(): the token in the X-CSRF-Token header."""
        if self.csrf is None:
            await self.get("/login")
        headers = {"X-CSRF-Token": self.csrf}
        if accept_json:
            headers["Accept"] = "application/json"
        return await self.http.post(url, data=data, headers=headers)

    def login_with(self, token: str) -> None:
        self.http.cookies.set(security.SESSION_COOKIE, token)

    @property
    def session_cookie(self) -> str | None:
        return self.http.cookies.get(security.SESSION_COOKIE)

    async def aclose(self) -> None:
        await self.http.aclose()


async def sign_up(browser: Browser, email: str, name: str, password: str = PASSWORD,
                  host: bool = False) -> httpx.Response:
    """The sign-up form, as a person fills it in (costs one argon2 hash)."""
    await browser.get("/signup")
    return await browser.post("/signup", {
        "email": email, "display_name": name, "password": password,
        "account_type": "host" if host else "shopper"})


async def log_in(browser: Browser, email: str, password: str = PASSWORD,
                 next_url: str | None = None) -> httpx.Response:
    """The log-in form (costs one argon2 verification)."""
    await browser.get("/login" + (f"?next={next_url}" if next_url else ""))
    data = {"email": email, "password": password}
    if next_url is not None:
        data["next"] = next_url
    return await browser.post("/login", data)


async def add_product_with_form(browser: Browser, name: str, price: str, stock: str,
                                description: str = "", image: tuple | None = None):
    """The studio's product form (multipart, like the browser sends it)."""
    await browser.get("/studio/products/new")
    files = {"image": image} if image else None
    return await browser.post("/studio/products/new", {
        "name": name, "description": description, "price": price, "stock": stock},
        files=files)
