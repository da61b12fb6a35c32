"""Graceful stop on SIGUSR1 / SIGTERM or a stop file, for preemptible and requeued jobs.

The handler only sets a flag; the trainer finishes the optimiser step it is in, all ranks agree
on the stop (the flag is summed over ranks together with the step's loss), a checkpoint is
saved and the process exits with `EXIT_PREEMPTED` (75, EX_TEMPFAIL: "try again") and
`<run>/status.json` says `"state": "preempted"`. Re-running the same command resumes exactly.

torchrun forwards SIGTERM (and SIGINT/SIGHUP) to its workers but not SIGUSR1; under torchrun,
have the batch script forward the signal or create the stop file (`<run>/STOP` by default),
which rank 0 polls once per step and removes once the stop is done.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

EXIT_PREEMPTED = 75
"""Exit code after a requested stop (signal or stop file): a checkpoint was saved; re-run to resume."""
EXIT_DIVERGED = 3
"""Exit code after a non-finite loss or gradient norm: nothing was saved; the last good checkpoint stays."""

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Collects stop requests (signals, a stop file) and restores signal handlers on close."""

    def __init__(self, stop_file: Path | None, poll_file: bool) -> None:
        self.stop_file = stop_file
        self.poll_file = poll_file and stop_file is not None
        self.signal_received: int | None = None
        self.file_seen = False
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signal_received = signum

    def requested(self) -> bool:
        """True once this process got a stop signal or (rank 0) sees the stop file."""
        if self.signal_received is not None:
            return True
        if self.poll_file and not self.file_seen and self.stop_file.exists():
            self.file_seen = True
        return self.file_seen

    def reason(self) -> str:
        if self.signal_received is not None:
            return f"signal {signal.Signals(self.signal_received).name}"
        if self.file_seen:
            return f"stop file {self.stop_file}"
        return "a stop requested by another rank"

    def consume_stop_file(self) -> None:
        """Remove the stop file so that the resumed run does not stop again at once."""
        if self.file_seen and self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
