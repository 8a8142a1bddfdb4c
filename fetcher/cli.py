"""The ``fetcher`` command: parse flags, call the core, map errors to exit codes.

This is the only module that reads argv and the environment, prints, or exits;
everything it does is one call into :mod:`fetcher.pipeline`, :mod:`fetcher.status`,
:mod:`fetcher.verify` or :mod:`fetcher.demo`, and one error boundary around it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import shlex
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, TypeVar

from . import __version__

if TYPE_CHECKING:
    from .config import Settings
    from .ids import IdSource
    from .pipeline import FetchOptions
    from .progress import Progress
    from .summary import RunSummary
from .errors import (
    EXIT_FAILED,
    EXIT_SIGINT,
    EXIT_USAGE,
    FetcherError,
    InternalError,
    UsageError,
)

_T = TypeVar("_T")

_SETTING_FLAGS = (
    "archive",
    "base_url",
    "api_key",
    "api_key_file",
    "concurrency",
    "downloads",
    "timeout",
    "retries",
    "retry_wait",
    "rate",
    "max_file_size",
    "layout",
    "s3_endpoint",
    "s3_addressing",
    "state",
    "state_reconnect",
)


class _Parser(argparse.ArgumentParser):
    """A bad flag is a usage error like any other: one ``fetcher: error:`` line, exit 2.

    Abbreviations are refused (``--pend`` is not ``--pending``): a flag added
    later must not change what an old cron line means. Subcommands' parsers are
    of this class too, so the rule holds for every command.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"fetcher: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fetcher",
        description="Archive AI-generated images and videos from Tencent VOD AIGC tasks "
        "before their download links expire.",
    )
    parser.add_argument("--version", action="version", version=f"fetcher {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fetch = commands.add_parser(
        "fetch",
        help="query tasks and archive their files",
        description="Query each task ID and archive its files and a JSON sidecar.",
    )
    _id_flags(fetch)
    fetch.add_argument(
        "--pending", action="store_true", help="also re-query every pending task in the archive"
    )
    fetch.add_argument(
        "--retry-failed",
        action="store_true",
        help="ask again about tasks an earlier run recorded as failed or expired",
    )
    fetch.add_argument("--dry-run", action="store_true", help="query and report; download nothing")
    fetch.add_argument(
        "--wait-lock",
        nargs="?",
        const="inf",
        metavar="SECONDS",
        help="wait for another run's lock (for SECONDS, or until free) instead of exiting 75; "
        "a word that is not a number after it is a FILE",
    )
    _summary_flags(fetch)
    _lease_flag(fetch)
    _setting_flags(fetch)
    _output_flags(fetch)

    status = commands.add_parser(
        "status", help="show what the archive holds", description="Show what the archive holds."
    )
    status.add_argument("--json", action="store_true", help="print JSON on stdout")
    shown = status.add_mutually_exclusive_group()
    shown.add_argument(
        "--limit",
        type=_count,
        default=20,
        metavar="N",
        help="show at most N entries of each list (default 20)",
    )
    shown.add_argument("--all", action="store_true", help="show every entry of each list")
    _archive_flag(status)
    status.add_argument("--config", type=Path, metavar="FILE", help="TOML config file")
    _store_flags(status)

    verify = commands.add_parser(
        "verify",
        help="re-hash every archived file against the state database",
        description="Re-hash every archived file and compare it with the size and SHA-256 "
        "the state database recorded; exit 1 when any is missing or corrupt.",
    )
    verify.add_argument(
        "--repair",
        action="store_true",
        help="download again the missing or corrupt files whose URL has not expired",
    )
    verify.add_argument(
        "--accept-changed",
        action="store_true",
        help="with --repair: let bytes the host now serves differently replace the archived ones",
    )
    verify.add_argument("--json", action="store_true", help="print JSON on stdout")
    _archive_flag(verify)
    verify.add_argument("--config", type=Path, metavar="FILE", help="TOML config file")
    verify.add_argument(
        "--deep",
        action="store_true",
        help="on a bucket: read and re-hash every object, not only compare its HEAD",
    )
    _store_flags(verify)
    output = verify.add_argument_group("output")
    output.add_argument("-q", "--quiet", action="store_true", help="print nothing when all is well")
    output.add_argument("--no-progress", action="store_true", help="no progress bars")
    verify.set_defaults(verbose=False)

    _search_parser(commands)
    _enqueue_parser(commands)
    _work_parser(commands)

    demo = commands.add_parser(
        "demo",
        help="run the whole pipeline against the bundled replica",
        description="Start a replica of the gateway and file host on loopback, archive "
        "sample_tasks.txt into a fresh folder, and show the result.",
    )
    demo.add_argument("--archive", type=_folder, metavar="DIR", help="folder to archive into")
    demo.add_argument(
        "--serve",
        action="store_true",
        help="only serve the replica until interrupted, to try 'fetcher fetch' against it",
    )
    _output_flags(demo)
    _serve_parser(commands)
    _state_parser(commands)
    return parser


