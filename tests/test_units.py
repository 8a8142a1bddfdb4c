"""Pure-logic tests: task IDs, layout, response parsing, settings, retry, archive paths, state.

Nothing here touches the network; the end-to-end pipeline lives in test_fetch.py
and the command line in test_cli.py.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import re
import unicodedata
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fetcher.archive import Archive
from fetcher.config import SETTING_NAMES, Settings, load_settings
from fetcher.console import summary_line
from fetcher.dedup import FirstSight
from fetcher.download import extension_for
from fetcher.errors import (
    ArchiveError,
    ConfigError,
    DownloadError,
    FetcherError,
    FileExpired,
    InputError,
    IntegrityError,
    QueryError,
    ResponseError,
    TaskError,
    TaskNotFound,
    UsageError,
)
from fetcher.ids import MAX_ID_LENGTH, IdSource, InvalidId, Mark, id_problem, iter_entries
from fetcher.layout import DEFAULT_LAYOUT, MAX_SEGMENT_BYTES, Layout, LayoutFields, safe_segment
from fetcher.models import ApiErrorCode, Task, TaskState, parse_task, parse_time
from fetcher.retry import RetryPolicy, parse_retry_after
from fetcher.state import StateDB
from fetcher.summary import Outcome, RunSummary, TaskOutcome

TID = "1392336703-AigcImageTask-47965947a83db42af4b1e3a74c243531t"
HASHED_SEGMENT = re.compile(r"~[0-9a-f]{16}$")

# ====================================================================================
# ids
# ====================================================================================


def entries(data: bytes, name: str = "ids.txt") -> list[str | InvalidId]:
    return list(iter_entries([IdSource.from_stream(name, io.BytesIO(data))]))


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(TID, id="real-format"),
        pytest.param("a", id="one-char"),
        pytest.param("A-b_c.9", id="all-classes"),
        pytest.param("x" * MAX_ID_LENGTH, id="256-chars"),
        pytest.param("...", id="three-dots"),
    ],
)
def test_id_problem_accepts_valid_ids(text: str) -> None:
    """Letters, digits, '-', '_' and '.' up to 256 characters are a valid task ID."""
    assert id_problem(text) is None


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("x" * (MAX_ID_LENGTH + 1), id="257-chars"),
        pytest.param(".", id="dot"),
        pytest.param("..", id="dotdot"),
        pytest.param("a/b", id="slash"),
        pytest.param("../etc", id="traversal"),
        pytest.param("a b", id="space-inside"),
        pytest.param("a\x00b", id="nul"),
        pytest.param("a\tb", id="tab"),
        pytest.param("abc\n", id="trailing-newline"),
        pytest.param("tâche", id="non-ascii-letter"),
        pytest.param("\uff11\uff12\uff13", id="fullwidth-digits"),
        pytest.param("a\\b", id="backslash"),
    ],
)
def test_id_problem_rejects_invalid_ids(text: str) -> None:
    """Anything else gets a reason string."""
    problem = id_problem(text)
    assert isinstance(problem, str)
    assert problem


def test_iter_entries_skips_blanks_and_comments_and_strips() -> None:
    """Blank lines and '#' comments are skipped; surrounding whitespace is stripped."""
    data = b"# header\n\n  abc  \n\t\n   # indented comment\ndef\t\n"
    assert entries(data) == ["abc", "def"]


def test_iter_entries_handles_crlf_and_bom() -> None:
    """A Windows file (UTF-8 BOM, CRLF endings) yields the same IDs as a Unix one."""
    data = "\ufeffabc\r\ndef\r\n\r\nghi".encode()
    assert entries(data) == ["abc", "def", "ghi"]


def test_iter_entries_reports_invalid_lines_with_line_numbers() -> None:
    """Invalid lines become InvalidId with the source name and the 1-based line number."""
    data = b"# c\nok1\n\nbad id\nok2\na/b\n"
    got = entries(data, name="list.txt")
    assert got[0] == "ok1"
    assert got[2] == "ok2"
    bad = [e for e in got if isinstance(e, InvalidId)]
    assert [(b.source, b.line, b.text) for b in bad] == [
        ("list.txt", 4, "bad id"),
        ("list.txt", 6, "a/b"),
    ]
    assert all(b.reason for b in bad)
    assert str(bad[0]).startswith("list.txt:4: invalid task ID")


def test_iter_entries_line_numbers_count_crlf_and_bom_lines() -> None:
    """Line numbers stay right in a CRLF file with a BOM."""
    data = "\ufeffok\r\n\r\nnot ok\r\n".encode()
    got = entries(data)
    assert got[0] == "ok"
    assert isinstance(got[1], InvalidId)
    assert got[1].line == 3


def test_iter_entries_reports_undecodable_bytes_as_invalid_line() -> None:
    """Invalid UTF-8 is one invalid line, not an exception, and later lines still come."""
    got = entries(b"abc\n\xff\xfeid\nxyz\n")
    assert got[0] == "abc"
    assert got[2] == "xyz"
    bad = got[1]
    assert isinstance(bad, InvalidId)
    assert bad.line == 2


def test_iter_entries_reads_several_sources_in_order() -> None:
    """Entries come source by source; line numbers restart for each source."""
    got = list(
        iter_entries(
            [
                IdSource.from_stream("a", io.BytesIO(b"one\nbad id\n")),
                IdSource.from_values("flag", ["two"]),
                IdSource.from_stream("b", io.BytesIO(b"bad id\n")),
            ]
        )
    )
    assert got[0] == "one"
    assert got[2] == "two"
    assert isinstance(got[1], InvalidId)
    assert isinstance(got[3], InvalidId)
    assert (got[1].source, got[1].line) == ("a", 2)
    assert (got[3].source, got[3].line) == ("b", 1)


def test_from_values_reports_empty_value_as_invalid() -> None:
    """A value given as a flag is always an ID, so an empty one is reported, not skipped."""
    got = list(iter_entries([IdSource.from_values("--id", ["abc", "", "  ", "# x"])]))
    assert got[0] == "abc"
    assert [type(e) for e in got] == [str, InvalidId, InvalidId, InvalidId]
    assert [e.line for e in got[1:] if isinstance(e, InvalidId)] == [2, 3, 4]


def test_from_path_on_missing_file_raises_input_error(tmp_path: Path) -> None:
    """A task-ID file that cannot be opened is a usage error (exit 2) before any work."""
    missing = tmp_path / "nope.txt"
    with pytest.raises(InputError, match=r"nope\.txt") as caught:
        IdSource.from_path(missing)
    assert caught.value.exit_code == 2


def test_from_path_reads_and_closes_the_file(tmp_path: Path) -> None:
    """A readable file yields its IDs and is closed once read to the end."""
    path = tmp_path / "ids.txt"
    path.write_bytes(b"abc\ndef\n")
    source = IdSource.from_path(path)
    assert [e for e in iter_entries([source]) if not isinstance(e, Mark)] == ["abc", "def"]
    assert source.stream is not None
    assert source.stream.closed


_NO_NEWLINES = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=30
)


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(_NO_NEWLINES, max_size=12), crlf=st.booleans(), final_newline=st.booleans())
def test_iter_entries_matches_line_model(lines: list[str], crlf: bool, final_newline: bool) -> None:
    """For any text, each non-blank, non-comment line is a valid ID or an InvalidId at its line."""
    sep = "\r\n" if crlf else "\n"
    data = (sep.join(lines) + (sep if final_newline and lines else "")).encode()
    expected: list[tuple[str, int, str]] = []
    for number, line in enumerate(lines, start=1):
        text = line.removeprefix("\ufeff") if number == 1 else line
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        expected.append(("ok" if id_problem(text) is None else "bad", number, text))
    got = entries(data)
    assert len(got) == len(expected)
    for entry, (kind, number, text) in zip(got, expected, strict=True):
        if kind == "ok":
            assert entry == text
            assert id_problem(text) is None
        else:
            assert isinstance(entry, InvalidId)
            assert (entry.line, entry.text) == (number, text)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_iter_entries_never_raises_on_bytes(data: bytes) -> None:
    """Arbitrary bytes yield only IDs and InvalidId entries; only a UTF-16 BOM is refused whole."""
    try:
        found = entries(data)
    except InputError:
        assert data[:2] in (b"\xff\xfe", b"\xfe\xff")
        return
    for entry in found:
        if isinstance(entry, InvalidId):
            assert entry.line >= 1
            assert entry.reason
        else:
            assert id_problem(entry) is None


# ====================================================================================
# layout
# ====================================================================================

CREATED = datetime(2025, 12, 29, 12, 3, 30, tzinfo=UTC)


def fields(**changes: Any) -> LayoutFields:
    base: dict[str, Any] = {
        "task_id": "abc",
        "task_type": "AigcImageTask",
        "model_name": "GEM",
        "model_version": "2.5",
        "created": CREATED,
        "finished": CREATED + timedelta(seconds=13),
    }
    base.update(changes)
    return LayoutFields(**base)


def assert_safe_path(path: PurePosixPath) -> None:
    assert not path.is_absolute()
    assert path.parts
    for part in path.parts:
        assert part not in ("", ".", "..")
        assert not part.startswith(".")
        assert "/" not in part
        assert "\\" not in part
        assert part == part.strip()
        assert len(part.encode("utf-8")) <= MAX_SEGMENT_BYTES
        assert not any(unicodedata.category(c) == "Cc" for c in part), part


def test_default_layout_renders_type_date_and_id() -> None:
    """The default layout is <task_type>/<YYYY>/<MM>/<DD>/<task_id>."""
    path = Layout(DEFAULT_LAYOUT).render(fields(task_id=TID))
    assert path == PurePosixPath(f"AigcImageTask/2025/12/29/{TID}")


def test_layout_uses_unknown_for_missing_values() -> None:
    """A missing model name or date renders as 'unknown' rather than an empty segment."""
    layout = Layout("{model_name}/{created:%Y}/{task_id}")
    path = layout.render(fields(model_name=None, created=None))
    assert path == PurePosixPath("unknown/unknown/abc")


def test_layout_formats_all_fields() -> None:
    """Every documented field can be used, dates with strftime specs."""
    layout = Layout("{model_name}-{model_version}/{finished:%H%M%S}/{task_type}_{task_id}")
    assert layout.render(fields()) == PurePosixPath("GEM-2.5/120343/AigcImageTask_abc")


@pytest.mark.parametrize(
    "template",
    [
        pytest.param("{nope}/{task_id}", id="unknown-field"),
        pytest.param("{task_id.__class__}", id="attribute"),
        pytest.param("{task_id[0]}", id="index"),
        pytest.param("{task_id!r}", id="conversion-r"),
        pytest.param("{task_id!s}", id="conversion-s"),
        pytest.param("{task_type}/{created:%Y}", id="missing-task-id"),
        pytest.param("{}", id="positional"),
        pytest.param("{0}", id="numbered"),
        pytest.param("{task_id", id="unbalanced"),
        pytest.param("{task_id:{task_type}}", id="nested-spec"),
        pytest.param("{task_id:d}", id="bad-spec-on-id"),
        pytest.param("{model_name:d}/{task_id}", id="bad-spec-on-optional-field"),
        pytest.param("{model_version:=10}/{task_id}", id="numeric-spec-on-optional-text"),
    ],
)
def test_invalid_layout_is_a_usage_error(template: str) -> None:
    """A template that cannot render every task is refused up front with UsageError."""
    with pytest.raises(UsageError):
        Layout(template)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("a/b", id="slash"),
        pytest.param("../../etc", id="traversal"),
        pytest.param("..", id="dotdot"),
        pytest.param(".", id="dot"),
        pytest.param("/abs", id="absolute"),
        pytest.param("a\\b", id="backslash"),
        pytest.param("..\\..\\x", id="backslash-traversal"),
        pytest.param("a\x00b", id="nul"),
        pytest.param("a\nb\rc\x1b[0m", id="control"),
        pytest.param("a\x85b", id="c1-control"),
        pytest.param(".hidden", id="leading-dot"),
        pytest.param(" .hidden ", id="spaced-leading-dot"),
        pytest.param(".fetcher", id="meta-dir-name"),
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
    ],
)
@pytest.mark.parametrize("field", ["task_id", "task_type", "model_name", "model_version"])
def test_hostile_values_never_add_segments_or_hide(value: str, field: str) -> None:
    """A field value cannot create extra segments, climb out, or make a hidden name."""
    layout = Layout("{task_type}/{model_name}/{model_version}/{task_id}")
    path = layout.render(fields(**{field: value}))
    assert_safe_path(path)
    order = ["task_type", "model_name", "model_version", "task_id"]
    benign = {"task_type": "AigcImageTask", "model_name": "GEM", "model_version": "2.5"}
    benign["task_id"] = "abc"
    if value.strip():
        assert len(path.parts) == 4
        for index, name in enumerate(order):
            if name != field:
                assert path.parts[index] == benign[name]
    else:
        # An empty value drops its segment; it never adds one.
        assert path.parts == tuple(benign[name] for name in order if name != field)


def test_long_task_id_is_cut_with_hash_suffix() -> None:
    """A 256-character task ID gives a segment of at most 255 bytes ending in ~<16 hex>."""
    long_id = "a" * MAX_ID_LENGTH
    segment = Layout(DEFAULT_LAYOUT).render(fields(task_id=long_id)).name
    assert len(segment.encode()) <= MAX_SEGMENT_BYTES
    assert HASHED_SEGMENT.search(segment)
    assert segment.startswith("a" * 200)


def test_long_ids_differing_at_the_end_stay_distinct() -> None:
    """Two long IDs that differ only after the cut still get different folders."""
    layout = Layout(DEFAULT_LAYOUT)
    one = layout.render(fields(task_id="a" * 255 + "b"))
    two = layout.render(fields(task_id="a" * 255 + "c"))
    assert one != two
    assert one.parent == two.parent


def test_long_multibyte_value_is_cut_on_a_character_boundary() -> None:
    """Cutting a multi-byte value never leaves half a character."""
    segment = safe_segment("é" * 300)
    assert len(segment.encode("utf-8")) <= MAX_SEGMENT_BYTES
    assert HASHED_SEGMENT.search(segment)
    assert set(segment[:-17]) == {"é"}


def test_short_segment_passes_through_unchanged() -> None:
    """A plain, short segment is left exactly as it is (exactly 255 bytes included)."""
    assert safe_segment(TID) == TID
    assert safe_segment("b" * MAX_SEGMENT_BYTES) == "b" * MAX_SEGMENT_BYTES


_TEMPLATES = [
    DEFAULT_LAYOUT,
    "by-model/{model_name}/{model_version}/{task_id}",
    "x/{task_type}-{task_id}",
    "{finished:%Y-%m}/{model_name}_{task_id}",
]
_HOSTILE_TEXT = st.lists(
    st.one_of(
        st.sampled_from(
            ["/", ".", "..", "\\", "\x00", "\n", " ", "\x85", "é", "~", "a" * 120, "語" * 60]
        ),
        st.characters(blacklist_categories=("Cs",)),
    ),
    max_size=60,
).map("".join)
_OPT_DATES = st.none() | st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)


@pytest.fixture(scope="module")
def fixed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("layout-root").resolve()


@settings(max_examples=200, deadline=None)
@given(
    template=st.sampled_from(_TEMPLATES),
    task_id=_HOSTILE_TEXT,
    task_type=_HOSTILE_TEXT,
    model_name=st.none() | _HOSTILE_TEXT,
    model_version=st.none() | _HOSTILE_TEXT,
    created=_OPT_DATES,
    finished=_OPT_DATES,
)
def test_rendered_path_always_stays_inside_root(
    fixed_root: Path,
    template: str,
    task_id: str,
    task_type: str,
    model_name: str | None,
    model_version: str | None,
    created: datetime | None,
    finished: datetime | None,
) -> None:
    """Whatever the API returns, the path is relative, clean, short per segment and inside root."""
    values = LayoutFields(task_id, task_type, model_name, model_version, created, finished)
    path = Layout(template).render(values)
    assert_safe_path(path)
    assert len(path.parts) <= template.count("/") + 1
    resolved = (fixed_root / path).resolve()
    assert fixed_root in resolved.parents


@settings(max_examples=150, deadline=None)
@given(text=_HOSTILE_TEXT)
def test_safe_segment_is_one_clean_segment(text: str) -> None:
    """safe_segment always returns one non-hidden name of at most 255 bytes."""
    segment = safe_segment(text)
    assert_safe_path(PurePosixPath(segment))
    assert PurePosixPath(segment).name == segment


# ====================================================================================
# models
# ====================================================================================

DOCUMENTED_EXAMPLE = (
    b"{\r\n"
    b'    "Response": {\r\n'
    b'        "Status": "FINISH",\r\n'
    b'        "TaskType": "AigcImageTask",\r\n'
    b'        "RequestId": "12082802-fe37-410e-ae20-0cf14e91e018",\r\n'
    b'        "CreateTime": "2025-12-29T12:03:30Z",\r\n'
    b'        "FinishTime": "2025-12-29T12:03:43Z",\r\n'
    b'        "AigcImageTask": {\r\n'
    b'            "Input": {\r\n'
    b'                "Prompt": "pig",\r\n'
    b'                "ModelName": "GEM",\r\n'
    b'                "ModelVersion": "2.5",\r\n'
    b'                "OutputConfig": {\r\n'
    b'                    "StorageMode": "Temporary"\r\n'
    b"                },\r\n"
    b'                "EnhancePrompt": "Enabled",\r\n'
    b'                "NegativePrompt": "blur, distorted"\r\n'
    b"            },\r\n"
    b'            "Output": {\r\n'
    b'                "FileInfos": [\r\n'
    b"                    {\r\n"
    b'                        "FileUrl": "http://251000800.vod2.myqcloud.com/1a168d62vodcq251000800'
    b'/ef0aa3215145403710877804273/aigcImageGenFile.png",\r\n'
    b'                        "ExpireTime": "2026-01-05T12:03:57Z",\r\n'
    b'                        "StorageMode": "Temporary"\r\n'
    b"                    }\r\n"
    b"                ]\r\n"
    b"            },\r\n"
    b'            "Status": "FINISH",\r\n'
    b'            "TaskId": "1392336703-AigcImageTask-47965947a83db42af4b1e3a74c243531t",\r\n'
    b'            "Progress": 100\r\n'
    b"        },\r\n"
    b'        "BeginProcessTime": "2025-12-29T12:03:30Z"\r\n'
    b"    }\r\n"
    b"}"
)

EXAMPLE_URL = (
    "http://251000800.vod2.myqcloud.com/1a168d62vodcq251000800/"
    "ef0aa3215145403710877804273/aigcImageGenFile.png"
)


def body(
    task_obj: dict[str, Any],
    *,
    task_type: str = "AigcImageTask",
    status: str = "FINISH",
    **top: Any,
) -> bytes:
    response: dict[str, Any] = {
        "TaskType": task_type,
        "Status": status,
        "CreateTime": "2025-12-29T12:03:30Z",
        "FinishTime": "2025-12-29T12:03:43Z",
        "RequestId": "r-1",
        task_type: task_obj,
    }
    response.update(top)
    return json.dumps({"Response": response}).encode()


def file_entry(url: str = "http://h.example/a.png", **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "FileUrl": url,
        "ExpireTime": "2026-01-05T12:03:57Z",
        "StorageMode": "Temporary",
    }
    entry.update(extra)
    return entry


def finished_obj(*entries: dict[str, Any], key: str = "FileInfos") -> dict[str, Any]:
    return {
        "TaskId": TID,
        "Status": "FINISH",
        "Progress": 100,
        "ErrCode": 0,
        "ErrCodeExt": "",
        "Message": "",
        "Input": {"Prompt": "pig", "ModelName": "GEM", "ModelVersion": "2.5"},
        "Output": {key: list(entries)},
    }


def error_body(code: str, message: str = "something") -> bytes:
    return json.dumps(
        {"Response": {"Error": {"Code": code, "Message": message}, "RequestId": "r"}}
    ).encode()


def test_parse_task_documented_example() -> None:
    """The API's own documented example is a finished task with one file."""
    task = parse_task(TID, DOCUMENTED_EXAMPLE)
    assert task.state is TaskState.FINISHED
    assert task.task_type == "AigcImageTask"
    assert task.status == "FINISH"
    assert task.created == datetime(2025, 12, 29, 12, 3, 30, tzinfo=UTC)
    assert task.finished == datetime(2025, 12, 29, 12, 3, 43, tzinfo=UTC)
    assert task.prompt == "pig"
    assert task.negative_prompt == "blur, distorted"
    assert (task.model_name, task.model_version) == ("GEM", "2.5")
    assert task.failure is None
    assert len(task.files) == 1
    (remote,) = task.files
    assert remote.index == 0
    assert remote.url == EXAMPLE_URL
    assert remote.expire_time == datetime(2026, 1, 5, 12, 3, 57, tzinfo=UTC)
    assert remote.md5 is None


