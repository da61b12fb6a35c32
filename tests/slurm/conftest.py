"""A real one-node SLURM cluster for the `slurm` tests (slurm/local-cluster.sh), and job helpers.

The session fixture `slurm` starts the cluster when SLURM is installed and not running, and stops
at the end what it started. Where SLURM is not installed or cannot be started (not root, no
Debian packages) the tests are skipped with the reason — unless FOUNDATION_REQUIRE_SLURM=1
(set by .ci/run once it has started the cluster), which turns that into a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "slurm" / "local-cluster.sh"
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED", "REQUEUE_HOLD"}


def _unavailable(reason: str) -> None:
    if os.environ.get("FOUNDATION_REQUIRE_SLURM") == "1":
        pytest.fail(f"{reason} (and FOUNDATION_REQUIRE_SLURM=1)")
    pytest.skip(reason)


def _tail(log: Path | None, lines: int = 40) -> str:
    if log is None or not log.exists():
        return ""
    return "\n--- job log (tail) ---\n" + "\n".join(log.read_text().splitlines()[-lines:])


class Slurm:
    """Submit, inspect, signal and wait for jobs on the local cluster; cancels leftovers at the end."""

    def __init__(self) -> None:
        self.jobs: list[str] = []

    def sbatch(self, script: Path, *options: str, env: dict[str, str] | None = None) -> str:
        """Submit `script` with sbatch `options`; `env` is added to this process's environment."""
        full_env = {**os.environ, **(env or {})}
        done = subprocess.run(
            ["sbatch", "--parsable", *options, str(script)],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"sbatch failed: {done.stderr}"
        job = done.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def show(self, job: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once SLURM forgot it."""
        done = subprocess.run(
            ["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", done.stdout))

    def state(self, job: str) -> str:
        return self.show(job).get("JobState", "UNKNOWN")

    def scontrol(self, *args: str) -> None:
        done = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"scontrol {' '.join(args)} failed: {done.stderr}"

    def scancel(self, *args: str) -> None:
        done = subprocess.run(["scancel", *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"scancel {' '.join(args)} failed: {done.stderr}"

    def wait_until(
        self,
        what: str,
        condition: Callable[[], bool],
        timeout: float,
        log: Path | None = None,
        job: str | None = None,
    ) -> None:
        """Poll `condition` until it holds; fail with the job log's tail on timeout, or at once
        when `job` has ended without the condition holding."""
        deadline = time.monotonic() + timeout
        while not condition():
            ended = job is not None and self.state(job) not in ACTIVE_STATES
            if ended and not condition():
                pytest.fail(f"job {job} ended ({self.show(job)}) before {what}{_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{_tail(log)}")
            time.sleep(0.25)

    def wait_finished(self, job: str, timeout: float, log: Path | None = None) -> dict[str, str]:
        """Wait until `job` leaves the queue for good; returns its final `scontrol show job`."""
        self.wait_until(f"job {job} to finish", lambda: self.state(job) not in ACTIVE_STATES, timeout, log)
        return self.show(job)

    def cancel_leftovers(self) -> None:
        for job in self.jobs:
            if self.state(job) in ACTIVE_STATES:
                subprocess.run(["scancel", job], capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def slurm():
    """The local cluster, started here if needed (and then stopped at the end of the session)."""
    missing = [
        name
        for name in ("sbatch", "scontrol", "sinfo", "slurmctld", "slurmd", "munged")
        if not shutil.which(name)
    ]
    if missing:
        _unavailable(
            f"SLURM is not installed (no {', '.join(missing)}): run `slurm/local-cluster.sh install` as "
            "root on Debian/Ubuntu, or `.ci/run`, to get a one-node cluster"
        )
    status = subprocess.run([str(CLUSTER_SCRIPT), "status"], capture_output=True, text=True, timeout=60)
    started = False
    if status.returncode != 0:
        if os.geteuid() != 0:
            _unavailable("SLURM is installed but not running here, and starting the local cluster needs root")
        start = subprocess.run([str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=180)
        if start.returncode != 0:
            _unavailable(f"could not start the local SLURM cluster: {start.stderr.strip()[-600:]}")
        started = True
    cluster = Slurm()
    try:
        yield cluster
    finally:
        cluster.cancel_leftovers()
        if started:
            subprocess.run([str(CLUSTER_SCRIPT), "stop"], capture_output=True, timeout=120)
