"""``python -m bench.site.rush``: one checkout rush, in process, profiled where asked.

N shoppers (users, sessions and a one-unit cart made directly in the database) all POST
/checkout at once through httpx's ASGI transport against one app (no network, no uvicorn: what
is measured is the app and its database, the part the hot-row design changes).  Prints
checkouts/s, p50/p99 answer time, how many bought / were told sold out, and the check that
exactly min(N, stock) orders were made.  ``--profile`` adds a cProfile of the rush (top
functions by cumulative time).

    python -m bench.site.rush --db sqlite --shoppers 300 --stock 300
    python -m bench.site.rush --db mysql://root@127.0.0.1/test --shoppers 3000 --stock 300

Only loopback; every wait is bounded by httpx's timeout.  Numbers from a shared 2-core box are
throughput as measured there, not a promise.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import secrets
import statistics
import tempfile
import time

import httpx

from watchbuy.db import queries, shopping
from watchbuy.db.migrations import upgrade
from watchbuy.site import security
from watchbuy.site.accounts import ensure_channel
from watchbuy.site.app import create_app
from watchbuy.site.config import load_site_settings

ADDRESS = {"name": "Rush Shopper", "line1": "1 Market Street", "city": "Springfield",
           "postal_code": "12345", "country": "US"}


async def prepare(db, shoppers: int, stock: int) -> tuple[int, list[tuple[str, str]]]:
    """A host, a product with ``stock`` units, and ``shoppers`` (session token, csrf cookie)
    pairs, each with one unit of the product in the cart."""
    tag = secrets.token_hex(4)
    host = await queries.create_user(db, f"host-{tag}@example.test", f"Host {tag}", "x", True)
    await ensure_channel(db, host, f"Host {tag}")
    product = await queries.create_product(db, host, "Rush mug", "", 1800, "usd", stock, None)
    people = []
    for i in range(shoppers):
        user = await queries.create_user(db, f"s{i}-{tag}@example.test", f"Shopper {i}", "x",
                                         False)
        # the mug is shipped: checkout copies the shopper's default address onto the order
        await shopping.add_address(db, user, ADDRESS, True)
        await queries.set_cart_quantity(db, user, product, 1)
        people.append((await security.start_session(db, user, 1.0), secrets.token_urlsafe(24)))
    return product, people


async def checkout(app, secret: str, token: str, csrf_cookie: str) -> tuple[int, float]:
    cookies = {security.SESSION_COOKIE: token, security.CSRF_COOKIE: csrf_cookie}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://testserver", cookies=cookies,
                                 timeout=60) as client:
        started = time.perf_counter()
        response = await client.post("/checkout", data={
            "csrf_token": security.csrf_token_for(secret, csrf_cookie, token)})
        return response.status_code, time.perf_counter() - started


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as data:
        url = args.db if args.db != "sqlite" else f"sqlite:///{data}/watchbuy.db"
        settings = load_site_settings(environ={"WATCHBUY_ENV_FILE": os.devnull},
                                      data_dir=data, database_url=url)
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            db = app.state.db
            await upgrade(db)
            product, people = await prepare(db, args.shoppers, args.stock)
            profiler = cProfile.Profile() if args.profile else None
            if profiler:
                profiler.enable()
            started = time.perf_counter()
            results = await asyncio.gather(*(checkout(app, settings.secret_key, token, csrf)
                                             for token, csrf in people))
            elapsed = time.perf_counter() - started
            if profiler:
                profiler.disable()
            statuses: dict[int, int] = {}
            for status, _ in results:
                statuses[status] = statuses.get(status, 0) + 1
            times = sorted(t for _, t in results)
            orders = await db.fetch_val("SELECT COUNT(*) FROM order_items WHERE product_id = "
                                        f"{int(product)}")
            left = (await queries.product(db, product))["stock"]
            print(f"db={db.dialect_name} shoppers={args.shoppers} stock={args.stock} "
                  f"checkouts/s={len(results) / elapsed:.0f} elapsed={elapsed:.2f}s "
                  f"p50={statistics.median(times):.3f}s "
                  f"p99={times[int(len(times) * 0.99) - 1]:.3f}s statuses={statuses} "
                  f"orders={orders} stock_left={left}")
            assert orders == min(args.shoppers, args.stock) and left >= 0
            if profiler:
                pstats.Stats(profiler).sort_stats(os.environ.get("RUSH_PROFILE_SORT", "cumulative")).print_stats(args.profile)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", default="sqlite", help="sqlite, or a mysql:// URL")
    parser.add_argument("--shoppers", type=int, default=300)
    parser.add_argument("--stock", type=int, default=300)
    parser.add_argument("--profile", type=int, default=0, help="print this many profile rows")
    asyncio.run(main(parser.parse_args()))
