"""WorkSink: the bytes on disk and both digests are right, whichever path the blocks take."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from fetcher.sink import BLOCK, IN_FLIGHT, WorkSink


def _body(size: int) -> bytes:
    return os.urandom(size)


async def _sink_all(path: Path, body: bytes, *, start: int, md5: bool, piece: int) -> WorkSink:
    async with WorkSink(path, start, md5=md5) as sink:
        for offset in range(start, len(body), piece):
            await sink.write(body[offset : offset + piece])
        await sink.sync()
    return sink


@pytest.mark.parametrize(
    ("size", "piece", "md5"),
    [
        pytest.param(1000, 1000, True, id="one-small-write"),
        pytest.param(BLOCK, BLOCK, True, id="exactly-one-block"),
        pytest.param(5 * BLOCK + 17, 64 * 1024, True, id="many-blocks-two-lanes"),
        pytest.param(5 * BLOCK + 17, 3 * BLOCK, True, id="pieces-larger-than-a-block"),
        pytest.param(5 * BLOCK + 17, 64 * 1024, False, id="many-blocks-sha-only"),
        pytest.param((IN_FLIGHT * 3) * BLOCK, BLOCK, True, id="lanes-full-many-times"),
    ],
)
def test_file_and_digests_match_the_body(tmp_path: Path, size: int, piece: int, md5: bool) -> None:
    """Whatever the block path, the file is the body and both digests are the body's."""
    body = _body(size)
    path = tmp_path / "w.part"

    sink = asyncio.run(_sink_all(path, body, start=0, md5=md5, piece=piece))

    assert path.read_bytes() == body
    assert sink.size == size
    assert sink.sha256 == hashlib.sha256(body).hexdigest()
    assert sink.md5 == (hashlib.md5(body).hexdigest() if md5 else None)


@pytest.mark.parametrize(
    "start", [pytest.param(10, id="small"), pytest.param(BLOCK + 5, id="past-a-block")]
)
def test_resumed_file_digests_cover_the_bytes_already_there(tmp_path: Path, start: int) -> None:
    """A resumed sink hashes the bytes on disk first, so MD5 and SHA-256 cover the whole file."""
    body = _body(4 * BLOCK + 3)
    path = tmp_path / "w.part"
    path.write_bytes(body[:start])

    sink = asyncio.run(_sink_all(path, body, start=start, md5=True, piece=200_000))

    assert path.read_bytes() == body
    assert sink.md5 == hashlib.md5(body).hexdigest()
    assert sink.sha256 == hashlib.sha256(body).hexdigest()


def test_cancelled_download_leaves_a_prefix_of_the_body(tmp_path: Path) -> None:
    """Cancelled mid-body, every block handed to the lanes is on disk, in order, and no more."""
    body = _body(8 * BLOCK)
    path = tmp_path / "w.part"
    handed = 0

    async def receive() -> None:
        nonlocal handed
        async with WorkSink(path, 0, md5=True) as sink:
            for offset in range(0, len(body), 100_000):
                await sink.write(body[offset : offset + 100_000])
                handed = sink.size
                if handed > 5 * BLOCK:
                    raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(receive())

    on_disk = path.read_bytes()
    assert len(on_disk) == handed
    assert on_disk == body[:handed]
