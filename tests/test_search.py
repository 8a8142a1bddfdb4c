"""Search and listing over real archives: the state's FTS5 index, filters, pages, old archives."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import sqlite3
import struct
import subprocess
import sys
import termios
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    STATE_KINDS,
    add_image_task,
    add_video_task,
    process_env,
    run,
    run_cli,
    task_id,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fetcher.archive import Archive
from fetcher.catalog import Catalog, Query, file_kind, reading, reading_store, terms
from fetcher.config import Settings
from fetcher.demo import run_demo
from fetcher.errors import CatalogError, UsageError
from fetcher.index import build_index, needs_index
from fetcher.replica import Replica, task_response
from fetcher.state import TEXT_SCHEMA, DatabaseUrl, StateDB
from fetcher.state.postgres import PostgresState
from fetcher.state.transfer import copy_state
from tests.pgserver import PostgresServer


@pytest.fixture(scope="module")
def demo_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The archive ``fetcher demo`` makes, made once for the module."""
    root = tmp_path_factory.mktemp("demo") / "archive"
    run_demo(root)
    return root


#: Opens the demo archive's catalog: ``with demo_reading() as catalog``.
Reading = Callable[[], AbstractContextManager[Catalog]]


@pytest.fixture(scope="module")
def demo_postgres(demo_archive: Path, postgres: PostgresServer) -> DatabaseUrl:
    """The demo archive's state copied into PostgreSQL, once for the module."""
    url = DatabaseUrl.parse(postgres.database())
    with StateDB(demo_archive / ".fetcher" / "state.sqlite") as source, PostgresState(url) as db:
        copy_state(source, db)
    return url


@pytest.fixture(params=STATE_KINDS)
def demo_reading(request: pytest.FixtureRequest, demo_archive: Path) -> Reading:
    """The demo archive's catalog, on each state implementation (the same rows in each)."""
    if request.param == "sqlite":
        return lambda: reading(demo_archive)
    url = request.getfixturevalue("demo_postgres")
    return lambda: reading_store(Archive(demo_archive, url))


def _ids(catalog: Catalog, query: Query) -> list[str]:
    return [card.task_id for card in catalog.find(query).cards]


def test_search_finds_the_demos_pig(demo_archive: Path, demo_reading: Reading) -> None:
    """After the demo, a search for "pig" finds the pig, archived, with its image."""
    with demo_reading() as catalog:
        cards = catalog.find(Query(text="pig")).cards
    assert len(cards) == 1
    pig = cards[0]
    assert pig.prompt == "pig"
    assert pig.state == "archived"
    assert [f.kind for f in pig.files] == ["image"]
    assert pig.files[0].path is not None
    assert (demo_archive / pig.files[0].path).is_file()


def test_every_recorded_task_is_listed_newest_first_with_its_words(demo_reading: Reading) -> None:
    """Pending and failed tasks are listed with their prompts, as archived ones are."""
    with demo_reading() as catalog:
        cards = catalog.find(Query()).cards
        assert catalog.indexed_whole()
    assert {c.state for c in cards} == {"archived", "pending", "failed"}
    assert all(c.prompt for c in cards)
    listed = [(c.created_at, c.task_id) for c in cards]
    assert listed == sorted(listed, reverse=True)


