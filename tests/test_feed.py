"""IDs reach the pipeline at once from a slow source, and in bounded batches from a fast one."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import add_image_task, process_env, task_id

from fetcher.errors import InputError
from fetcher.feed import batches
from fetcher.replica import Replica


async def _collect(items: Iterator[int], limit: int) -> list[list[int]]:
    return [batch async for batch in batches(items, limit)]


def test_fast_source_arrives_whole_in_order_and_bounded() -> None:
    """Every item arrives once, in order, in batches no larger than the limit."""
    got = asyncio.run(_collect(iter(range(10_000)), 64))
    assert [i for batch in got for i in batch] == list(range(10_000))
    assert max(len(batch) for batch in got) <= 64


def test_reading_error_is_raised_in_the_loop() -> None:
    """An error while reading (an unreadable file) surfaces where the run can report it."""

    def failing() -> Iterator[int]:
        yield 1
        raise InputError("cannot read task-ID file 'x': I/O error")

    with pytest.raises(InputError, match="cannot read"):
        asyncio.run(_collect(failing(), 10))


def test_slow_generator_ids_are_archived_before_stdin_closes(
    replica: Replica, tmp_path: Path
) -> None:
    """An ID written by a generator that keeps stdin open is archived without waiting for EOF."""
    tid = task_id(1)
    add_image_task(replica, tid)
    archive = tmp_path / "archive"
    env = process_env(replica, archive, tmp_path)
    with subprocess.Popen(
        [sys.executable, "-m", "fetcher", "fetch", "-", "-q"],
        stdin=subprocess.PIPE,
        env=env,
    ) as proc:
        assert proc.stdin is not None
        proc.stdin.write(f"{tid}\n".encode())
        proc.stdin.flush()
        deadline = time.monotonic() + 15
        while not list(archive.rglob("task.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        archived_while_open = bool(list(archive.rglob("task.json")))
        proc.stdin.close()
        code = proc.wait(timeout=15)

    assert archived_while_open
    assert code == 0