def _state_parser(commands: Any) -> None:
    state = commands.add_parser(
        "state",
        help="move an archive's state between SQLite and PostgreSQL",
        description="Work on an archive's state itself.",
    )
    actions = state.add_subparsers(dest="state_command", metavar="ACTION", required=True)
    copy = actions.add_parser(
        "copy",
        help="copy a state into another (SQLite <-> PostgreSQL)",
        description="Copy every task, file, list file and search word of SOURCE into TARGET. "
        "Each is a postgresql://USER@HOST/DB URL, an SQLite state file, or an archive folder "
        "(its own state). Run it while no fetcher writes either.",
    )
    copy.add_argument("source", metavar="SOURCE", help="the state to copy (only read)")
    copy.add_argument("target", metavar="TARGET", help="the state to copy into (made if new)")
    copy.add_argument(
        "--replace", action="store_true", help="empty a TARGET that holds tasks first"
    )


def _search_parser(commands: Any) -> None:
    search = commands.add_parser(
        "search",
        help="find tasks in the archive by their words",
        description="Find tasks in the archive by prompt, negative prompt, model or task ID "
        "(a piece of any of them); newest first.",
    )
    search.add_argument(
        "query",
        nargs="*",
        metavar="QUERY",
        help='words that must all be found; "a quoted phrase" is one; none lists every task',
    )
    search.add_argument("--json", action="store_true", help="print a JSON object a task")
    search.add_argument("--type", dest="task_type", metavar="T", help="only tasks of type T")
    search.add_argument("--model", metavar="M", help="only tasks made with model M")
    search.add_argument(
        "--since", type=_date, metavar="DATE", help="only tasks created at or after DATE"
    )
    search.add_argument(
        "--until",
        type=_date_until,
        metavar="DATE",
        help="only tasks created before DATE ends (a day counts whole)",
    )
    search.add_argument(
        "--state",
        dest="states",
        action="append",
        default=[],
        metavar="S",
        help="only tasks in state S: archived, pending, incomplete, failed, expired, queued "
        "(repeatable)",
    )
    search.add_argument(
        "--limit", type=_positive, default=20, metavar="N", help="at most N tasks (default 20)"
    )
    _archive_flag(search)
    search.add_argument("--config", type=Path, metavar="FILE", help="TOML config file")
    _store_flags(search, state=False)  # its --state is a task's: the state is --state-db
    search.add_argument(
        "--state-db",
        metavar="PATH|URL",
        help="the state --state names for the other commands: a bucket archive's state file, "
        "or a shared postgresql://USER@HOST/DB",
    )


def _id_flags(parser: argparse.ArgumentParser) -> None:
    """Where task IDs come from: FILE arguments, ``-`` for stdin, ``--id``."""
    parser.add_argument(
        "files", nargs="*", metavar="FILE", help="file with one task ID a line; '-' reads stdin"
    )
    parser.add_argument(
        "--id",
        dest="ids",
        action="append",
        default=[],
        metavar="TASK_ID",
        help="a task ID (repeatable)",
    )


