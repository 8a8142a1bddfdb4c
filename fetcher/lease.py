"""Leases: which run works on which task, so several runs share one state without a coordinator.

A run registers itself (``runs``: host, pid, until when it is alive) and claims
each task it works on with a lease (``leases``: the task, the run, when the
lease lapses). A claim is one atomic UPSERT: it takes a task nobody holds, or
whose lease lapsed (its run was killed, or paused past it), and leaves a task
another live run holds to that run. The run renews all its leases, and its own
row, in one statement every third of the lease, while it works; a run that
stops being renewed (SIGKILL, SIGSTOP, a lost host) lets its tasks go once the
lease lapses, and any other run takes them over.

Whatever settles a task (its archived row above all) is written only under a
lease the run still holds: :meth:`Leases.guard` checks it, and locks it, in the
settling write's own transaction, so a run that was paused past its lease
never commits over the run that took the task over.

Times are Unix seconds from this machine's clock; the SQL is plain (UPSERT,
RETURNING) and runs on SQLite 3.35 and PostgreSQL alike.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .state import Records, Step, now_text, redone

#: Default seconds a lease lasts unless renewed (``--lease``).
DEFAULT_LEASE = 60.0
#: IDs to one statement (a parameter each).
CHUNK = 500
#: A run's row is forgotten this long after it stopped being renewed (killed runs).
FORGET_AFTER = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Holder:
    """A task's lease as another run sees it."""

    task_id: str
    state: str | None
    final: bool
    #: The run holding it, or None when nobody does.
    run_id: str | None
    expires_at: float | None


