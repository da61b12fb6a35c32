"""Batches built in loader workers travel through reusable shared buffers (foundation/data/shm.py):
same values as in-process, intact while held, buffers reused and let go of."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from foundation.data import ShardDataset, shm

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*set_vital.*"),
    pytest.mark.filterwarnings("ignore:This DataLoader will create"),
    pytest.mark.skipif(not shm.AVAILABLE, reason="needs os.memfd_create (Linux)"),
]


def snapshot(batch: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)  # same fields, same order
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def reference(path, **kwargs) -> list[dict]:
    return [snapshot(b) for b in ShardDataset(path, "train", **kwargs)]


def mapped() -> set[tuple[str, int]]:
    """(pool, buffer) pairs the main process maps right now."""
    return {(token, i) for token, record in shm._RECORDS.items() for i in record.mappings}


@pytest.fixture(autouse=True)
def _nothing_mapped_before():
    gc.collect()
    assert not mapped()


def test_held_batches_stay_intact_and_equal_in_process_batches(small_set):
    kwargs = dict(batch_size=4, seed=1, drop_last=False, epochs=2)
    want = reference(small_set, **kwargs)
    held = list(DataLoader(ShardDataset(small_set, "train", **kwargs), batch_size=None, num_workers=2))
    assert len(held) == len(want) == 52
    for got, expected in zip(held, want, strict=True):
        assert_same(got, expected)
    assert len(mapped()) >= 40  # nothing could be reused while every batch is held
    del held, got
    gc.collect()
    assert not mapped()  # released with the last tensor


def test_buffers_are_reused_while_batches_are_dropped(small_set):
    kwargs = dict(batch_size=4, seed=1, drop_last=False, epochs=2)
    want = reference(small_set, **kwargs)
    seen: set[tuple[str, int]] = set()
    loader = DataLoader(ShardDataset(small_set, "train", **kwargs), batch_size=None, num_workers=2)
    for got, expected in zip(loader, want, strict=True):
        assert_same(got, expected)
        seen |= mapped()
    assert len(seen) <= 2 * 5  # a few buffers per worker for 52 batches
    del got
    gc.collect()
    assert not mapped()


@pytest.mark.slow
def test_early_stop_and_persistent_workers_leave_nothing_behind(small_set):
    kwargs = dict(batch_size=4, seed=3, epochs=1)
    want = reference(small_set, **kwargs)
    ds = ShardDataset(small_set, "train", **kwargs)
    it = iter(DataLoader(ds, batch_size=None, num_workers=2))
    assert_same(next(it), want[0])
    del it  # workers shut down with batches in flight
    gc.collect()
    persistent = StatefulDataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    for _ in range(2):
        for got, expected in zip(persistent, want, strict=True):
            assert_same(got, expected)
        del got
        gc.collect()
        assert not mapped()  # the abandoned pools went when the new ones arrived, these at the end


def _double_flux(batch: dict) -> dict:
    return {**batch, "flux": batch["flux"] * 2}


def test_loader_collate_fn_may_replace_fields(small_set):
    """A DataLoader collate_fn runs on the worker's batch: replaced tensors go the usual torch way,
    the others by reference; a batch rebuilt as a new dict frees its buffer in the worker."""
    kwargs = dict(batch_size=4, seed=1, epochs=1)
    want = reference(small_set, **kwargs)
    ds = ShardDataset(small_set, "train", **kwargs)
    for got, expected in zip(
        DataLoader(ds, batch_size=None, num_workers=2, collate_fn=_double_flux), want, strict=True
    ):
        assert torch.equal(got["flux"], expected["flux"] * 2)
        assert torch.equal(got["label"], expected["label"]) and got["__key__"] == expected["__key__"]
    del got
    gc.collect()
    assert not mapped()


def test_without_memfd_falls_back_to_torch_shared_memory(small_set, monkeypatch):
    monkeypatch.setattr(shm, "AVAILABLE", False)
    kwargs = dict(batch_size=4, seed=1, epochs=1)
    want = reference(small_set, **kwargs)
    got = list(DataLoader(ShardDataset(small_set, "train", **kwargs), batch_size=None, num_workers=2))
    for a, b in zip(got, want, strict=True):
        assert_same(a, b)
        assert a["flux"].is_shared()
    assert not mapped()


@pytest.mark.slow
def test_spawned_workers(small_set):
    kwargs = dict(batch_size=8, seed=1, epochs=1)
    want = reference(small_set, **kwargs)
    loader = DataLoader(
        ShardDataset(small_set, "train", **kwargs),
        batch_size=None,
        num_workers=1,
        multiprocessing_context="spawn",
    )
    for got, expected in zip(loader, want, strict=True):
        assert_same(got, expected)
    del got
    gc.collect()
    assert not mapped()


def _mixed_collate(samples: list[dict]) -> dict:
    flux = torch.from_numpy(np.stack([s["flux"] for s in samples]))
    both = torch.arange(12.0).reshape(3, 4) + float(samples[0]["label"])
    return {
        "flux": flux,  # moves into the shared buffer
        "half": flux.to(torch.bfloat16),  # no numpy dtype: moves too
        "label": torch.tensor([s["label"] for s in samples]),
        "transposed": flux.clone().t(),  # not contiguous (strides kept): left to torch
        "whole": both,  # two views of one storage: left to torch, still one storage after
        "row": both[1],
        "nested": {"z": torch.tensor([s["z"] for s in samples])},
    }


def test_collate_fn_batches_travel_the_same_way_and_keep_views(small_set):
    kwargs = dict(batch_size=4, seed=1, epochs=1, collate_fn=_mixed_collate)
    want = reference(small_set, **kwargs)
    held = list(DataLoader(ShardDataset(small_set, "train", **kwargs), batch_size=None, num_workers=2))
    for got, expected in zip(held, want, strict=True):
        nested = got.pop("nested")
        assert torch.equal(nested["z"], expected.pop("nested")["z"])
        assert_same(got, expected)
        assert got["half"].dtype == torch.bfloat16
        assert got["transposed"].stride() == expected["transposed"].stride()
        assert got["row"].untyped_storage().data_ptr() == got["whole"].untyped_storage().data_ptr()
    assert mapped()  # the plain tensors came through the buffers
    del held, got
    gc.collect()
    assert not mapped()
