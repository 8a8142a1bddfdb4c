"""The time of day leases are written and compared in: one clock for every run on a state.

Runs on one host share its clock, but runs on several hosts sharing a PostgreSQL
state would each read their own, and clocks a fraction of a lease apart make one
run take over another's live tasks, or wait minutes for a dead one's. So on a
shared state the time is the database server's: this machine's clock plus the
offset between the two. The offset is one reading of the server's
``clock_timestamp()`` (the time as the statement runs, not as its transaction
began), set at the midpoint of two readings of this machine's clock around it:
off by at most half the round trip. On SQLite the runs share a host, and its clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .state import Records

#: The statement that reads the server's time of day in Unix seconds, by dialect; none
#: where the state's time is this machine's.
SERVER_TIME = {"postgresql": "SELECT EXTRACT(EPOCH FROM clock_timestamp())"}
#: A reading whose round trip took longer (a reconnect in it) is taken again, ...
NARROW = 0.1
#: ... this many readings at most, the narrowest kept.
READINGS = 3


def offset(db: Records, clock: Callable[[], float] = time.time) -> float:
    """Seconds to add to ``clock`` for the state's time of day: 0 but on a shared state."""
    sql = SERVER_TIME.get(db.dialect)
    if sql is None:
        return 0.0
    readings: list[tuple[float, float]] = []  # (round trip, offset)
    while len(readings) < READINGS and (not readings or readings[-1][0] > NARROW):
        before = clock()
        row = db.query_one(sql)
        after = clock()
        assert row is not None, "a SELECT of one value returned no row"
        readings.append((after - before, float(str(row[0])) - (before + after) / 2))
    return min(readings)[1]
