"""Two ranks over gloo on CPU: DDP and FSDP2 against one process, exact resume, external signals."""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from foundation.config import load_pretrain_config
from foundation.data import ShardDataset
from foundation.train import EXIT_PREEMPTED, train
from foundation.train import checkpoint as ckpt
from tests.testkit import child_env
from tests.testkit.configs import config_dict, write_config
from tests.testkit.ranks import run_ranks, torchrun_command
from tests.testkit.runs import assert_bitwise_equal, final_weights

pytestmark = pytest.mark.slow

# Not the per-test seeded `random` (tests/conftest.py): every run tries other steps; the step is in
# the assertion messages.
UNSEEDED = random.SystemRandom()


# SGD: linear in the gradient, so "same gradients" shows as "same weights" up to rounding (see
# test_train_loop). Micro-batch 2 x grad_accum 2 per rank: DDP's no_sync path is in every step.
DDP = {
    "optim": {"name": "sgd", "lr": 0.05, "warmup_steps": 2},
    "data": {"batch_size": 2, "num_workers": 0},
    "train": {"grad_accum": 2, "parallel": "ddp", "steps": 10, "ckpt_every": 4},
}


def section_merge(base: dict, **changes) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for section, values in changes.items():
        out.setdefault(section, {}).update(values)
    return out


def losses(run_dir) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def assert_ok(results, code=0):
    for rank, result in enumerate(results):
        assert result.returncode == code, f"rank {rank} exited {result.returncode}:\n{result.stdout[-3000:]}"


