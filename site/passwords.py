"""Passwords off the event loop, and the minimum password policy.

Argon2 costs ~120 ms of CPU per hash or verification (that is its point).  Run on the event loop,
40 concurrent sign-ups stalled every page of the site for seconds; run in unbounded threads they
would still take every core.  So hashing and verifying run in worker threads, at most
``password_hash_concurrency`` at once (a semaphore); the rest wait their turn without blocking
anything else.  The per-address budgets in :mod:`watchbuy.site.accounts` keep that queue short.
"""

from __future__ import annotations

import asyncio
import secrets

import anyio.to_thread

from watchbuy.site import security

# Our own short list of passwords people pick most often (keyboard walks, "password" and
# "welcome" variants, counting).  Matched case-insensitively; the length rule catches the rest of
# the short ones.
COMMON_PASSWORDS = frozenset("""
123456 123456789 12345678 1234567890 12345 1234567 qwerty password password1 password123
password1234 passw0rd p@ssw0rd p@ssword123 111111 000000 123123 654321 666666 121212
abc123 abcd1234 qwerty123 qwertyuiop qwerty1234 qwertyuiop123 asdfghjkl asdfghjkl1
asdfasdfasdf zxcvbnm zxcvbnm123 1q2w3e4r 1q2w3e4r5t 1q2w3e4r5t6y 1qaz2wsx 1qaz2wsx3edc
zaq12wsx q1w2e3r4t5 q1w2e3r4t5y6 iloveyou iloveyou123 iloveyou12 letmein letmein123
letmeinplease welcome welcome1 welcome123 welcome2024 welcome2025 welcome2026 monkey dragon
football football123 baseball basketball superman batman spiderman starwars princess
sunshine sunshine123 shadow master master123 trustno1 freedom whatever computer
internet michael jennifer jordan23 charlie123 liverpool chelsea arsenal1234 pokemon
minecraft fortnite123 samsung123 unknown123 secret123 changeme changeme123 default123
administrator admin12345 adminadmin rootroot test123456 testtest12 guest12345
0123456789 9876543210 1111111111 0000000000 1234512345 1122334455 aaaaaaaaaa
abcdefghij abcdefg123 abc1234567 qazwsxedc qazwsxedcrfv 123qweasdzxc 1234qwer
1234qwerasdf zxcvbnm1234 password12 passwordpassword mypassword mypassword1
watchbuy watchbuy123 watchbuy2026 livestream shopping123 onlineshop123
""".split())


def password_problem(password: str, email: str, min_length: int) -> str | None:
    """What is wrong with a new password (a message for the form), or None."""
    if len(password) < min_length:
        return f"Choose a password of at least {min_length} characters."
    if len(password) > 256:
        return "That password is too long."
    folded = password.strip().casefold()
    if folded in COMMON_PASSWORDS:
        return "That password is one of the most common ones: choose another."
    email = email.strip().casefold()
    if email and (folded == email or folded == email.split("@", 1)[0]):
        return "Your password cannot be your email address."
    return None


class PasswordWorkers:
    """Argon2 in worker threads, at most ``concurrency`` at once."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self._semaphore: asyncio.Semaphore | None = None
        self._dummy_hash: str | None = None

    @property
    def semaphore(self) -> asyncio.Semaphore:
        if self._semaphore is None:  # made on first use: on the loop that serves the app
            self._semaphore = asyncio.Semaphore(self.concurrency)
        return self._semaphore

    async def hash(self, password: str) -> str:
        async with self.semaphore:
            return await anyio.to_thread.run_sync(security.hash_password, password)

    async def verify(self, password_hash: str, password: str) -> bool:
        async with self.semaphore:
            return await anyio.to_thread.run_sync(security.verify_password, password_hash,
                                                  password)

    async def verify_nobody(self, password: str) -> None:
        """The cost of a verification, for an email with no account: answering faster would
        tell a stranger which emails have accounts."""
        if self._dummy_hash is None:
            self._dummy_hash = await self.hash(secrets.token_urlsafe(16))
        await self.verify(self._dummy_hash, password)
