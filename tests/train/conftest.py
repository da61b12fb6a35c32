"""Shared fixtures for the trainer tests: a tiny real shard set, configs, and a 2-rank launcher.

`toyfamily` (this folder) is the model; spawned ranks import it through PYTHONPATH.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from foundation.data import ShardWriter

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

LENGTH, FEATURES = 4, 4


def write_shards(path: Path, n_train: int = 96, n_valid: int = 24, nan_at: int | None = None) -> Path:
    """A regression shard set: y = 0.3 * sum(x) + noise; `nan_at` poisons one training sample."""
    rng = np.random.default_rng(123)
    for split, n in (("train", n_train), ("valid", n_valid)):
        with ShardWriter(path, split=split, samples_per_shard=16, family="toy") as writer:
            for i in range(n):
                x = rng.normal(size=(LENGTH, FEATURES)).astype(np.float32)
                y = float(0.3 * x.sum() + 0.05 * rng.normal())
                if split == "train" and i == nan_at:
                    y = float("nan")
                writer.write({"__key__": f"{split}-{i:04d}", "x": x, "y": y})
    return path


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("toy-shards"))


def config_dict(shards: Path, run_dir: Path, **sections) -> dict:
    """A tiny, fast pretraining config; keyword arguments update sections (`train={...}`)."""
    data = {
        "family": "toyfamily:FAMILY",
        "data": {"path": str(shards), "batch_size": 4, "num_workers": 0, "shuffle": True},
        "model": {"width": 16, "depth": 2},
        "run": {"dir": str(run_dir), "seed": 7},
        "optim": {"lr": 0.01, "warmup_steps": 3, "min_lr_ratio": 0.1},
        "train": {
            "steps": 12,
            "log_every": 2,
            "val_every": 6,
            "val_batches": 2,
            "ckpt_every": 4,
            "keep_last": 2,
            "progress": False,
            "tensorboard": False,
        },
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return data


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("TOY_ACTION", None)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(config: Path, *args: str, nproc: int = 2, env: dict | None = None, timeout: float = 240) -> list:
    """Run `foundation pretrain` as `nproc` ranks (the env vars torchrun sets); their CompletedProcesses."""
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        rank_env = child_env(**(env or {}))
        if nproc > 1:
            rank_env.update(
                RANK=str(rank),
                WORLD_SIZE=str(nproc),
                LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "foundation.cli", "pretrain", str(config), *args],
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, None))
    return results


def final_weights(run_dir: Path) -> dict:
    import torch

    return torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"
