"""Writes that survive a power cut: fsync the bytes, and the folder entry that names them.

A rename, a new file or a new folder is an entry in its parent folder, and that
entry is data too: until the parent is fsynced, a power cut can take it back
even though the bytes it names are safe. Everything fetcher later relies on
(archived files, sidecars, folders, the partial bytes and record a resume
builds on) goes through here.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the entries of the folder ``path`` durable (renames, new files, new folders)."""
    _fsync(path)


def fsync_file(path: Path) -> None:
    """Put a file's bytes on stable storage (a file another process or run wrote)."""
    _fsync(path)


def _fsync(path: Path) -> None:
    # A folder and a file are fsynced alike on Linux: through a read-only descriptor.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folders(path: Path) -> None:
    """``mkdir -p`` that lasts: each folder made, and the one above that existed, is fsynced.

    Without this, a power cut can take a whole task folder (and the files renamed
    into it) back with it.
    """
    made: list[Path] = []
    probe = path
    while not probe.is_dir():
        made.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    if not made:
        return
    path.mkdir(parents=True, exist_ok=True)
    for folder in (*made, probe):
        fsync_dir(folder)


def write_text_durably(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, fsync it, and fsync its folder's entry for it."""
    with path.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(path.parent)
