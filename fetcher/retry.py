"""When to try again, and how long to wait: one policy for queries and downloads.

Backoff is exponential with full jitter and a cap, so many workers that fail
together do not retry in lockstep; a server's ``Retry-After`` (seconds or an
HTTP date) wins over the computed delay, within the same cap.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

#: Statuses worth asking again for: throttling and server-side trouble.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``retries`` further attempts after the first, waits between ``base`` and ``cap`` seconds."""

    retries: int = 5
    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt number ``attempt + 1`` (``attempt`` counts from 1)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.cap)
        # The exponent is bounded: 2**1100 is too large to become a float.
        exponent = min(attempt - 1, 64)
        return random.uniform(0, min(self.cap, self.base * 2**exponent))


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds from now, or None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def attempts(count: int) -> str:
    """``1 attempt``, ``3 attempts``: how failure reasons count tries."""
    return "1 attempt" if count == 1 else f"{count} attempts"


class RateLimiter:
    """Spaces calls at least ``1/rate`` seconds apart, shared by every worker."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self._lock:
            now = time.monotonic()
            if self._next > now:
                await asyncio.sleep(self._next - now)
                now = self._next
            self._next = now + self._interval