def test_parse_task_processing_with_sentinel_times_is_pending() -> None:
    """A running task is PENDING, and the sentinel times read as 'no time'."""
    task_obj = {
        "TaskId": TID,
        "Status": "PROCESSING",
        "Progress": 40,
        "Output": {"FileInfos": []},
    }
    raw = body(
        task_obj,
        status="PROCESSING",
        FinishTime="0001-01-01T00:00:00Z",
        CreateTime="0000-00-00T00:00:00Z",
    )
    task = parse_task(TID, raw)
    assert task.state is TaskState.PENDING
    assert task.finished is None
    assert task.created is None
    assert task.files == ()
    assert task.status == "PROCESSING"


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("0001-01-01T00:00:00Z", id="zero-year-one"),
        pytest.param("0000-00-00T00:00:00Z", id="zero-date"),
        pytest.param("", id="empty"),
        pytest.param(None, id="null"),
        pytest.param(12345, id="number"),
        pytest.param("yesterday", id="garbage"),
        pytest.param("9999-12-31T23:59:59-01:00", id="overflows-after-utc-conversion"),
    ],
)
def test_parse_time_reads_sentinels_and_garbage_as_none(value: object) -> None:
    """Sentinel, empty, non-string and out-of-range times mean 'no time', never an exception."""
    assert parse_time(value) is None


