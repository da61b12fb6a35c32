"""SIGTERM as Ctrl-C: `kill` and a batch system's stop reach the same clean-up as an interrupt."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises KeyboardInterrupt in the main thread, so that `with` and
    `finally` blocks clean up (child processes stopped, temporaries removed) instead of the process
    dying with them undone. Elsewhere than the main thread (where no handler can be set) it does
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