def _enqueue_parser(commands: Any) -> None:
    enqueue = commands.add_parser(
        "enqueue",
        help="record task IDs as queued, for 'fetch --pending' or 'work' to archive",
        description="Record task IDs as queued in the archive's state, sending no query; "
        "'fetcher fetch --pending' and 'fetcher work' then archive them.",
    )
    _id_flags(enqueue)
    enqueue.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    _archive_flag(enqueue)
    enqueue.add_argument("--config", type=Path, metavar="FILE", help="TOML config file")
    _store_flags(enqueue)


def _work_parser(commands: Any) -> None:
    work = commands.add_parser(
        "work",
        help="keep archiving tasks as they are enqueued, until stopped",
        description="Keep archiving the tasks 'fetcher enqueue' records, as they come, "
        "and ask about running tasks again now and then; SIGINT/SIGTERM wind it down.",
    )
    work.add_argument(
        "--idle-exit",
        type=_seconds,
        metavar="SECONDS",
        help="exit after SECONDS with nothing queued (default: run until stopped)",
    )
    _summary_flags(work)
    _lease_flag(work)
    _setting_flags(work)
    _output_flags(work)


def _summary_flags(parser: argparse.ArgumentParser) -> None:
    """A run's summary as JSON: at the end, or each task's outcome as it happens too."""
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    parser.add_argument(
        "--json-lines",
        action="store_true",
        help="print each task's outcome as a line of JSON as it happens, then the summary",
    )


def _lease_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lease",
        type=_lease_seconds,
        default=60.0,
        metavar="SECONDS",
        help="how long a task stays this run's without renewal, should it die (default 60)",
    )


def _lease_seconds(text: str) -> float:
    """A lease's length: more than 0 seconds."""
    seconds = _seconds(text)
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a lease: more than 0 seconds")
    return seconds


def _seconds(text: str) -> float:
    """A number of seconds, 0 or more."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0 or math.isinf(seconds):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds, 0 or more")
    return seconds


def _date(text: str) -> Any:
    """``2026-05-01`` (midnight UTC) or an ISO 8601 time (``2026-05-01T12:00:00Z``)."""
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date (2026-05-01) or a time (2026-05-01T12:00:00Z)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _date_until(text: str) -> Any:
    """Like :func:`_date`; a bare day means up to its end."""
    from datetime import timedelta

    moment = _date(text)
    return moment + timedelta(days=1) if "T" not in text and " " not in text.strip() else moment


def _positive(text: str) -> int:
    """A whole number, 1 or more."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number, 1 or more")
    return int(text)


def _serve_parser(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="browse and search the archive in a web browser (read-only)",
        description="Serve a read-only gallery of the archive: a grid of thumbnails, "
        "filters and search, each task's files, prompt and sidecar.",
    )
    _archive_flag(serve)
    serve.add_argument("--config", type=Path, metavar="FILE", help="TOML config file")
    _store_flags(serve)
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    serve.add_argument("--port", type=_count, default=8765, help="port (default 8765; 0 picks one)")
    serve.add_argument("--open", action="store_true", help="open the gallery in a web browser")
    token = serve.add_mutually_exclusive_group()
    token.add_argument(
        "--token",
        help="require this token on every request (FETCHER_SERVE_TOKEN; needed off loopback)",
    )
    token.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="the same, read from FILE's first line (kept out of the process list)",
    )


def _count(text: str) -> int:
    """A whole number, 0 or more; anything else is a usage error naming the flag."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number, 0 or more")
    return int(text)


def _setting_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (flag > FETCHER_<NAME> > config file > default)")
    _archive_flag(group)
    group.add_argument("--base-url", metavar="URL", help="the gateway's origin")
    group.add_argument(
        "--api-key", metavar="KEY", help="API key (prefer --api-key-file: argv is visible)"
    )
    group.add_argument(
        "--api-key-file", metavar="FILE", help="read the API key from FILE's first line"
    )
    group.add_argument("--config", type=Path, metavar="FILE", help="TOML config file")
    group.add_argument("--concurrency", type=int, metavar="N", help="queries in flight")
    group.add_argument("--downloads", type=int, metavar="N", help="downloads in flight")
    group.add_argument("--timeout", type=float, metavar="SECONDS", help="network timeout")
    group.add_argument("--retries", type=int, metavar="N", help="retries per query and file")
    group.add_argument(
        "--retry-wait", type=float, metavar="SECONDS", help="first backoff delay (doubles each try)"
    )
    group.add_argument("--rate", type=float, metavar="PER_SECOND", help="query rate limit")
    group.add_argument(
        "--max-file-size", metavar="BYTES", help="largest file accepted (16GiB, 500MB, 1048576)"
    )
    group.add_argument("--layout", metavar="TEMPLATE", help="folder template for each task")
    _store_flags(group)


def _archive_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Which archive: a folder, or a bucket's prefix."""
    parser.add_argument(
        "--archive",
        type=_folder,
        metavar="DIR|s3://BUCKET/PREFIX",
        help="archive folder, or a bucket and prefix (s3://BUCKET/PREFIX)",
    )