def test_filters_narrow_the_list(demo_reading: Reading) -> None:
    """Type, model and state filters each keep only what they name; facets offer them."""
    with demo_reading() as catalog:
        facets = catalog.facets()
        assert facets.task_types == ("AigcImageTask", "AigcVideoTask")
        assert facets.models == ("GEM", "Hunyuan", "Kling")
        assert facets.states["archived"] == 3
        videos = catalog.find(Query(task_type="AigcVideoTask")).cards
        assert [c.model for c in videos] == ["Kling"]
        assert [f.kind for f in videos[0].files] == ["video"]
        assert {c.model for c in catalog.find(Query(model="Hunyuan")).cards} == {"Hunyuan"}
        failed = catalog.find(Query(states=("failed",))).cards
        assert [c.state for c in failed] == ["failed"]
        assert failed[0].reason
        assert len(catalog.find(Query(states=("archived", "pending"))).cards) == 4
        future = datetime.now(UTC) + timedelta(days=1)
        assert catalog.find(Query(since=future)).cards == ()
        assert len(catalog.find(Query(until=future)).cards) == 5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("PIG", 1, id="case"),
        pytest.param("fox snow", 1, id="all-words"),
        pytest.param("fox lighthouse", 0, id="a-word-missing"),
        pytest.param('"red fox"', 1, id="phrase"),
        pytest.param('"fox red"', 0, id="phrase-order"),
        pytest.param("Kling", 1, id="model"),
        pytest.param("distorted", 5, id="negative-prompt"),
        pytest.param("1392336703-AigcImageTask-4796", 1, id="id-prefix"),
        pytest.param("1392336703-AigcImageTask-47965947a83db42af4b1e3a74c243531t", 1, id="id"),
        pytest.param("ox", 1, id="two-letters"),
        pytest.param("", 5, id="empty"),
    ],
)
def test_search_matches_words_ids_and_models(
    demo_reading: Reading, text: str, expected: int
) -> None:
    """Every word must be found, in the prompt, negative prompt, model or task ID."""
    with demo_reading() as catalog:
        assert len(catalog.find(Query(text=text)).cards) == expected


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.text(max_size=80)
    | st.sampled_from(['"', '""', "a AND", "NEAR(", "*", "<script>", "^x"])
)
def test_any_text_searches_without_error(demo_reading: Reading, text: str) -> None:
    """Quotes, FTS5 operators, control characters, any Unicode: a search, never an error."""
    with demo_reading() as catalog:
        page = catalog.find(Query(text=text))
    assert len(page.cards) <= 5


def test_pages_follow_each_other_to_the_end(replica: Replica, settings: Settings) -> None:
    """Keyset pages hold every task once, in order, and the last says there is no next."""
    ids = [task_id(n) for n in range(7)]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for n, tid in enumerate(ids):
        add_image_task(replica, tid, created=start + timedelta(hours=n), prompt=f"cat number {n}")
    run(settings, *ids)
    seen: list[str] = []
    with reading(settings.archive) as catalog:
        page = catalog.find(Query(text="cat", limit=3))
        seen += [c.task_id for c in page.cards]
        while page.next is not None:
            page = catalog.find(Query(text="cat", limit=3, after=page.next))
            seen += [c.task_id for c in page.cards]
    assert seen == list(reversed(ids))


@pytest.mark.parametrize(
    "query",
    [
        pytest.param(Query(after="not a cursor"), id="cursor-garbage"),
        pytest.param(Query(after="WyJhIl0"), id="cursor-short"),
        pytest.param(Query(after="é"), id="cursor-unicode"),
        pytest.param(Query(limit=0), id="limit-zero"),
        pytest.param(Query(limit=10**9), id="limit-huge"),
        pytest.param(Query(states=("lost",)), id="state"),
        pytest.param(Query(text=" ".join(f"w{n}" for n in range(40))), id="words"),
    ],
)
def test_bad_queries_are_our_error(demo_reading: Reading, query: Query) -> None:
    """A bad cursor, limit, state or too many words: CatalogError, one line, exit 2."""
    with demo_reading() as catalog, pytest.raises(CatalogError) as raised:
        catalog.find(query)
    assert raised.value.exit_code == 2
    assert "\n" not in str(raised.value)


def test_card_is_one_task_or_none(demo_archive: Path, demo_reading: Reading) -> None:
    """A card by ID has every file and the sidecar's folder; an unknown ID is None."""
    pig = "1392336703-AigcImageTask-47965947a83db42af4b1e3a74c243531t"
    with demo_reading() as catalog:
        card = catalog.card(pig)
        assert catalog.card("no-such-task") is None
    assert card is not None
    assert card.folder is not None
    assert (demo_archive / card.folder / "task.json").is_file()
    assert card.files[0].sha256 is not None


def test_reading_no_archive_is_a_usage_error(tmp_path: Path) -> None:
    """A folder that holds no archive: one usage error, nothing created."""
    with pytest.raises(UsageError, match="no fetcher archive"), reading(tmp_path / "none"):
        pass
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(
    ("content_type", "path", "kind"),
    [
        pytest.param("image/png", "a/00.png", "image", id="png"),
        pytest.param("video/mp4", None, "video", id="mp4-type"),
        pytest.param(None, "a/00.MP4", "video", id="mp4-name"),
        pytest.param("application/octet-stream", "a/00.webp", "image", id="by-name"),
        pytest.param("text/html", "a/00.bin", "other", id="other"),
    ],
)
def test_file_kind(content_type: str | None, path: str | None, kind: str) -> None:
    """A file is an image or a video by its type, else by its name."""
    assert file_kind(content_type, path) == kind


