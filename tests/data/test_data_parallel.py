"""ordered_map: results in input order, at most max_in_flight units pending, worker errors
re-raised as they are, and a stopped map ends its workers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from foundation.data.parallel import ordered_map
from foundation.errors import DataError
from tests.testkit import parallel_units as units


def test_results_come_in_input_order_for_any_worker_count():
    items = list(range(20))
    expected = [3 * i for i in items]
    assert list(ordered_map(units.scaled, items, 1, context=3)) == expected
    assert list(ordered_map(units.scaled, iter(items), 2, context=3, max_in_flight=5)) == expected


def test_one_worker_runs_inline_and_more_run_in_other_processes():
    assert set(ordered_map(units.pid_of, range(3), 1)) == {os.getpid()}
    assert os.getpid() not in set(ordered_map(units.pid_of, range(6), 2))


def test_at_most_max_in_flight_units_are_submitted_ahead_of_the_consumer(tmp_path):
    results = ordered_map(units.mark_started, range(50), 2, context=str(tmp_path), max_in_flight=3)
    assert next(results) == 0
    time.sleep(0.5)  # ample time for an unbounded map to start every unit
    started = len(list(tmp_path.glob("started-*")))
    assert started <= 4  # the 3 pending plus the one just consumed
    results.close()


def test_a_data_error_in_a_worker_is_the_same_one_line_error():
    with pytest.raises(DataError) as inline:
        list(ordered_map(units.fail_on, range(10), 1, context=7))
    with pytest.raises(DataError) as pooled:
        list(ordered_map(units.fail_on, range(10), 2, context=7))
    assert str(pooled.value) == str(inline.value)
    assert "unit7.h5" in str(pooled.value)


def test_bad_worker_counts_are_refused():
    with pytest.raises(ValueError):
        list(ordered_map(units.scaled, range(3), 0))
    with pytest.raises(ValueError):
        list(ordered_map(units.scaled, range(3), 2, max_in_flight=0))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


@pytest.mark.slow
def test_sigterm_stops_the_map_and_ends_its_workers(tmp_path):
    """The units not started are dropped, the running ones finish, the workers exit."""
    script = textwrap.dedent(
        f"""
        import sys
        from foundation.data.parallel import ordered_map
        from tests.testkit import parallel_units as units
        try:
            for _ in ordered_map(units.slow_unit, range(20), 2, context={str(tmp_path)!r}):
                pass
        except KeyboardInterrupt:
            print("interrupted")
            sys.exit(3)
        """
    )
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=repo,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("pid-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    worker_pids = [int(p.name.split("-")[1]) for p in tmp_path.glob("pid-*")]
    assert len(worker_pids) == 2
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 3 and "interrupted" in out
    deadline = time.monotonic() + 10
    while any(map(_alive, worker_pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, worker_pids))
    assert len(list(tmp_path.glob("done-*"))) <= 6  # of 20: the pool did not run on to the end
