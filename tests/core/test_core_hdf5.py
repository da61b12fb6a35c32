"""foundation.hdf5.open_hdf5: every HDF5 reader's errors name the file and say what to do, and a
file on which HDF5 would loop, blow up or crash is refused by a bounded child (foundation.isolated)."""

import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from foundation.errors import ConfigError, DataError
from foundation.hdf5 import check_storage, missing_storage, open_hdf5
from foundation.isolated import MEGABYTES_ENV, SECONDS_ENV, run_isolated


def test_opens_and_names_bad_files(tmp_path):
    good = tmp_path / "good.h5"
    with h5py.File(good, "w") as f:
        f["x"] = np.arange(3)
    with open_hdf5(good) as f:
        assert f["x"][()].tolist() == [0, 1, 2]
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    with pytest.raises(DataError, match=r"--images: .*bad\.h5: cannot open as HDF5"):
        open_hdf5(bad, "--images")
    with pytest.raises(DataError, match=r"missing\.h5: cannot open as HDF5"):
        open_hdf5(tmp_path / "missing.h5")


@pytest.mark.skipif(
    os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() == "FALSE", reason="HDF5 file locking is off here"
)
def test_file_being_written_by_another_process_is_explained(tmp_path):
    path = tmp_path / "busy.h5"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import h5py, sys; f = h5py.File({str(path)!r}, 'w'); print('open', flush=True); "
            "sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "open"
        with pytest.raises(DataError, match="locked by another process that is writing it"):
            open_hdf5(path)
    finally:
        writer.communicate("")


