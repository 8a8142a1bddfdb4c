"""What the archive holds, as a reader browses it: search, filters, pages, one task's card.

Read-only: the state is opened with :class:`~fetcher.state.StateDB`'s ``readonly``,
so ``fetcher search`` and the gallery never write, and work on a backup or a
read-only mount. Tasks come newest first (by creation time; a task never
answered, by when it was first seen), a page at a time by keyset: the cursor
is the last card's place in that order, so page 10,000 costs what page 1 does.

Words are matched by the state's FTS5 index (``task_search``, trigram: any run
of three or more characters, in any script); a shorter word is looked for row
by row. A user's text never reaches FTS5's query syntax: each word is quoted.
An archive whose state predates the index (schema 3, read-only) is still
listed and searched, by its stored answers, row by row.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from .archive import Archive
from .errors import CatalogError, UsageError
from .models import format_time, parse_time
from .state import STATES, TEXT_SCHEMA, Holder, Records, StateDB, open_state, opt_text
from .state.schema import POSTGRES_WORDS

#: The most cards one page holds.
MAX_LIMIT = 1000
#: The most words one search takes: each is a condition on every row it may match.
MAX_TERMS = 32
#: Up to this many matches, a search sorts them; past it, it walks the tasks newest first.
FEW_MATCHES = 5000
#: The trigram tokenizer indexes runs of this many characters; shorter words are scanned.
TRIGRAM = 3

_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".avif"})
_VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".webm", ".mkv", ".m4v"})
#: A quoted phrase, or a run of anything but whitespace.
_TERM = re.compile(r'"([^"]*)"|(\S+)')
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
#: The stored answer's fields, for tasks the index does not hold (yet).
_INPUT_PATHS = tuple(
    f"$.input.{name}" for name in ("Prompt", "NegativePrompt", "ModelName", "ModelVersion")
)
_TEXT_COLUMNS = ("prompt", "negative_prompt", "model", "model_version")


@dataclass(frozen=True, slots=True)
class Query:
    """What to list: words to find, filters, and where the previous page ended.

    ``since`` is inclusive and ``until`` exclusive; a time without a zone is UTC.
    ``states`` empty means every state. ``after`` is the previous page's ``next``.
    """

    text: str = ""
    task_type: str | None = None
    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    states: tuple[str, ...] = ()
    limit: int = 50
    after: str | None = None


@dataclass(frozen=True, slots=True)
class CardFile:
    """One output file of a task: where it lies (archive-relative POSIX path) once done."""

    index: int
    path: str | None
    size: int | None
    sha256: str | None
    content_type: str | None
    #: ``image``, ``video`` or ``other``: how a viewer shows it.
    kind: str
    #: ``wanted``, ``done``, ``failed`` or ``expired``.
    state: str


@dataclass(frozen=True, slots=True)
class Card:
    """One task as a reader sees it: its words, times, state and files."""

    task_id: str
    state: str
    task_type: str | None
    created_at: datetime | None
    finished_at: datetime | None
    #: The task's folder, archive-relative; None until its files were recorded.
    folder: str | None
    prompt: str | None
    negative_prompt: str | None
    model: str | None
    model_version: str | None
    reason: str | None
    files: tuple[CardFile, ...]

    def to_json(self) -> dict[str, Any]:
        """The card as ``fetcher search --json`` prints it; its keys are a contract."""
        return {
            "task_id": self.task_id,
            "state": self.state,
            "task_type": self.task_type,
            "created_at": format_time(self.created_at),
            "finished_at": format_time(self.finished_at),
            "folder": self.folder,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "model": self.model,
            "model_version": self.model_version,
            "reason": self.reason,
            "files": [
                {
                    "index": f.index,
                    "path": f.path,
                    "size": f.size,
                    "sha256": f.sha256,
                    "content_type": f.content_type,
                    "kind": f.kind,
                    "state": f.state,
                }
                for f in self.files
            ],
        }


@dataclass(frozen=True, slots=True)
class Page:
    """Cards, newest first; ``next`` is the cursor for the page after, None at the end."""

    cards: tuple[Card, ...]
    next: str | None


@dataclass(frozen=True, slots=True)
class Facets:
    """What the filters can offer: task types and models present, tasks by state."""

    task_types: tuple[str, ...]
    models: tuple[str, ...]
    #: Every state named (zeros too), archived first.
    states: Mapping[str, int]


def file_kind(content_type: str | None, path: str | None) -> str:
    """``image``, ``video`` or ``other``: by the type the host sent, else by the name."""
    major = (content_type or "").split("/", 1)[0].strip().lower()
    if major in ("image", "video"):
        return major
    suffix = PurePosixPath(path or "").suffix.lower()
    if suffix in _IMAGE_SUFFIXES:
        return "image"
    if suffix in _VIDEO_SUFFIXES:
        return "video"
    return "other"


@contextmanager
def reading(root: Path) -> Iterator[Catalog]:
    """The archive at ``root`` opened for reading; a usage error if there is none."""
    archive = Archive(root)
    if not archive.exists():
        raise UsageError(f"no fetcher archive at {str(archive.root)!r}")
    with reading_state(archive.db_path) as catalog:
        yield catalog


@contextmanager
def reading_store(store: Holder) -> Iterator[Catalog]:
    """The state a store names opened for reading: a shared PostgreSQL one, or its file."""
    with open_state(store, readonly=True) as db:
        yield Catalog(db)


@contextmanager
def reading_state(db_path: Path) -> Iterator[Catalog]:
    """The state database at ``db_path`` opened for reading (a bucket's, kept on this machine)."""
    with StateDB(db_path, readonly=True) as db:
        yield Catalog(db)


class Catalog:
    """Queries over one open state database; use it on the thread that opened it."""

    def __init__(self, db: Records) -> None:
        self._db = db
        self._indexed = db.version >= TEXT_SCHEMA
        if self._indexed:
            # A task the index does not hold yet (an archive being indexed) still shows
            # its words, from its stored answer.
            self._text = tuple(
                f"COALESCE(x.{column}, json_extract(t.detail, '{path}'))"
                for column, path in zip(_TEXT_COLUMNS, _INPUT_PATHS, strict=True)
            )
            self._from = "tasks t LEFT JOIN task_text x ON x.task_id = t.task_id"
        else:
            self._text = tuple(f"json_extract(t.detail, '{path}')" for path in _INPUT_PATHS)
            self._from = "tasks t"

    def indexed_whole(self) -> bool:
        """Whether every task's words are in the search index (else searches miss some)."""
        if not self._indexed:
            return False
        row = self._db.query_one("SELECT value FROM meta WHERE key = 'text_index'")
        return row is not None and row[0] == "whole"

    def find(self, query: Query) -> Page:
        """One page of the tasks ``query`` asks for, newest first."""
        if not 1 <= query.limit <= MAX_LIMIT:
            raise CatalogError(f"a page holds 1 to {MAX_LIMIT} tasks, not {query.limit}")
        where, params, source = self._conditions(query)
        sql = (
            f"SELECT {_CARD_COLUMNS}, {', '.join(self._text)}, {_LISTED_T} "  # noqa: S608
            f"FROM {source} WHERE {' AND '.join(where) or 'TRUE'} "
            f"ORDER BY {_LISTED_T} DESC, t.task_id DESC LIMIT ?"
        )
        rows = self._db.query(sql, (*params, query.limit + 1))
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        cards = self._cards(rows)
        last = rows[-1] if more else None
        return Page(cards, None if last is None else _cursor(str(last[-1]), str(last[0])))

    def card(self, task_id: str) -> Card | None:
        """The task ``task_id``, or None when the archive does not know it."""
        sql = f"SELECT {_CARD_COLUMNS}, {', '.join(self._text)}, NULL FROM {self._from} "  # noqa: S608
        rows = self._db.query(sql + "WHERE t.task_id = ?", (task_id,))
        cards = self._cards(rows)
        return cards[0] if cards else None

    def neighbours(self, task_id: str, query: Query) -> tuple[str | None, str | None]:
        """The tasks just newer and just older than ``task_id`` among those ``query`` lists,
        newest first: where a task page's arrows lead, however the page was reached."""
        row = self._db.query_one(
            f"SELECT {_LISTED_T} FROM tasks t WHERE t.task_id = ?",  # noqa: S608
            (task_id,),
        )
        if row is None or row[0] is None:
            return None, None
        listed = str(row[0])
        older = self.find(replace(query, after=_cursor(listed, task_id), limit=1)).cards
        where, params, source = self._conditions(replace(query, after=None))
        where.append(f"{_LISTED_T} >= ? AND ({_LISTED_T} > ? OR t.task_id > ?)")
        params += [listed, listed, task_id]
        newer = self._db.query(
            f"SELECT t.task_id FROM {source} WHERE {' AND '.join(where)} "  # noqa: S608
            f"ORDER BY {_LISTED_T} ASC, t.task_id ASC LIMIT 1",
            params,
        )
        return (str(newer[0][0]) if newer else None), (older[0].task_id if older else None)

    def facets(self) -> Facets:
        """Task types and models present, and how many tasks are in each state."""
        types = self._db.query(_distinct("tasks", "task_type"))
        models = self._db.query(
            _distinct("task_text", "model")
            if self._indexed
            else f"SELECT DISTINCT {self._text[2]} AS model FROM tasks t "  # noqa: S608
            "WHERE model IS NOT NULL ORDER BY 1"
        )
        return Facets(
            tuple(str(r[0]) for r in types),
            tuple(str(r[0]) for r in models),
            self._db.counts(),
        )

    def _conditions(self, query: Query) -> tuple[list[str], list[object], str]:
        """The WHERE conditions and their parameters, and the FROM clause they apply to."""
        where: list[str] = []
        params: list[object] = []
        if query.task_type is not None:
            where.append("t.task_type = ?")
            params.append(query.task_type)
        if query.model is not None:
            # Unary plus: walk the newest-first index and keep this model's tasks, rather
            # than take all of them by the model's index and sort them for each page.
            where.append(("+x.model" if self._indexed else self._text[2]) + " = ?")
            params.append(query.model)
        if query.states:
            unknown = sorted(set(query.states) - set(STATES))
            if unknown:
                raise CatalogError(f"no such state {unknown[0]!r}: one of {', '.join(STATES)}")
            where.append(f"t.state IN ({','.join('?' * len(query.states))})")
            params += query.states
        if query.since is not None:
            where.append(f"{_LISTED_T} >= ?")
            params.append(format_time(_utc(query.since)))
        if query.until is not None:
            where.append(f"{_LISTED_T} < ?")
            params.append(format_time(_utc(query.until)))
        if query.after is not None:
            # Spelt out, not as a row value: this form is a range over the indexes.
            listed, task_id = _uncursor(query.after)
            where.append(f"{_LISTED_T} <= ? AND ({_LISTED_T} < ? OR t.task_id < ?)")
            params += [listed, listed, task_id]
        source = self._match(terms(query.text), where, params)
        return where, params, source

    def _match(self, words: Sequence[str], where: list[str], params: list[object]) -> str:
        """Every word must be found in the task's ID or words (ANDed conditions).

        Returns the FROM clause. Few matches (a rare word, or none): the index's
        matches are taken and sorted, rather than walking every task newest first
        looking for them (145 ms for no match over 100,000 tasks). Many: the walk
        finds a page of them in its first rows, where sorting them all would not.
        """
        source = self._from
        if self._db.dialect == "postgresql":
            # pg_trgm's GIN index answers LIKE on the words as FTS5's trigrams do; the
            # planner weighs few matches against walking the newest-first index itself.
            for word in words:
                where.append(f"{POSTGRES_WORDS} LIKE ?")
                params.append("%" + _like_escaped(word.lower()) + "%")
            return source
        indexed = [w for w in words if self._indexed and len(w) >= TRIGRAM]
        if indexed:
            match = " ".join(_fts_string(w) for w in indexed)
            if self._matches_at_most(match, FEW_MATCHES):
                source = (
                    "task_search s CROSS JOIN task_text x ON x.id = s.rowid "
                    "CROSS JOIN tasks t ON t.task_id = x.task_id"
                )
                where.append("task_search MATCH ?")
            else:
                where.append("x.id IN (SELECT rowid FROM task_search WHERE task_search MATCH ?)")
            params.append(match)
        for word in words:
            if word in indexed:
                continue
            columns = ("t.task_id", *self._text)
            where.append("(" + " OR ".join(f"instr(lower({c}), lower(?))" for c in columns) + ")")
            params += [word] * len(columns)
        return source

    def _matches_at_most(self, match: str, count: int) -> bool:
        """Whether the index holds ``count`` matches or fewer (it counts no further)."""
        row = self._db.query_one(
            "SELECT COUNT(*) FROM (SELECT rowid FROM task_search WHERE task_search MATCH ? "
            "LIMIT ?)",
            (match, count + 1),
        )
        return row is not None and int(str(row[0])) <= count

    def _cards(self, rows: Sequence[tuple[object, ...]]) -> tuple[Card, ...]:
        ids = [str(r[0]) for r in rows]
        files: dict[str, list[CardFile]] = {task_id: [] for task_id in ids}
        if ids:
            for r in self._db.query(
                "SELECT task_id, idx, path, size, sha256, content_type, state FROM files "
                "WHERE task_id IN (SELECT value FROM json_each(?)) ORDER BY task_id, idx",
                (json.dumps(ids),),
            ):
                path, ctype = opt_text(r[2]), opt_text(r[5])
                files[str(r[0])].append(
                    CardFile(
                        index=int(str(r[1])),
                        path=path,
                        size=None if r[3] is None else int(str(r[3])),
                        sha256=opt_text(r[4]),
                        content_type=ctype,
                        kind=file_kind(ctype, path),
                        state=str(r[6]),
                    )
                )
        return tuple(_card(r, tuple(files[str(r[0])])) for r in rows)


#: Columns of ``tasks t`` a card is made of, in :func:`_card`'s order; its words follow.
_CARD_COLUMNS = "t.task_id, t.state, t.task_type, t.created_at, t.finished_at, t.dir, t.reason"
#: The time a task is listed by, as migration 4's indexes hold it: made, else first seen.
_LISTED_T = "COALESCE(t.created_at, t.first_seen)"


def _distinct(table: str, column: str) -> str:
    """The column's values, each once, in order: one index lookup per value (a few), not a
    walk over every row (35 ms over 100,000 tasks, for three task types and models)."""
    return (
        f"WITH RECURSIVE seen (value) AS (SELECT MIN({column}) FROM {table} "  # noqa: S608
        f"UNION ALL SELECT (SELECT MIN({column}) FROM {table} WHERE {column} > seen.value) "
        "FROM seen WHERE seen.value IS NOT NULL) SELECT value FROM seen WHERE value IS NOT NULL"
    )


def _card(row: tuple[object, ...], files: tuple[CardFile, ...]) -> Card:
    task_id, state, task_type, created, finished, folder, reason = row[:7]
    prompt, negative, model, version = (_text(v) for v in row[7:11])
    return Card(
        task_id=str(task_id),
        state=str(state),
        task_type=opt_text(task_type),
        created_at=parse_time(created),
        finished_at=parse_time(finished),
        folder=opt_text(folder),
        prompt=prompt,
        negative_prompt=negative,
        model=model,
        model_version=version,
        reason=opt_text(reason),
        files=files,
    )


def _text(value: object) -> str | None:
    """A stored answer's field as text: an Input value that is not a string is none."""
    return value if isinstance(value, str) and value else None


def terms(text: str) -> list[str]:
    """The words a user's text asks for: ``"a quoted phrase"`` is one; duplicates once.

    Control characters and lone surrogates (neither can be stored or searched)
    become spaces; at most :data:`MAX_TERMS` words, else a :class:`CatalogError`.
    """
    clean = "".join(c if c.isprintable() else " " for c in _LONE_SURROGATE.sub(" ", text))
    found: dict[str, None] = {}
    for match in _TERM.finditer(clean):
        quoted, bare = match.groups()
        word = " ".join((quoted if quoted is not None else bare.strip('"')).split())
        if word:
            found[word] = None
    if len(found) > MAX_TERMS:
        raise CatalogError(f"a search takes at most {MAX_TERMS} words, not {len(found)}")
    return list(found)


def _like_escaped(word: str) -> str:
    """``word`` for a LIKE pattern: its ``%``, ``_`` and ``\\`` match only themselves."""
    return word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _fts_string(word: str) -> str:
    """``word`` as an FTS5 string: quoted, so nothing in it is query syntax."""
    return '"' + word.replace('"', '""') + '"'


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _cursor(listed_at: str, task_id: str) -> str:
    """The place after which the next page starts, as an opaque URL-safe word."""
    raw = json.dumps([listed_at, task_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _uncursor(cursor: str) -> tuple[str, str]:
    bad = CatalogError("bad page cursor: start again from the first page")
    if len(cursor) > 2048 or not cursor.isascii():
        raise bad
    try:
        place = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error) as exc:
        raise bad from exc
    if not (isinstance(place, list) and len(place) == 2 and all(isinstance(p, str) for p in place)):
        raise bad
    return place[0], place[1]
