"""Times for people: epoch seconds as local ISO 8601 with the UTC offset (pure)."""

from datetime import datetime, timezone
from typing import Optional

# Record fields that hold epoch seconds (the admin API's instance records).
TIME_FIELDS = ("first_seen", "last_seen")


def local_iso(epoch: Optional[float]) -> str:
    """`2024-05-01T14:03:07+02:00`: seconds, the offset always written (also
    +00:00), so a line read elsewhere or later still names one instant.
    "-" for no time (None, 0: a record from before times were kept)."""
    if not epoch:
        return "-"
    return datetime.fromtimestamp(epoch, timezone.utc).astimezone().isoformat(timespec="seconds")


def for_people(record: dict) -> dict:
    """`record` with its TIME_FIELDS as local_iso strings (text output only:
    --json keeps epoch seconds)."""
    return {k: local_iso(v) if k in TIME_FIELDS and isinstance(v, (int, float)) else v
            for k, v in record.items()}