def test_truncated_file_is_called_truncated_not_locked(tmp_path):
    # h5py's truncation message contains "sblock", which a loose match on "lock" took for a lock.
    whole = tmp_path / "whole.h5"
    with h5py.File(whole, "w") as f:
        f["x"] = np.zeros(1000)
    data = whole.read_bytes()
    for keep in (len(data) // 2, 100):
        cut = tmp_path / f"cut-{keep}.h5"
        cut.write_bytes(data[:keep])
        with pytest.raises(DataError, match=r"cut-\d+\.h5 is truncated") as caught:
            open_hdf5(cut)
        assert "locked" not in str(caught.value)


def test_unfiltered_chunk_of_the_wrong_size_is_refused_before_it_is_read(tmp_path):
    # HDF5 reads an uncompressed chunk whole into a buffer of the layout's chunk size, whatever size
    # the chunk index records: a larger recorded size overran the buffer (a crash at exit).
    path = tmp_path / "overrun.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("x", shape=(32,), dtype="f8", chunks=(16,))
        ds.id.write_direct_chunk((0,), np.zeros(16).tobytes())
        ds.id.write_direct_chunk((16,), np.zeros(40).tobytes())
    with pytest.raises(
        DataError, match=r"dataset 'x' has an uncompressed chunk of 320 bytes where its layout needs 128"
    ):
        open_hdf5(path)


def test_walk_reads_every_attribute_and_accepts_a_sound_file(tmp_path):
    path = tmp_path / "sound.h5"
    with h5py.File(path, "w") as f:
        f.attrs["title"] = "x" * 1000
        g = f.create_group("a/b")
        g.attrs["n"] = np.arange(10)
        g.create_dataset("v", data=np.arange(100.0).reshape(10, 10), chunks=(3, 3), compression="gzip")
        g.create_dataset(
            "s", data=np.asarray(["p", "q"], dtype=object).astype(h5py.string_dtype()), chunks=(1,)
        )
    with open_hdf5(path) as f:
        assert f["a/b/v"][2, 2] == 22.0


@pytest.fixture
def fast_checks(monkeypatch):
    monkeypatch.setenv(SECONDS_ENV, "1")
    monkeypatch.setenv(MEGABYTES_ENV, "200")


def _loop_forever():
    while True:
        pass


def _allocate_4_gib():
    bytearray(4 << 30)


def _crash():
    os.kill(os.getpid(), signal.SIGSEGV)


def _refuse():
    raise DataError("the file is wrong in this way")


def _bug():
    return 1 // 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the bounded child needs os.fork")
@pytest.mark.parametrize(
    "task, message",
    [
        (_loop_forever, r"where\.h5: reading it did not finish within 1 s .*raise FOUNDATION_CHECK_SECONDS"),
        (_allocate_4_gib, r"where\.h5: reading it needs more than 200 MB .*raise FOUNDATION_CHECK_MB"),
        (_crash, r"where\.h5: the library reading it crashed \(signal 11\)"),
        (_refuse, r"^the file is wrong in this way$"),
    ],
)
def test_isolated_check_turns_loops_blowups_and_crashes_into_one_line(fast_checks, task, message):
    with pytest.raises(DataError, match=message):
        run_isolated(task, "where.h5")


def test_isolated_check_shows_a_bug_with_its_own_exception(fast_checks):
    with pytest.raises(ZeroDivisionError):
        run_isolated(_bug, "where.h5")


def test_isolated_checks_can_be_turned_off_and_refuse_a_bad_setting(monkeypatch):
    ran = []
    monkeypatch.setenv(SECONDS_ENV, "0")
    run_isolated(lambda: ran.append(os.getpid()), "where.h5")
    assert ran == [os.getpid()]  # in-process
    monkeypatch.setenv(SECONDS_ENV, "nan")
    with pytest.raises(ConfigError, match="FOUNDATION_CHECK_SECONDS='nan' must be a number >= 0"):
        run_isolated(lambda: None, "where.h5")


def test_missing_storage_checks_the_rows_asked_for(tmp_path):
    """One check of stored sizes for the whole-dataset readers (`check_storage`) and the embeddings
    reader (its committed rows): unwritten chunks or bytes, and compression bombs where asked."""
    with h5py.File(tmp_path / "s.h5", "w") as f:
        grown = f.create_dataset("grown", shape=(10, 2), maxshape=(None, 2), chunks=(4, 2), dtype="f4")
        grown[:4] = 1.0
        grown.resize((1_000_000, 2))  # declared, never written
        assert missing_storage(grown, 4) is None
        assert missing_storage(grown, 5) == (
            "declares 5 rows but stores only 1 of its 2 chunks (HDF5 reads fill values where no chunks "
            "are stored)"
        )
        with pytest.raises(
            DataError, match=r"^x\.h5: grown: declares shape \(1000000, 2\) but stores only 1"
        ):
            check_storage(grown, "x.h5: grown")
        flat = f.create_dataset("flat", shape=(100, 3), dtype="f4")
        assert missing_storage(flat, 0) is None
        assert missing_storage(flat) == "declares shape (100, 3) (1200 bytes) but stores only 0 bytes"
        plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        plist.set_layout(h5py.h5d.COMPACT)
        space = h5py.h5s.create_simple((4,))
        h5py.h5d.create(f.id, b"compact", h5py.h5t.NATIVE_FLOAT, space, dcpl=plist)
        assert missing_storage(f["compact"]) is None  # compact data lives whole in the header
        zeros = f.create_dataset("zeros", data=np.zeros((1 << 18, 2), "f4"), compression="gzip")
        assert missing_storage(zeros) is None
        assert "compressed into" in missing_storage(zeros, 1 << 18, max_ratio=256)


def test_mapped_rows_read_what_h5py_reads_for_every_mappable_layout(tmp_path):
    from foundation.hdf5 import MappedRows

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 24)).astype(np.float32)
    path = tmp_path / "rows.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("chunked", data=x, chunks=(64, 24), maxshape=(None, 24))
        # Appended in parts beside another dataset, as an export writes: chunks lie apart, at byte
        # offsets that are not whole rows from each other.
        grown = f.create_dataset(
            "interleaved", shape=(0, 24), dtype="f4", chunks=(64, 24), maxshape=(None, 24)
        )
        names = f.create_dataset("names", shape=(0,), dtype="S7", chunks=(50,), maxshape=(None,))
        for start in range(0, 1000, 100):
            grown.resize((start + 100, 24))
            grown[start : start + 100] = x[start : start + 100]
            names.resize((start + 100,))
            names[start : start + 100] = [b"galaxy7"] * 100
            f.flush()
        f.create_dataset("contiguous", data=x)
        f.create_dataset("big_endian", data=x.astype(">f8"))
        f.create_dataset("gzip", data=x, chunks=(64, 24), compression="gzip")
        f.create_dataset("split_rows", data=x, chunks=(64, 8))
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.COMPACT)
        space = h5py.h5s.create_simple((4, 24))
        h5py.h5d.create(f.id, b"compact", h5py.h5t.IEEE_F32LE, space, dcpl=dcpl).write(
            h5py.h5s.ALL, h5py.h5s.ALL, np.ascontiguousarray(x[:4])
        )
    rows = np.r_[rng.integers(0, 1000, 300), 0, 999, 999, 63, 64]
    with h5py.File(path, "r") as f:
        chunk_starts = MappedRows.of(path, f["interleaved"], 1000).block_offsets
        assert len(np.unique(chunk_starts % (24 * 4))) > 1
        for name in ("chunked", "interleaved", "contiguous", "big_endian"):
            mapped = MappedRows.of(path, f[name], 1000)
            assert mapped is not None, name
            got = mapped.read(rows)
            assert got.dtype == f[name].dtype
            np.testing.assert_array_equal(got, x[rows].astype(f[name].dtype))
            assert mapped.read(np.zeros(0, np.int64)).shape == (0, 24)
        for name in ("gzip", "split_rows", "compact"):
            assert MappedRows.of(path, f[name], len(f[name])) is None, name


def test_mapped_rows_refuse_offsets_beyond_the_file(tmp_path):
    from foundation.hdf5 import MappedRows

    path = tmp_path / "rows.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.ones((100, 8), np.float32))
    copy = tmp_path / "short.h5"
    with h5py.File(path, "r") as f:
        offset = f["x"].id.get_offset()
    copy.write_bytes(path.read_bytes()[: offset + 100])  # the data block cut short
    with h5py.File(path, "r") as f:
        assert MappedRows.of(copy, f["x"], 100) is None
        assert MappedRows.of(path, f["x"], 100) is not None
