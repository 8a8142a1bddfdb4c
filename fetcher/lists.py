"""The ``lists`` table: how far each list file is settled, as the archive remembers it.

:mod:`fetcher.bookmarks` decides, during a run, which mark of a list file is
settled; this module keeps that mark between runs, and gives it back to the next
run and to ``status``.
"""

from __future__ import annotations

from .ids import Mark
from .state import Records, now_text, redone


@redone
def save_bookmark(db: Records, mark: Mark) -> None:
    """Remember how far ``mark.source`` is settled, for the next run to start there."""
    with db.atomic() as conn:
        conn.execute(
            "INSERT INTO lists VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (source) DO UPDATE SET "
            "settled_bytes = excluded.settled_bytes, lines = excluded.lines, "
            "ids = excluded.ids, digest = excluded.digest, updated_at = excluded.updated_at",
            (mark.source, mark.offset, mark.lines, mark.ids, mark.digest, now_text()),
        )


def bookmarks(db: Records) -> list[tuple[Mark, str]]:
    """Every remembered list file, with when it was last settled (a row per list file).

    None in an archive made before lists were remembered (opened read-only, so not
    migrated: no table).
    """
    if not db.has_table("lists"):
        return []
    rows = db.query(
        "SELECT source, settled_bytes, lines, ids, digest, updated_at FROM lists ORDER BY source"
    )
    return [
        (Mark(str(source), int(str(size)), int(str(lines)), int(str(ids)), str(d)), str(at))
        for source, size, lines, ids, d, at in rows
    ]
