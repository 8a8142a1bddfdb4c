"""Task IDs from blocking sources into the event loop: batched when fast, at once when slow.

Reading a file or stdin blocks, so it happens on a thread. Two ways of handing
lines over both fail someone: one line at a time costs a loop wake-up per line
(too slow for a million-line list), and fixed-size batches leave a slow
generator's IDs waiting until a batch fills. Here the thread appends to a
shared list and wakes the loop only when the list goes from empty to non-empty;
the loop takes whatever has gathered. A full list makes the reader wait, so
memory stays bounded.

The thread is a daemon: a read blocked on a pipe that never closes must not
keep a finished run (a rejected key, Ctrl-C) from exiting.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class _Handoff(Generic[T]):
    """A bounded list shared by one reading thread and the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self._loop = loop
        self._limit = limit
        self._items: list[T] = []
        self._done = False
        self._closed = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._ready = asyncio.Event()

    # -- the reading thread -------------------------------------------------------------

    def push(self, item: T) -> bool:
        """Add one item; False once the loop side has stopped listening."""
        with self._cond:
            while len(self._items) >= self._limit and not self._closed:
                self._cond.wait()
            if self._closed:
                return False
            self._items.append(item)
            if len(self._items) == 1:
                self._wake()
        return True

    def finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._done = True
            self._error = error
            self._wake()

    def _wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:
            self._closed = True  # the loop is gone: the run is over

    # -- the event loop -----------------------------------------------------------------

    async def take(self) -> list[T] | None:
        """Everything gathered so far, waiting until there is something; None at the end."""
        while True:
            with self._cond:
                if self._items:
                    batch, self._items = self._items, []
                    self._cond.notify()
                    return batch
                if self._done:
                    if self._error is not None:
                        raise self._error
                    return None
                self._ready.clear()
            await self._ready.wait()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


async def batches(items: Iterator[T], limit: int) -> AsyncIterator[list[T]]:
    """``items`` (a blocking iterator) as lists of at most ``limit``, read on a daemon thread."""
    handoff: _Handoff[T] = _Handoff(asyncio.get_running_loop(), limit)

    def read() -> None:
        try:
            for item in items:
                if not handoff.push(item):
                    return
        except BaseException as exc:  # raised again on the loop side, where it belongs
            handoff.finish(exc)
            return
        handoff.finish()

    threading.Thread(target=read, name="fetcher-ids", daemon=True).start()
    try:
        while (batch := await handoff.take()) is not None:
            yield batch
    finally:
        handoff.close()
