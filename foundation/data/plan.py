"""Which samples make batch b of epoch e on a given rank — a pure function of
(seed, epoch, rank, world_size) and the shard sizes, never of the number of loader workers.

Per epoch: shards are permuted (seeded by (seed, epoch)) and their samples laid end to end;
each rank takes one contiguous, equally long interval (so ranks read disjoint shards and yield
equal batch counts); inside its interval a rank shuffles within consecutive windows of
`window` samples; batch b is the b-th slice of that order. Memory is O(shards + window),
not O(samples).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from foundation.errors import DataError

log = logging.getLogger(__name__)


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(entropy))))


class EpochPlan:
    def __init__(
        self,
        shard_samples: Sequence[int],
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool,
        drop_last: bool,
        window: int,
        split: str = "train",
    ):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        self.shard_samples = np.asarray(shard_samples, dtype=np.int64)
        self.total = int(self.shard_samples.sum())
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.window = max(1, int(window))
        n, r, b = self.total, world_size, batch_size
        if drop_last:
            self.batches = n // (r * b)
            if self.batches == 0:
                raise DataError(
                    f"split {split!r} has {n} samples, fewer than world_size {r} x batch_size {b} = {r * b} "
                    "needed for one full batch per rank; lower batch_size, use fewer ranks, or pass "
                    "drop_last=False"
                )
            self.rank_samples = self.batches * b
            self.rank_start = rank * self.rank_samples
            self._sizes_tail: list[int] = []
        else:
            if n < r:
                raise DataError(
                    f"split {split!r} has {n} samples, fewer than world_size {r}: every rank needs at "
                    "least one"
                )
            base, extra = divmod(n, r)
            if b == 1 and extra:  # one sample per batch: equal counts force skipping n % r samples
                log.warning(
                    "split %r: %d sample(s) per epoch are skipped so that %d ranks get equal batch "
                    "counts with batch_size 1",
                    split,
                    extra,
                    r,
                )
                extra = 0
            self.batches = math.ceil((base + (1 if extra else 0)) / b)
            rank_samples = base + (1 if rank < extra else 0)
            self.rank_start = rank * base + min(rank, extra)
            last = rank_samples - (self.batches - 1) * b
            if last > 0:
                self._sizes_tail = [last]
            else:  # one sample short of the other ranks' last batch: split the last full one
                self._sizes_tail = [b - b // 2, b // 2]  # (b >= 2 and batches >= 2 here)
            self.rank_samples = rank_samples
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._window_cache: dict[tuple[int, int], np.ndarray] = {}

    def batch_bounds(self, b: int) -> tuple[int, int]:
        """Rank-local [start, end) sample positions of batch b."""
        if not 0 <= b < self.batches:
            raise IndexError(b)
        size = self.batch_size
        tail = self._sizes_tail
        first_tail = self.batches - len(tail)
        if b < first_tail:
            return b * size, (b + 1) * size
        start = first_tail * size + sum(tail[: b - first_tail])
        return start, start + tail[b - first_tail]

    def shard_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(permuted shard indices, cumulative sample offsets of that order) for an epoch."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            if self.shuffle:
                order = _rng(self.seed, epoch, 0).permutation(len(self.shard_samples))
            else:
                order = np.arange(len(self.shard_samples))
            starts = np.concatenate([[0], np.cumsum(self.shard_samples[order])])
            self._epoch_cache = (epoch, order, starts)
            self._window_cache.clear()
        return self._epoch_cache[1], self._epoch_cache[2]

    def _window_perm(self, epoch: int, w: int) -> np.ndarray:
        key = (epoch, w)
        perm = self._window_cache.get(key)
        if perm is None:
            length = min(self.window, self.rank_samples - w * self.window)
            perm = _rng(self.seed, epoch, self.rank, w, 1).permutation(length)
            if len(self._window_cache) >= 4:
                self._window_cache.clear()
            self._window_cache[key] = perm
        return perm

    def shards_after(self, epoch: int, b: int, count: int) -> np.ndarray:
        """Up to `count` shards this rank reads next in `epoch` after those batch b may read (the
        rest of its shuffle window included): what a remote loader fetches ahead."""
        order, starts = self.shard_order(epoch)
        _, hi = self.batch_bounds(b)
        window_end = min(((hi - 1) // self.window + 1) * self.window, self.rank_samples)
        last = int(np.searchsorted(starts, self.rank_start + window_end - 1, side="right")) - 1
        final = int(np.searchsorted(starts, self.rank_start + self.rank_samples - 1, side="right")) - 1
        return order[last + 1 : min(last + 1 + count, final + 1)]

    def batch(self, epoch: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard indices, in-shard sample indices) of batch b of `epoch` on this rank."""
        order, starts = self.shard_order(epoch)
        lo, hi = self.batch_bounds(b)
        local = np.arange(lo, hi, dtype=np.int64)
        if self.shuffle:
            windows = local // self.window
            shuffled = np.empty_like(local)
            for w in np.unique(windows):
                mask = windows == w
                shuffled[mask] = (
                    self._window_perm(epoch, int(w))[local[mask] - w * self.window] + w * self.window
                )
            local = shuffled
        position = local + self.rank_start
        slot = np.searchsorted(starts, position, side="right") - 1
        return order[slot], position - starts[slot]