def test_terms_keep_phrases_and_drop_what_cannot_be_searched() -> None:
    """Quoted phrases stay whole; control characters and stray quotes split or vanish."""
    assert terms('pig "red  fox" pig \x00x "') == ["pig", "red fox", "x"]


def _as_schema_3(db_path: Path) -> None:
    """Take the state back to schema 3: no search tables, indexes or marker."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        for name in ("tasks_newest", "tasks_by_type_newest", "tasks_by_state_newest"):
            conn.execute(f"DROP INDEX {name}")
        conn.execute("DROP TABLE task_search")  # its triggers' target: dropped first
        conn.execute("DROP TABLE task_text")  # its index and triggers go with it
        conn.execute("DELETE FROM meta WHERE key = 'text_index'")
        conn.execute("PRAGMA user_version = 3")
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert not {n for n in names if n.startswith("task_")}
    finally:
        conn.close()


class _Recorded:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def indexed(self, done: int, total: int) -> None:
        self.calls.append((done, total))


def test_an_archive_from_before_search_is_indexed_once(
    replica: Replica, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A schema-3 archive is listed and searched read-only, then indexed once with progress."""
    ids = [task_id(n) for n in range(5)]
    for n, tid in enumerate(ids):
        add_image_task(replica, tid, prompt=f"owl {n}" if n % 2 else f"heron {n}")
    add_video_task(replica, task_id(9, "AigcVideoTask"))
    run(settings, *ids, task_id(9, "AigcVideoTask"))
    db_path = settings.archive / ".fetcher" / "state.sqlite"
    _as_schema_3(db_path)
    with reading(settings.archive) as catalog:
        assert not catalog.indexed_whole()
        assert len(catalog.find(Query(text="owl")).cards) == 2
        assert catalog.facets().models == ("GEM", "Kling")
    monkeypatch.setattr("fetcher.index.INDEX_BATCH", 2)
    recorded = _Recorded()
    with StateDB(db_path) as db:
        assert db.version >= TEXT_SCHEMA  # migrated to the search schema (or past it)
        assert needs_index(db)
        assert build_index(db, recorded) == 6
        assert not needs_index(db)
        assert build_index(db, recorded) == 0
    assert recorded.calls[0] == (0, 6)
    assert recorded.calls[-1] == (6, 6)
    assert len(recorded.calls) >= 4
    with reading(settings.archive) as catalog:
        assert catalog.indexed_whole()
        assert len(catalog.find(Query(text="heron")).cards) == 3
        assert len(catalog.find(Query(text="Kling 2.1")).cards) == 1


def _on_a_terminal(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """``fetcher ARGS`` with its stderr on a pseudo-terminal: exit code, stdout, terminal."""
    leader, follower = pty.openpty()
    # 24 rows of 100 columns, as a terminal window has (a new pty has none: no room for a bar)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "fetcher", *args],
            stdout=subprocess.PIPE,
            stderr=follower,
            env=env,
            text=True,
        )
    finally:
        os.close(follower)
    shown = b""
    try:
        while chunk := _read_terminal(leader):
            shown += chunk
    finally:
        os.close(leader)
    out, _ = process.communicate(timeout=60)
    return process.returncode, out, shown.decode(errors="replace")


def _read_terminal(leader: int) -> bytes:
    """The next bytes the terminal shows; none once the program closed it."""
    try:
        return os.read(leader, 65536)
    except OSError:  # EIO: every writer is gone
        return b""


def test_search_on_an_old_archive_shows_a_bar_on_a_terminal_but_not_with_json(
    replica: Replica, settings: Settings
) -> None:
    """The index build before a search draws its bar on a terminal; with --json it does not
    (and prints only the JSON lines)."""
    ids = [task_id(n) for n in range(3)]
    for tid in ids:
        add_image_task(replica, tid, prompt="an otter")
    run(settings, *ids)
    db_path = settings.archive / ".fetcher" / "state.sqlite"
    _as_schema_3(db_path)
    env = process_env(replica, settings.archive, settings.archive.parent)
    code, out, terminal = _on_a_terminal(env, "search", "otter")
    assert code == 0, terminal
    assert "indexing for search" in terminal and "3/3" in terminal
    assert len(out.splitlines()) == 3
    _as_schema_3(db_path)
    code, out, terminal = _on_a_terminal(env, "search", "otter", "--json")
    assert code == 0, terminal
    assert terminal == ""
    assert {json.loads(line)["task_id"] for line in out.splitlines()} == set(ids)
    with reading(settings.archive) as catalog:
        assert catalog.indexed_whole()


