"""slurm/pretrain.sbatch and slurm/export.sbatch on a real (one-node) SLURM cluster.

The pretraining job is preempted twice while it trains — first the way a time limit does it
(`scancel --signal=USR1 --batch`: the batch script turns the signal into the trainer's stop file,
the trainer checkpoints, the script requeues the job), then the way a scheduler's preemption or
an operator does it (`scontrol requeue`: SIGTERM to every process, the trainer checkpoints, SLURM
requeues). Each restart must resume from the checkpoint the stop wrote, and the final weights
must be bitwise those of an uninterrupted job of the same config (CPU, fp32, same world size).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.testkit import REPO, child_env
from tests.testkit.configs import config_dict
from tests.testkit.shards import write_toy_shards

pytestmark = pytest.mark.slurm

PRETRAIN = REPO / "slurm" / "pretrain.sbatch"
EXPORT = REPO / "slurm" / "export.sbatch"
STEPS = 60
# 0.15 s per step (the toy family's TOY_SLEEP): a 9 s run, long enough to signal it twice mid-run
# on a loaded 2-core machine.
STEP_DELAY_S = "0.15"


def job_config(shards: Path, run_dir: Path) -> str:
    """The jobs' pretraining config (YAML) of the toy family."""
    data = config_dict(
        shards,
        run_dir,
        data={"batch_size": 8, "num_workers": 1},
        model={"width": 32},
        run={"seed": 3},
        optim={"lr": 0.01, "warmup_steps": 5},
        train={"steps": STEPS, "log_every": 1, "val_every": 20, "val_batches": 2, "ckpt_every": 0},
    )
    return yaml.safe_dump(data)


def job_env(config: Path, **extra: str) -> dict[str, str]:
    """The job's variables; VENV only where this is not the repository's .venv (the scripts'
    default, which the jobs then find by themselves)."""
    # The toy family is a module:ATTRIBUTE family: saved runs may load it once it is named trusted.
    env = child_env(
        CONFIG=str(config),
        FOUNDATION_FAMILY_MODULES="tests.testkit.toyfamily",
        TOY_SLEEP=STEP_DELAY_S,
        **extra,
    )
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        env["VENV"] = sys.prefix
    return env


