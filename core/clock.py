"""The one clock of the domain: timezone-aware UTC wall time for records (create, start and
end times). Measurements never use it; they use `time.perf_counter_ns` inside the server."""

from __future__ import annotations

import datetime as dt

__all__ = ["utcnow"]


def utcnow() -> dt.datetime:
    """Now, in UTC, timezone-aware."""
    return dt.datetime.now(dt.UTC)