def test_parse_time_converts_to_utc() -> None:
    """An offset time is converted to UTC; a naive one is taken as UTC."""
    assert parse_time("2025-12-29T20:03:30+08:00") == CREATED
    assert parse_time("2025-12-29T12:03:30") == CREATED


def test_parse_task_pending_expire_sentinel_on_file() -> None:
    """A file entry's ExpireTime sentinel parses as None."""
    raw = body(finished_obj(file_entry(ExpireTime="0000-00-00T00:00:00Z")))
    (remote,) = parse_task(TID, raw).files
    assert remote.expire_time is None


def test_parse_task_failure_inside_finish() -> None:
    """FINISH with a non-zero ErrCode is FAILED, the reason naming code, ext and message."""
    task_obj = finished_obj()
    task_obj.update(
        ErrCode=70000,
        ErrCodeExt="ContentModerationFailed",
        Message="The image may contain sensitive content",
    )
    task = parse_task(TID, body(task_obj))
    assert task.state is TaskState.FAILED
    assert task.failure is not None
    assert "70000" in task.failure
    assert "ContentModerationFailed" in task.failure
    assert "sensitive content" in task.failure
    assert task.files == ()


def test_parse_task_inner_status_fail() -> None:
    """An inner Status FAIL without an ErrCode is still FAILED."""
    task_obj = finished_obj()
    task_obj.update(Status="FAIL", ErrCode=0, Message="model error")
    task = parse_task(TID, body(task_obj))
    assert task.state is TaskState.FAILED
    assert task.failure is not None
    assert "model error" in task.failure


