"""Loaders for the trainer: the shard set's `ShardDataset` inside torchdata's `StatefulDataLoader`.

Batches are built inside the loader workers (the dataset batches; the loader only moves them),
and `StatefulDataLoader.state_dict()` aggregates the per-worker dataset states, so a checkpoint
records exactly which batch comes next for every rank and worker.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from foundation.train.distributed import Distributed
from foundation.train.preemption import ignore_stop_signals_in_worker


def build_loader(
    cfg: Any,
    family: Any,
    manifest: Any,
    dist_info: Distributed,
    *,
    split: str,
    train: bool,
) -> StatefulDataLoader:
    """The loader over `split` for this rank: an endless shuffled stream for training, one
    unshuffled pass (read from the start at each validation) otherwise."""
    from foundation.data import ShardDataset

    collate = family.make_collate(cfg.model, manifest, train) if family.make_collate is not None else None
    dataset = ShardDataset(
        cfg.data.path,
        split=split,
        batch_size=cfg.data.batch_size,
        seed=cfg.run.seed,
        shuffle=cfg.data.shuffle if train else False,
        epochs=None if train else 1,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        collate_fn=collate,
        drop_last=train,  # validation sees every sample (its last batches may be smaller)
    )
    workers = cfg.data.num_workers
    with warnings.catch_warnings():
        # torchdata 0.11 calls a deprecated torch API in every constructor; nothing to act on.
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
        return StatefulDataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=dist_info.device.type == "cuda",
            # An explicit generator: creating the loader's iterator must not consume the global RNG,
            # or a resumed run would draw different dropout masks than an uninterrupted one.
            generator=torch.Generator().manual_seed(cfg.run.seed),
            worker_init_fn=ignore_stop_signals_in_worker if workers > 0 else None,
            persistent_workers=workers > 0 and not train,
            prefetch_factor=cfg.data.prefetch if workers > 0 else None,
        )


def batch_samples(batch: Any) -> int:
    """Number of samples in a batch: the length of `__key__`, else the first tensor's first dim."""
    if isinstance(batch, dict):
        keys = batch.get("__key__")
        if isinstance(keys, list | tuple):
            return len(keys)
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                return int(value.shape[0])
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[0])
    raise TypeError(f"cannot tell the number of samples in a batch of type {type(batch).__name__}")


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to `device`; other values pass through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(value, device) for value in batch)
    return batch
