"""Where a task's folder goes inside the archive, from a ``str.format`` template.

Every value that reaches a path comes from the API, so each is cleaned before it
is used: separators, control characters and characters other systems reject
become ``_``, a leading dot is neutralised (no hidden folders, no clash with the
archive's own ``.fetcher``), and a segment longer than a file name may be is cut
and suffixed with a hash of the whole, so a 256-character task ID still fits and
stays unique. The result is always a relative path below the archive root.
"""

from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath

from .errors import UsageError

DEFAULT_LAYOUT = "{task_type}/{created:%Y}/{created:%m}/{created:%d}/{task_id}"
MAX_SEGMENT_BYTES = 255
_HASH_CHARS = 16
_UNSAFE = re.compile(r'[\x00-\x1f\x7f-\x9f/\\<>:"|?*]')
_DATE_FIELDS = frozenset({"created", "finished"})
_TEXT_FIELDS = frozenset({"task_id", "task_type", "model_name", "model_version"})
FIELDS = _DATE_FIELDS | _TEXT_FIELDS
#: The ``strftime`` codes of C99 plus Python's ``%f``: the ones every platform knows. Another
#: code is passed through as text by glibc and means something else, or nothing, elsewhere.
_STRFTIME_CODES = frozenset("aAbBcCdDeFgGhHIjmMnprRStTuUVwWxXyYzZf%")
#: glibc's padding flags (``%-d``) are kept: layouts in use on Linux rely on them.
_STRFTIME = re.compile(r"%([-_0^#]?)(.?)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class LayoutFields:
    """The values a layout template may use."""

    task_id: str
    task_type: str
    model_name: str | None = None
    model_version: str | None = None
    created: datetime | None = None
    finished: datetime | None = None


class Layout:
    """A validated layout template; :meth:`render` turns task fields into a safe path."""

    def __init__(self, template: str) -> None:
        self.template = template
        self._pieces = _parse(template)
        now = datetime.now(UTC)
        # Every field set, so a spec that only breaks on a real value fails here, not mid-run.
        sample = LayoutFields("x", "x", "x", "x", created=now, finished=now)
        try:
            self.render(sample)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"invalid layout {template!r}: {exc}") from exc

    def render(self, fields: LayoutFields) -> PurePosixPath:
        out: list[str] = []
        for literal, name, spec in self._pieces:
            out.append(literal)
            if name is not None:
                out.append(_render_field(fields, name, spec))
        segments = [safe_segment(part) for part in "".join(out).split("/") if part.strip()]
        if not segments:
            raise UsageError(f"layout {self.template!r} renders an empty path")
        return PurePosixPath(*segments)


def _parse(template: str) -> list[tuple[str, str | None, str]]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise UsageError(f"invalid layout {template!r}: {exc}") from exc
    pieces: list[tuple[str, str | None, str]] = []
    names: set[str] = set()
    for literal, name, spec, conversion in parsed:
        if name is not None:
            if name not in FIELDS:
                known = ", ".join(sorted(FIELDS))
                raise UsageError(f"layout field {{{name}}} is unknown (known: {known})")
            if conversion is not None or "{" in (spec or ""):
                raise UsageError(f"layout field {{{name}}} may not use conversions or nesting")
            if name in _DATE_FIELDS:
                _check_strftime(name, spec or "")
            names.add(name)
        pieces.append((literal, name, spec or ""))
    if "task_id" not in names:
        raise UsageError("layout must contain {task_id}, so each task gets its own folder")
    return pieces


def _check_strftime(name: str, spec: str) -> None:
    for match in _STRFTIME.finditer(spec):
        if match.group(2) not in _STRFTIME_CODES or (match.group(1) and match.group(2) == "%"):
            code = match.group(0) if len(match.group(0)) > 1 else "a lone %"
            raise UsageError(
                f"layout field {{{name}:{spec}}}: unknown strftime code {code}"
                " (use %Y, %m, %d, %H, %M, %S, %j, ... or %% for a percent sign)"
            )


def _render_field(fields: LayoutFields, name: str, spec: str) -> str:
    value = getattr(fields, name)
    if value is None:
        return "unknown"
    if name in _DATE_FIELDS:
        return format(value, spec or "%Y-%m-%d")
    return format(_visible(str(value)), spec)


def _visible(text: str) -> str:
    """Separators and characters that would let a name lie about itself become ``_``.

    Beyond the ASCII and C1 controls, that is every character Python calls
    unprintable: format characters (a right-to-left override, zero-width joiners),
    line and paragraph separators, and spaces other than the plain one.
    """
    return "".join(c if c.isprintable() else "_" for c in _UNSAFE.sub("_", text))


def safe_segment(text: str) -> str:
    """One path segment that cannot escape its folder, hide itself or exceed 255 bytes."""
    cleaned = _visible(text).strip()
    if not cleaned or cleaned.startswith("."):
        cleaned = "_" + cleaned
    encoded = cleaned.encode("utf-8")
    if len(encoded) <= MAX_SEGMENT_BYTES:
        return cleaned
    digest = hashlib.sha256(encoded).hexdigest()[:_HASH_CHARS]
    room = MAX_SEGMENT_BYTES - _HASH_CHARS - 1
    head = encoded[:room].decode("utf-8", errors="ignore")
    return f"{head}~{digest}"