def test_parse_task_aborted() -> None:
    """A top-level ABORTED task is FAILED and says so."""
    task_obj = {"TaskId": TID, "Status": "ABORTED", "Output": {}}
    task = parse_task(TID, body(task_obj, status="ABORTED"))
    assert task.state is TaskState.FAILED
    assert task.failure is not None
    assert "abort" in task.failure.lower()


def test_parse_task_finish_without_files_is_failed() -> None:
    """FINISH with no output files and no error is FAILED, not silently 'archived'."""
    task = parse_task(TID, body(finished_obj()))
    assert task.state is TaskState.FAILED
    assert task.failure


def test_parse_task_redraw_single_file_info() -> None:
    """AigcVideoRedrawTask keeps its one output in Output.FileInfo, an object."""
    task_obj = finished_obj()
    task_obj["Output"] = {"FileInfo": file_entry("http://h.example/redraw.mp4")}
    task = parse_task(TID, body(task_obj, task_type="AigcVideoRedrawTask"))
    assert task.state is TaskState.FINISHED
    assert task.task_type == "AigcVideoRedrawTask"
    assert [f.url for f in task.files] == ["http://h.example/redraw.mp4"]


def test_parse_task_audio_and_video_infos() -> None:
    """AigcAudioTask lists outputs in AudioInfos and VideoInfos; all are kept, indexed."""
    task_obj = finished_obj()
    task_obj["Output"] = {
        "AudioInfos": [file_entry("http://h.example/a.mp3")],
        "VideoInfos": [file_entry("http://h.example/v.mp4")],
    }
    task = parse_task(TID, body(task_obj, task_type="AigcAudioTask"))
    assert task.state is TaskState.FINISHED
    assert sorted(f.url for f in task.files) == ["http://h.example/a.mp3", "http://h.example/v.mp4"]
    assert [f.index for f in task.files] == [0, 1]


def test_parse_task_tolerates_unknown_fields() -> None:
    """Undocumented keys anywhere (top, task, file, metadata) are ignored."""
    entry = file_entry(
        NewThing={"x": [1, 2]},
        MetaData={"Size": 1234, "Width": 10, "Codec": "h265", "Md5": ""},
        UsageType="Output",
    )
    task_obj = finished_obj(entry)
    task_obj.update(SessionContext="s", Mystery=[None, True], Progress="100")
    task_obj["Output"]["Usage"] = {"Tokens": 9}
    raw = body(
        task_obj,
        Extra={"a": 1},
        AigcVideoTask=None,
        SomethingTask=None,
        BeginProcessTime="2025-12-29T12:03:30Z",
    )
    task = parse_task(TID, raw)
    assert task.state is TaskState.FINISHED
    (remote,) = task.files
    assert remote.size == 1234
    assert remote.md5 is None


def test_parse_task_finds_task_object_without_task_type() -> None:
    """Without TaskType the first '*Task' object is used."""
    raw = json.dumps(
        {"Response": {"Status": "FINISH", "AigcVideoTask": finished_obj(file_entry())}}
    ).encode()
    task = parse_task(TID, raw)
    assert task.task_type == "AigcVideoTask"
    assert task.state is TaskState.FINISHED


@pytest.mark.parametrize(
    "code",
    [
        pytest.param("InvalidParameterValue.TaskId", id="invalid-task-id"),
        pytest.param("ResourceNotFound", id="resource-not-found"),
        pytest.param("ResourceNotFound.Task", id="resource-not-found-sub"),
    ],
)
def test_error_not_found_codes_raise_task_not_found(code: str) -> None:
    """Tencent 'no such task' errors are TaskNotFound, final, carrying the task ID."""
    with pytest.raises(TaskNotFound) as caught:
        parse_task(TID, error_body(code, "task does not exist"))
    assert caught.value.final is True
    assert caught.value.task_id == TID
    assert code in str(caught.value)


@pytest.mark.parametrize(
    ("code", "retryable", "auth"),
    [
        pytest.param("RequestLimitExceeded", True, False, id="rate-limit"),
        pytest.param("InternalError", True, False, id="internal"),
        pytest.param("AuthFailure.SignatureFailure", False, True, id="auth-signature"),
        pytest.param("UnauthorizedOperation", False, True, id="unauthorized"),
        pytest.param("FailedOperation", False, False, id="failed-operation"),
        pytest.param("InvalidParameterValue.Other", False, False, id="other-invalid"),
    ],
)
def test_error_codes_raise_api_error_code(code: str, retryable: bool, auth: bool) -> None:
    """Other Tencent errors are ApiErrorCode with the code and its retryable/auth nature."""
    with pytest.raises(ApiErrorCode) as caught:
        parse_task(TID, error_body(code, "why"))
    assert caught.value.code == code
    assert caught.value.retryable is retryable
    assert caught.value.auth is auth
    assert "why" in str(caught.value)


def test_error_without_code_or_message_is_still_an_api_error() -> None:
    """An Error object missing its fields still becomes an ApiErrorCode, not a crash."""
    with pytest.raises(ApiErrorCode):
        parse_task(TID, b'{"Response": {"Error": {}}}')


@pytest.mark.parametrize(
    ("md5", "expected"),
    [
        pytest.param(
            "0123456789ABCDEF0123456789ABCDEF", "0123456789abcdef0123456789abcdef", id="upper"
        ),
        pytest.param(
            "0123456789abcdef0123456789abcdef", "0123456789abcdef0123456789abcdef", id="lower"
        ),
        pytest.param("xyz", None, id="garbage"),
        pytest.param("0123456789abcdef0123456789abcde", None, id="31-chars"),
        pytest.param("g123456789abcdef0123456789abcdef", None, id="non-hex"),
        pytest.param("", None, id="empty"),
        pytest.param(12345, None, id="number"),
    ],
)
def test_md5_is_lowercased_or_ignored(md5: object, expected: str | None) -> None:
    """MetaData.Md5 is kept lower-cased when it is 32 hex digits, otherwise ignored."""
    raw = body(finished_obj(file_entry(MetaData={"Md5": md5})))
    (remote,) = parse_task(TID, raw).files
    assert remote.md5 == expected


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"<html>502 Bad Gateway</html>", id="html"),
        pytest.param(b"\xff\xfe\x00", id="binary"),
        pytest.param(b"[]", id="list"),
        pytest.param(b"null", id="null"),
        pytest.param(b'{"error": {"message": "bad key", "type": "x", "code": ""}}', id="gateway"),
        pytest.param(b'{"Response": []}', id="response-list"),
        pytest.param(b'{"Response": {"Status": "FINISH"}}', id="no-task-object"),
        pytest.param(b'{"Response": {"Error": "boom"}}', id="error-string"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deeply-nested"),
        pytest.param(b'{"a":' * 50_000 + b"1" + b"}" * 50_000, id="deeply-nested-objects"),
    ],
)
def test_unusable_body_is_response_error(raw: bytes) -> None:
    """A body that is not the documented shape is a ResponseError."""
    with pytest.raises(ResponseError):
        parse_task(TID, raw)


def test_unexpected_status_is_response_error() -> None:
    """A top-level status fetcher does not know is a ResponseError, not a guess."""
    with pytest.raises(ResponseError, match="BOGUS"):
        parse_task(TID, body(finished_obj(file_entry()), status="BOGUS"))


@pytest.mark.parametrize(
    "output",
    [
        pytest.param({"FileInfos": "not a list"}, id="infos-not-list"),
        pytest.param({"FileInfos": ["http://x"]}, id="entry-not-object"),
        pytest.param({"FileInfos": [{"ExpireTime": "2026-01-05T12:03:57Z"}]}, id="no-url"),
        pytest.param({"FileInfos": [{"FileUrl": "   "}]}, id="blank-url"),
    ],
)
def test_malformed_output_is_response_error(output: dict[str, Any]) -> None:
    """A FINISH task whose outputs are malformed is a ResponseError."""
    task_obj = finished_obj()
    task_obj["Output"] = output
    with pytest.raises(ResponseError):
        parse_task(TID, body(task_obj))