def test_a_fetch_on_an_old_archive_shows_the_index_bar_on_a_terminal_but_not_with_q(
    replica: Replica, settings: Settings
) -> None:
    """The fetch that indexes an old archive first draws that bar on a terminal; with -q
    the terminal shows nothing (all went well)."""
    ids = [task_id(n) for n in range(3)]
    for tid in ids:
        add_image_task(replica, tid, prompt="a heron")
    run(settings, *ids)
    db_path = settings.archive / ".fetcher" / "state.sqlite"
    env = process_env(replica, settings.archive, settings.archive.parent)
    _as_schema_3(db_path)
    code, _, terminal = _on_a_terminal(env, "fetch", "--pending")
    assert code == 0, terminal
    assert "indexing for search" in terminal and "3/3" in terminal
    _as_schema_3(db_path)
    code, out, terminal = _on_a_terminal(env, "fetch", "--pending", "-q")
    assert (code, out, terminal) == (0, "", "")
    with reading(settings.archive) as catalog:
        assert catalog.indexed_whole()


def test_a_fetch_indexes_an_old_archive_first(replica: Replica, settings: Settings) -> None:
    """The next fetch after the upgrade indexes what earlier runs archived."""
    first, second = task_id(1), task_id(2)
    add_image_task(replica, first, prompt="a crane at dawn")
    run(settings, first)
    _as_schema_3(settings.archive / ".fetcher" / "state.sqlite")
    add_image_task(replica, second, prompt="a crane at dusk")
    run(settings, second)
    with reading(settings.archive) as catalog:
        assert catalog.indexed_whole()
        assert set(_ids(catalog, Query(text="crane"))) == {first, second}


def test_words_are_recorded_with_the_answer_and_follow_it(
    replica: Replica, settings: Settings
) -> None:
    """A pending task is found by its words; when it finishes, its new answer replaces them."""
    tid = task_id(3)
    replica.set_task(tid, task_response(tid, status="PROCESSING", prompt="a slow snail"))
    run(settings, tid)
    with reading(settings.archive) as catalog:
        assert [c.state for c in catalog.find(Query(text="snail")).cards] == ["pending"]
    add_image_task(replica, tid, prompt="a fast snail")
    run(settings, tid, pending=True)
    with reading(settings.archive) as catalog:
        assert [c.state for c in catalog.find(Query(text="fast snail")).cards] == ["archived"]
        assert catalog.find(Query(text="slow")).cards == ()
    conn = sqlite3.connect(settings.archive / ".fetcher" / "state.sqlite")
    try:
        # The index agrees with its table (FTS5's own check raises if not).
        conn.execute("INSERT INTO task_search (task_search) VALUES ('integrity-check')")
    finally:
        conn.close()


def test_fetcher_search_pig_after_fetcher_demo(tmp_path: Path) -> None:
    """`fetcher demo` then `fetcher search pig`: one line, the pig's ID, folder and prompt."""
    archive = tmp_path / "demo"
    made = run_cli(["demo", "--archive", str(archive), "-q"])
    assert made.returncode == 0, made.stderr
    found = run_cli(["search", "pig", "--archive", str(archive)], env={"COLUMNS": "300"})
    assert found.returncode == 0, found.stderr
    assert found.stderr == ""
    lines = found.stdout.splitlines()
    assert len(lines) == 1
    pig = "1392336703-AigcImageTask-47965947a83db42af4b1e3a74c243531t"
    assert lines[0].startswith(f"{pig}  ")
    assert lines[0].endswith("  pig")
    assert "GEM 2.5  AigcImageTask/" in lines[0]


JSON_KEYS = {
    "task_id", "state", "task_type", "created_at", "finished_at", "folder", "prompt",
    "negative_prompt", "model", "model_version", "reason", "files",
}  # fmt: skip
FILE_KEYS = {"index", "path", "size", "sha256", "content_type", "kind", "state"}


