"""Module-level unit functions for `ordered_map` tests (worker processes import them by name)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from foundation.errors import DataError


def scaled(context: int, item: int) -> int:
    """item x context, slower for even items so that workers finish out of order."""
    if item % 2 == 0:
        time.sleep(0.02)
    return item * context


def pid_of(context: None, item: int) -> int:
    return os.getpid()


def fail_on(context: int, item: int) -> int:
    """A DataError naming the file for item == context."""
    if item == context:
        raise DataError(f"unit{item}.h5: trajectory 0 has non-finite values in steps 0..4")
    return item


def mark_started(context: str, item: int) -> int:
    """Leave a marker per started unit, then take a while (to test bounded in-flight work)."""
    (Path(context) / f"started-{item}").touch()
    time.sleep(0.05)
    return item


def slow_unit(context: str, item: int) -> int:
    """Record this worker's pid, take a second, record that the unit finished."""
    (Path(context) / f"pid-{os.getpid()}").touch()
    time.sleep(1)
    (Path(context) / f"done-{item}").touch()
    return item
