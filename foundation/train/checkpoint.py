"""Checkpoints: `torch.distributed.checkpoint` folders written atomically, keep-last-K, resume.

Layout of one checkpoint, `<run>/checkpoints/step-<N>/`:
    .metadata, __<r>_0.distcp   DCP files: {"model": ..., "optim": ...} (sharded under FSDP2)
    rank-<r>.pt                 per-rank state: loader position, RNG states, lr schedule
    meta.json                   step, world size, parallel mode, config hash and config, versions
    COMPLETE                    written last; a folder without it is not a checkpoint
Every rank writes into `checkpoints/.tmp-step-<N>/`; when all are done, rank 0 writes `meta.json`
and `COMPLETE`, fsyncs, and renames the folder to `step-<N>` — so a job killed at any moment
leaves the previous checkpoints untouched and loadable. Multi-node runs need the run directory on
a file system every node sees (as DCP itself does).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from foundation.errors import ConfigError
from foundation.train.distributed import Distributed

_log = logging.getLogger(__name__)

FORMAT = "foundation.checkpoint"
VERSION = 1
COMPLETE = "COMPLETE"
META = "meta.json"


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / META).is_file()


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint of a run, oldest first."""
    root = checkpoints_root(run_dir)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            name = child.name
            if name.startswith("step-") and name[5:].isdigit() and is_complete(child):
                found.append((int(name[5:]), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> tuple[int, Path] | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not is_complete(path):
        raise ConfigError(
            f"{str(path)!r} is not a complete checkpoint folder (no {COMPLETE} marker or {META})"
        )
    meta = json.loads((path / META).read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError(
            f"{str(path / META)!r} is not a foundation checkpoint (format {meta.get('format')!r})"
        )
    if meta.get("version", 0) > VERSION:
        raise ConfigError(
            f"checkpoint {str(path)!r} has format version {meta['version']}; this version reads <= {VERSION}"
        )
    return meta


def remove_partial(run_dir: str | Path) -> None:
    """Delete folders left by saves that never completed (called by rank 0 before training)."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return
    for child in root.iterdir():
        if child.name.startswith(".tmp-") or child.name.startswith(".old-"):
            _log.warning("removing incomplete checkpoint folder %s", child)
            shutil.rmtree(child, ignore_errors=True)
        elif child.name.startswith("step-") and not is_complete(child):
            _log.warning("ignoring incomplete checkpoint folder %s", child)


def rng_state() -> dict[str, Any]:
    """Every random stream of this process (python, numpy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(path)


def _publish(tmp: Path, final: Path) -> None:
    """Make a fully written checkpoint visible (the one step a crash can interrupt harmlessly)."""
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rank_state: dict[str, Any],
    meta: dict[str, Any],
    dist_info: Distributed,
    keep_last: int,
) -> Path:
    """Write `step-<step>` atomically (collective: every rank calls it) and prune to `keep_last`."""
    root = checkpoints_root(run_dir)
    final = root / f"step-{step}"
    if is_complete(final):
        return final
    tmp = root / f".tmp-step-{step}"
    if dist_info.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist_info.barrier()
    start = time.perf_counter()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    torch.save(rank_state, tmp / f"rank-{dist_info.rank}.pt")
    dist_info.barrier()
    if dist_info.is_main:
        full_meta = {"format": FORMAT, "version": VERSION, "step": step, "world_size": dist_info.world_size}
        full_meta.update(meta)
        (tmp / META).write_text(json.dumps(full_meta, indent=1, default=str))
        _fsync_tree(tmp)
        (tmp / COMPLETE).write_text(f"{step}\n")
        _fsync_dir(tmp)
        if final.exists():  # an incomplete folder of the same step from an older crash
            shutil.rmtree(final)
        _publish(tmp, final)
        _prune(root, keep_last)
    dist_info.barrier()
    if dist_info.is_main:
        _log.info("saved checkpoint %s in %.1f s", final, time.perf_counter() - start)
    return final


def _prune(root: Path, keep_last: int) -> None:
    complete = list_checkpoints(root.parent)
    for _, path in complete[:-keep_last] if keep_last > 0 else []:
        trash = path.with_name(f".old-{path.name}")
        os.rename(path, trash)  # unpublish first: a half-deleted folder never looks complete
        shutil.rmtree(trash, ignore_errors=True)


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, dist_info: Distributed
) -> dict[str, Any]:
    """Restore model and optimiser in place (collective); return this rank's saved state."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank_file = path / f"rank-{dist_info.rank}.pt"
    if not rank_file.is_file():
        raise ConfigError(
            f"checkpoint {str(path)!r} has no state for rank {dist_info.rank} ({rank_file.name})"
        )
    # Our own file, holding python/numpy RNG tuples and loader state (not only tensors).
    return torch.load(rank_file, weights_only=False)


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Load only the model part of a checkpoint into a plain (unwrapped) model, in one process."""
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(state["model"])
