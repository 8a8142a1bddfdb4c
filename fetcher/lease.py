"""Leases: which run works on which task, so several runs share one state without a coordinator.

A run registers itself (``runs``: host, pid, until when it is alive) and claims
each task it works on with a lease (``leases``: the task, the run, when the
lease lapses). A claim takes a task nobody holds, or whose lease lapsed (its run
was killed, or paused past it), and leaves a task another live run holds to that
run. The run renews all its leases, and its own row, in one statement every
third of the lease, while it works; a run that stops being renewed (SIGKILL,
SIGSTOP, a lost host) lets its tasks go once the lease lapses, and any other
run takes them over.

A claim is one transaction, the queue worker's pattern on PostgreSQL: the lease
rows it may take over are locked ``FOR UPDATE SKIP LOCKED``, so two runs
claiming at once pass each other's rows by instead of waiting for them; the
leases are written; and, in a statement that sees every commit the lease
writes waited for, a task another run settled meanwhile (archived, or failed
for good) is let go again. So a run never takes a task another run archived
between the run's look at the task's state and its claim. On SQLite, whose
write lock serialises transactions, the same statements run without the lock
clause.

Whatever settles a task (its archived row above all) is written only under a
lease the run still holds: :meth:`Leases.held` checks it, and locks it, in the
settling write's own transaction, so a run that was paused past its lease
never commits over the run that took the task over.

Times are Unix seconds by the state's clock (:mod:`fetcher.clock`): on PostgreSQL
the server's, which every host's runs agree on whatever their own clocks say, learned
when the run begins and again before each renewal writes, so a clock stepped
meanwhile is caught up within a third of a lease; on SQLite this machine's. The SQL
is plain (UPSERT, RETURNING) and runs on SQLite 3.35 and PostgreSQL alike.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .clock import offset
from .state import ARCHIVED, Records, Step, now_text, redone

#: Default seconds a lease lasts unless renewed (``--lease``).
DEFAULT_LEASE = 60.0
#: IDs to one statement (a parameter each).
CHUNK = 500
#: A run's row is forgotten this long after it stopped being renewed (killed runs).
FORGET_AFTER = 24 * 3600.0
#: What PostgreSQL adds to a read of the rows a claim means to take: rows another
#: transaction has locked (its run settling the task, or claiming it) are passed by.
SKIP_LOCKED = {"postgresql": " FOR UPDATE SKIP LOCKED"}


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
    they are taken over at once, not after they lapse. ``clock`` is this machine's
    time of day in Unix seconds (``time.time``; tests pass their own), which
    :meth:`begin` and :meth:`renew` set to the state's clock.
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
        #: Seconds from ``clock`` to the state's time of day (0 until :meth:`begin`).
        self._offset = 0.0
        self.run_id = secrets.token_hex(8)

    @redone
    def begin(self) -> None:
        """Register the run (and forget runs long dead)."""
        self._offset = offset(self._db, self._clock)
        now = self.time_of_day()
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
    def claim(self, task_ids: Sequence[str], *, retry_failed: bool = False) -> set[str]:
        """Of ``task_ids``, those this run holds now; the rest another live run holds, or
        another run settled: archived, or failed for good (unless ``retry_failed``)."""
        ids = sorted(set(task_ids))  # one order for every run: their lease writes never cross
        held: set[str] = set()
        with self._db.atomic() as step:
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start : start + CHUNK]
                taken = self.take(step, chunk)
                # A statement of its own, after the lease writes: it sees whatever the
                # runs they waited for committed before letting go (a settled row first).
                settled = self._settled(step, taken, retry_failed)
                if settled:
                    step.execute(
                        "DELETE FROM leases WHERE run_id = ? AND task_id IN "
                        "(SELECT value FROM json_each(?))",
                        (self.run_id, json.dumps(sorted(settled))),
                    )
                held |= taken - settled
        return held

    def take(self, step: Step, task_ids: Sequence[str]) -> set[str]:
        """The leases of ``task_ids`` no other live run holds, written as this run's inside
        ``step``'s transaction (and returned); the others are left as they are.

        A lease row another transaction has locked is passed by, not waited for, on
        PostgreSQL; so is one that exists but is not this run's to take. Only a lease
        row another claim inserted and has not committed yet is waited for, as long as
        that claim's transaction lasts: claims write theirs in task order, so no two of
        them ever wait for each other in a circle.
        """
        marks = json.dumps(list(task_ids))
        lock = SKIP_LOCKED.get(self._db.dialect, "")
        now = self.now()
        takeable = {
            str(r[0])
            for r in step.execute(
                "SELECT task_id FROM leases WHERE task_id IN (SELECT value FROM json_each(?)) "  # noqa: S608
                f"AND (run_id = ? OR expires_at < ?) ORDER BY task_id{lock}",
                (marks, self.run_id, now),
            ).fetchall()
        }
        leased = {
            str(r[0])
            for r in step.execute(
                "SELECT task_id FROM leases WHERE task_id IN (SELECT value FROM json_each(?))",
                (marks,),
            ).fetchall()
        }
        wanted = sorted(t for t in task_ids if t in takeable or t not in leased)
        if not wanted:
            return set()
        rows = step.execute(
            "INSERT INTO leases (task_id, run_id, expires_at) "
            "SELECT value, ?, ? FROM json_each(?) WHERE true ORDER BY value "
            "ON CONFLICT (task_id) DO UPDATE SET run_id = excluded.run_id, "
            "expires_at = excluded.expires_at "
            "WHERE leases.run_id = excluded.run_id OR leases.expires_at < ? "
            "RETURNING task_id",
            (self.run_id, self.time_of_day() + self.seconds, json.dumps(wanted), now),
        ).fetchall()
        return {str(r[0]) for r in rows}

    @staticmethod
    def _settled(step: Step, task_ids: set[str], retry_failed: bool) -> set[str]:
        """Of ``task_ids``, those whose state says no run need work on them again."""
        if not task_ids:
            return set()
        rows = step.execute(
            "SELECT task_id, state, final FROM tasks "
            "WHERE task_id IN (SELECT value FROM json_each(?)) AND (state = ? OR final != 0)",
            (json.dumps(sorted(task_ids)), ARCHIVED),
        ).fetchall()
        return {str(t) for t, state, _ in rows if state == ARCHIVED or not retry_failed}

    @redone
    def renew(self) -> None:
        """Every lease of this run, and the run itself, good for another :attr:`seconds`."""
        # Learned before the writes: a clock stepped since the last renewal moves no lease.
        self._offset = offset(self._db, self._clock)
        expires = self.time_of_day() + self.seconds
        with self._db.atomic():
            self._db.query(
                "UPDATE leases SET expires_at = ? WHERE run_id = ? RETURNING task_id",
                (expires, self.run_id),
            )
            self._db.query(
                "UPDATE runs SET alive_until = ? WHERE run_id = ? RETURNING run_id",
                (expires, self.run_id),
            )

    def held(self, task_id: str, step: Step) -> bool:
        """Whether this run still holds ``task_id``, checked inside ``step``'s transaction:
        the settling write's own, before it writes (:class:`~fetcher.state.Records`'s
        settling methods take it as ``held``).

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

    def time_of_day(self) -> float:
        """The state's time, in which leases are written (see :mod:`fetcher.clock`)."""
        return self._clock() + self._offset

    def now(self) -> float:
        """The time other runs' leases are compared with: past them all when exclusive."""
        return math.inf if self._exclusive else self.time_of_day()

    def lapsed(self, holder: Holder) -> bool:
        """Whether ``holder``'s lease is free to take: nobody's, or past its time."""
        return holder.expires_at is None or holder.expires_at < self.now()


def live_runs(db: Records, now: float, limit: int | None) -> list[dict[str, object]]:
    """The runs renewed lately, oldest first, each with its leases (at most ``limit``);
    ``now`` is this machine's time, moved to the state's clock as leases are."""
    now += offset(db)
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


def live_run_ids(db: Records, now: float) -> set[str]:
    """The runs renewed lately (``alive_until`` not past): whose work nobody else touches."""
    return {str(r[0]) for r in db.query("SELECT run_id FROM runs WHERE alive_until >= ?", (now,))}
