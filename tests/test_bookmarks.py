"""A list file's settled beginning is not read again: the cron re-run over a growing list."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from conftest import add_image_task, on_each_state, task_id

from fetcher.config import Settings
from fetcher.ids import IdSource, InvalidId, Mark, iter_entries
from fetcher.lists import bookmarks
from fetcher.pipeline import FetchOptions, fetch_sync
from fetcher.replica import Replica, file_info, png, task_response
from fetcher.state import open_state
from fetcher.status import archive_status
from fetcher.stores import open_store
from fetcher.summary import Outcome, RunSummary

#: Every run here records bookmarks in the state: each runs on SQLite and on PostgreSQL.
settings = pytest.fixture(name="settings")(on_each_state)


def run_file(settings: Settings, path: Path, **options: Any) -> RunSummary:
    return fetch_sync(settings, [IdSource.from_path(path)], FetchOptions(**options))


def queried(replica: Replica) -> list[str]:
    """Task IDs the API was asked about, sorted (queries run concurrently)."""
    return sorted(seen.path.rsplit("/", 1)[-1] for seen in replica.seen("api"))


def saved(settings: Settings, path: Path) -> Mark | None:
    with open_state(open_store(settings.archive, settings)) as db:
        return next((m for m, _ in bookmarks(db) if m.source == str(path.resolve())), None)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read a list a few bytes at a time, so every line gets a mark of its own."""
    monkeypatch.setattr("fetcher.ids.READ_CHUNK", 8)


# -- reading ----------------------------------------------------------------------------


def test_marks_follow_whole_lines_with_their_digest(tmp_path: Path) -> None:
    """A file yields a start mark, its entries, and a mark after each chunk of whole lines."""
    path = tmp_path / "ids.txt"
    path.write_bytes(b"abc\n# note\nbad id\ndef\n")

    got = list(iter_entries([IdSource.from_path(path)]))

    key = str(path.resolve())
    empty = hashlib.sha256(b"").hexdigest()
    assert got[0] == Mark(key, 0, 0, 0, empty)
    assert got[1] == "abc"
    assert isinstance(got[2], InvalidId)
    assert got[2].line == 3
    assert got[3:] == ["def", Mark(key, 22, 4, 2, hashlib.sha256(path.read_bytes()).hexdigest())]


def test_unchanged_beginning_is_skipped_and_line_numbers_go_on(tmp_path: Path) -> None:
    """With a matching bookmark, reading starts after it; later lines keep their numbers."""
    path = tmp_path / "ids.txt"
    path.write_bytes(b"abc\ndef\n")
    first = [e for e in iter_entries([IdSource.from_path(path)]) if isinstance(e, Mark)][-1]
    path.write_bytes(b"abc\ndef\nghi\nbad id\n")

    got = list(iter_entries([IdSource.from_path(path)], {first.source: first}))

    assert isinstance(got[0], Mark)
    assert (got[0].offset, got[0].lines, got[0].skipped) == (8, 2, 2)
    assert got[1] == "ghi"
    assert isinstance(got[2], InvalidId)
    assert got[2].line == 4
    assert isinstance(got[3], Mark)
    assert (got[3].ids, got[3].digest) == (3, hashlib.sha256(path.read_bytes()).hexdigest())


@pytest.mark.parametrize(
    "now",
    [
        pytest.param(b"abX\ndef\nghi\n", id="edited-beginning"),
        pytest.param(b"abc\n", id="truncated"),
        pytest.param(b"", id="emptied"),
    ],
)
def test_changed_beginning_is_read_whole(tmp_path: Path, now: bytes) -> None:
    """A list that was edited or cut, not just appended to, is read from its first line."""
    path = tmp_path / "ids.txt"
    path.write_bytes(b"abc\ndef\n")
    first = [e for e in iter_entries([IdSource.from_path(path)]) if isinstance(e, Mark)][-1]
    path.write_bytes(now)

    got = list(iter_entries([IdSource.from_path(path)], {first.source: first}))

    assert isinstance(got[0], Mark)
    assert (got[0].offset, got[0].skipped) == (0, 0)
    wanted = [line.strip() for line in now.decode().splitlines() if line.strip()]
    assert [e for e in got if isinstance(e, str)] == wanted