@pytest.fixture(scope="module")
def ddp_run(shards, tmp_path_factory):
    """An uninterrupted 2-rank DDP run: the reference for the resume tests below."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    path = write_config(run_dir.parent / "cfg.yaml", config_dict(shards, run_dir, **DDP))
    assert_ok(run_ranks(["pretrain", str(path)]))
    return run_dir


class RankInterleave:
    """One process reading what 2 ranks read in a step: rank 0's micro-batches, then rank 1's."""

    def __init__(self, shards, batch_size: int, accum: int, seed: int) -> None:
        self.accum = accum
        self.ranks = [
            ShardDataset(shards, "train", batch_size=batch_size, seed=seed, epochs=None, rank=r, world_size=2)
            for r in (0, 1)
        ]

    def __iter__(self):
        streams = [iter(dataset) for dataset in self.ranks]
        while True:
            for stream in streams:
                for _ in range(self.accum):
                    yield next(stream)


def test_ddp_and_fsdp_match_one_process_with_the_same_global_batch(ddp_run, shards, tmp_path):
    # One process, the same 8 samples per step: 4 micro-batches of 2 (rank 0's two, then rank 1's).
    single = section_merge(DDP, train={"grad_accum": 4, "parallel": "none"})
    cfg = load_pretrain_config(
        write_config(tmp_path / "one.yaml", config_dict(shards, tmp_path / "one", **single))
    )
    train(cfg, train_loader=RankInterleave(shards, batch_size=2, accum=2, seed=cfg.run.seed))

    # FSDP2 through the real torchrun launcher, micro-batch 4 x 1 per rank (the same samples: a
    # rank's stream does not depend on the batch size).
    fsdp = section_merge(DDP, data={"batch_size": 4}, train={"grad_accum": 1, "parallel": "fsdp"})
    path = write_config(tmp_path / "fsdp.yaml", config_dict(shards, tmp_path / "fsdp", **fsdp))
    torchrun = subprocess.run(
        torchrun_command(["pretrain", str(path)]),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert torchrun.returncode == 0, torchrun.stdout[-3000:] + torchrun.stderr[-3000:]
    assert ckpt.read_meta(ckpt.latest_checkpoint(tmp_path / "fsdp")[1])["parallel"] == "fsdp"

    reference = final_weights(tmp_path / "one")
    for run_dir in (ddp_run, tmp_path / "fsdp"):
        weights = final_weights(run_dir)
        for key in reference:
            torch.testing.assert_close(weights[key], reference[key], rtol=1e-4, atol=1e-6, msg=key)
    losses = {
        name: [
            r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r
        ]
        for name, d in {"one": tmp_path / "one", "ddp": ddp_run, "fsdp": tmp_path / "fsdp"}.items()
    }
    assert losses["ddp"] == pytest.approx(losses["one"], rel=1e-5)
    assert losses["fsdp"] == pytest.approx(losses["one"], rel=1e-5)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from Linux's /proc")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_finished_rank_takes_no_process_group_threads_into_exit(parallel, shards, tmp_path):
    """destroy_process_group frees the gloo group only once nothing else holds it (FSDP2's DTensor
    plans did, and reference cycles): a rank that exits with gloo's threads alive
    can abort at exit ("terminate called without an active exception") after a successful run."""
    data = config_dict(shards, tmp_path / "run", **section_merge(DDP, train={"parallel": parallel}))
    path = write_config(tmp_path / "cfg.yaml", data)
    command = torchrun_command([str(path), str(tmp_path)])
    command[command.index("foundation.cli")] = "tests.testkit.train_threads"
    result = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        names = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert not [name for name in names if "gloo" in name], (rank, names)


def test_two_ranks_stop_together_and_resume_bitwise(ddp_run, shards, tmp_path):
    """SIGUSR1 reaches rank 1 only, mid-step, with 2 loader workers per rank."""
    call = UNSEEDED.randint(3, 18)  # a micro-step of rank 1; rank 0 learns of it by the all-reduce
    stop_step = math.ceil(call / 2)
    run_dir = tmp_path / "run"
    data = config_dict(shards, run_dir, **section_merge(DDP, data={"num_workers": 2}))
    path = write_config(tmp_path / "cfg.yaml", data)

    stopped = run_ranks(["pretrain", str(path)], env={"TOY_ACTION": f"{call}:SIGUSR1:1"})
    assert_ok(stopped, EXIT_PREEMPTED)
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["step"]) == ("preempted", stop_step), f"signal at micro-step {call}"
    assert ckpt.latest_checkpoint(run_dir)[0] == stop_step

    assert_ok(run_ranks(["pretrain", str(path)]))
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
    assert_bitwise_equal(final_weights(run_dir), final_weights(ddp_run))
    assert losses(run_dir) == losses(ddp_run), f"signal at micro-step {call}"


def _wait_for_step(run_dir, step: int, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        if metrics.exists() and any(
            json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines() if line
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def test_external_sigterm_to_torchrun_at_a_random_moment_resumes_exactly(ddp_run, shards, tmp_path):
    """The scheduler's view: SIGTERM to torchrun (which forwards it to the ranks) at an arbitrary
    moment of a run slowed down to 0.25 s per micro-step; the resumed run ends on the reference."""
    run_dir = tmp_path / "run"
    path = write_config(tmp_path / "cfg.yaml", config_dict(shards, run_dir, **DDP))
    proc = subprocess.Popen(
        torchrun_command(["pretrain", str(path)]),
        env=child_env(TOY_SLEEP="0.25"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for_step(run_dir, 2, proc)
        time.sleep(UNSEEDED.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and status["step"] < 10, out[-3000:]
    assert ckpt.latest_checkpoint(run_dir)[0] == status["step"]

    assert_ok(run_ranks(["pretrain", str(path)]))
    assert_bitwise_equal(final_weights(run_dir), final_weights(ddp_run))


def _garble_rank_1_state(path) -> None:
    (path / "rank-1.json").write_text('{"schedule": ')  # only rank 1 finds this one damaged


def _zero_data_files(path) -> None:
    for file in path.glob("*.distcp"):  # sizes kept: found when DCP loads, on every rank
        file.write_bytes(bytes(file.stat().st_size))


@pytest.mark.parametrize("damage", [_garble_rank_1_state, _zero_data_files])
def test_two_ranks_fall_back_together_from_a_damaged_checkpoint(ddp_run, shards, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(ddp_run, run_dir)
    damage(run_dir / "checkpoints" / "step-10")
    path = write_config(tmp_path / "cfg.yaml", config_dict(shards, run_dir, **DDP))
    results = run_ranks(["pretrain", str(path)])
    assert_ok(results)
    assert "trying the one before" in results[0].stdout
    assert_bitwise_equal(final_weights(run_dir), final_weights(ddp_run))
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == [8, 10]
