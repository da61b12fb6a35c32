"""slurm/search-index.sbatch on a real (one-node) SLURM cluster: the plan job trains the index and
submits an array of add tasks and a merge job that waits for them; a run interrupted after some
shards resumes when it is submitted again (the plan and finished shards are kept), and the index
it writes is the one a single process builds from the same files.

The interruption is made with the scheduler: a job that needs the whole node, queued before the
array exists, takes the node when the plan job ends, so the array waits; its last task is held,
the blocking job cancelled, the two other tasks run, then the array and the merge job are cancelled.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from foundation.search.files import query
from foundation.search.index import VectorIndex
from tests.testkit import REPO, child_env
from tests.testkit.embeddings import export_parts

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SCRIPT = REPO / "slurm" / "search-index.sbatch"
SHARDS = 3
BUILD_ARGS = "--param nlist=16 --tune-sample 60 --seed 4"
JOB_TIMEOUT_S = 180


def _job_env(parts: list[Path], out: Path, **extra: str) -> dict[str, str]:
    env = child_env(
        EMBEDDINGS=" ".join(str(p) for p in parts),
        MODALITY="spectrum",
        OUT=str(out),
        KIND="ivf",
        SHARDS=str(SHARDS),
        BUILD_ARGS=BUILD_ARGS,
        **extra,
    )
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        env["VENV"] = sys.prefix
    return env


def _submit_plan(slurm, folder: Path, env: dict[str, str], block: bool = False) -> tuple[str, str, str, Path]:
    """Submit the plan job in `folder`; (array job, merge job, blocking job or "", plan log) once it
    has run. `block`: a job needing every CPU is queued while the plan runs (before the array is
    submitted, so ahead of it) and holds the node when the plan ends; the caller cancels it."""
    blocker = ""
    if block:
        # A time limit on the plan job: backfill then knows the blocking job starts after it, and
        # does not start array tasks (without a limit) in front of it.
        plan = slurm.sbatch(SCRIPT, f"--chdir={folder}", "--hold", "--time=10", env=env)
        script = folder / "node-blocker.sh"
        script.write_text("#!/usr/bin/env bash\nsleep 600\n")
        cpus = os.cpu_count() or 1
        blocker = slurm.sbatch(
            script, f"--chdir={folder}", f"--cpus-per-task={cpus}", f"--dependency=after:{plan}",
            "--time=10", "--output=/dev/null",
        )  # fmt: skip
        slurm.scontrol("release", plan)
    else:
        plan = slurm.sbatch(SCRIPT, f"--chdir={folder}", env=env)
    log = folder / f"foundation-search-index-{plan}_4294967294.out"
    final = slurm.wait_finished(plan, JOB_TIMEOUT_S, log=log)
    text = log.read_text() if log.exists() else ""
    assert final.get("ExitCode") == "0:0", f"plan job failed: {final}\n{text}"
    found = re.search(r"submitted shard array (\d+) and merge job (\d+)", text)
    assert found, text
    slurm.jobs += list(found.groups())
    return found.group(1), found.group(2), blocker, log


def _shard_files(out: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / "build").glob("shard-*.faiss"))}


def _logs(folder: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(folder.glob("*.out")))


def test_search_index_job_runs_in_shards_and_resumes_after_an_interruption(slurm, tmp_path):
    parts, merged = export_parts(tmp_path)
    out = tmp_path / "index"
    jobs = tmp_path / "jobs"
    jobs.mkdir()

    # First submission, interrupted: only shards 0 and 1 run, then the rest is cancelled.
    array, merge, blocker, _ = _submit_plan(slurm, jobs, _job_env(parts, out), block=True)
    slurm.wait_until("the blocking job to start", lambda: slurm.state(blocker) == "RUNNING", JOB_TIMEOUT_S)
    assert slurm.state(array) == "PENDING" and slurm.state(merge) == "PENDING"
    slurm.scontrol("hold", f"{array}_2")
    slurm.scancel(blocker)
    for task in (0, 1):
        final = slurm.wait_finished(f"{array}_{task}", JOB_TIMEOUT_S, log=jobs / f"x-{array}_{task}.out")
        assert final.get("ExitCode") == "0:0", f"{final}\n{_logs(jobs)}"
    slurm.scancel(array)
    slurm.scancel(merge)
    slurm.wait_finished(merge, JOB_TIMEOUT_S)
    done = _shard_files(out)
    assert sorted(done) == ["shard-00000.faiss", "shard-00001.faiss"], _logs(jobs)
    assert not (out / "index.json").exists()

    # Submitted again: the plan and the finished shards are kept, shard 2 is added, merge writes OUT.
    again = tmp_path / "again"
    again.mkdir()
    array, merge, _, plan_log = _submit_plan(slurm, again, _job_env(parts, out))
    final = slurm.wait_finished(
        merge, JOB_TIMEOUT_S, log=again / f"foundation-search-index-merge-{merge}.out"
    )
    assert final.get("ExitCode") == "0:0", f"merge failed: {final}\n{_logs(again)}"
    assert "step plan done" in plan_log.read_text()
    assert "built ivf index over 1300 spectrum vectors" in _logs(again), _logs(again)
    assert not (out / "build").exists()

    # The same index as one process builds from the same parts.
    ref_out = tmp_path / "ref"
    from foundation.cli import main

    argv = ["search", "build", "--modality", "spectrum", "--kind", "ivf", "--out", str(ref_out)]
    argv += [a for p in parts for a in ("--embeddings", str(p))] + BUILD_ARGS.split()
    assert main(argv) == 0
    jobs_index, ref_index = VectorIndex.load(out), VectorIndex.load(ref_out)
    assert jobs_index.meta.tuning["value"] == ref_index.meta.tuning["value"]
    q = np.random.default_rng(5).standard_normal((30, jobs_index.meta.dim)).astype(np.float32)
    np.testing.assert_array_equal(jobs_index.search(q, 10)[1], ref_index.search(q, 10)[1])
    hits = query(out, ["p1-gal-00003"], query_modality="image", k=5, embeddings_path=merged)
    assert len(hits[0]["neighbours"]) == 5
