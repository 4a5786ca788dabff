"""Several site processes on one port (``watchbuy site --workers N``) and what they share.

* The per-user rate limit: one suite over both implementations (in this process, in Redis),
  then the chat limit held across two real site processes.
* The supervisor, with real processes, a real Redis and a real SQLite file: requests land on
  every worker, a room socket on one worker hears chat posted through another, a worker killed
  with SIGKILL comes back while the others keep answering, SIGTERM ends them all, and N > 1
  without Redis is refused before anything starts.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from watchbuy.site.ratelimit import RateLimiter, RedisRateLimiter, make_rate_limiter

pytest_plugins = ["site_fixtures"]


# -- the rate limit, both implementations ---------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def make_limiter(request):
    made: list = []

    def make(count: int, window: float):
        if request.param == "memory":
            limiter = RateLimiter(count, window)
        else:
            url = request.getfixturevalue("redis_url")
            # A prefix of its own per test: runs never see each other's counts.
            limiter = RedisRateLimiter(count, window, url, f"test-{uuid.uuid4().hex}:", "t")
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.close()


async def test_limit_refuses_past_the_count_per_key(make_limiter) -> None:
    limiter = make_limiter(3, 60.0)
    assert [await limiter.claim(7) for _ in range(5)] == [True, True, True, False, False]
    assert await limiter.claim(8)  # another key has its own count


async def test_limit_lets_in_again_once_the_window_has_moved(make_limiter) -> None:
    limiter = make_limiter(2, 0.3)
    assert await limiter.claim("k") and await limiter.claim("k")
    assert not await limiter.claim("k")
    await asyncio.sleep(0.45)
    assert await limiter.claim("k")


async def test_two_redis_limiters_share_one_count(redis_url) -> None:
    # Two processes' limiters on one Redis: the count is one, whichever answers.
    prefix = f"test-{uuid.uuid4().hex}:"
    first = RedisRateLimiter(4, 60.0, redis_url, prefix, "chat")
    second = RedisRateLimiter(4, 60.0, redis_url, prefix, "chat")
    try:
        results = [await (first if n % 2 else second).claim(1) for n in range(6)]
        assert results == [True] * 4 + [False] * 2
    finally:
        await first.close()
        await second.close()


async def test_redis_down_falls_back_to_this_process(caplog) -> None:
    # Nothing listens on port 1: the limit still holds, per process, with one warning.
    limiter = RedisRateLimiter(2, 60.0, "redis://127.0.0.1:1/0", "x:", "chat", timeout=0.5)
    try:
        assert [await limiter.claim(1) for _ in range(3)] == [True, True, False]
    finally:
        await limiter.close()
    warnings = [r for r in caplog.records if "kept in this process only" in r.getMessage()]
    assert len(warnings) == 1


def test_memory_limiter_forgets_idle_keys() -> None:
    limiter = RateLimiter(1, 0.3)
    for key in range(1000):
        limiter.allow(key)
    assert len(limiter) == 1000
    time.sleep(0.7)
    limiter.allow("late")
    assert len(limiter) == 1


def test_make_rate_limiter_follows_the_broker() -> None:
    assert isinstance(make_rate_limiter(5, 10.0, "", "w:", "chat"), RateLimiter)
    assert isinstance(make_rate_limiter(5, 10.0, "memory://", "w:", "chat"), RateLimiter)
    redis_limiter = make_rate_limiter(5, 10.0, "redis://127.0.0.1:6379/0", "w:", "chat")
    assert isinstance(redis_limiter, RedisRateLimiter)
    asyncio.run(redis_limiter.close())

