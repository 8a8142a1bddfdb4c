"""One run at a time per bucket and prefix: a lock object written with conditional writes.

The lock is ``PREFIX/.fetcher/lock``, a small JSON naming its host and PID. It is
created only if absent (``If-None-Match: *``), renewed every :data:`RENEW` seconds
by a write that succeeds only over the holder's own version (``If-Match``), and
lapses :data:`LAPSE` seconds after its last renewal, judged by the store's own
clock (the object's Last-Modified against the answer's Date), so no two hosts'
clocks are compared. A lapsed lock, or one naming this host and a PID that no
longer runs, is taken over by a write conditional on the version read, so of two
runs taking it over at once one wins.

A run whose renewal finds the lock replaced (its lock lapsed while the store was
out of reach, and another run took it over) has lost it: the renewal sets the
run's stop event, so it takes no new work and winds down as on SIGINT, and
:attr:`BucketLock.lost` says so; the store then keeps no snapshot, since the
state is the other run's now, and the run ends with
:class:`~fetcher.errors.LockedError` (exit 75), as a run finding the lock taken does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from ..errors import ArchiveError, LockedError

if TYPE_CHECKING:
    from .s3 import Bucket

RENEW = 20.0
LAPSE = 60.0
#: How often a waiting run looks at the lock again.
POLL = 1.0
#: Statuses of a conditional write that lost: the precondition, or a write racing it.
_LOST = (409, 412)

_log = logging.getLogger("fetcher")


class BucketLock:
    """The lock object of one archive in a bucket; held between acquire and release."""

    def __init__(self, bucket: Bucket, key: str) -> None:
        self.bucket = bucket
        self.key = key
        self.host = socket.gethostname()
        self._etag: str | None = None
        self._renewal: asyncio.Task[None] | None = None
        #: The holder last seen, for the message when the lock cannot be had.
        self._holder = ""
        #: Set by a renewal that found the lock replaced: why the run must stop.
        self.lost: str | None = None
        self._stop: asyncio.Event | None = None

    async def acquire(
        self,
        wait: float | None,
        stop: asyncio.Event,
        waiting: Callable[[], None] | None,
        name: str,
    ) -> bool:
        """True with the lock held; False when ``stop`` was set while waiting.

        :class:`~fetcher.errors.LockedError` when another run holds it past ``wait``.
        """
        deadline = time.monotonic() + (wait or 0.0)
        while not await self._take():
            if time.monotonic() >= deadline:
                waited = f" (waited {wait:g} s)" if wait else ""
                raise LockedError(
                    f"another fetcher run{self._holder} holds the lock on {name}{waited}"
                )
            if stop.is_set():
                return False
            if waiting is not None:
                waiting()
                waiting = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL)
        self._stop = stop
        self._renewal = asyncio.get_running_loop().create_task(self._renew(name))
        return True

    async def release(self) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal
            self._renewal = None
        if self._etag is not None:
            # Conditional: a lock another run took over after ours lapsed stays its own.
            with contextlib.suppress(Exception):
                await self.bucket.request(
                    "delete_object", Key=self.key, IfMatch=self._etag, expect=(*_LOST, 404)
                )
            self._etag = None

    async def _take(self) -> bool:
        from .s3 import Expected

        try:
            answer = await self._write(IfNoneMatch="*")
        except Expected:
            pass
        else:
            self._etag = answer["ETag"]
            return True
        try:
            current = await self.bucket.request("get_object", Key=self.key, expect=(404,))
        except Expected:
            return False  # released between the two requests: try again at once next time
        async with current["Body"] as body:
            raw = await body.read(64 * 1024)
        holder = _holder(raw)
        self._holder = f" (host {holder.get('host')!s}, pid {holder.get('pid')!s})"
        if not (self._lapsed(current) or self._dead_here(holder)):
            return False
        try:
            answer = await self._write(IfMatch=current["ETag"])
        except Expected:
            return False
        _log.info("took over the lock%s: it had lapsed or its run is gone", self._holder)
        self._etag = answer["ETag"]
        return True

    async def _write(self, **condition: str) -> Mapping[str, Any]:
        document = {
            "host": self.host,
            "pid": os.getpid(),
            "renewed": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        answer: Mapping[str, Any] = await self.bucket.request(
            "put_object",
            Key=self.key,
            Body=json.dumps(document).encode(),
            ContentType="application/json",
            expect=_LOST,
            **condition,
        )
        return answer

    @staticmethod
    def _lapsed(answer: Mapping[str, Any]) -> bool:
        """Whether the lock's last renewal is over LAPSE seconds old by the store's clock."""
        modified = answer.get("LastModified")
        date = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if not isinstance(modified, datetime) or not date:
            return False
        try:
            now = parsedate_to_datetime(str(date))
        except (TypeError, ValueError):
            return False
        return (now - modified).total_seconds() > LAPSE

    def _dead_here(self, holder: Mapping[str, Any]) -> bool:
        pid = holder.get("pid")
        if holder.get("host") != self.host or not isinstance(pid, int) or pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False

    async def _renew(self, name: str) -> None:
        from .s3 import Expected

        while True:
            await asyncio.sleep(RENEW)
            try:
                answer = await self._write(IfMatch=self._etag or "")
            except Expected:
                self.lost = (
                    f"lost the lock on {name}: another run took it over;"
                    " this run stopped taking work"
                )
                _log.debug("%s (renewing %s)", self.lost, self.key)
                self._etag = None
                if self._stop is not None:
                    self._stop.set()
                return
            except ArchiveError as exc:
                _log.warning("could not renew the lock: %s", exc)
                continue
            self._etag = answer["ETag"]


def _holder(raw: bytes) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}
