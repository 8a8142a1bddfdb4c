"""Typed views of the query API's answers, parsed defensively.

The API is a Tencent VOD ``DescribeTaskDetail`` body behind a gateway. Real
responses carry fields nobody documented, sentinel times and a failed task
that still says ``Status: "FINISH"``; everything here tolerates unknown keys
and turns anything unusable into a :class:`~fetcher.errors.ResponseError`.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from .errors import QueryError, ResponseError, TaskNotFound

#: Tencent error codes that mean "no such task"; asking again will not help.
NOT_FOUND_CODES = ("InvalidParameterValue.TaskId", "ResourceNotFound")
#: Tencent error codes that mean "try again later".
RETRYABLE_CODES = ("RequestLimitExceeded", "InternalError")
#: Tencent error codes that mean the key is not accepted.
AUTH_CODES = ("AuthFailure", "UnauthorizedOperation")

#: Where a task object keeps its downloadable outputs: lists, then single objects.
_OUTPUT_LISTS = ("FileInfos", "VideoInfos", "AudioInfos")
_OUTPUT_SINGLES = ("FileInfo",)
#: Half a UTF-16 pair: JSON's ``\udXXX`` escapes can carry one alone, UTF-8 cannot store it.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class TaskState(enum.StrEnum):
    """What the API says about a task, reduced to what fetcher acts on."""

    PENDING = "pending"
    FINISHED = "finished"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """One output file as the API describes it."""

    index: int
    url: str
    expire_time: datetime | None
    md5: str | None = None
    size: int | None = None
    file_type: str | None = None


@dataclass(frozen=True, slots=True)
class Task:
    """One AIGC task as returned by the query endpoint."""

    task_id: str
    task_type: str
    state: TaskState
    status: str
    created: datetime | None = None
    finished: datetime | None = None
    failure: str | None = None
    input: Mapping[str, Any] = field(default_factory=dict)
    files: tuple[RemoteFile, ...] = ()

    @property
    def prompt(self) -> str | None:
        return _opt_str(self.input.get("Prompt"))

    @property
    def negative_prompt(self) -> str | None:
        return _opt_str(self.input.get("NegativePrompt"))

    @property
    def model_name(self) -> str | None:
        return _opt_str(self.input.get("ModelName"))

    @property
    def model_version(self) -> str | None:
        return _opt_str(self.input.get("ModelVersion"))


class ApiErrorCode(QueryError):
    """A Tencent-style ``Response.Error`` that is not "not found"; ``code`` says which."""

    def __init__(self, code: str, message: str, *, task_id: str | None = None) -> None:
        super().__init__(f"API error {code}: {message}", task_id=task_id)
        self.code = code

    @property
    def retryable(self) -> bool:
        return self.code.startswith(RETRYABLE_CODES)

    @property
    def auth(self) -> bool:
        return self.code.startswith(AUTH_CODES)


def parse_time(value: object) -> datetime | None:
    """Parse an API timestamp; sentinels and garbage mean "no time"."""
    if not isinstance(value, str) or not value or value.startswith(("0000-", "0001-")):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        # OverflowError: e.g. 9999-12-31T23:59:59-01:00 falls past year 9999 in UTC.
        return None


def load_json(body: bytes) -> Any:
    """``json.loads``, keeping only what can be stored and written back as JSON.

    A lone UTF-16 surrogate (a prompt cut mid-emoji by some client) becomes U+FFFD,
    since neither SQLite nor a UTF-8 file can hold it; ``NaN``, ``Infinity`` and
    numbers too large for a float become ``null``, since JSON cannot express them.
    Raises ``ValueError`` (or ``RecursionError``) for a body that is not JSON.
    """
    return json.loads(
        body,
        object_pairs_hook=_clean_object,
        parse_constant=lambda _: None,
        parse_float=_finite_float,
    )


def _clean_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return {_clean_text(key): _clean_value(value) for key, value in pairs}


def _clean_value(value: Any) -> Any:
    """Strings and lists of them; objects inside were cleaned when they were built."""
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, list):
        return [_clean_value(item) for item in value]
    return value


def _clean_text(text: str) -> str:
    return _LONE_SURROGATE.sub("\ufffd", text)


def _finite_float(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


def redact(text: str, secret: str | None) -> str:
    """``text`` with every copy of ``secret`` replaced by ``***``: as sent and percent-encoded.

    Server text (an error's ``Message``, a failed task's ``Message``) may echo the
    request, key included, and it ends up printed, stored and in sidecars.
    """
    if not secret:
        return text
    for form in dict.fromkeys((secret, quote(secret, safe=""), quote(secret))):
        text = text.replace(form, "***")
    return text


def server_text(value: object, secret: str | None) -> str:
    """Free text from the server made fit for a reason: one line, the key blotted out."""
    return redact(one_line(redact(str(value), secret)), secret)


def one_line(text: str) -> str:
    """API text fit for a one-line reason, its control, format and separator characters blanked.

    Newlines, ESC, NUL, U+2028 and the like become spaces; runs of spaces collapse.
    """
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def format_time(value: datetime | None) -> str | None:
    """The one textual form fetcher writes for times: ISO 8601 UTC with ``Z``."""
    if value is None:
        return None
    v = value.astimezone(UTC)
    # Not strftime: it was 2.6 % of a run over 2,000 small tasks, and pads years < 1000 oddly.
    return f"{v.year:04d}-{v.month:02d}-{v.day:02d}T{v.hour:02d}:{v.minute:02d}:{v.second:02d}Z"


def parse_task(task_id: str, body: bytes, *, secret: str | None = None) -> Task:
    """Turn a query response body into a :class:`Task`.

    Every piece of server text that becomes a reason (an error's code and message,
    a failed task's ``ErrCodeExt`` and ``Message``, an unknown status) has
    ``secret``, the API key, blotted out.

    Raises :class:`TaskNotFound` for an unknown task, :class:`ApiErrorCode` for
    any other Tencent-style error and :class:`ResponseError` for a body that is
    not the shape the API documents. Never raises anything else.
    """
    try:
        document = load_json(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ResponseError("response is not valid JSON", task_id=task_id) from exc
    response = _mapping(document, "Response", task_id)
    error = response.get("Error")
    if error is not None:
        _raise_api_error(task_id, error, secret)
    return _parse_response(task_id, response, secret)


def _raise_api_error(task_id: str, error: object, secret: str | None) -> None:
    if not isinstance(error, Mapping):
        raise ResponseError("Response.Error is not an object", task_id=task_id)
    code = server_text(error.get("Code") or "", secret) or "UnknownError"
    message = server_text(error.get("Message") or "", secret) or "no message"
    if code.startswith(NOT_FOUND_CODES):
        raise TaskNotFound(f"unknown task ({code}: {message})", task_id=task_id)
    raise ApiErrorCode(code, message, task_id=task_id)


def _parse_response(task_id: str, response: Mapping[str, Any], secret: str | None) -> Task:
    task_type, task_obj = _find_task_object(response, task_id)
    status = server_text(response.get("Status") or task_obj.get("Status") or "", secret).upper()
    created = parse_time(response.get("CreateTime"))
    finished = parse_time(response.get("FinishTime"))
    raw_input = task_obj.get("Input")
    task_input: Mapping[str, Any] = raw_input if isinstance(raw_input, Mapping) else {}
    base = Task(
        task_id=task_id,
        task_type=task_type,
        state=TaskState.PENDING,
        status=status,
        created=created,
        finished=finished,
        input=task_input,
    )
    failure = _failure(status, task_obj, secret)
    if failure is not None:
        return replace(base, state=TaskState.FAILED, failure=failure)
    if status in ("WAITING", "PROCESSING", ""):
        return base
    if status != "FINISH":
        raise ResponseError(f"unexpected task status {status!r}", task_id=task_id)
    files = tuple(_parse_files(task_obj.get("Output"), task_id))
    if not files:
        return replace(base, state=TaskState.FAILED, failure="task finished without output files")
    return replace(base, state=TaskState.FINISHED, files=files)


def _find_task_object(response: Mapping[str, Any], task_id: str) -> tuple[str, Mapping[str, Any]]:
    """The task object sits under the key ``TaskType`` names; fall back to any ``*Task``."""
    task_type = response.get("TaskType")
    if isinstance(task_type, str) and isinstance(response.get(task_type), Mapping):
        return task_type, response[task_type]
    for key, value in response.items():
        if key.endswith("Task") and isinstance(value, Mapping):
            return key, value
    raise ResponseError("response holds no task object", task_id=task_id)


def _failure(status: str, task_obj: Mapping[str, Any], secret: str | None) -> str | None:
    """A failed task still says FINISH at the top; the truth is in the task object."""
    inner = str(task_obj.get("Status") or "").upper()
    err_code = task_obj.get("ErrCode")
    failed_code = isinstance(err_code, int | str) and str(err_code) not in ("", "0")
    if not (failed_code or inner == "FAIL" or status == "ABORTED"):
        return None
    parts = [
        server_text(part, secret)
        for part in (
            "aborted" if status == "ABORTED" else None,
            f"ErrCode {err_code}" if failed_code else None,
            task_obj.get("ErrCodeExt") or None,
            task_obj.get("Message") or None,
        )
        if part
    ]
    parts = [part for part in parts if part]
    return ": ".join(parts) if parts else "task failed"


def _parse_files(output: object, task_id: str) -> Iterator[RemoteFile]:
    if not isinstance(output, Mapping):
        return
    entries: list[object] = []
    for key in _OUTPUT_LISTS:
        value = output.get(key)
        if isinstance(value, list):
            entries.extend(value)
        elif value is not None:
            raise ResponseError(f"Output.{key} is not a list", task_id=task_id)
    for key in _OUTPUT_SINGLES:
        value = output.get(key)
        if isinstance(value, Mapping):
            entries.append(value)
    for index, entry in enumerate(entries):
        yield _parse_file(index, entry, task_id)


def _parse_file(index: int, entry: object, task_id: str) -> RemoteFile:
    if not isinstance(entry, Mapping):
        raise ResponseError(f"output file {index} is not an object", task_id=task_id)
    url = entry.get("FileUrl") or entry.get("Url")
    if not isinstance(url, str) or not url.strip():
        raise ResponseError(f"output file {index} has no FileUrl", task_id=task_id)
    meta = entry.get("MetaData")
    meta = meta if isinstance(meta, Mapping) else {}
    md5 = meta.get("Md5")
    size = meta.get("Size")
    return RemoteFile(
        index=index,
        url=url.strip(),
        expire_time=parse_time(entry.get("ExpireTime")),
        md5=md5.lower() if isinstance(md5, str) and _is_md5(md5) else None,
        size=size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None,
        file_type=_opt_str(entry.get("FileType")),
    )


def _is_md5(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdefABCDEF" for c in value)


def _mapping(document: object, key: str, task_id: str) -> Mapping[str, Any]:
    if not isinstance(document, Mapping):
        raise ResponseError("response is not a JSON object", task_id=task_id)
    value = document.get(key)
    if not isinstance(value, Mapping):
        raise ResponseError(f"response has no {key!r} object", task_id=task_id)
    return value


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
