"""The JSON sidecar written beside a task's files: what was asked for, and what came back.

The sidecar is for people and other tools long after the API has forgotten the
task, so it carries the prompt and model in plain keys, the task's ``Input``
verbatim, and each file's checksum. Its shape is versioned by ``schema``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from . import __version__
from .models import Task, format_time
from .state import FileRow

SIDECAR_SCHEMA = 1


def build_sidecar(task: Task, files: Sequence[FileRow], folder: str) -> dict[str, Any]:
    """The sidecar document; file paths are relative to the sidecar's own folder."""
    prefix = folder.rstrip("/") + "/"
    return {
        "schema": SIDECAR_SCHEMA,
        "fetcher_version": __version__,
        "task_id": task.task_id,
        "task_type": task.task_type,
        "status": task.status,
        "prompt": task.prompt,
        "negative_prompt": task.negative_prompt,
        "model_name": task.model_name,
        "model_version": task.model_version,
        "created_at": format_time(task.created),
        "finished_at": format_time(task.finished),
        "archived_at": format_time(datetime.now(UTC)),
        "input": task.input,
        "files": [_file_entry(row, prefix) for row in files],
    }


def _file_entry(row: FileRow, prefix: str) -> dict[str, Any]:
    """A file in place, or one that is missing and why: a partial task still keeps its prompt."""
    entry: dict[str, Any] = {
        "path": row.path.removeprefix(prefix) if row.path and row.state == "done" else None,
        "url": row.url,
        "expire_time": row.expire_time,
        "size": row.size,
        "sha256": row.sha256,
        "md5": row.md5,
        "content_type": row.content_type,
    }
    if row.state != "done":
        entry["missing"] = row.reason or row.state
    return entry
