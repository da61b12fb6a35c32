"""The loader: determinism, coverage per rank/worker, balance, exact resume, collate, errors."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from foundation.data import ShardDataset, ShardWriter
from foundation.errors import DataError

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*set_vital.*"),
    pytest.mark.filterwarnings("ignore:This DataLoader will create"),
]
ALL_KEYS = {f"obj-{i:05d}" for i in range(103)}


def keys_of(loader) -> list[list[str]]:
    return [list(batch["__key__"]) for batch in loader]


def test_batches_hold_tensors_and_match_the_samples(small_set, make_sample):
    ds = ShardDataset(small_set, "train", batch_size=8, seed=1)
    batch = next(iter(ds))
    assert batch["flux"].shape == (8, 6) and batch["flux"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and batch["z"].dtype == torch.float64
    assert isinstance(batch["name"], list) and isinstance(batch["meta"][0], dict)
    for j, key in enumerate(batch["__key__"]):
        want = make_sample(int(key.split("-")[1]))
        np.testing.assert_array_equal(batch["flux"][j].numpy(), want["flux"])
        assert batch["label"][j] == want["label"] and batch["z"][j] == want["z"]
        assert batch["name"][j] == want["name"] and batch["meta"][j] == want["meta"]


def test_deterministic_and_seed_dependent(small_set):
    a = keys_of(ShardDataset(small_set, "train", batch_size=4, seed=3, epochs=2))
    b = keys_of(ShardDataset(small_set, "train", batch_size=4, seed=3, epochs=2))
    c = keys_of(ShardDataset(small_set, "train", batch_size=4, seed=4, epochs=2))
    assert a == b and a != c
    ds = ShardDataset(small_set, "train", batch_size=4, seed=3, epochs=2)
    assert ds.batch_at(1, 3)["__key__"] == a[ds.batches_per_epoch + 3]  # random access to the stream
    epoch_len = len(a) // 2
    assert a[:epoch_len] != a[epoch_len:]  # a new permutation every epoch
    assert sorted(sum(a[:epoch_len], [])) != sum(a[:epoch_len], [])  # shuffled
    ordered = keys_of(ShardDataset(small_set, "train", batch_size=4, shuffle=False, drop_last=False))
    assert sum(ordered, []) == sorted(ALL_KEYS)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_disjoint_complete_balanced_for_every_world_size_and_worker_count(small_set, world_size, monkeypatch):
    """Ranks simulated in one process (rank 0 from the environment, like torchrun, others from
    arguments); the stream of a rank is identical for 0..3 workers."""
    for drop_last in (False, True):
        per_rank = []
        batch_counts = set()
        for rank in range(world_size):
            if rank == 0:
                monkeypatch.setenv("RANK", "0")
                monkeypatch.setenv("WORLD_SIZE", str(world_size))
                ds = ShardDataset(small_set, "train", batch_size=5, seed=11, drop_last=drop_last)
            else:
                ds = ShardDataset(
                    small_set,
                    "train",
                    batch_size=5,
                    seed=11,
                    drop_last=drop_last,
                    rank=rank,
                    world_size=world_size,
                )
            assert (ds.rank, ds.world_size) == (rank, world_size)
            worker_counts = range(4) if not drop_last else (0, 2)  # keeps the test under a few seconds
            streams = [keys_of(DataLoader(ds, batch_size=None, num_workers=w)) for w in worker_counts]
            assert all(s == streams[0] for s in streams[1:])
            assert len(streams[0]) == ds.batches_per_epoch == len(ds)
            per_rank.append(sum(streams[0], []))
            batch_counts.add(len(streams[0]))
            if drop_last:
                assert all(len(b) == 5 for b in streams[0])
        assert len(batch_counts) == 1  # every rank yields the same number of batches
        flat = sum(per_rank, [])
        assert len(flat) == len(set(flat))  # no sample twice in an epoch, across all ranks
        if drop_last:
            assert len(flat) == (103 // (world_size * 5)) * world_size * 5
            assert set(flat) <= ALL_KEYS
        else:
            assert set(flat) == ALL_KEYS


def test_equal_batch_counts_even_when_samples_do_not_divide(tmp_path, write_split):
    # 21 samples, 4 ranks, batch 5: ranks hold 6/5/5/5 samples -> every rank must still yield 2 batches
    write_split(tmp_path, 21, 4)
    counts, seen = [], []
    for rank in range(4):
        ds = ShardDataset(tmp_path, "train", batch_size=5, drop_last=False, rank=rank, world_size=4)
        batches = keys_of(ds)
        counts.append(len(batches))
        seen += sum(batches, [])
        assert all(len(b) >= 1 for b in batches)
    assert counts == [2, 2, 2, 2] and len(seen) == len(set(seen)) == 21


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_after", [1, 6, 13])
def test_exact_resume_with_stateful_dataloader(small_set, workers, stop_after):
    def make():
        return ShardDataset(small_set, "train", batch_size=4, seed=5, epochs=None)

    def take(loader, n):
        it = iter(loader)
        return [list(next(it)["__key__"]) for _ in range(n)]

    reference = take(StatefulDataLoader(make(), batch_size=None, num_workers=workers), stop_after + 40)
    loader = StatefulDataLoader(make(), batch_size=None, num_workers=workers)
    first = take(loader, stop_after)
    state = loader.state_dict()
    resumed = StatefulDataLoader(make(), batch_size=None, num_workers=workers)
    resumed.load_state_dict(state)
    assert first + take(resumed, 40) == reference  # crosses epoch boundaries (25 batches/epoch)


def test_direct_state_dict_resume_and_worker_count_change(small_set):
    ds = ShardDataset(small_set, "train", batch_size=4, seed=5, epochs=2)
    reference = keys_of(ds)
    it = iter(ds)
    first = [list(next(it)["__key__"]) for _ in range(30)]
    state = ds.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 5)
    fresh = ShardDataset(small_set, "train", batch_size=4, seed=5, epochs=2)
    fresh.load_state_dict(state)
    # a rank-level state resumes under any number of workers
    assert first + keys_of(DataLoader(fresh, batch_size=None, num_workers=2)) == reference
    other = ShardDataset(small_set, "train", batch_size=8, seed=5, epochs=2)
    with pytest.raises(DataError, match="batch_size: saved 4 now 8"):
        other.load_state_dict(state)


def test_iterating_twice_repeats_and_set_epoch(small_set):
    ds = ShardDataset(small_set, "train", batch_size=4, seed=5)
    first, second = keys_of(ds), keys_of(ds)
    assert first == second
    persistent = StatefulDataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    assert keys_of(persistent) == first and keys_of(persistent) == first  # e.g. repeated validation
    ds.set_epoch(1)
    assert (
        keys_of(ds) == keys_of(ShardDataset(small_set, "train", batch_size=4, seed=5, epochs=2))[len(first) :]
    )


def test_infinite_mode_keeps_going_with_new_permutations(small_set):
    ds = ShardDataset(small_set, "train", batch_size=10, seed=0, epochs=None)
    it = iter(ds)
    epochs = [[next(it)["__key__"] for _ in range(ds.batches_per_epoch)] for _ in range(4)]
    flat = [sum(e, []) for e in epochs]
    assert all(len(set(e)) == len(e) == 100 for e in flat)
    assert len({tuple(e) for e in flat}) == 4
    with pytest.raises(TypeError):
        len(ds)


def _pad_collate(samples, rng=None, pad=0):
    """Pads variable-length tokens; a random mask from the loader's per-batch rng."""
    length = max(len(s["tokens"]) for s in samples)
    tokens = np.full((len(samples), length), pad, dtype=np.int64)
    for i, s in enumerate(samples):
        tokens[i, : len(s["tokens"])] = s["tokens"]
    return {"tokens": torch.from_numpy(tokens), "mask": torch.from_numpy(rng.random(tokens.shape) < 0.3)}