def _check_parsed(task: Task) -> None:
    assert isinstance(task.state, TaskState)
    assert task.task_id == TID
    if task.state is TaskState.FINISHED:
        assert task.files
        for remote in task.files:
            assert isinstance(remote.url, str)
            assert remote.url == remote.url.strip()
            assert remote.url
            assert remote.md5 is None or re.fullmatch(r"[0-9a-f]{32}", remote.md5)
    if task.state is TaskState.FAILED:
        assert task.failure


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=300))
def test_parse_task_on_arbitrary_bytes_raises_only_fetcher_errors(raw: bytes) -> None:
    """Any bytes give a Task or a FetcherError, never another exception."""
    try:
        task = parse_task(TID, raw)
    except FetcherError:
        return
    _check_parsed(task)


_KEYS = st.sampled_from(
    [
        "Response",
        "Error",
        "Code",
        "Message",
        "TaskType",
        "Status",
        "CreateTime",
        "FinishTime",
        "AigcImageTask",
        "AigcVideoRedrawTask",
        "Input",
        "Output",
        "FileInfos",
        "FileInfo",
        "AudioInfos",
        "VideoInfos",
        "FileUrl",
        "Url",
        "ExpireTime",
        "MetaData",
        "Md5",
        "Size",
        "FileType",
        "ErrCode",
        "ErrCodeExt",
        "Prompt",
        "ModelName",
    ]
) | st.text(max_size=8)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(
        [
            "FINISH",
            "PROCESSING",
            "WAITING",
            "ABORTED",
            "FAIL",
            "0001-01-01T00:00:00Z",
            "0000-00-00T00:00:00Z",
            "2025-12-29T12:03:30Z",
            "9999-12-31T23:59:59-14:00",
            "0001-01-01T00:00:00+14:00",
            "http://h.example/a.png",
            "0123456789ABCDEF0123456789ABCDEF",
            "InvalidParameterValue.TaskId",
            "RequestLimitExceeded",
            "AigcImageTask",
        ]
    )
)
_JSON = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_KEYS, children, max_size=5),
    max_leaves=25,
)


def _parse_never_crashes(document: object) -> None:
    raw = json.dumps(document).encode()
    try:
        task = parse_task(TID, raw)
    except FetcherError:
        return
    _check_parsed(task)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=_JSON)
def test_parse_task_on_arbitrary_json_raises_only_fetcher_errors(document: object) -> None:
    """Arbitrary JSON documents give a Task or a FetcherError, nothing else."""
    _parse_never_crashes(document)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    task_type=st.sampled_from(["AigcImageTask", "AigcVideoRedrawTask", "AigcAudioTask"]),
    status=_SCALARS,
    task_obj=st.dictionaries(_KEYS, _JSON, max_size=6),
    output=st.dictionaries(_KEYS, _JSON, max_size=4),
    extra=st.dictionaries(_KEYS, _JSON, max_size=4),
)
def test_parse_task_on_arbitrary_task_object_raises_only_fetcher_errors(
    task_type: str,
    status: object,
    task_obj: dict[str, Any],
    output: dict[str, Any],
    extra: dict[str, Any],
) -> None:
    """Arbitrary content under Response/<TaskType> gives a Task or a FetcherError."""
    task_obj = {**task_obj, "Output": output}
    response = {**extra, "TaskType": task_type, "Status": status, task_type: task_obj}
    _parse_never_crashes({"Response": response})


@pytest.mark.parametrize(
    ("error", "final"),
    [
        pytest.param(TaskNotFound("x"), True, id="unknown-task"),
        pytest.param(FileExpired("x"), True, id="expired"),
        pytest.param(QueryError("x"), False, id="query-error"),
        pytest.param(DownloadError("x"), False, id="download-error"),
        pytest.param(IntegrityError("x"), False, id="integrity"),
    ],
)
def test_only_the_apis_own_answers_are_final(error: TaskError, final: bool) -> None:
    """Unknown tasks and expired files are not asked about again; transient trouble is."""
    assert error.final is final


# ====================================================================================
# config
# ====================================================================================