class Leases:
    """One run's leases over one state; :meth:`begin` before the first claim, :meth:`end` after.

    ``exclusive``: the run holds the archive's lock, so no other run is running and
    every other run's lease is void (a run killed before it let go of its tasks):
    they are taken over at once, not after they lapse. ``clock`` is the time of day
    in Unix seconds (``time.time``; tests pass their own).
    """

    def __init__(
        self,
        db: Records,
        seconds: float = DEFAULT_LEASE,
        *,
        exclusive: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self.seconds = seconds
        self._exclusive = exclusive
        self._clock = clock
        self.run_id = secrets.token_hex(8)

    @redone
    def begin(self) -> None:
        """Register the run (and forget runs long dead)."""
        now = self._clock()
        with self._db.atomic():
            self._db.query(
                "DELETE FROM runs WHERE alive_until < ? RETURNING run_id", (now - FORGET_AFTER,)
            )
            self._db.query(
                "INSERT INTO runs (run_id, host, pid, started_at, alive_until) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (run_id) DO NOTHING RETURNING run_id",
                (self.run_id, socket.gethostname(), os.getpid(), now_text(), now + self.seconds),
            )

    @redone
    def end(self) -> None:
        """Let go of every lease still held (tasks left unsettled) and unregister the run."""
        with self._db.atomic():
            self._db.query("DELETE FROM leases WHERE run_id = ? RETURNING task_id", (self.run_id,))
            self._db.query("DELETE FROM runs WHERE run_id = ? RETURNING run_id", (self.run_id,))

    @redone
    def claim(self, task_ids: Sequence[str]) -> set[str]:
        """Of ``task_ids``, those this run holds now; the rest another live run holds."""
        held: set[str] = set()
        expires = self._clock() + self.seconds
        with self._db.atomic():
            for start in range(0, len(task_ids), CHUNK):
                chunk = list(dict.fromkeys(task_ids[start : start + CHUNK]))
                rows = ", ".join(["(?, ?, ?)"] * len(chunk))
                params = [v for task_id in chunk for v in (task_id, self.run_id, expires)]
                returned = self._db.query(
                    f"INSERT INTO leases (task_id, run_id, expires_at) VALUES {rows} "  # noqa: S608
                    "ON CONFLICT (task_id) DO UPDATE SET run_id = excluded.run_id, "
                    "expires_at = excluded.expires_at "
                    "WHERE leases.run_id = excluded.run_id OR leases.expires_at < ? "
                    "RETURNING task_id",
                    (*params, self.now()),
                )
                held.update(str(r[0]) for r in returned)
        return held

    @redone
    def renew(self) -> None:
        """Every lease of this run, and the run itself, good for another :attr:`seconds`."""
        expires = self._clock() + self.seconds
        with self._db.atomic():
            self._db.query(
                "UPDATE leases SET expires_at = ? WHERE run_id = ? RETURNING task_id",
                (expires, self.run_id),
            )
            self._db.query(
                "UPDATE runs SET alive_until = ? WHERE run_id = ? RETURNING run_id",
                (expires, self.run_id),
            )

    @redone
    def guard(self, task_id: str) -> bool:
        """Whether this run still holds ``task_id``: call it just before a settling write.

        On SQLite the check joins the turn's write transaction, and with it the
        settling write (a run's steps of one turn commit together); on PostgreSQL
        a step is a transaction of its own, so the archived row is checked inside
        its own step instead (:meth:`held`).
        """
        if self._exclusive:
            return True  # no other run is running to take it over: nothing to check
        with self._db.atomic() as step:
            return self.held(task_id, step)

    def held(self, task_id: str, step: Step) -> bool:
        """Whether this run still holds ``task_id``, checked inside ``step``'s transaction.

        The lease row is written (to itself), which locks it until the transaction
        ends: on SQLite the database's write lock, on PostgreSQL the row's. A lease
        that lapsed but that no run took over is still this run's: nobody else holds it.
        """
        if self._exclusive:
            return True
        row = step.execute(
            "UPDATE leases SET expires_at = expires_at WHERE task_id = ? AND run_id = ? "
            "RETURNING task_id",
            (task_id, self.run_id),
        ).fetchone()
        return row is not None

    @redone
    def release(self, task_id: str) -> None:
        """The task is settled by this run: nobody needs to wait for it."""
        with self._db.atomic():
            self._db.query(
                "DELETE FROM leases WHERE task_id = ? AND run_id = ? RETURNING task_id",
                (task_id, self.run_id),
            )

    def holders(self, task_ids: Iterable[str]) -> list[Holder]:
        """Each task's state and lease, as other runs left them (a task no run has
        recorded yet has no state)."""
        ids = list(task_ids)
        found: list[Holder] = []
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            marks = ", ".join("?" * len(chunk))
            states = {
                str(t): (None if s is None else str(s), bool(f))
                for t, s, f in self._db.query(
                    f"SELECT task_id, state, final FROM tasks WHERE task_id IN ({marks})",  # noqa: S608
                    chunk,
                )
            }
            leases = {
                str(t): (str(r), float(str(e)))
                for t, r, e in self._db.query(
                    "SELECT task_id, run_id, expires_at FROM leases "  # noqa: S608
                    f"WHERE task_id IN ({marks})",
                    chunk,
                )
            }
            for task_id in chunk:
                state, final = states.get(task_id, (None, False))
                run_id, expires = leases.get(task_id, (None, None))
                found.append(Holder(task_id, state, final, run_id, expires))
        return found

    def now(self) -> float:
        """The time other runs' leases are compared with: past them all when exclusive."""
        return math.inf if self._exclusive else self._clock()

    def lapsed(self, holder: Holder) -> bool:
        """Whether ``holder``'s lease is free to take: nobody's, or past its time."""
        return holder.expires_at is None or holder.expires_at < self.now()


def live_runs(db: Records, now: float, limit: int | None) -> list[dict[str, object]]:
    """The runs renewed lately, oldest first, each with its leases (at most ``limit``)."""
    runs = db.query(
        "SELECT run_id, host, pid, started_at, alive_until FROM runs "
        "WHERE alive_until >= ? ORDER BY started_at, run_id",
        (now,),
    )
    found: list[dict[str, object]] = []
    for run_id, host, pid, started_at, alive_until in runs:
        leases = db.query(
            "SELECT task_id, expires_at FROM leases WHERE run_id = ? ORDER BY task_id LIMIT ?",
            (run_id, db.no_limit if limit is None else limit),
        )
        count = db.query_one("SELECT COUNT(*) FROM leases WHERE run_id = ?", (run_id,))
        found.append(
            {
                "run_id": str(run_id),
                "host": str(host),
                "pid": int(str(pid)),
                "started_at": str(started_at),
                "alive_for_seconds": int(float(str(alive_until)) - now),
                "lease_count": int(str(count[0])) if count else 0,
                "leases": [
                    {"task_id": str(t), "expires_in_seconds": int(float(str(e)) - now)}
                    for t, e in leases
                ],
            }
        )
    return found
