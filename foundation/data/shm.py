"""Reusable shared-memory buffers for batches built in loader workers.

Why: torch sends each tensor a worker yields through a *fresh* shared-memory file — the worker
allocates and zeroes new pages and faults them in, the main process fetches the file descriptor
over a socket from the worker's resource-sharer thread (connect, HMAC handshake), maps it and
unmaps it again when the batch dies. At 64 KiB samples that costs about as much CPU as reading
the data. Here each worker keeps a few buffers (memfd files) and sends a buffer's descriptor only
the first time; a batch then travels as (buffer, offset, dtype, shape) and the main process builds
its tensors over its existing mapping. When the last tensor of a batch dies the main process marks
the buffer free and the worker reuses it, pages already in place.

Protocol (byte 0 and 1 of a buffer's header, each with one writer per transition):
- state: FREE → BUSY by the worker when it takes a buffer; BUSY → FREE by the main process when
  the last tensor of the batch is freed (or by the worker, if the batch never left it).
- closed: set once by the worker when it stops using a buffer (pool closed, or too many free ones).
The main process forgets a mapping when it is free and closed, when the worker's last batch has
been received, or when the worker has exited (a DataLoader worker exits only after the main
process has received everything it sent, or when the loader shuts down and drops the rest).
Tensors in the main process are ordinary CPU tensors over that memory and keep it alive.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import secrets
import select
import threading
import weakref
from collections.abc import Sequence
from multiprocessing.reduction import DupFd, ForkingPickler
from typing import Any

import numpy as np
import torch

from foundation.errors import DataError

log = logging.getLogger(__name__)

HEADER = 64  # bytes before a buffer's data (keeps the data 64-byte aligned)
ALIGN = 64  # alignment of each array inside a buffer
FREE, BUSY = 0, 1
STATE, CLOSED = 0, 1  # header byte offsets
KEEP_FREE = 2  # free buffers a worker keeps beyond the one it takes

AVAILABLE = hasattr(os, "memfd_create")


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


class _Lease:
    """Base object of the numpy arrays (and so of the tensors) of one batch: exposes the buffer's
    data area; when the last array over it is freed, `__del__` releases the buffer."""

    __slots__ = ("_interface", "_release", "_args", "__weakref__")

    def __init__(self, address: int, nbytes: int, release, *args):
        self._interface = {"data": (address, False), "shape": (nbytes,), "typestr": "|u1", "version": 3}
        self._release = release
        self._args = args

    @property
    def __array_interface__(self) -> dict:
        return self._interface

    def __del__(self):
        release, self._release = self._release, None
        if release is not None:
            try:
                release(*self._args)
            except Exception:  # interpreter shutdown: the memory goes with the process
                pass


# ---------------------------------------------------------------------- worker side


class _Buffer:
    __slots__ = ("index", "fd", "map", "bytes", "capacity", "announced", "local", "__weakref__")

    def __init__(self, index: int, capacity: int):
        self.index = index
        self.capacity = capacity
        self.fd = os.memfd_create(f"foundation-batch-{index}", os.MFD_CLOEXEC)
        # closed with the last reference (a batch may still be pickled on the queue's thread)
        weakref.finalize(self, os.close, self.fd)
        os.ftruncate(self.fd, capacity)
        self.map = mmap.mmap(self.fd, capacity)
        self.bytes = np.frombuffer(self.map, dtype=np.uint8)
        self.announced = False
        self.local = False  # arrays over it still alive in this process

    def close(self) -> None:
        """This process will not use the buffer again (the memory lives while anyone maps it)."""
        self.bytes[CLOSED] = 1


def _release_local(buffer: _Buffer, sent: list) -> None:
    buffer.local = False
    if not sent[0]:  # never sent: nobody else will free it
        buffer.bytes[STATE] = FREE


def _tensor(base: np.ndarray, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor over base[offset:] (a uint8 array whose base is a _Lease)."""
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(base[offset : offset + nbytes]).view(dtype).reshape(shape)


