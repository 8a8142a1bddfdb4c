"""Work folders on a shared state: one per run, so a run cleans only what dead runs left.

On SQLite the archive's lock says no other run is working, so the run holding it
cleans the whole work folder. A PostgreSQL state has no lock: runs on this host, and
on other hosts that share the archive's folder, stage downloads side by side. So each
run stages in a room of its own, ``run-<run_id>/`` inside the store's work folder,
made only after the run is registered in the state's ``runs`` table. A room whose run
the table no longer lists as live (gone, or not renewed in time: killed, or paused
past its lease, whose tasks others take over) is a dead run's, and any run may clean it.

Cleaning keeps what SQLite's does: a partial download with its record, for as long as
a file URL lives, and the store's own markers. The run that takes over that file's
task (it holds the task's lease, so no live run writes that file) moves those into
its own room and resumes there; a dead room that ends up empty is removed, and so is
a run's own when it ends with nothing in flight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection
from pathlib import Path

from ..durable import fsync_dir, make_folders
from .local import archive_error, clean_work_folder, work_file

#: A run's room is this followed by its run ID.
ROOM_PREFIX = "run-"


class RunRoom:
    """One run's room in ``top``, and the dead runs' rooms it cleans and takes files from.

    ``live()`` gives the run IDs the state lists as live now (this run's included);
    ``keep`` names suffixes of the store's own files a dead room keeps (a bucket's
    markers of uploads no row records yet).
    """

    def __init__(
        self,
        top: Path,
        run_id: str,
        live: Callable[[], Collection[str]],
        keep: tuple[str, ...] = (),
    ) -> None:
        self.top = top
        self.path = top / f"{ROOM_PREFIX}{run_id}"
        self._live = live
        self._keep = keep

    def open(self, now: float | None = None) -> None:
        """Clean the dead runs' rooms, then make this run's own.

        The rooms are listed before the live runs are read: a run registers before it
        makes its room, so a room listed is one whose run the read can see.
        """
        rooms = self._rooms()
        alive = self._live()
        for room in rooms:
            if room.name.removeprefix(ROOM_PREFIX) not in alive:
                _clean_room(room, now, self._keep)
        make_folders(self.path)

    def ready(self) -> Path:
        """This run's room, made again when another run took this one for dead and removed
        it (this run's row lapsed while the state was out of reach, say)."""
        if not self.path.is_dir():
            # Not made: the write into it fails next, and says why, for that file alone.
            with contextlib.suppress(OSError):
                make_folders(self.path)
        return self.path

    def file(self, task_id: str, index: int) -> Path:
        """The work file of one task's file in this room, with what a dead run left of it
        moved in first (call it only while holding the task's lease)."""
        own = work_file(self.ready(), task_id, index)
        if not own.exists():
            # A partial that cannot be moved (a permission, a full disk) is only not
            # resumed: the file is downloaded from its start instead.
            with contextlib.suppress(OSError):
                self._take_over(own)
        return own

    def close(self) -> None:
        """The run is over: its room goes if nothing is left in it (else a later run's
        clean-up keeps what can be resumed)."""
        remove_if_empty(self.path)

    def _rooms(self) -> list[Path]:
        """Every room in the work folder but this run's own."""
        with contextlib.suppress(FileNotFoundError):
            return [
                entry
                for entry in self.top.iterdir()
                if entry.name.startswith(ROOM_PREFIX) and entry != self.path and entry.is_dir()
            ]
        return []

    def _take_over(self, own: Path) -> None:
        """Move a dead run's partial of this file (bytes, record, marker) into ``own``'s room."""
        stem = own.name.removesuffix(own.suffix)
        found = [room for room in self._rooms() if any(room.glob(f"{stem}.*"))]
        if not found:
            return
        alive = self._live()
        for room in found:
            if room.name.removeprefix(ROOM_PREFIX) in alive:
                continue  # a live run's: not touched, whatever it holds
            for entry in room.glob(f"{stem}.*"):
                with contextlib.suppress(FileNotFoundError):  # another run's clean-up won
                    entry.replace(self.path / entry.name)
            fsync_dir(self.path)
            remove_if_empty(room)
            return


def open_room(
    top: Path,
    run_id: str,
    live: Callable[[], Collection[str]],
    keep: tuple[str, ...] = (),
) -> RunRoom:
    """A run's room, opened (dead rooms cleaned, its own made); a failure is the archive's
    one line."""
    room = RunRoom(top, run_id, live, keep)
    try:
        room.open()
    except OSError as exc:
        raise archive_error(exc, room.path) from exc
    return room


def _clean_room(room: Path, now: float | None, keep: tuple[str, ...]) -> None:
    """A dead run's room without what cannot be resumed; removed when that is all of it.

    Another run may be cleaning it, or taking a file from it, at the same time: an
    entry gone in between is skipped, never an error.
    """
    with contextlib.suppress(FileNotFoundError):
        clean_work_folder(room, now, keep)
    remove_if_empty(room)


def remove_if_empty(room: Path) -> None:
    """``rmdir``: a room that is not empty (or already gone) stays as it is."""
    with contextlib.suppress(OSError):
        room.rmdir()