def test_custom_collate_variable_lengths_and_reproducible_rng(tmp_path):
    with ShardWriter(tmp_path, samples_per_shard=7) as w:
        for i in range(40):
            w.write({"__key__": f"t{i}", "tokens": np.arange(1 + i % 9, dtype=np.int32)})
    with pytest.raises(DataError, match="variable shapes"):
        ShardDataset(tmp_path, "train", batch_size=4)
    collate = functools.partial(_pad_collate, pad=-1)
    runs = []
    for workers in (0, 2):
        ds = ShardDataset(tmp_path, "train", batch_size=4, seed=2, collate_fn=collate)
        runs.append(list(DataLoader(ds, batch_size=None, num_workers=workers)))
    for a, b in zip(*runs, strict=True):
        assert a["__key__"] == b["__key__"]
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["mask"], b["mask"])
    assert not all(torch.equal(runs[0][0]["mask"], r["mask"]) for r in runs[0][1:])
    assert (runs[0][0]["tokens"] == -1).any()


def test_default_collate_refuses_variable_shapes_naming_the_field(tmp_path):
    with ShardWriter(tmp_path, samples_per_shard=4, allow_degenerate=True) as w:
        for i in range(8):
            w.write({"__key__": f"s{i}", "x": np.zeros(3 if i < 7 else 4, np.float32), "y": np.ones(2)})
    with pytest.raises(DataError, match=r"field\(s\) \['x'\] have variable shapes \(\[None\]\)"):
        ShardDataset(tmp_path, "train", batch_size=8)
    batch = next(iter(ShardDataset(tmp_path, "train", batch_size=8, fields=["y"])))
    assert batch["y"].shape == (8, 2)