def test_last_line_without_newline_is_read_but_not_marked(tmp_path: Path) -> None:
    """A last line still being written is read, but no mark covers it."""
    path = tmp_path / "ids.txt"
    path.write_bytes(b"abc\ndef")

    got = list(iter_entries([IdSource.from_path(path)]))

    assert [e for e in got if isinstance(e, str)] == ["abc", "def"]
    marks = [e for e in got if isinstance(e, Mark)]
    assert (marks[-1].offset, marks[-1].ids) == (4, 1)


# -- runs -------------------------------------------------------------------------------


def test_rerun_reads_only_what_was_appended(
    replica: Replica, settings: Settings, tmp_path: Path
) -> None:
    """After a run settles a list, the next reads only the new lines and queries only them."""
    old, new = [task_id(n) for n in range(3)], [task_id(n) for n in range(3, 5)]
    for tid in old + new:
        add_image_task(replica, tid)
    path = tmp_path / "ids.txt"
    path.write_text("".join(f"{t}\n" for t in old))
    assert run_file(settings, path).counts[Outcome.ARCHIVED] == 3

    with path.open("a") as handle:
        handle.writelines(f"{t}\n" for t in new)
    summary = run_file(settings, path)

    assert summary.unchanged == 3
    assert summary.counts[Outcome.ARCHIVED] == 2
    assert summary.counts[Outcome.ALREADY_ARCHIVED] == 0
    assert queried(replica) == sorted(old + new)
    again = run_file(settings, path)
    assert (again.unchanged, again.requests) == (5, 0)


def test_pending_task_is_asked_again_and_stops_the_bookmark_before_it(
    replica: Replica, settings: Settings, tmp_path: Path, small_chunks: None
) -> None:
    """A task still running keeps its line (and what follows) in the next run's reading."""
    before, waiting, after = task_id(1), task_id(2), task_id(3)
    add_image_task(replica, before)
    add_image_task(replica, after)
    url = replica.add_file(f"{waiting}/image_0.png", png(8, 8))
    replica.set_task(
        waiting,
        task_response(waiting, status="PROCESSING"),
        task_response(waiting, status="PROCESSING"),
        task_response(waiting, files=[file_info(url)]),
    )
    path = tmp_path / "ids.txt"
    path.write_text(f"{before}\n{waiting}\n{after}\n")

    first = run_file(settings, path)
    assert first.counts[Outcome.PENDING] == 1
    mark = saved(settings, path)
    assert mark is not None
    assert (mark.lines, mark.ids) == (1, 1)

    second = run_file(settings, path)
    assert (second.unchanged, second.counts[Outcome.PENDING]) == (1, 1)
    assert second.counts[Outcome.ALREADY_ARCHIVED] == 1  # the line after it, read again

    third = run_file(settings, path)
    assert (third.unchanged, third.counts[Outcome.ARCHIVED]) == (1, 1)
    fourth = run_file(settings, path)
    assert (fourth.unchanged, fourth.requests) == (3, 0)
    assert queried(replica) == sorted([before, waiting, after, waiting, waiting])