def test_search_json_is_a_line_a_task_with_the_documented_keys(demo_archive: Path) -> None:
    """--json: one object a line, newest first, exactly the keys the README lists."""
    found = run_cli(["search", "--json", "--archive", str(demo_archive)])
    assert found.returncode == 0, found.stderr
    objects = [json.loads(line) for line in found.stdout.splitlines()]
    assert len(objects) == 5
    assert all(set(o) == JSON_KEYS for o in objects)
    assert all(set(f) == FILE_KEYS for o in objects for f in o["files"])
    created = [o["created_at"] for o in objects]
    assert created == sorted(created, reverse=True)
    readme = (ROOT / "README.md").read_text(encoding="utf-8").split("## Search", 1)[1]
    assert all(f"`{key}`" in readme for key in JSON_KEYS | FILE_KEYS)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["--type", "AigcVideoTask"], 1, id="type"),
        pytest.param(["--model", "GEM", "--state", "pending"], 1, id="model-state"),
        pytest.param(["--state", "archived", "--state", "failed"], 4, id="states"),
        pytest.param(["--limit", "2"], 2, id="limit"),
        pytest.param(["--until", "2000-01-01"], 0, id="until"),
        pytest.param(["--since", "2000-01-01T00:00:00Z"], 5, id="since"),
        pytest.param(["red", "fox"], 1, id="words"),
    ],
)
def test_search_flags_filter(demo_archive: Path, args: list[str], expected: int) -> None:
    """Each flag narrows the list as documented."""
    found = run_cli(["search", "--json", "--archive", str(demo_archive), *args])
    assert found.returncode == 0, found.stderr
    assert len(found.stdout.splitlines()) == expected


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--since", "yesterday"], id="since"),
        pytest.param(["--until", "2026-13-01"], id="until"),
        pytest.param(["--limit", "0"], id="limit-zero"),
        pytest.param(["--limit", "-3"], id="limit-negative"),
        pytest.param(["--limit", "many"], id="limit-word"),
        pytest.param(["--state", "lost"], id="state"),
    ],
)
def test_bad_search_flags_are_one_line_exit_2(demo_archive: Path, args: list[str]) -> None:
    """A bad date, limit or state: one line on stderr naming it, exit 2, nothing on stdout."""
    found = run_cli(["search", "pig", "--archive", str(demo_archive), *args])
    assert found.returncode == 2
    assert found.stdout == ""
    assert len(found.stderr.splitlines()) == 1
    assert found.stderr.startswith("fetcher: error: ")


def test_search_indexes_an_old_archive_first(replica: Replica, settings: Settings) -> None:
    """The first `fetcher search` on a schema-3 archive indexes it, then finds by the index."""
    tid = task_id(4)
    add_image_task(replica, tid, prompt="a badger under the moon")
    run(settings, tid)
    _as_schema_3(settings.archive / ".fetcher" / "state.sqlite")
    found = run_cli(["search", "badger", "--archive", str(settings.archive)])
    assert found.returncode == 0, found.stderr
    assert found.stderr == ""
    assert found.stdout.startswith(tid)
    with reading(settings.archive) as catalog:
        assert catalog.indexed_whole()


def test_search_names_its_state_with_state_db(
    demo_postgres: DatabaseUrl, postgres: PostgresServer, tmp_path: Path
) -> None:
    """`search --state-db URL` reads that state (what --state names for the other commands)
    while its --state still filters tasks; a state it cannot reach is one line naming
    the server, exit 2, without the password."""
    elsewhere = tmp_path / "no-state-here"
    elsewhere.mkdir()
    args = ["search", "--json", "--archive", str(elsewhere), "--state-db", demo_postgres.dsn]
    found = run_cli([*args, "pig", "--state", "archived"])
    assert found.returncode == 0, found.stderr
    assert [json.loads(line)["prompt"] for line in found.stdout.splitlines()] == ["pig"]
    assert run_cli([*args, "pig", "--state", "failed"]).stdout == ""
    wrong = postgres.url(demo_postgres.dsn.rsplit("/", 1)[1], password="not-the-password")
    refused = run_cli(["search", "pig", "--archive", str(elsewhere), "--state-db", wrong])
    assert refused.returncode == 2
    assert refused.stderr.startswith("fetcher: error: cannot connect to the state database")
    assert len(refused.stderr.splitlines()) == 1
    assert "not-the-password" not in refused.stderr + refused.stdout


def test_a_bad_state_db_is_named_as_given(tmp_path: Path) -> None:
    """A --state-db value that is no state: its one line names --state-db, not --state."""
    found = run_cli(["search", "pig", "--archive", str(tmp_path), "--state-db", "postgresql://["])
    assert found.returncode == 2
    assert len(found.stderr.splitlines()) == 1
    assert "--state-db" in found.stderr