@pytest.fixture
def no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the platform config folder at an empty place, so the real one is never read."""
    home = tmp_path / "xdg-config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    return home


def write_config(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def test_defaults_without_any_layer(no_user_config: Path) -> None:
    """With no file, env or flags, the documented defaults apply and no warning is given."""
    loaded = load_settings({}, {})
    assert loaded.settings == Settings()
    assert loaded.warnings == ()
    assert loaded.settings.concurrency == 8
    assert loaded.settings.layout == DEFAULT_LAYOUT


def test_precedence_default_file_env_flag(tmp_path: Path) -> None:
    """Each layer overrides the one below: default < file < env < flag."""
    path = write_config(
        tmp_path / "c.toml",
        "concurrency = 2\ntimeout = 3.0\nretries = 4\nrate = 9.0\n",
    )
    env = {"FETCHER_TIMEOUT": "5", "FETCHER_RETRIES": "6", "FETCHER_RATE": "11"}
    flags = {"retries": 7, "rate": None}
    loaded = load_settings(flags, env, path)
    s = loaded.settings
    assert s.downloads == 4  # default
    assert s.concurrency == 2  # file
    assert s.timeout == 5.0  # env over file
    assert s.retries == 7  # flag over env
    assert s.rate == 11.0  # a None flag is "not given"


def test_fetcher_config_env_names_the_file(tmp_path: Path) -> None:
    """FETCHER_CONFIG in the environment picks the config file."""
    path = write_config(tmp_path / "c.toml", "downloads = 3\n")
    loaded = load_settings({}, {"FETCHER_CONFIG": str(path)})
    assert loaded.settings.downloads == 3


def test_config_flag_wins_over_fetcher_config_env(tmp_path: Path) -> None:
    """An explicit config path beats FETCHER_CONFIG."""
    env_file = write_config(tmp_path / "env.toml", "downloads = 3\n")
    flag_file = write_config(tmp_path / "flag.toml", "downloads = 5\n")
    loaded = load_settings({}, {"FETCHER_CONFIG": str(env_file)}, flag_file)
    assert loaded.settings.downloads == 5


def test_default_config_file_is_read_when_present(no_user_config: Path) -> None:
    """The platform config file is used when it exists."""
    folder = no_user_config / "fetcher"
    folder.mkdir(parents=True)
    write_config(folder / "config.toml", "concurrency = 3\n")
    assert load_settings({}, {}).settings.concurrency == 3


def test_missing_default_config_is_fine(no_user_config: Path) -> None:
    """A missing file at the default location is not an error."""
    assert not (no_user_config / "fetcher" / "config.toml").exists()
    assert load_settings({}, {}).settings == Settings()


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    """A --config path that does not exist is a ConfigError naming it."""
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=r"absent\.toml"):
        load_settings({}, {}, missing)
    with pytest.raises(ConfigError, match=r"absent\.toml"):
        load_settings({}, {"FETCHER_CONFIG": str(missing)})


_ENV_VALUES: dict[str, tuple[str, object]] = {
    "archive": ("/srv/archive", Path("/srv/archive")),
    "base_url": ("https://api.example.com", "https://api.example.com"),
    "api_key": ("sk-secret", "sk-secret"),
    "concurrency": ("3", 3),
    "downloads": ("2", 2),
    "timeout": ("1.5", 1.5),
    "retries": ("0", 0),
    "retry_wait": ("0.25", 0.25),
    "rate": ("7", 7.0),
    "max_file_size": ("1024", 1024),
    "layout": ("{task_type}/{task_id}", "{task_type}/{task_id}"),
    "s3_endpoint": ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
    "s3_addressing": ("path", "path"),
    "state": ("/srv/state.sqlite", Path("/srv/state.sqlite")),
    "state_reconnect": ("5", 5.0),
}


def test_env_table_covers_every_setting() -> None:
    """Every setting has an environment case below (a new setting needs one)."""
    assert set(_ENV_VALUES) == set(SETTING_NAMES)


@pytest.mark.parametrize("name", sorted(_ENV_VALUES))
def test_env_variable_sets_each_setting(name: str, tmp_path: Path) -> None:
    """FETCHER_<NAME> sets each setting, coerced to its type."""
    raw, expected = _ENV_VALUES[name]
    empty = write_config(tmp_path / "empty.toml", "")
    loaded = load_settings({}, {f"FETCHER_{name.upper()}": raw}, empty)
    assert getattr(loaded.settings, name) == expected


def test_empty_env_variable_is_ignored(tmp_path: Path) -> None:
    """FETCHER_X='' is the same as unset, so the file value stays."""
    path = write_config(tmp_path / "c.toml", "concurrency = 2\n")
    assert load_settings({}, {"FETCHER_CONCURRENCY": ""}, path).settings.concurrency == 2


def test_config_file_accepts_dashed_keys(tmp_path: Path) -> None:
    """A config key may be spelled with dashes, like the flag."""
    path = write_config(tmp_path / "c.toml", "retry-wait = 2.0\nmax-file-size = 10\n")
    s = load_settings({}, {}, path).settings
    assert (s.retry_wait, s.max_file_size) == (2.0, 10)


def test_unknown_config_key_is_named(tmp_path: Path) -> None:
    """An unknown key in the file is a ConfigError naming that key."""
    path = write_config(tmp_path / "c.toml", "concurency = 3\n")
    with pytest.raises(ConfigError, match="concurency"):
        load_settings({}, {}, path)


def test_invalid_toml_is_config_error(tmp_path: Path) -> None:
    """A file that is not TOML is a ConfigError naming the file."""
    path = write_config(tmp_path / "broken.toml", "concurrency = = 3\n[\n")
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        load_settings({}, {}, path)


@pytest.mark.parametrize(
    ("name", "env_value"),
    [
        pytest.param("concurrency", "abc", id="concurrency-abc"),
        pytest.param("concurrency", "0", id="concurrency-zero"),
        pytest.param("concurrency", "2.5", id="concurrency-fraction"),
        pytest.param("downloads", "-1", id="downloads-negative"),
        pytest.param("retries", "-1", id="retries-negative"),
        pytest.param("timeout", "-1", id="timeout-negative"),
        pytest.param("timeout", "0", id="timeout-zero"),
        pytest.param("timeout", "nan", id="timeout-nan"),
        pytest.param("rate", "fast", id="rate-word"),
        pytest.param("retry_wait", "0", id="retry-wait-zero"),
        pytest.param("max_file_size", "0", id="max-file-size-zero"),
        pytest.param("max_file_size", "1e9", id="max-file-size-float-text"),
        pytest.param("base_url", "ftp://x", id="base-url-ftp"),
        pytest.param("base_url", "https://", id="base-url-no-host"),
        pytest.param("base_url", "api.example.com", id="base-url-no-scheme"),
        pytest.param("base_url", "https://gw.example:0", id="base-url-port-zero"),
        pytest.param("base_url", "https://gw<example", id="base-url-bad-host"),
    ],
)
def test_bad_env_value_names_the_setting(name: str, env_value: str, tmp_path: Path) -> None:
    """An invalid value from the environment is a ConfigError naming the setting."""
    empty = write_config(tmp_path / "empty.toml", "")
    with pytest.raises(ConfigError, match=name):
        load_settings({}, {f"FETCHER_{name.upper()}": env_value}, empty)


@pytest.mark.parametrize(
    ("name", "toml_value"),
    [
        pytest.param("concurrency", '"abc"', id="concurrency-string"),
        pytest.param("concurrency", "0", id="concurrency-zero"),
        pytest.param("concurrency", "true", id="concurrency-bool"),
        pytest.param("concurrency", "2.5", id="concurrency-fraction"),
        pytest.param("concurrency", "inf", id="concurrency-inf"),
        pytest.param("concurrency", "nan", id="concurrency-nan"),
        pytest.param("concurrency", "[1]", id="concurrency-list"),
        pytest.param("timeout", "-1.0", id="timeout-negative"),
        pytest.param("timeout", "true", id="timeout-bool"),
        pytest.param("rate", "{a = 1}", id="rate-table"),
        pytest.param("base_url", '"ftp://x"', id="base-url-ftp"),
        pytest.param("base_url", "42", id="base-url-number"),
        pytest.param("layout", "7", id="layout-number"),
    ],
)
def test_bad_file_value_names_the_setting(name: str, toml_value: str, tmp_path: Path) -> None:
    """An invalid value in the config file is a ConfigError naming the setting."""
    path = write_config(tmp_path / "c.toml", f"{name} = {toml_value}\n")
    with pytest.raises(ConfigError, match=name):
        load_settings({}, {}, path)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        pytest.param("concurrency", 0, id="concurrency-zero"),
        pytest.param("timeout", -3.0, id="timeout-negative"),
        pytest.param("base_url", "ftp://x", id="base-url-ftp"),
    ],
)
def test_bad_flag_value_names_the_setting(name: str, value: object, tmp_path: Path) -> None:
    """An invalid flag value is a ConfigError naming the setting."""
    empty = write_config(tmp_path / "empty.toml", "")
    with pytest.raises(ConfigError, match=name):
        load_settings({name: value}, {}, empty)


def test_integral_float_in_file_is_accepted(tmp_path: Path) -> None:
    """concurrency = 4.0 is an integer in float clothing and is accepted as 4."""
    path = write_config(tmp_path / "c.toml", "concurrency = 4.0\n")
    settings_ = load_settings({}, {}, path).settings
    assert settings_.concurrency == 4
    assert isinstance(settings_.concurrency, int)


def test_invalid_layout_setting_is_usage_error(tmp_path: Path) -> None:
    """A layout without {task_id} is refused while loading settings."""
    empty = write_config(tmp_path / "empty.toml", "")
    with pytest.raises(UsageError, match="task_id"):
        load_settings({}, {"FETCHER_LAYOUT": "{task_type}"}, empty)


def test_api_key_never_in_repr(tmp_path: Path) -> None:
    """The API key does not show in repr or str of the settings."""
    secret = "sk-very-secret-value-123"
    empty = write_config(tmp_path / "empty.toml", "")
    loaded = load_settings({"api_key": secret}, {}, empty)
    assert loaded.settings.api_key == secret
    assert secret not in repr(loaded.settings)
    assert secret not in str(loaded.settings)
    assert secret not in repr(loaded)


def test_api_key_of_wrong_type_is_not_echoed(tmp_path: Path) -> None:
    """A non-string api_key is refused without printing the value back."""
    path = write_config(tmp_path / "c.toml", "api_key = 987654321987\n")
    with pytest.raises(ConfigError, match="api_key") as caught:
        load_settings({}, {}, path)
    assert "987654321987" not in str(caught.value)


@pytest.mark.parametrize(
    ("mode", "warned"),
    [
        pytest.param(0o644, True, id="world-readable"),
        pytest.param(0o640, True, id="group-readable"),
        pytest.param(0o600, False, id="private"),
    ],
)
def test_readable_config_with_api_key_warns(mode: int, warned: bool, tmp_path: Path) -> None:
    """A config file holding the key and readable by others warns, without the key in it."""
    secret = "sk-in-file-secret"
    path = write_config(tmp_path / "c.toml", f'api_key = "{secret}"\n', mode)
    loaded = load_settings({}, {}, path)
    assert loaded.settings.api_key == secret
    assert bool(loaded.warnings) is warned
    for warning in loaded.warnings:
        assert secret not in warning
        assert "c.toml" in warning


def test_readable_config_without_api_key_does_not_warn(tmp_path: Path) -> None:
    """A world-readable config without a key is fine."""
    path = write_config(tmp_path / "c.toml", "concurrency = 2\n", 0o644)
    assert load_settings({}, {}, path).warnings == ()


@pytest.mark.parametrize(
    ("base_url", "api_key", "missing"),
    [
        pytest.param(None, "k", "base URL", id="no-base-url"),
        pytest.param("https://api.example.com", None, "API key", id="no-key"),
        pytest.param("https://api.example.com", "", "API key", id="empty-key"),
        pytest.param(None, None, "base URL", id="neither"),
    ],
)
def test_require_api_names_what_is_missing(
    base_url: str | None, api_key: str | None, missing: str
) -> None:
    """require_api raises ConfigError saying which of URL and key is missing."""
    with pytest.raises(ConfigError, match=missing):
        Settings(base_url=base_url, api_key=api_key).require_api()


def test_require_api_returns_both() -> None:
    """With both set, require_api returns them."""
    s = Settings(base_url="https://api.example.com", api_key="k")
    assert s.require_api() == ("https://api.example.com", "k")


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(
        ["concurrency", "downloads", "timeout", "retries", "retry_wait", "rate", "max_file_size"]
    ),
    raw=st.text(max_size=20) | st.from_regex(r"\s*-?[0-9]{1,6}(\.[0-9]*)?\s*", fullmatch=True),
)
def test_any_numeric_env_value_is_valid_or_config_error(
    fixed_root: Path, name: str, raw: str
) -> None:
    """Any text for a numeric setting either loads a value in range or is a ConfigError."""
    empty = fixed_root / "empty.toml"
    empty.touch()
    try:
        loaded = load_settings({}, {f"FETCHER_{name.upper()}": raw}, empty)
    except ConfigError as exc:
        assert name in str(exc)
        return
    value = getattr(loaded.settings, name)
    assert value >= 0
    if name in ("timeout", "retry_wait", "rate"):
        assert value > 0


# ====================================================================================
# retry
# ====================================================================================


def test_parse_retry_after_seconds() -> None:
    """A delta-seconds Retry-After is read as seconds."""
    assert parse_retry_after("5") == 5
    assert parse_retry_after(" 120 ") == 120
    assert parse_retry_after("0") == 0


def test_parse_retry_after_http_date() -> None:
    """An HTTP-date Retry-After is the time from 'now' until then, never negative."""
    now = datetime(2015, 10, 21, 7, 27, 50, tzinfo=UTC)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:20:00 GMT", now) == 0.0


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(None, id="none"),
        pytest.param("", id="empty"),
        pytest.param("soon", id="word"),
        pytest.param("-5", id="negative"),
        pytest.param("1.5", id="fraction"),
        pytest.param("Wed, 99 Foo 2015", id="bad-date"),
        pytest.param("\xb2", id="superscript-two"),
        pytest.param("\u0665", id="arabic-indic-digit"),
    ],
)
def test_parse_retry_after_garbage_is_none(value: str | None) -> None:
    """Anything that is neither ASCII seconds nor an HTTP date is None."""
    assert parse_retry_after(value) is None


@settings(max_examples=200, deadline=None)
@given(value=st.text(max_size=40))
def test_parse_retry_after_never_raises(value: str) -> None:
    """Any header text gives None or a non-negative number of seconds."""
    now = datetime(2025, 1, 1, tzinfo=UTC)
    result = parse_retry_after(value, now)
    assert result is None or result >= 0


@settings(max_examples=200, deadline=None)
@given(
    attempt=st.integers(min_value=1, max_value=100_000),
    base=st.floats(min_value=0.001, max_value=10),
    cap=st.floats(min_value=0, max_value=120),
)
def test_delay_stays_within_zero_and_cap(attempt: int, base: float, cap: float) -> None:
    """The computed backoff is always between 0 and the cap, however many attempts."""
    delay = RetryPolicy(retries=attempt, base=base, cap=cap).delay(attempt)
    assert 0 <= delay <= cap


@settings(max_examples=200, deadline=None)
@given(
    attempt=st.integers(min_value=1, max_value=1000),
    retry_after=st.floats(allow_nan=False),
    cap=st.floats(min_value=0, max_value=120),
)
def test_delay_honours_retry_after_within_cap(attempt: int, retry_after: float, cap: float) -> None:
    """A server's Retry-After wins over backoff, clamped to [0, cap]."""
    delay = RetryPolicy(cap=cap).delay(attempt, retry_after)
    assert delay == min(max(retry_after, 0.0), cap)


