"""The archive folder, importable from here as before; it lives in :mod:`fetcher.stores.local`."""

from __future__ import annotations

from .stores.local import (
    LOCK_POLL,
    META_DIR,
    RESUME_WINDOW,
    SIDECAR_NAME,
    Archive,
    archive_error,
)

__all__ = [
    "LOCK_POLL",
    "META_DIR",
    "RESUME_WINDOW",
    "SIDECAR_NAME",
    "Archive",
    "archive_error",
]