def _store_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, state: bool = True
) -> None:
    """How a bucket archive (``--archive s3://BUCKET[/PREFIX]``) is reached, and its state."""
    parser.add_argument(
        "--s3-endpoint", metavar="URL", help="S3 endpoint (default: as the AWS CLI finds it)"
    )
    parser.add_argument(
        "--s3-addressing",
        choices=("auto", "path", "virtual"),
        help="bucket in the path or in the host name (auto: path for an IP or localhost)",
    )
    if state:
        parser.add_argument(
            "--state",
            metavar="PATH|URL",
            help="a bucket archive's state file (default: user data dir), or for any archive "
            "a shared postgresql://USER@HOST/DB",
        )
        parser.add_argument(
            "--state-reconnect",
            type=float,
            metavar="SECONDS",
            help="how long a run waits for a lost postgresql:// state to come back (default 60)",
        )


def _output_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    loudness = group.add_mutually_exclusive_group()  # -q -v would mean nothing sensible
    loudness.add_argument("-q", "--quiet", action="store_true", help="only problems")
    loudness.add_argument(
        "-v", "--verbose", action="store_true", help="also tasks already archived"
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def _folder(text: str) -> str:
    """A folder flag's value: an empty one would silently mean the current folder."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path is not a folder")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = argparse.Namespace()
    try:
        args = parser.parse_args(argv)
        return _COMMANDS[args.command](args)
    except FetcherError as exc:
        return _report(exc, verbose=getattr(args, "verbose", False))
    except KeyboardInterrupt:
        print("fetcher: interrupted", file=sys.stderr)
        return EXIT_SIGINT
    except BrokenPipeError:
        # The reader of our output went away (``fetcher ... | head``); the run's work
        # is already saved. Point stdout at /dev/null so the exit flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        print("fetcher: error: output closed early (broken pipe)", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # a bug: one line, exit 70, traceback at -v
        return _report(_internal(exc), verbose=getattr(args, "verbose", False))


def _report(exc: FetcherError, *, verbose: bool) -> int:
    """The one line a fatal error gets on stderr; a bug's traceback too, at ``-v``."""
    print(f"fetcher: error: {exc}", file=sys.stderr)
    if isinstance(exc, InternalError):
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        if verbose:
            traceback.print_exception(cause, file=sys.stderr)
        else:
            print("fetcher: this is a bug; -v shows its traceback", file=sys.stderr)
    return exc.exit_code


def _internal(exc: BaseException) -> InternalError:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    error = InternalError(f"internal error: {type(exc).__name__}{': ' + text if text else ''}")
    error.__cause__ = exc
    return error


def _settings(args: argparse.Namespace) -> Any:
    from .config import load_settings

    flags = {name: getattr(args, name, None) for name in _SETTING_FLAGS}
    labels = {}
    if getattr(args, "state_db", None) is not None:  # search's name for the state setting
        flags["state"], labels["state"] = args.state_db, "--state-db"
    loaded = load_settings(flags, os.environ, getattr(args, "config", None), labels)
    for warning in loaded.warnings:
        print(f"fetcher: warning: {warning}", file=sys.stderr)
    return loaded.settings


def _progress(args: argparse.Namespace) -> Any:
    from .console import BarProgress, LogProgress, setup_logging

    setup_logging(-1 if args.quiet else (1 if args.verbose else 0))
    if args.no_progress or args.quiet or not sys.stderr.isatty():
        return LogProgress()
    return BarProgress()


def _fetch(args: argparse.Namespace) -> int:
    """``fetch``; with ``--json``/``--json-lines``, the summary object even when a fatal
    error stops the run (its ``error`` says which), before the error's line on stderr."""
    from .summary import RunSummary

    summary = RunSummary()
    try:
        return _fetch_into(args, summary)
    except BrokenPipeError:
        raise
    except Exception as exc:
        error = exc if isinstance(exc, FetcherError) else _internal(exc)
        if args.json or args.json_lines:
            _print_summary(args, summary, error.exit_code, error)
        if error is exc:
            raise
        raise error from exc


def _print_summary(
    args: argparse.Namespace, summary: RunSummary, code: int, error: FetcherError | None
) -> None:
    from .jsonlines import write_object

    document = {
        **summary.to_json_streamed(),
        "exit_code": code,
        "error": None if error is None else {"code": error.code, "message": str(error)},
    }
    write_object(sys.stdout, document, one_line=args.json_lines)


def _wait_lock(args: argparse.Namespace) -> float | None:
    """``--wait-lock``'s seconds; a word after it that is not a number is a FILE, as meant.

    ``fetch --wait-lock ids.txt`` waits until the lock is free and reads ``ids.txt``.
    """
    value: str | None = args.wait_lock
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        args.files.insert(0, value)
        return math.inf
    if not seconds >= 0:
        raise UsageError("--wait-lock needs a number of seconds, 0 or more")
    return seconds


def _fetch_into(args: argparse.Namespace, summary: RunSummary) -> int:
    from .console import summary_line
    from .jsonlines import JsonLinesProgress
    from .pipeline import FetchOptions

    if args.json and args.json_lines:
        raise UsageError("--json and --json-lines are two ways to say one thing: pick one")
    wait_lock = _wait_lock(args)
    settings = _settings(args)
    settings.require_api()
    if not (args.files or args.ids or args.pending):
        raise UsageError("nothing to fetch: give FILE, '-' for stdin, --id or --pending")
    sources = _id_sources(args)
    options = FetchOptions(
        dry_run=args.dry_run,
        pending=args.pending,
        retry_failed=args.retry_failed,
        wait_lock=wait_lock,
        lease=args.lease,
    )
    with _progress(args) as shown:
        _warn_if_key_in_clear(settings)
        progress = JsonLinesProgress(shown, sys.stdout) if args.json_lines else shown
        signum = asyncio.run(_fetch_until_signal(settings, sources, options, progress, summary))
    code = summary.exit_code if signum is None else 128 + signum
    if args.json or args.json_lines:
        _print_summary(args, summary, code, None)
    elif not args.quiet or signum is not None:
        print(summary_line(summary))
    return code


def _id_sources(args: argparse.Namespace) -> list[IdSource]:
    """The sources ``_id_flags`` named, each file opened now (a bad one is exit 2 at once)."""
    from .ids import IdSource

    sources = [
        IdSource.from_stream("<stdin>", _own_stdin())
        if name == "-"
        else IdSource.from_path(Path(name))
        for name in args.files
    ]
    if args.ids:
        sources.append(IdSource.from_values("--id", args.ids))
    return sources


def _warn_if_key_in_clear(settings: Settings) -> None:
    """One line when the key is about to cross a network unencrypted (loopback is fine)."""
    from .url import Url

    api = Url.parse(settings.require_api()[0])
    if api.in_clear:
        logging.getLogger("fetcher").warning(
            "warning: the API key goes to %s over plain http://, readable on the way;"
            " use https:// if the gateway offers it",
            api.authority,
        )


async def _fetch_until_signal(
    settings: Settings,
    sources: list[IdSource],
    options: FetchOptions,
    progress: Progress,
    summary: RunSummary,
) -> int | None:
    """Run the fetch into ``summary``; the first SIGINT/SIGTERM winds it down (also while it
    waits for the lock), a second one kills. Returns the signal that stopped it, if any.

    Winding down keeps in-flight downloads for the next run and still reports.
    """
    from .pipeline import fetch

    _, signum = await _until_signal(
        lambda stop: fetch(settings, sources, options, progress, stop=stop, summary=summary),
        "stopping; downloads in flight are kept for the next run",
    )
    return signum


def _own_stdin() -> BinaryIO:
    """Standard input on a file object of our own, for the ID-reading daemon thread.

    At exit the interpreter flushes and closes ``sys.stdin``; if the reader is
    blocked inside it (a generator that has not closed the pipe), that is a fatal
    error. A duplicate descriptor keeps the two apart.
    """
    return os.fdopen(os.dup(sys.stdin.fileno()), "rb")


def _status(args: argparse.Namespace) -> int:
    from .status import archive_status

    settings = _settings(args)
    limit = None if args.all else args.limit
    report = archive_status(settings.archive, limit=limit, settings=settings)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print("\n".join(report.lines()))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .stores import BucketUrl
    from .verify import verify

    settings = _settings(args)
    if args.accept_changed and not args.repair:
        raise UsageError("--accept-changed needs --repair")
    bucket = isinstance(settings.archive, BucketUrl)
    if args.deep and not bucket:
        raise UsageError(
            "--deep is for a bucket archive: a folder's verify always reads every file"
        )

    def work(stop: asyncio.Event) -> Awaitable[Any]:
        if bucket:
            from .bucket_verify import verify_bucket

            return verify_bucket(
                settings.archive,
                repair=args.repair,
                settings=settings,
                deep=args.deep,
                progress=progress,
                accept_changed=args.accept_changed,
                stop=stop,
            )
        return verify(
            settings.archive,
            repair=args.repair,
            settings=settings,
            progress=progress,
            accept_changed=args.accept_changed,
            stop=stop,
        )

    with _progress(args) as progress:
        report, signum = asyncio.run(
            _until_signal(work, "stopping; a download in flight is kept for the next repair")
        )
    code = report.exit_code if signum is None else 128 + signum
    if args.json:
        print(json.dumps({**report.to_json(), "exit_code": code}, indent=2))
    elif report.problems or not args.quiet or signum is not None:
        print("\n".join(report.lines()))
    return code


async def _until_signal(
    work: Callable[[asyncio.Event], Awaitable[_T]], note: str
) -> tuple[_T, int | None]:
    """Run ``work(stop)``; the first SIGINT/SIGTERM sets ``stop`` (and logs ``note``), a
    second one kills. Returns the result and the signal that stopped it, if any."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        logging.getLogger("fetcher").warning("%s: %s", signal.Signals(signum).name, note)
        stop.set()
        loop.remove_signal_handler(signum)  # the next one gets the default: it kills

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        result = await work(stop)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    return result, (received[0] if received else None)


def _enqueue(args: argparse.Namespace) -> int:
    """``enqueue``: each bad line on stderr as it is read, then one summary."""
    from .intake import EnqueueSummary, enqueue

    settings = _settings(args)
    if not (args.files or args.ids):
        raise UsageError("nothing to enqueue: give FILE, '-' for stdin, or --id")
    sources = _id_sources(args)

    def invalid(line: object) -> None:
        print(f"fetcher: {line}", file=sys.stderr)

    summary = EnqueueSummary()
    _, signum = asyncio.run(
        _until_signal(
            lambda stop: enqueue(settings, sources, invalid, stop, summary),
            "stopping; the IDs queued so far stay queued",
        )
    )
    code = summary.exit_code if signum is None else 128 + signum
    if args.json:
        print(json.dumps({**summary.to_json(), "exit_code": code}, indent=2))
    else:
        print(
            f"{summary.queued} queued, {summary.already_known} already known, "
            f"{summary.invalid} invalid in {summary.archive}"
        )
    return code


def _work(args: argparse.Namespace) -> int:
    """``work``: until a signal or ``--idle-exit``; the summary of every pass at the end."""
    from .console import summary_line
    from .jsonlines import JsonLinesProgress
    from .summary import RunSummary
    from .worker import WorkOptions, work

    if args.json and args.json_lines:
        raise UsageError("--json and --json-lines are two ways to say one thing: pick one")
    settings = _settings(args)
    settings.require_api()
    summary = RunSummary()
    options = WorkOptions(idle_exit=args.idle_exit, lease=args.lease)
    try:
        with _progress(args) as shown:
            _warn_if_key_in_clear(settings)
            progress = JsonLinesProgress(shown, sys.stdout) if args.json_lines else shown
            _, signum = asyncio.run(
                _until_signal(
                    lambda stop: work(settings, options, progress, stop, summary),
                    "stopping; downloads in flight are kept for the next run",
                )
            )
    except FetcherError as exc:
        if args.json or args.json_lines:
            _print_summary(args, summary, exc.exit_code, exc)
        raise
    code = summary.exit_code if signum is None else 128 + signum
    if args.json or args.json_lines:
        _print_summary(args, summary, code, None)
    elif not args.quiet or signum is not None:
        print(summary_line(summary))
    return code


def _search(args: argparse.Namespace) -> int:
    """``search``: index an archive that predates the index, then print the matches."""
    import shutil

    from .catalog import Query
    from .jsonlines import compact
    from .models import one_line

    opened, whole, missing = _searched(args)
    query = Query(
        text=" ".join(args.query),
        task_type=args.task_type,
        model=args.model,
        since=args.since,
        until=args.until,
        states=tuple(args.states),
    )
    width = shutil.get_terminal_size().columns
    with opened as catalog:
        if not (whole and catalog.indexed_whole()):
            print(
                f"fetcher: warning: the search index is not built yet ({missing}): "
                "searching row by row",
                file=sys.stderr,
            )
        for card in _cards(catalog, query, args.limit):
            if args.json:
                print(compact(card.to_json()))
            else:
                print(_card_line(card, width, one_line))
    return 0


def _searched(args: argparse.Namespace) -> tuple[Any, bool, str]:
    """The catalog a search reads, whether its index is whole, and why it may not be.

    A PostgreSQL state is read where it is. A folder's index is built first when the
    archive predates it (with a bar). A bucket's state is read here, restored from the
    bucket's snapshot when this host has none; its index is built by the fetch runs
    that write it.
    """
    import contextlib

    from .catalog import reading, reading_state, reading_store
    from .console import IndexBar
    from .index import index_archive
    from .stores import BucketUrl, database_url, open_store, state_here

    settings = _settings(args)
    root = settings.archive
    if database_url(settings) is not None:
        # A PostgreSQL state is indexed from its first migration on: nothing to build.
        return reading_store(open_store(root, settings)), True, ""
    if isinstance(root, BucketUrl):
        return reading_state(state_here(root, settings)), True, "the next fetch builds it"
    with contextlib.closing(IndexBar(shown=not args.json)) as bar:
        whole = index_archive(root, bar)
    reason = "another run holds the lock, or the archive is read-only"
    return reading(root), whole, reason


def _state(args: argparse.Namespace) -> int:
    """``state copy``: copy, then index on the target what an older source never indexed."""
    import contextlib

    from .console import IndexBar
    from .index import build_index, needs_index
    from .state import open_state
    from .state.transfer import StatePlace, copy_state

    source, target = StatePlace.parse(args.source), StatePlace.parse(args.target)
    if str(source) == str(target):
        raise UsageError("SOURCE and TARGET are the same state")
    if source.state_url is None and not source.db_path.is_file():
        raise UsageError(f"no state at {str(source.db_path)!r}")
    if target.state_url is None:
        target.db_path.parent.mkdir(parents=True, exist_ok=True)
    with open_state(source) as read, open_state(target) as written:
        copied = copy_state(read, written, replace=args.replace)
        if needs_index(written):
            with contextlib.closing(IndexBar()) as bar:
                build_index(written, bar)
    counts = f"{copied['tasks']} tasks, {copied['files']} files, {copied['lists']} list files"
    print(f"copied {counts} from {source} to {target}")
    return 0


def _cards(catalog: Any, query: Any, limit: int) -> Any:
    """Up to ``limit`` cards, page by page."""
    from dataclasses import replace

    from .catalog import MAX_LIMIT

    left = limit
    while left > 0:
        page = catalog.find(replace(query, limit=min(left, MAX_LIMIT)))
        yield from page.cards
        left -= len(page.cards)
        if page.next is None:
            return
        query = replace(query, after=page.next)


def _card_line(card: Any, width: int, one_line: Callable[[str], str]) -> str:
    """ID, created, model, folder, then the prompt cut to the terminal's width."""
    created = card.created_at.strftime("%Y-%m-%d %H:%M") if card.created_at else "-"
    model = " ".join(p for p in (card.model, card.model_version) if p) or "-"
    head = f"{card.task_id}  {created}  {model}  {card.folder or '-'}  "
    prompt = one_line(card.prompt or "")
    room = max(width - len(head), 10)
    if len(prompt) > room:
        prompt = prompt[: room - 1] + "…"
    return head + prompt


def _demo(args: argparse.Namespace) -> int:
    from .console import summary_line
    from .demo import run_demo, tree_lines

    if args.serve:
        return _serve_demo()
    with _progress(args) as progress:
        result = run_demo(Path(args.archive) if args.archive else None, progress)
    print(summary_line(result.summary))
    print(
        "(the replica plays one task still running and one refused by moderation,"
        " so those outcomes show too)"
    )
    print()
    print("\n".join(tree_lines(result.archive)))
    if result.sidecar is not None:
        print()
        print(f"{result.sidecar.relative_to(result.archive)}:")
        print(result.sidecar.read_text(encoding="utf-8"), end="")
    print()
    print("Point it at the real gateway:")
    print("  export FETCHER_BASE_URL=https://your-gateway.example FETCHER_API_KEY=...")
    print(f"  {_invocation()} fetch task_ids.txt --archive {shlex.quote(str(result.archive))}")
    print("See it in a browser:")
    print(f"  {_invocation()} serve --archive {shlex.quote(str(result.archive))} --open")
    return 0


def _serve_demo() -> int:
    import time

    from .demo import demo_replica, sample_tasks

    with demo_replica() as replica:
        print("replica of the gateway and file host running; in another shell:")
        print(f"  export FETCHER_BASE_URL={replica.api_url} FETCHER_API_KEY={replica.api_key}")
        sample = shlex.quote(str(sample_tasks()))
        print(f"  {_invocation()} fetch {sample} --archive demo-archive --json")
        print("Ctrl-C stops it.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


def _invocation() -> str:
    """This fetcher as the user can run it again: a venv's script is not on PATH by itself."""
    program = sys.argv[0] if sys.argv else ""
    if Path(program).name == "fetcher":
        return shlex.quote(program)
    return f"{shlex.quote(sys.executable)} -m fetcher"


def _serve(args: argparse.Namespace) -> int:
    """``serve``: the gallery until SIGINT/SIGTERM, which end it cleanly (exit 0)."""
    import webbrowser

    from .gallery import GalleryOptions, serve

    token = _serve_token(args)
    settings = _settings(args)
    options = GalleryOptions(
        archive=settings.archive, host=args.host, port=args.port, token=token, settings=settings
    )

    def ready(url: str) -> None:
        print(f"serving {options.archive} at {url}", flush=True)
        if token is not None:
            print("every request needs the token: open the address once with ?token=<token>,")
            print("or send 'Authorization: Bearer <token>'", flush=True)
        print("Ctrl-C stops it.", flush=True)
        if args.open:
            webbrowser.open(url + (f"?token={token}" if token else ""))

    logging.basicConfig(format="fetcher: %(message)s")
    asyncio.run(_until_signal(lambda stop: serve(options, stop, ready), "stopping the gallery"))
    return 0


def _serve_token(args: argparse.Namespace) -> str | None:
    """``--token``, else ``--token-file``'s first line, else ``FETCHER_SERVE_TOKEN``."""
    from .config import secret_from_file

    if args.token_file is None:
        return args.token or os.environ.get("FETCHER_SERVE_TOKEN") or None
    token, warnings = secret_from_file(args.token_file.expanduser(), "token file", "the token")
    for warning in warnings:
        print(f"fetcher: warning: {warning}", file=sys.stderr)
    return token


_COMMANDS = {
    "fetch": _fetch,
    "status": _status,
    "verify": _verify,
    "search": _search,
    "enqueue": _enqueue,
    "work": _work,
    "demo": _demo,
    "serve": _serve,
    "state": _state,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