def test_delay_grows_with_attempts_up_to_cap() -> None:
    """Full jitter: the upper bound doubles per attempt, then stops at the cap."""
    policy = RetryPolicy(base=1.0, cap=8.0)
    first = [policy.delay(1) for _ in range(200)]
    late = [policy.delay(10) for _ in range(200)]
    assert max(first) <= 1.0
    assert max(late) <= 8.0
    assert max(late) > 1.0


# ====================================================================================
# download.extension_for
# ====================================================================================


@pytest.mark.parametrize(
    ("url", "content_type", "expected"),
    [
        pytest.param("http://h/a/img.PNG", None, ".png", id="upper-suffix"),
        pytest.param("http://h/a/img.jpeg", None, ".jpg", id="jpeg"),
        pytest.param("http://h/a/img.JPEG", "image/png", ".jpg", id="url-beats-type"),
        pytest.param("http://h/a/clip.mp4", "video/mp4", ".mp4", id="mp4"),
        pytest.param("http://h/a/file", "image/png", ".png", id="from-type"),
        pytest.param("http://h/a/file", "image/jpeg", ".jpg", id="jpeg-type"),
        pytest.param("http://h/a/file", "video/mp4", ".mp4", id="video-type"),
        pytest.param("http://h/a/file", None, ".bin", id="no-type"),
        pytest.param("http://h/a/file", "application/x-unknown-thing", ".bin", id="odd-type"),
        pytest.param("http://h/a/img.png?sig=abc.exe", None, ".png", id="query-ignored"),
        pytest.param("http://h/a/file?name=x.png", None, ".bin", id="query-not-used"),
        pytest.param("http://h/a/file#frag.gif", None, ".bin", id="fragment-not-used"),
        pytest.param("http://h/dir.v2/file", None, ".bin", id="dot-in-folder"),
        pytest.param("http://h/a/file.toolongext", None, ".bin", id="too-long-ext"),
    ],
)
def test_extension_for(url: str, content_type: str | None, expected: str) -> None:
    """The extension comes from the URL path, else the Content-Type, else .bin."""
    assert extension_for(url, content_type) == expected


# ====================================================================================
# archive paths
# ====================================================================================


@pytest.mark.parametrize(
    "relative",
    [
        pytest.param("../x", id="parent"),
        pytest.param("a/../../x", id="climb-after-descend"),
        pytest.param("/etc/passwd", id="absolute"),
        pytest.param(PurePosixPath("/tmp/x"), id="absolute-purepath"),
        pytest.param("", id="root-itself"),
        pytest.param(".", id="dot"),
        pytest.param("a/..", id="back-to-root"),
    ],
)
def test_archive_resolve_refuses_escapes(relative: str | PurePosixPath, tmp_path: Path) -> None:
    """Archive.resolve refuses a path outside the root (or the root itself)."""
    archive = Archive(tmp_path / "arch")
    archive.prepare()
    with pytest.raises(ArchiveError, match="outside the archive"):
        archive.resolve(relative)


def test_archive_resolve_refuses_symlink_escape(tmp_path: Path) -> None:
    """A symlink inside the archive that points outside is refused too."""
    archive = Archive(tmp_path / "arch")
    archive.prepare()
    outside = tmp_path / "outside"
    outside.mkdir()
    (archive.root / "link").symlink_to(outside)
    with pytest.raises(ArchiveError):
        archive.resolve("link/x.png")


def test_archive_place_remakes_a_folder_removed_during_the_run(tmp_path: Path) -> None:
    """A task folder deleted after the run made it is made again, not an error."""
    import shutil

    archive = Archive(tmp_path / "arch")
    archive.prepare()
    for name in ("one", "two"):
        (archive.work_dir / name).write_bytes(name.encode())
    archive.place(archive.work_dir / "one", PurePosixPath("a/b/one.bin"))
    shutil.rmtree(archive.root / "a")

    placed = archive.place(archive.work_dir / "two", PurePosixPath("a/b/two.bin"))

    assert placed.read_bytes() == b"two"