def test_schema_mismatch_in_shard_names_shard_and_key(tmp_path):
    with ShardWriter(tmp_path, samples_per_shard=4, allow_degenerate=True) as w:
        for i in range(8):
            w.write({"__key__": f"s{i}", "x": np.zeros(3, np.float32)})
    manifest_path = tmp_path / "manifest.json"
    text = manifest_path.read_text().replace('"dtype": "float32"', '"dtype": "float64"')
    manifest_path.write_text(text)
    ds = ShardDataset(tmp_path, "train", batch_size=4, shuffle=False)
    with pytest.raises(
        DataError, match=r"shard train-000000.tar sample 's0' field 'x': dtype float32, schema says float64"
    ):
        next(iter(ds))


def test_too_few_samples_is_a_clear_error_not_a_hang(tmp_path, write_split):
    write_split(tmp_path, 10, 4)
    with pytest.raises(DataError, match="fewer than world_size 4 x batch_size 4"):
        ShardDataset(tmp_path, "train", batch_size=4, rank=0, world_size=4)
    with pytest.raises(DataError, match="fewer than world_size 16"):
        ShardDataset(tmp_path, "train", batch_size=4, rank=0, world_size=16, drop_last=False)
    with pytest.raises(DataError, match="no split 'valid'"):
        ShardDataset(tmp_path, "valid", batch_size=4)
    with pytest.raises(DataError, match="unknown field"):
        ShardDataset(tmp_path, "train", batch_size=4, fields=["nope"])


def test_missing_manifest_says_how_to_make_shards(tmp_path):
    with pytest.raises(DataError, match="foundation prepare"):
        ShardDataset(tmp_path, "train")


def test_fields_subset(small_set):
    batch = next(iter(ShardDataset(small_set, "train", batch_size=4, fields=["z"])))
    assert set(batch) == {"z", "__key__"}


DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "complex64", "complex128"]  # fmt: skip


def test_default_collate_keeps_every_dtype(tmp_path):
    rng = np.random.default_rng(0)
    samples = []
    with ShardWriter(tmp_path, samples_per_shard=3) as w:
        for i in range(8):
            sample = {"__key__": f"s{i}", "empty": np.zeros((0, 2), np.float32), "scalar0d": np.float32(i)}
            for d in DTYPES:
                sample[d] = (
                    (rng.normal(size=(2, 3)) * 100).astype(d) if d != "bool" else rng.random((2, 3)) > 0.5
                )
            samples.append(sample)
            w.write(sample)
    by_key = {s["__key__"]: s for s in samples}
    for workers in (0, 2):
        batch = next(
            iter(
                DataLoader(
                    ShardDataset(tmp_path, "train", batch_size=8), batch_size=None, num_workers=workers
                )
            )
        )
        for d in DTYPES:
            want = np.stack([by_key[k][d] for k in batch["__key__"]])
            assert batch[d].shape == (8, 2, 3) and str(batch[d].dtype) == f"torch.{d}"
            np.testing.assert_array_equal(batch[d].numpy(), want)
        assert batch["empty"].shape == (8, 0, 2)
        assert batch["scalar0d"].tolist() == [float(k[1:]) for k in batch["__key__"]]


def test_rank_comes_from_torch_distributed_before_the_environment(small_set, tmp_path, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    from_env = ShardDataset(small_set, "train", batch_size=4)
    assert (from_env.rank, from_env.world_size) == (3, 4)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ds = ShardDataset(small_set, "train", batch_size=4)
        assert (ds.rank, ds.world_size) == (0, 1)
        explicit = ShardDataset(small_set, "train", batch_size=4, rank=1, world_size=2)
        assert (explicit.rank, explicit.world_size) == (1, 2)
    finally:
        dist.destroy_process_group()


def test_plan_invariants_over_many_sizes():
    """The epoch plan alone (no I/O): for many shard layouts, world sizes and batch sizes, ranks
    get equal batch counts, batches are non-empty and at most batch_size, and no sample repeats;
    drop_last=False covers every sample (except the documented batch_size=1 case)."""
    from foundation.data.plan import EpochPlan

    rng = np.random.default_rng(0)
    for _ in range(300):
        shards = rng.integers(0, 12, size=rng.integers(1, 7)).tolist()
        total = sum(shards)
        world, batch = int(rng.integers(1, 6)), int(rng.integers(1, 7))
        for drop_last in (True, False):
            if (drop_last and total < world * batch) or total < world:
                continue
            counts, seen = set(), []
            for rank in range(world):
                window = int(rng.integers(1, 20))
                plan = EpochPlan(shards, batch_size=batch, rank=rank, world_size=world, seed=1,
                                 shuffle=True, drop_last=drop_last, window=window)  # fmt: skip
                counts.add(plan.batches)
                for b in range(plan.batches):
                    s, i = plan.batch(3, b)
                    assert 1 <= len(s) <= batch and (not drop_last or len(s) == batch)
                    assert all(0 <= ii < shards[ss] for ss, ii in zip(s.tolist(), i.tolist(), strict=True))
                    seen += list(zip(s.tolist(), i.tolist(), strict=True))
            assert len(counts) == 1 and len(seen) == len(set(seen))
            if not drop_last and (batch > 1 or total % world == 0):
                assert len(seen) == total