class PooledBatch(dict):
    """A batch (a plain dict to its users) whose arrays live in one buffer of a worker's pool;
    pickled for the main process by reference (see `_reduce_pooled`)."""

    def __copy__(self) -> PooledBatch:
        clone = PooledBatch(self)
        clone.__dict__.update(self.__dict__)
        return clone


class BatchBuffers:
    """One loader worker's buffers for one iteration of the dataset. `batch(layout)` gives a
    PooledBatch of empty tensors over a free buffer; `close()` when the iteration ends."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(8)
        self.pid = os.getpid()
        self.buffers: list[_Buffer] = []
        self._created = 0

    def _acquire(self, nbytes: int) -> _Buffer:
        free = [b for b in self.buffers if not b.local and b.bytes[STATE] == FREE]
        fitting = [b for b in free if b.capacity >= HEADER + nbytes]
        chosen = min(fitting, key=lambda b: b.capacity) if fitting else None
        spare = [b for b in free if b is not chosen]
        for b in spare[KEEP_FREE:]:  # the consumer once held many batches: give the memory back
            b.close()
            self.buffers.remove(b)
        if chosen is None:
            page = mmap.PAGESIZE
            chosen = _Buffer(self._created, -(-(HEADER + nbytes) // page) * page)
            self._created += 1
            self.buffers.append(chosen)
        chosen.bytes[STATE] = BUSY
        chosen.local = True
        return chosen

    def batch(
        self, layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], order: Sequence[str]
    ) -> PooledBatch:
        """A PooledBatch with keys `order`: empty tensors over one buffer for the fields of `layout`
        (field, dtype, shape), None for the others (to be filled by the caller)."""
        offsets = []
        total = 0
        for _, dtype, shape in layout:
            offsets.append(total)
            total += -(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN
        buffer = self._acquire(max(total, 1))
        sent = [False]
        lease = _Lease(_address(buffer.bytes) + HEADER, total, _release_local, buffer, sent)
        base = np.asarray(lease)
        batch = PooledBatch.fromkeys(order)
        regions = {}
        for (field, dtype, shape), offset in zip(layout, offsets, strict=True):
            tensor = _tensor(base, offset, dtype, shape)
            batch[field] = tensor
            regions[field] = (tensor, offset, dtype, shape)
        batch.__dict__.update(pool=self, buffer=buffer, sent=sent, regions=regions, final=False)
        return batch

    def adopt(self, batch: Any) -> Any:
        """A collate_fn's dict batch with its tensors copied into one buffer (one copy, where torch
        would create, fill and send a new shared-memory file per tensor). Only plain contiguous CPU
        tensors that own their whole storage, alone, move; anything else is left to torch."""
        if type(batch) is not dict:
            return batch
        storages: dict[int, list[str]] = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                storages.setdefault(value.untyped_storage().data_ptr(), []).append(key)
        layout = []
        for key, value in batch.items():
            if (
                type(value) is torch.Tensor
                and value.device.type == "cpu"
                and value.layout == torch.strided
                and not value.requires_grad
                and not value.is_shared()
                and not (value.is_conj() or value.is_neg())
                and value.is_contiguous()
                and value.storage_offset() == 0
                and value.untyped_storage().nbytes() == value.nbytes
                and len(storages[value.untyped_storage().data_ptr()]) == 1  # no other view of it
            ):
                layout.append((key, value.dtype, tuple(value.shape)))
        if not layout:
            return batch
        pooled = self.batch(layout, list(batch))
        for key, value in batch.items():
            if key in pooled.regions:
                pooled[key].copy_(value)
            else:
                pooled[key] = value
        return pooled

    def close(self) -> None:
        for b in self.buffers:
            b.close()
        self.buffers.clear()


def _reduce_pooled(batch: PooledBatch):
    """Pickling for multiprocessing (ForkingPickler only): arrays by reference into the buffer."""
    regions = {}
    plain = {}
    for key, value in batch.items():
        region = batch.regions.get(key)
        if region is not None and region[0] is value:
            regions[key] = region[1:]
        else:
            plain[key] = value
    if not regions:  # every array was replaced: an ordinary dict
        return dict, (plain,)
    buffer: _Buffer = batch.buffer
    dupfd = None
    if not buffer.announced:
        dupfd = DupFd(buffer.fd)
        buffer.announced = True
    batch.sent[0] = True
    pool: BatchBuffers = batch.pool
    return _rebuild_pooled, (
        pool.token,
        pool.pid,
        buffer.index,
        buffer.capacity,
        dupfd,
        list(batch),
        regions,
        plain,
        batch.final,
    )


ForkingPickler.register(PooledBatch, _reduce_pooled)


# ---------------------------------------------------------------------- main-process side


class _Mapping:
    """The main process's mapping of one worker buffer."""

    __slots__ = ("record", "index", "map", "bytes", "leases", "pid")

    def __init__(self, record: _Record, index: int, fd: int, capacity: int):
        self.record = record
        self.index = index
        self.pid = os.getpid()
        self.map = mmap.mmap(fd, capacity)
        self.bytes = np.frombuffer(self.map, dtype=np.uint8)
        self.leases = 0


