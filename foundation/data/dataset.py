"""`ShardDataset`: the streaming, deterministic, resumable loader over a shard set.

Every rank has one stream of batches fixed by (seed, epoch, rank, world_size) (see plan.py).
Loader worker w of W builds batches w, w+W, w+2W, ... of that stream; PyTorch's DataLoader
collects from workers round-robin, so the order a rank sees is the same for any `num_workers`.
Resuming is O(1): the state is just (epoch, next batch).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from foundation.data import codec, shm, tario
from foundation.data.manifest import Manifest
from foundation.data.plan import EpochPlan, _rng
from foundation.data.reader import ShardReader
from foundation.data.remote import RemoteShardSet, is_url
from foundation.errors import DataError

log = logging.getLogger(__name__)

STATE_VERSION = 1


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size: arguments, else torch.distributed if initialised, else the
    RANK / WORLD_SIZE environment variables (torchrun, our SLURM scripts), else 0 / 1."""
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        try:
            r = int(os.environ.get("RANK", 0))
            w = int(os.environ.get("WORLD_SIZE", 1))
        except ValueError:
            raise DataError("the RANK / WORLD_SIZE environment variables must be integers") from None
    return (int(rank) if rank is not None else r), (int(world_size) if world_size is not None else w)


def _plausible_sample_counts(directory, shards) -> list[int]:
    """The manifest's sample count of each shard, refused when its file could not hold that many
    (each sample takes a 512-byte tar header at least): the epoch plan sizes its shuffle buffers
    from these counts before any shard is opened, so a damaged manifest must not size them.
    `directory` None (a remote set): the recorded sizes, which every fetched shard must match."""
    counts = []
    for shard in shards:
        try:
            size = shard.bytes if directory is None else os.stat(directory / shard.name).st_size
        except FileNotFoundError:
            size = None  # reported when the shard is opened
        if size is not None and shard.samples * tario.BLOCK > size:
            raise DataError(
                f"shard {shard.name}: the manifest records {shard.samples} samples but the file's {size} "
                "bytes cannot hold that many; the manifest is damaged: re-create it"
            )
        counts.append(shard.samples)
    return counts


