"""Real servers for the tests (MariaDB, Redis): mandatory in CI (``CI=true``), elsewhere a
loud skip where no server answers (see :func:`require_server`); site_fixtures.py reports the
skips at the end of the run."""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from urllib.parse import urlsplit

import pymysql
import pytest
import redis

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
MYSQL_URL = os.environ.get("WATCHBUY_TEST_MYSQL_URL", "mysql+aiomysql://root:@127.0.0.1:3306")
REDIS_URL = os.environ.get("WATCHBUY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

skipped_servers: set[str] = set()


def require_server(problem: str | None, what: str) -> None:
    if problem is None:
        return
    if IN_CI:
        pytest.fail(f"{what} did not answer ({problem}); it is mandatory in CI (CI=true)",
                    pytrace=False)
    skipped_servers.add(what)
    pytest.skip(f"!!! NOT TESTED: {what} did not answer ({problem}); start it to run these "
                "tests (they are mandatory in CI)")


def _mysql_parts():
    parts = urlsplit(MYSQL_URL)
    return {"host": parts.hostname or "127.0.0.1", "port": parts.port or 3306,
            "user": parts.username or "root", "password": parts.password or ""}


def mysql_connect(database: str | None = None) -> pymysql.Connection:
    return pymysql.connect(**_mysql_parts(), database=database, connect_timeout=2,
                           autocommit=True, charset="utf8mb4")


@functools.cache
def mysql_problem() -> str | None:
    try:
        mysql_connect().close()
    except Exception as exc:  # any reason at all means: no usable server here
        return f"{type(exc).__name__}: {exc}"
    return None


def mysql_url(database: str) -> str:
    return f"{MYSQL_URL.rstrip('/')}/{database}"


@functools.cache
def redis_problem() -> str | None:
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@contextlib.contextmanager
def fresh_mysql_database():
    """A new, empty MariaDB database; dropped afterwards.  Yields its name."""
    require_server(mysql_problem(), f"MariaDB at {MYSQL_URL}")
    name = f"wb_test_{uuid.uuid4().hex}"
    with contextlib.closing(mysql_connect()) as conn, conn.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        yield name
    finally:
        with contextlib.closing(mysql_connect()) as conn, conn.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")


def empty_mysql_database(name: str) -> None:
    """Delete every row (the tables stay: migrating afresh costs ~1 s per test on MariaDB)."""
    with contextlib.closing(mysql_connect(name)) as conn, conn.cursor() as cursor:
        cursor.execute("SHOW TABLES")
        tables = [row[0] for row in cursor.fetchall()]
        cursor.execute("SET FOREIGN_KEY_CHECKS=0")
        for table in tables:
            if table != "schema_version":
                cursor.execute(f"DELETE FROM `{table}`")
