"""The state in PostgreSQL: reaching it, its schema, and its password kept to itself.

What a run records is the same on both implementations: the state tests
(fetch, status, verify, the queue, resuming) run on each through the ``state``
fixture. These are the cases only a database server has.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from conftest import (
    add_image_task,
    process_env,
    run,
    run_cli,
    state_env,
    task_id,
    tweak,
)

from fetcher.config import Settings
from fetcher.errors import ArchiveError, StateUnreachable
from fetcher.replica import Replica, task_response
from fetcher.state import MIGRATIONS, SCHEMA_VERSION, DatabaseUrl
from fetcher.state.postgres import PostgresState
from fetcher.state.schema import POSTGRES_MIGRATIONS
from fetcher.summary import Outcome
from tests.pgserver import PostgresServer, free_port

#: A password no server here has: a wrong one, and one a leak would show.
WRONG = "not-the-password-3141"


def _unreachable(postgres: PostgresServer, what: str) -> str:
    """A URL the server refuses: a wrong password, no such database, or nobody listening."""
    if what == "wrong-password":
        return postgres.url("postgres", password=WRONG)
    if what == "no-database":
        return postgres.url("no_such_database")
    return f"postgresql://postgres:{WRONG}@127.0.0.1:{free_port()}/postgres"


@pytest.mark.parametrize("what", ["wrong-password", "no-database", "refused"])
@pytest.mark.parametrize("command", ["status", "fetch"])
def test_an_unreachable_state_is_one_line_exit_2_naming_the_server_not_the_password(
    postgres: PostgresServer, replica: Replica, tmp_path: Path, what: str, command: str
) -> None:
    """Refused, a wrong password, no database: exit 2, one line naming the server, no
    traceback, and the password nowhere in the output (``--json`` included)."""
    url = _unreachable(postgres, what)
    env = process_env(replica, tmp_path / "archive", tmp_path) | {"FETCHER_STATE": url}
    args = ["fetch", "--id", task_id(1), "--json"] if command == "fetch" else ["status"]

    result = run_cli(args, env=env)

    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fetcher: error: cannot connect to the state database")
    assert "127.0.0.1" in lines[0]
    secret = postgres.password if what == "no-database" else WRONG
    assert secret not in result.stderr + result.stdout
    if command == "fetch":
        assert json.loads(result.stdout)["error"]["code"] == "state"


@pytest.mark.parametrize(
    "given",
    [
        pytest.param(f"postgresql://me:{WRONG}@db.example:notaport/x", id="bad-port"),
        pytest.param(f"postgres://me:{WRONG}@[::1/x", id="bad-host"),
    ],
)
def test_a_state_url_that_does_not_parse_is_a_usage_error_without_its_password(
    tmp_path: Path, given: str
) -> None:
    """A bad ``--state`` URL, from the flag or the environment: exit 2, one line, and the
    password not repeated (by our message or argparse's)."""
    by_flag = run_cli(["status", "--archive", str(tmp_path), "--state", given])
    by_env = run_cli(["status", "--archive", str(tmp_path)], env={"FETCHER_STATE": given})

    for result in (by_flag, by_env):
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert "is not a PostgreSQL URL" in result.stderr
        assert WRONG not in result.stderr + result.stdout


def test_the_password_is_in_no_repr_str_or_settings_repr() -> None:
    """A URL's text, repr and the settings' repr hold the user and host, never the password."""
    url = DatabaseUrl.parse(f"postgresql://me:{WRONG}@db.example:5433/archive?sslmode=require")
    settings = Settings(state=f"postgresql://me:{WRONG}@db.example/archive?password={WRONG}")

    assert str(url) == "postgresql://me@db.example:5433/archive?sslmode=require"
    for text in (str(url), repr(url), repr(settings), str(settings.state)):
        assert WRONG not in text
    assert url.dsn.count(WRONG) == 1


def test_the_schema_is_made_on_first_use_versioned_and_kept(
    postgres_url: DatabaseUrl, replica: Replica, settings: Settings
) -> None:
    """A first open makes every table at the newest version; later opens leave rows be."""
    with PostgresState(postgres_url) as db:
        assert db.version == SCHEMA_VERSION
    tid = task_id(1)
    add_image_task(replica, tid)
    assert run(tweak(settings, state=postgres_url), tid).exit_code == 0

    with PostgresState(postgres_url) as db:
        assert db.version == SCHEMA_VERSION
        assert db.counts()["archived"] == 1
    with psycopg.connect(postgres_url.dsn) as conn:
        assert conn.execute("SELECT version FROM fetcher_schema").fetchall() == [(SCHEMA_VERSION,)]


def test_an_older_schema_is_migrated_and_its_rows_kept(postgres_url: DatabaseUrl) -> None:
    """A database at schema 2 is brought to the newest by the next open, its tasks intact."""
    with psycopg.connect(postgres_url.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE fetcher_schema (version INTEGER NOT NULL)")
        for statement in (*POSTGRES_MIGRATIONS[0], *POSTGRES_MIGRATIONS[1]):
            conn.execute(statement)
        conn.execute("INSERT INTO fetcher_schema VALUES (2)")
        conn.execute(
            "INSERT INTO tasks (task_id, state, first_seen, updated_at) "
            "VALUES ('old', 'pending', 'then', 'then')"
        )

    with PostgresState(postgres_url) as db:
        assert db.version == SCHEMA_VERSION
        assert db.unfinished_ids() == ["old"]
        assert db.has_table("task_text") and db.has_table("lists")


def test_a_newer_schema_is_refused_in_one_line(postgres_url: DatabaseUrl) -> None:
    """A database a newer fetcher migrated is refused, naming the server, not touched."""
    with PostgresState(postgres_url):
        pass
    with psycopg.connect(postgres_url.dsn, autocommit=True) as conn:
        conn.execute("UPDATE fetcher_schema SET version = %s", (SCHEMA_VERSION + 1,))

    with pytest.raises(ArchiveError, match="upgrade fetcher") as caught:
        PostgresState(postgres_url).__enter__()
    assert str(postgres_url) in str(caught.value)
    assert postgres_url.password is not None
    assert postgres_url.password not in str(caught.value)


def test_every_sqlite_migration_has_its_postgresql_twin() -> None:
    """A schema change written for SQLite alone would leave PostgreSQL states behind."""
    assert len(POSTGRES_MIGRATIONS) == len(MIGRATIONS) == SCHEMA_VERSION


def test_a_server_that_is_gone_is_state_unreachable(postgres: PostgresServer) -> None:
    """Nobody listening is :class:`StateUnreachable` (exit 2), raised at open."""
    url = DatabaseUrl.parse(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    with pytest.raises(StateUnreachable, match="cannot connect to the state database"):
        PostgresState(url).__enter__()


def test_psycopg_is_imported_only_for_a_postgresql_state(
    replica: Replica, settings: Settings
) -> None:
    """``fetcher --help`` and a run on SQLite never load psycopg."""
    code = (
        "import sys\n"
        "import fetcher.cli\n"
        "fetcher.cli.build_parser()\n"
        "from fetcher.pipeline import fetch_sync\n"
        "from fetcher.config import Settings\n"
        "from fetcher.ids import IdSource\n"
        f"s = Settings(archive={str(settings.archive)!r}, base_url={replica.api_url!r}, "
        f"api_key={replica.api_key!r})\n"
        f"fetch_sync(s, [IdSource.from_values('t', [{task_id(1)!r}])])\n"
        "print('psycopg' in sys.modules)\n"
    )
    add_image_task(replica, task_id(1))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False"


def test_state_copy_both_ways_then_runs_go_on_from_the_copy(
    replica: Replica, settings: Settings, postgres_url: DatabaseUrl, tmp_path: Path
) -> None:
    """SQLite to PostgreSQL and back: every row comes along, runs on either copy find the
    archived tasks archived, and a target that holds tasks is refused unless replaced."""
    done, waiting, later = task_id(1), task_id(2), task_id(3)
    add_image_task(replica, done, 2, prompt="a zebra at dusk")
    replica.set_task(waiting, task_response(waiting, status="PROCESSING"))
    add_image_task(replica, later)
    assert run(settings, done, waiting).exit_code == 0
    archive, env = str(settings.archive), {"XDG_CONFIG_HOME": str(tmp_path / "nc")}

    there = run_cli(["state", "copy", archive, postgres_url.dsn], env=env)
    assert there.returncode == 0, there.stderr
    assert "copied 2 tasks, 2 files" in there.stdout
    assert postgres_url.password is not None
    assert postgres_url.password not in there.stdout + there.stderr
    shared = tweak(settings, state=postgres_url)
    with PostgresState(postgres_url) as db:
        assert db.counts()["archived"] == 1
        assert db.unfinished_ids() == [waiting]
    found = run_cli(["search", "zebra", "--archive", archive], env=env | state_env(shared))
    assert [line.split()[0] for line in found.stdout.splitlines()] == [done], found.stderr

    add_image_task(replica, waiting)
    summary = run(shared, done, waiting, later, pending=True)
    assert (summary.counts[Outcome.ALREADY_ARCHIVED], summary.counts[Outcome.ARCHIVED]) == (1, 2)

    refused = run_cli(["state", "copy", postgres_url.dsn, archive], env=env)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "--replace" in refused.stderr
    back = run_cli(["state", "copy", postgres_url.dsn, archive, "--replace"], env=env)
    assert back.returncode == 0, back.stderr
    assert "copied 3 tasks" in back.stdout
    again = run(settings, done, waiting, later)
    assert again.counts[Outcome.ALREADY_ARCHIVED] == 3
    assert again.files_downloaded == 0