def read_jsonl(path: Path) -> list[dict]:
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                pass
    return records


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss (the last record of a step wins, should a step have been logged twice)."""
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


def last_step(run_dir: Path) -> int:
    return max(train_losses(run_dir), default=0)


def resumed_steps(log: Path) -> list[int]:
    text = log.read_text() if log.exists() else ""
    return [int(n) for n in re.findall(r"resumed from \S+step-(\d+)", text)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-jobs")
    write_toy_shards(root / "shards", 448, 64, samples_per_shard=64)
    return root


@pytest.fixture(scope="module")
def reference_run(slurm, workspace):
    """An uninterrupted pretraining job (submitted once; tests wait for it as they need it)."""
    run_dir = workspace / "reference"
    config = workspace / "reference.yaml"
    config.write_text(job_config(workspace / "shards", run_dir))
    job = slurm.sbatch(
        PRETRAIN,
        "--job-name=reference",
        "--cpus-per-task=1",
        "--time=15",
        f"--chdir={workspace}",
        f"--output={workspace}/%x-%j.out",
        env=job_env(config, NPROC_PER_NODE="2"),
    )
    return job, run_dir, workspace / f"reference-{job}.out"


def test_pretrain_requeued_twice_resumes_to_the_uninterrupted_weights(slurm, workspace, reference_run):
    run_dir = workspace / "preempted"
    config = workspace / "preempted.yaml"
    config.write_text(job_config(workspace / "shards", run_dir))
    job = slurm.sbatch(
        PRETRAIN,
        "--job-name=preempted",
        "--cpus-per-task=1",
        "--time=15",
        f"--chdir={workspace}",
        f"--output={workspace}/%x-%j.out",
        env=job_env(config, NPROC_PER_NODE="2"),
    )
    log = workspace / f"preempted-{job}.out"

    # 1. Time-limit style: USR1 to the batch shell -> stop file -> checkpoint -> scontrol requeue.
    slurm.wait_until("the job to train a few steps", lambda: last_step(run_dir) >= 8, 180, log, job)
    slurm.scancel("--signal=USR1", "--batch", job)
    slurm.wait_until("the first resume", lambda: len(resumed_steps(log)) >= 1, 180, log, job)
    first = resumed_steps(log)[0]
    assert 8 <= first < STEPS, f"resumed from step {first}"
    assert slurm.show(job).get("Restarts") == "1"

    # 2. Scheduler style: scontrol requeue -> SIGTERM everywhere -> checkpoint -> SLURM requeues.
    slurm.wait_until("training past the first resume", lambda: last_step(run_dir) >= first + 5, 180, log, job)
    slurm.scontrol("requeue", job)
    final = slurm.wait_finished(job, 240, log)
    text = log.read_text()
    assert final["JobState"] == "COMPLETED", f"{final}\n{text[-3000:]}"
    assert final["Restarts"] == "2"
    assert "got SIGUSR1" in text and f"requeueing job {job}" in text
    resumes = resumed_steps(log)
    assert len(resumes) == 2, text[-3000:]
    # The second attempt stopped on SIGTERM and saved where it stopped (ckpt_every: 0, so every
    # checkpoint but the last is a preemption checkpoint).
    assert first + 5 <= resumes[1] < STEPS, resumes
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"

    ref_job, ref_dir, ref_log = reference_run
    ref = slurm.wait_finished(ref_job, 240, ref_log)
    assert ref["JobState"] == "COMPLETED" and ref["Restarts"] == "0", ref
    assert resumed_steps(ref_log) == []

    # Same weights, bit for bit, and the same loss at every step.
    ours = torch.load(run_dir / "model.pt", weights_only=False)
    theirs = torch.load(ref_dir / "model.pt", weights_only=False)
    assert ours["step"] == theirs["step"] == STEPS
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    for name, tensor in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][name], tensor), name
    losses, ref_losses = train_losses(run_dir), train_losses(ref_dir)
    assert sorted(losses) == sorted(ref_losses) == list(range(1, STEPS + 1))
    assert losses == ref_losses


def test_pretrain_bad_config_fails_fast_with_one_clear_line(slurm, workspace):
    config = workspace / "typo.yaml"
    config.write_text(job_config(workspace / "shards", workspace / "typo").replace("log_every", "log_evry"))
    job = slurm.sbatch(
        PRETRAIN,
        "--job-name=typo",
        f"--chdir={workspace}",
        f"--output={workspace}/%x-%j.out",
        env=job_env(config),
    )
    log = workspace / f"typo-{job}.out"
    final = slurm.wait_finished(job, 120, log)
    text = log.read_text()
    assert final["JobState"] == "FAILED" and final["ExitCode"] == "2:0", final
    assert "error: unknown config key 'train.log_evry'; did you mean 'log_every'" in text
    assert "Traceback" not in text and "srun" not in text
    assert not (workspace / "typo").exists()


def test_export_array_job_and_merge_match_a_single_process_export(slurm, workspace, reference_run):
    from foundation.embeddings import open_embeddings

    ref_job, ref_dir, ref_log = reference_run
    assert slurm.wait_finished(ref_job, 240, ref_log)["JobState"] == "COMPLETED"
    out = workspace / "embeddings" / "toy.h5"
    env = job_env(
        workspace / "unused.yaml",
        CHECKPOINT=str(ref_dir),
        DATA=str(workspace / "shards"),
        OUT=str(out),
        EXPORT_ARGS="--batch-size 16 --num-workers 0",
    )
    array = slurm.sbatch(
        EXPORT,
        "--array=0-1",
        "--job-name=export",
        "--cpus-per-task=1",
        f"--chdir={workspace}",
        f"--output={workspace}/%x-%A_%a.out",
        env=env,
    )
    first_log = workspace / f"export-{array}_0.out"
    slurm.wait_until(
        "the first task to submit the merge job",
        lambda: "submitted merge job" in (first_log.read_text() if first_log.exists() else ""),
        120,
        first_log,
        f"{array}_0",
    )
    merge = re.search(r"submitted merge job (\d+)", first_log.read_text()).group(1)
    slurm.jobs.append(merge)
    merge_log = workspace / f"export-merge-{merge}.out"
    for task in range(2):
        final = slurm.wait_finished(f"{array}_{task}", 180, workspace / f"export-{array}_{task}.out")
        assert final["JobState"] == "COMPLETED", final
    final = slurm.wait_finished(merge, 120, merge_log)
    assert final["JobState"] == "COMPLETED", f"{final}\n{merge_log.read_text()}"
    assert "merged 2 parts" in merge_log.read_text()

    # The same export in one process, outside SLURM.
    single = workspace / "embeddings" / "single.h5"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "foundation.cli",
            "export",
            "--checkpoint",
            str(ref_dir),
            "--data",
            str(workspace / "shards"),
            "--out",
            str(single),
            "--batch-size",
            "16",
            "--num-workers",
            "0",
            "--progress",
            "off",
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    with open_embeddings(out) as merged, open_embeddings(single) as whole:
        assert merged.rows == whole.rows == 512
        assert sorted(merged.ids) == sorted(whole.ids) and len(set(merged.ids)) == 512
        order = np.argsort(merged.ids)
        whole_order = np.argsort(whole.ids)
        np.testing.assert_allclose(
            merged.vectors("hidden")[order], whole.vectors("hidden")[whole_order], rtol=1e-6, atol=1e-7
        )


CLUSTER = REPO / "slurm" / "local-cluster.sh"


def _daemon_pids() -> dict[str, str]:
    pids = {}
    for name, pidfile in (("slurmctld", "/run/slurmctld.pid"), ("slurmd", "/run/slurmd.pid")):
        pids[name] = Path(pidfile).read_text().strip() if Path(pidfile).exists() else ""
    return pids


def test_local_cluster_start_is_idempotent(slurm):
    before = _daemon_pids()
    done = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "started" not in done.stderr  # nothing was (re)started
    assert _daemon_pids() == before
    status = subprocess.run([str(CLUSTER), "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and status.stdout.startswith("up:"), status


def test_local_cluster_never_overwrites_a_foreign_slurm_conf(slurm, tmp_path):
    foreign = tmp_path / "slurm.conf"
    foreign.write_text("ClusterName=production\n")
    done = subprocess.run(
        [str(CLUSTER), "start"],
        env={**os.environ, "SLURM_CONF": str(foreign)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "was not written by this script; refusing to overwrite it" in done.stderr
    assert foreign.read_text() == "ClusterName=production\n"