@pytest.mark.parametrize(
    "first_source",
    [pytest.param("stdin", id="stdin-then-list"), pytest.param("list", id="another-list-first")],
)
def test_pending_task_seen_twice_holds_back_every_list_it_is_in(
    replica: Replica, settings: Settings, tmp_path: Path, small_chunks: None, first_source: str
) -> None:
    """A pending ID read first from stdin (or another list) and again from a list file keeps
    its line there: status does not call it settled, and the next cron run over the list asks
    about it again, and archives it once finished."""
    before, waiting, after = task_id(1), task_id(2), task_id(3)
    add_image_task(replica, before)
    add_image_task(replica, after)
    url = replica.add_file(f"{waiting}/image_0.png", png(8, 8))
    replica.set_task(
        waiting,
        task_response(waiting, status="PROCESSING"),
        task_response(waiting, files=[file_info(url)]),
    )
    path = tmp_path / "ids.txt"
    path.write_text(f"{before}\n{waiting}\n{after}\n")
    if first_source == "stdin":
        first_read = IdSource.from_values("<stdin>", [waiting])
    else:
        other = tmp_path / "other.txt"
        other.write_text(f"{waiting}\n")
        first_read = IdSource.from_path(other)

    first = fetch_sync(settings, [first_read, IdSource.from_path(path)], FetchOptions())

    assert first.counts[Outcome.PENDING] == 1
    mark = saved(settings, path)
    assert mark is None or mark.lines <= 1
    lists = archive_status(settings.archive, settings=settings).lists
    assert all(e["lines"] <= 1 for e in lists if e["path"] == str(path.resolve()))

    cron = run_file(settings, path)

    assert cron.counts[Outcome.ARCHIVED] == 1
    assert queried(replica).count(waiting) == 2
    assert run_file(settings, path).unchanged == 3


def test_failure_for_good_is_settled_but_a_retryable_one_is_not(
    replica: Replica, settings: Settings, tmp_path: Path, small_chunks: None
) -> None:
    """A moderation failure does not stop the bookmark; an HTTP 500 every time does."""
    refused, flaky, fine = task_id(1), task_id(2), task_id(3)
    replica.set_task(
        refused,
        task_response(refused, err_code=70000, err_code_ext="ContentModerationFailed"),
    )
    replica.set_task(flaky, b"not json at all")
    add_image_task(replica, fine)
    path = tmp_path / "ids.txt"
    path.write_text(f"{refused}\n{flaky}\n{fine}\n")

    run_file(settings, path)

    mark = saved(settings, path)
    assert mark is not None
    assert (mark.lines, mark.ids) == (1, 1)


def test_retry_failed_reads_the_whole_list(
    replica: Replica, settings: Settings, tmp_path: Path
) -> None:
    """``--retry-failed`` asks again about failures for good, so it skips nothing."""
    refused = task_id(1)
    replica.set_task(
        refused,
        task_response(refused, err_code=70000, err_code_ext="ContentModerationFailed"),
    )
    path = tmp_path / "ids.txt"
    path.write_text(f"{refused}\n")
    run_file(settings, path)
    assert run_file(settings, path).unchanged == 1

    again = run_file(settings, path, retry_failed=True)

    assert again.unchanged == 0
    assert queried(replica) == [refused, refused]


def test_dry_run_leaves_no_bookmark(replica: Replica, settings: Settings, tmp_path: Path) -> None:
    """A dry run settles nothing, so the next real run still reads the whole list."""
    tid = task_id(1)
    add_image_task(replica, tid)
    path = tmp_path / "ids.txt"
    path.write_text(f"{tid}\n")

    run_file(settings, path, dry_run=True)

    assert not settings.archive.exists()
    assert run_file(settings, path).counts[Outcome.ARCHIVED] == 1


@pytest.mark.parametrize(
    "ending", [pytest.param(b"\nabc\n", id="then-an-id"), pytest.param(b"", id="to-the-end")]
)
def test_line_far_too_long_is_one_invalid_entry(tmp_path: Path, ending: bytes) -> None:
    """A binary file or a runaway line is reported once by its start, not held in memory whole."""
    path = tmp_path / "ids.txt"
    path.write_bytes(b"first\n" + b"x" * 3_000_000 + ending)

    got = list(iter_entries([IdSource.from_path(path)]))

    entries = [e for e in got if not isinstance(e, Mark)]
    assert entries[0] == "first"
    assert isinstance(entries[1], InvalidId)
    assert (entries[1].line, entries[1].reason) == (2, "a line far too long")
    assert entries[1].text == "x" * 80
    assert entries[2:] == (["abc"] if ending else [])
    last = [e for e in got if isinstance(e, Mark)][-1]
    if ending:
        assert (last.offset, last.lines) == (path.stat().st_size, 3)
        assert last.digest == hashlib.sha256(path.read_bytes()).hexdigest()