def _accepts_rng(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "rng" in params


class ShardDataset(IterableDataset):
    """Batches from one split of a shard set: dicts of tensors plus `"__key__"` (list of str).

    Use with ``DataLoader(ds, batch_size=None, num_workers=N)`` (batching happens here, in the
    workers) or torchdata's ``StatefulDataLoader`` for exact resume with workers.

    Args:
        path: shard-set directory (holding manifest.json), or its URL (`https://`, `s3://`, `gs://`,
            `hf://`, read through a local cache with default settings), or a `RemoteShardSet`.
        split: "train", "valid", "test", ...
        batch_size: samples per batch (per rank).
        seed: fixes shard order and shuffling for every epoch.
        shuffle: permute shards and shuffle within windows of `shuffle_window` samples.
        epochs: epochs per iteration (None = infinite stream, new permutation every epoch).
        rank, world_size: None = from torch.distributed / RANK, WORLD_SIZE / single process.
        collate_fn: ``fn(samples) -> batch`` (or ``fn(samples, rng=np.random.Generator)``, seeded
            per batch so random masking/augmentation is reproducible and resumable); runs in the
            workers and must be picklable. Samples are dicts of numpy arrays, Python scalars,
            str and decoded JSON, plus "__key__". None = stack arrays/numbers into tensors.
        drop_last: True = every batch full, < world_size*batch_size samples per epoch skipped;
            False = every sample once per epoch, the last batches of a rank may be smaller.
        fields: load only these fields (default: all).
        shuffle_window: samples shuffled together (default 4 shards' worth).
        check_sha256: hash each shard when first opened (slower start; see docs/shards.md).
        max_open_shards: shard files kept open at once (default: what a shuffle window needs).
        read_ahead: a remote set: shards fetched in the background ahead of the reading (at most
            half the cache bound); 0 = fetch each shard only when a batch needs it.
    """

    def __init__(
        self,
        path: str | os.PathLike | RemoteShardSet,
        split: str = "train",
        batch_size: int = 32,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = 1,
        rank: int | None = None,
        world_size: int | None = None,
        collate_fn: Callable[..., Any] | None = None,
        *,
        drop_last: bool = True,
        fields: Sequence[str] | None = None,
        shuffle_window: int | None = None,
        check_sha256: bool = False,
        max_open_shards: int | None = None,
        read_ahead: int = 4,
    ):
        super().__init__()
        self.remote: RemoteShardSet | None = None
        if isinstance(path, RemoteShardSet):
            self.remote = path
        elif is_url(path):
            self.remote = RemoteShardSet(path)
        self.manifest = self.remote.manifest if self.remote else Manifest.load(path)
        self.split = split
        self.split_info = self.manifest.split(split)
        if not self.split_info.shards:
            raise DataError(f"split {split!r} of {path} has no shards")
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            raise DataError(f"epochs must be a positive integer or None (infinite), got {epochs!r}")
        self.epochs = epochs
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.collate_fn = collate_fn
        self._collate_takes_rng = collate_fn is not None and _accepts_rng(collate_fn)
        self.check_sha256 = check_sha256
        schema = self.manifest.schema
        if fields is None:
            fields = list(schema)
        else:
            fields = list(fields)
            unknown = [f for f in fields if f not in schema]
            if unknown:
                raise DataError(f"unknown field(s) {unknown}; the shard set has: {', '.join(schema)}")
        self.fields = fields
        if collate_fn is None:
            variable = [f for f in fields if schema[f].variable]
            if variable:
                raise DataError(
                    f"field(s) {variable} have variable shapes "
                    f"({', '.join(str(list(schema[f].shape)) for f in variable)}); "
                    "the default collate can only stack equal shapes: pass a collate_fn that pads, or "
                    "select other fields with fields=[...]"
                )
        sizes = _plausible_sample_counts(None if self.remote else self.manifest.path, self.split_info.shards)
        typical = max(1, int(np.median([s for s in sizes if s > 0] or [1])))
        self.shuffle_window = int(shuffle_window) if shuffle_window else 4 * max(sizes)
        self.plan = EpochPlan(
            sizes,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            window=self.shuffle_window,
            split=split,
        )
        if not isinstance(read_ahead, int) or read_ahead < 0:
            raise DataError(f"read_ahead must be a whole number of shards >= 0, got {read_ahead!r}")
        self.read_ahead = read_ahead
        self.max_open_shards = max_open_shards or max(
            4, math.ceil((self.shuffle_window + self.batch_size) / typical) + 2
        )
        # Every iteration starts at `_start` (set by set_epoch / load_state_dict), so iterating
        # twice gives the same batches whatever num_workers is; `_cursor` is where the latest
        # iteration in *this* process got to, which is what state_dict() reports.
        self._start: dict[str, Any] = {"epoch": 0, "batch": 0, "first_epoch": 0}
        self._cursor: dict[str, Any] | None = None
        self._readers: OrderedDict[int, ShardReader] = OrderedDict()

    @classmethod
    def in_order(
        cls,
        path: str | os.PathLike | RemoteShardSet,
        split: str,
        batch_size: int,
        collate_fn: Callable[..., Any] | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> ShardDataset:
        """Every sample of `split` once, in stored order, the last batch kept: the pass that
        evaluation and export make (this process alone unless `rank`/`world_size` share it)."""
        return cls(
            path,
            split=split,
            batch_size=batch_size,
            shuffle=False,
            epochs=1,
            rank=rank,
            world_size=world_size,
            collate_fn=collate_fn,
            drop_last=False,
        )

    # ------------------------------------------------------------------ sizes

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank yields per epoch (identical across ranks)."""
        return self.plan.batches

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank yields per epoch."""
        return self.plan.rank_samples

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an infinite ShardDataset (epochs=None) has no length")
        return self.plan.batches * self.epochs

    # ------------------------------------------------------------------ state

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "samples": self.plan.total,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "shuffle_window": self.shuffle_window,
        }

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of `epoch` (like DistributedSampler.set_epoch)."""
        self._start = {"epoch": int(epoch), "batch": 0, "first_epoch": int(epoch)}
        self._cursor = None

    def state_dict(self) -> dict[str, Any]:
        """Where an iteration in this process got to: {"epoch", "batch" (next to yield), ...}.
        `load_state_dict` of it makes the next iteration continue exactly there. With
        num_workers > 0 use torchdata's StatefulDataLoader, which gathers these from the workers."""
        position = self._cursor if self._cursor is not None else self._start
        return {"version": STATE_VERSION, **position, "config": self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "epoch" not in state or "batch" not in state:
            raise DataError(f"not a ShardDataset state: {state!r}")
        saved = state.get("config", {})
        mine = self._fingerprint()
        diff = {k: (saved[k], mine[k]) for k in mine if k in saved and saved[k] != mine[k]}
        if diff:
            text = ", ".join(f"{k}: saved {a!r} now {b!r}" for k, (a, b) in diff.items())
            raise DataError(
                f"cannot resume the loader exactly: its settings changed ({text}); restore the settings, "
                "or start a fresh epoch with set_epoch()"
            )
        start = {
            k: int(state[k])
            for k in ("epoch", "batch", "first_epoch", "worker_id", "num_workers")
            if k in state
        }
        start.setdefault("first_epoch", start["epoch"])
        self._start = start
        self._cursor = None

    # ------------------------------------------------------------------ iteration

    def __iter__(self):
        self._cursor = None  # a new iteration starts at `_start`
        return self._iterate()

    def _iterate(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        nb = self.plan.batches
        state = dict(self._start)
        position = state["epoch"] * nb + state["batch"]
        if not (state.get("worker_id") == worker and state.get("num_workers") == workers):
            position += worker  # a rank-level position: this worker starts at its own offset
        stop = (state["first_epoch"] + self.epochs) * nb if self.epochs is not None else None
        first_epoch = state["first_epoch"]
        # In a loader worker, batches go to the main process through reusable shared buffers.
        pool = shm.BatchBuffers() if info is not None and shm.AVAILABLE else None
        try:
            while stop is None or position < stop:
                epoch, b = divmod(position, nb)
                batch = self._build(epoch, b, pool)
                if self.remote is not None and self.read_ahead:
                    upcoming = self.plan.shards_after(epoch, b, self.read_ahead)
                    self.remote.prefetch(self.split_info.shards[s] for s in upcoming.tolist())
                position += workers
                if isinstance(batch, shm.PooledBatch) and stop is not None and position >= stop:
                    batch.final = True  # this worker's last: the main process can let go of the pool
                # Updated before the yield: StatefulDataLoader snapshots right after receiving the batch.
                e, nb_next = divmod(position, nb)
                self._cursor = {
                    "epoch": e,
                    "batch": nb_next,
                    "first_epoch": first_epoch,
                    "worker_id": worker,
                    "num_workers": workers,
                }
                if workers == 1:
                    del self._cursor["worker_id"], self._cursor["num_workers"]
                yield batch
        finally:
            if self.remote is not None:
                self.remote.stop_read_ahead()
            if pool is not None:
                pool.close()

    def batch_at(self, epoch: int, index: int) -> Any:
        """Batch `index` of `epoch` on this rank, built directly (for inspection and tests)."""
        return self._build(epoch, index)

    # ------------------------------------------------------------------ building batches

    def _reader(self, shard: int) -> ShardReader:
        reader = self._readers.get(shard)
        if reader is not None:
            self._readers.move_to_end(shard)
            return reader
        info = self.split_info.shards[shard]
        reader = (
            self._open_shard(info) if self.remote else self._open_reader(self.manifest.path / info.name, info)
        )
        self._readers[shard] = reader
        while len(self._readers) > self.max_open_shards:
            # Dropped, not closed: a batch being built may still hold it; its file is
            # closed with the last reference.
            self._readers.popitem(last=False)
        return reader

    def _open_reader(self, path, info) -> ShardReader:
        return ShardReader(
            path,
            self.manifest.schema,
            expected_bytes=info.bytes,
            expected_samples=info.samples,
            expected_sha256=info.sha256 if self.check_sha256 else None,
        )

    def _open_shard(self, info) -> ShardReader:
        """A remote shard from the cache; fetched again once if another loader process evicted it
        between its fetch and its opening (an open shard stays readable after eviction)."""
        for last in (False, True):
            path = self.remote.shard_path(info)
            try:
                return self._open_reader(path, info)
            except (DataError, FileNotFoundError):
                if last or path.exists():
                    raise
        raise AssertionError("unreachable")

    def _build(self, epoch: int, b: int, pool: shm.BatchBuffers | None = None) -> Any:
        shards, indices = self.plan.batch(epoch, b)
        indices = indices.tolist()
        readers = [self._reader(s) for s in shards.tolist()]
        keys = [r.keys[i] for r, i in zip(readers, indices, strict=True)]
        if self.collate_fn is None:
            batch = default_collate_from_shards(readers, indices, self.fields, self.manifest.schema, pool)
            batch["__key__"] = keys
            return batch
        samples = [r.sample(i, self.fields) for r, i in zip(readers, indices, strict=True)]
        if self._collate_takes_rng:
            batch = self.collate_fn(samples, rng=_rng(self.seed, epoch, self.rank, b, 2))
        else:
            batch = self.collate_fn(samples)
        if isinstance(batch, dict) and "__key__" not in batch:
            batch["__key__"] = keys
        return pool.adopt(batch) if pool is not None else batch

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_readers"] = OrderedDict()  # open files stay with their process
        return state


def default_collate_from_shards(readers, indices, fields, schema, pool=None) -> dict[str, Any]:
    """Columns straight from the shards: one pread per array member, into the batch tensor.
    Array and scalar fields become tensors: over one reusable shared buffer of `pool` (loader
    workers, see shm.py), else in ordinary memory (else, in a worker without memfd, torch's
    shared memory)."""
    n = len(readers)
    layout = [
        (field, _torch_dtype(schema[field].dtype), (n, *schema[field].shape))
        for field in fields
        if not schema[field].optional and schema[field].kind in ("npy", "scalar")
    ]
    if pool is not None:
        batch = pool.batch(layout, fields)
    else:
        batch = dict.fromkeys(fields)
        for field, dtype, shape in layout:
            batch[field] = _empty_batch_tensor(shape, np.dtype(schema[field].dtype), dtype)
    for field in fields:
        spec = schema[field]
        if spec.optional:
            batch[field] = [r.decode(i, field) for r, i in zip(readers, indices, strict=True)]
        elif spec.kind == "npy":
            _stack_arrays(batch[field], readers, indices, field)
        elif spec.kind == "scalar":
            values = [r.decode(i, field) for r, i in zip(readers, indices, strict=True)]
            batch[field].numpy()[...] = np.asarray(values, dtype=np.dtype(spec.dtype))
        else:
            batch[field] = [r.decode(i, field) for r, i in zip(readers, indices, strict=True)]
    return batch


@functools.cache
def _torch_dtype(name: str) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=np.dtype(name))).dtype


def _empty_batch_tensor(shape: tuple[int, ...], dtype: np.dtype, torch_dtype: torch.dtype) -> torch.Tensor:
    """In ordinary memory (numpy uses huge pages for big arrays); in a loader worker (without a
    buffer pool) straight in shared memory, as torch's default_collate does, so sending the batch
    to the main process costs no extra copy."""
    if get_worker_info() is None:
        return torch.from_numpy(np.empty(shape, dtype=dtype))
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=torch_dtype).set_(storage, 0, shape)


def _stack_arrays(out: torch.Tensor, readers, indices, field) -> None:
    """Fill `out` (batch, *shape) with the field's arrays (fixed shape: variable-shape fields need
    a collate_fn, checked up front)."""
    array = out.numpy()
    nbytes = array[0].nbytes if len(readers) else 0
    if nbytes == 0:
        return
    flat = memoryview(array.reshape(-1).view(np.uint8))
    col = readers[0].column[field]
    pos = 0
    for r, i in zip(readers, indices, strict=True):
        h = r.array_header(i, col)
        start = r.offsets[col][i] + h.data_offset
        if h.native and not h.fortran:
            r.read_into(flat[pos : pos + nbytes], start)
        else:  # written by another tool: big-endian or Fortran order
            array[pos // nbytes] = codec.npy_from_data(r.read(start, nbytes), h)
        pos += nbytes
