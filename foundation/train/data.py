"""Loaders for the trainer: the shard set's `ShardDataset` inside torchdata's `StatefulDataLoader`.

Batches are built inside the loader workers (the dataset batches; the loader only moves them),
and `StatefulDataLoader.state_dict()` aggregates the per-worker dataset states, so a checkpoint
records exactly which batch comes next for every rank and worker.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from foundation.errors import FoundationError
from foundation.train.distributed import Distributed


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
        return _Loader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=dist_info.device.type == "cuda",
            # An explicit generator: creating the loader's iterator must not consume the global RNG,
            # or a resumed run would draw different dropout masks than an uninterrupted one.
            generator=torch.Generator().manual_seed(cfg.run.seed),
            worker_init_fn=functools.partial(loader_worker_init, loader_pid=os.getpid())
            if workers > 0
            else None,
            persistent_workers=workers > 0 and not train,
            prefetch_factor=cfg.data.prefetch if workers > 0 else None,
            multiprocessing_context=worker_context(collate) if workers > 0 else None,
        )


def worker_context(collate: Any) -> Any:
    """The loader workers' start method: `start_context`, never fork. A rank has other threads
    (gloo's, torch's), and under Python 3.11 a fork while one of them is being created or torn
    down leaves the child waiting forever on the interpreter's thread-list lock, in
    `PyOS_AfterFork_Child` (seen in a 2-rank test run: a validation loader's worker forked at step
    6 waited there; its rank waited for the batch, the other rank in the all-reduce, until the
    test's timeout). The server imports torch and the collate's module once."""
    from foundation.data.parallel import start_context

    collate_module = getattr(collate, "__module__", None) if collate is not None else None
    return start_context("torch", __name__, *([collate_module] if collate_module else []))


class _Loader(StatefulDataLoader):
    """StatefulDataLoader whose worker errors read as the worker raised them: torch re-raises a
    worker's exception with the worker's whole traceback as its message, and a FoundationError's
    message must stay the one sentence the CLI prints."""

    def __iter__(self) -> Iterator[Any]:
        return _plain_worker_errors(super().__iter__())


def _plain_worker_errors(batches: Iterator[Any]) -> Iterator[Any]:
    try:
        yield from batches
    except FoundationError as exc:
        raise type(exc)(worker_error_message(exc)) from exc  # (--verbose shows the worker's traceback)


def worker_error_message(exc: BaseException) -> str:
    """The original message of an exception torch re-raised from a loader worker
    ("Caught X in DataLoader worker process N.\nOriginal Traceback ...\n<module>.X: message")."""
    text = str(exc)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return text
    kind = type(exc)
    marker = f"{kind.__module__}.{kind.__qualname__}: "
    start = text.rfind(marker)
    return text[start + len(marker) :].strip() if start >= 0 else text


def loader_worker_init(worker_id: int, loader_pid: int | None = None) -> None:
    """DataLoader `worker_init_fn`: stop signals are the trainer's, except the loader's own SIGTERM.

    SLURM (and a terminal's process group) delivers a job's signals to every process: SIGUSR1's
    default action would kill a worker, and a worker killed by SIGTERM crashes the loader instead
    of letting the trainer stop cleanly, so workers ignore both. But the loader itself shuts its
    workers down with SIGTERM (multiprocessing terminates and then joins them when the process
    exits, e.g. after an error): a worker ignoring that signal would keep the run from ever
    exiting. So SIGTERM is blocked and a thread takes it: from the loader's process (`loader_pid`,
    default the parent: it differs under the forkserver start method) it ends the worker, as
    torch's own worker handler does; from anyone else it is dropped.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it
    loader = os.getppid() if loader_pid is None else loader_pid
    threading.Thread(target=_exit_on_loader_sigterm, args=(loader,), daemon=True).start()


def _exit_on_loader_sigterm(loader_pid: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == loader_pid:
            os._exit(0)  # as torch's worker handler: a clean exit, no "worker killed" report


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