def test_archive_resolve_accepts_inside_paths(tmp_path: Path) -> None:
    """An ordinary relative path resolves below the root."""
    archive = Archive(tmp_path / "arch")
    archive.prepare()
    got = archive.resolve(PurePosixPath("AigcImageTask/2025/12/29") / TID / "image_0.png")
    assert got == archive.root.resolve() / "AigcImageTask/2025/12/29" / TID / "image_0.png"


def test_work_path_is_short_and_stable(tmp_path: Path) -> None:
    """Work file names are stable across instances, distinct per file, and short."""
    one = Archive(tmp_path / "arch")
    two = Archive(tmp_path / "arch")
    long_id = "x" * MAX_ID_LENGTH
    assert one.work_path(TID, 0) == two.work_path(TID, 0)
    assert one.work_path(TID, 0) != one.work_path(TID, 1)
    assert one.work_path(TID, 0) != one.work_path(TID + "x", 0)
    for path in (one.work_path(long_id, 12), one.work_path(TID, 0)):
        assert path.parent == one.work_dir
        assert len(path.name) <= 64
        assert re.fullmatch(r"[0-9a-f]{32}-\d+\.part", path.name)


@settings(max_examples=100, deadline=None)
@given(task_id=st.text(max_size=300), index=st.integers(min_value=0, max_value=10_000))
def test_work_path_shape_for_any_id(fixed_root: Path, task_id: str, index: int) -> None:
    """Any task ID and index give a short name directly inside the work folder."""
    archive = Archive(fixed_root / "arch")
    path = archive.work_path(task_id, index)
    assert path.parent == archive.work_dir
    assert path.name.endswith(f"-{index}.part")
    assert len(path.name) <= 64


# ====================================================================================
# state
# ====================================================================================


def test_first_sight_drops_duplicates_within_and_across_calls(tmp_path: Path) -> None:
    """Within one connection each ID is fresh once, in first-seen order."""
    with StateDB(tmp_path / "state.sqlite") as db:
        seen = FirstSight(db)
        fresh, known = seen.first_sight(["a", "b", "a", "c", "b"])
        assert fresh == ["a", "b", "c"]
        assert known == {}
        fresh, _ = seen.first_sight(["c", "d", "a", "d"])
        assert fresh == ["d"]
        fresh, _ = seen.first_sight([])
        assert fresh == []


def test_first_sight_dedups_across_batches(tmp_path: Path) -> None:
    """Duplicates more than one SQL batch apart are still dropped."""
    ids = [f"id{n}" for n in range(1200)]
    with StateDB(tmp_path / "state.sqlite") as db:
        fresh, _ = FirstSight(db).first_sight(ids + ids[:600] + ["new"] + ids[1100:])
        assert fresh == [*ids, "new"]


def _committed_states(path: Path) -> dict[str, int]:
    """What another connection (another process) sees: only committed rows (states held)."""
    with StateDB(path, readonly=True) as other:
        return {state: n for state, n in other.counts().items() if n}


def test_grouped_steps_of_one_loop_turn_commit_together_when_it_ends(tmp_path: Path) -> None:
    """Steps in one turn share a transaction, committed once the loop runs again."""
    path = tmp_path / "state.sqlite"

    async def scenario() -> None:
        with StateDB(path) as db, db.grouped(asyncio.get_running_loop()):
            db.mark_archived("t1")
            db.record_failure("t2", "HTTP 500", final=False)
            assert _committed_states(path) == {}
            await asyncio.sleep(0)
            assert _committed_states(path) == {"archived": 1, "failed": 1}
            db.mark_archived("t3")
        assert _committed_states(path) == {"archived": 2, "failed": 1}

    asyncio.run(scenario())


def test_grouped_step_that_fails_rolls_back_alone(tmp_path: Path) -> None:
    """A step raising inside a group undoes only its own writes; the turn's others land."""
    path = tmp_path / "state.sqlite"

    async def scenario() -> None:
        with StateDB(path) as db, db.grouped(asyncio.get_running_loop()):
            db.mark_archived("t1")
            with pytest.raises(RuntimeError), db.atomic() as conn:
                conn.execute(
                    "INSERT INTO tasks (task_id, state, first_seen, updated_at) "
                    "VALUES ('t2', 'failed', 'x', 'x')"
                )
                raise RuntimeError("this step goes wrong")
            db.mark_archived("t3")
        assert _committed_states(path) == {"archived": 2}

    asyncio.run(scenario())


def test_first_sight_reports_known_states_in_a_new_run(tmp_path: Path) -> None:
    """What one run recorded is reported by first_sight in the next run (new connection)."""
    path = tmp_path / "state.sqlite"
    with StateDB(path) as db:
        FirstSight(db).first_sight(["t1", "t2", "t3"])
        db.mark_archived("t1")
        db.record_failure("t2", "ErrCode 70000", final=True)
    with StateDB(path) as db:
        fresh, known = FirstSight(db).first_sight(["t1", "t2", "t3", "t1"])
        assert fresh == ["t1", "t2", "t3"]
        assert set(known) == {"t1", "t2"}
        assert known["t1"].state == "archived"
        assert known["t1"].final is True
        assert known["t2"].state == "failed"
        assert known["t2"].final is True
        assert known["t2"].reason == "ErrCode 70000"


def test_first_sight_reports_known_state_within_a_run(tmp_path: Path) -> None:
    """Known states are reported alongside fresh IDs in the same call."""
    path = tmp_path / "state.sqlite"
    with StateDB(path) as db:
        db.mark_archived("old")
        fresh, known = FirstSight(db).first_sight(["old", "new"])
        assert fresh == ["old", "new"]
        assert list(known) == ["old"]
        assert known["old"].state == "archived"


_DB_NUMBERS = itertools.count()


@settings(max_examples=60, deadline=None)
@given(
    calls=st.lists(st.lists(st.sampled_from([f"t{n}" for n in range(15)]), max_size=20), max_size=5)
)
def test_first_sight_yields_each_id_once(fixed_root: Path, calls: list[list[str]]) -> None:
    """Across any sequence of calls, the fresh IDs are the distinct IDs in first-seen order."""
    with StateDB(fixed_root / f"first-sight-{next(_DB_NUMBERS)}.sqlite") as db:
        fresh_all: list[str] = []
        seen = FirstSight(db)
        for call in calls:
            fresh, _ = seen.first_sight(call)
            fresh_all.extend(fresh)
    flat = [i for call in calls for i in call]
    assert fresh_all == list(dict.fromkeys(flat))


def test_state_db_files_are_inside_meta_dir(tmp_path: Path) -> None:
    """The archive keeps its database, lock and work files under .fetcher."""
    archive = Archive(tmp_path / "arch")
    for path in (archive.db_path, archive.lock_path, archive.work_dir):
        assert path.relative_to(archive.root).parts[0] == ".fetcher"
    assert archive.root.is_absolute()


def test_summary_totals_hold_their_parts() -> None:
    """``failed`` counts expired and invalid too; ``already_archived`` counts unchanged too."""
    summary = RunSummary()
    for n, outcome in enumerate(
        [Outcome.FAILED, Outcome.EXPIRED, Outcome.EXPIRED, Outcome.INVALID, Outcome.ARCHIVED]
        + [Outcome.ALREADY_ARCHIVED] * 2
    ):
        summary.add(TaskOutcome(f"t{n}", outcome))
    summary.unchanged = 5

    data = summary.to_json()

    assert (data["failed"], data["expired"], data["invalid"]) == (4, 2, 1)
    assert (data["already_archived"], data["unchanged"]) == (7, 5)
    assert (data["archived"], data["exit_code"]) == (1, 1)
    line = summary_line(summary)
    assert "7 already archived (5 unchanged)" in line
    assert "4 failed (2 expired, 1 invalid)" in line