class _Record:
    """What the main process knows of one worker pool."""

    def __init__(self, token: str, pid: int):
        self.token = token
        self.pid = pid
        self.final = False
        self.mappings: dict[int, _Mapping] = {}
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self.pidfd = None

    def exited(self) -> bool:
        if self.pidfd is not None:
            poller = select.poll()
            poller.register(self.pidfd, select.POLLIN)
            return bool(poller.poll(0))
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False

    def sweep(self) -> None:
        """Forget the mappings that no batch still to come can refer to."""
        for index, m in list(self.mappings.items()):
            if m.leases == 0 and (self.final or (m.bytes[CLOSED] and m.bytes[STATE] == FREE)):
                del self.mappings[index]
        if not self.mappings:  # a later buffer of this pool would come with its descriptor
            self.forget()

    def forget(self) -> None:
        _RECORDS.pop(self.token, None)
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


_RECORDS: dict[str, _Record] = {}
_LOCK = threading.RLock()  # batches may be received on the pin-memory thread


def _release_mapping(mapping: _Mapping) -> None:
    if os.getpid() != mapping.pid:  # a forked child dropping its copy of a batch: not ours to free
        return
    with _LOCK:
        mapping.leases -= 1
        if mapping.leases == 0:
            mapping.bytes[STATE] = FREE
            mapping.record.sweep()


def _rebuild_pooled(
    token: str,
    pid: int,
    index: int,
    capacity: int,
    dupfd: Any,
    keys: list[str],
    regions: dict[str, tuple[int, torch.dtype, tuple[int, ...]]],
    plain: dict[str, Any],
    final: bool,
) -> dict[str, Any]:
    fd = dupfd.detach() if dupfd is not None else -1
    with _LOCK:
        try:
            record = _RECORDS.get(token)
            if record is None:
                for other in list(_RECORDS.values()):  # a new pool: tidy up after the others
                    if other.exited():
                        other.final = True
                    other.sweep()
                record = _RECORDS[token] = _Record(token, pid)
            if fd >= 0:
                record.mappings[index] = _Mapping(record, index, fd, capacity)
        finally:
            if fd >= 0:
                os.close(fd)
        mapping = record.mappings.get(index)
        if mapping is None:
            record.sweep()
            raise DataError(
                f"a batch from loader worker {pid} refers to shared buffer {index}, which this process "
                "never received (was the batch pickled for another process?)"
            )
        mapping.leases += 1
        if final:
            record.final = True
    lease = _Lease(_address(mapping.bytes) + HEADER, capacity - HEADER, _release_mapping, mapping)
    base = np.asarray(lease)
    del lease
    batch = {}
    for key in keys:
        region = regions.get(key)
        if region is None:
            batch[key] = plain[key]
        else:
            batch[key] = _tensor(base, *region)
    with _LOCK:
        record.sweep()
    return batch
