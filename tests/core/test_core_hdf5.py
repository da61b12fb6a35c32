"""foundation.hdf5.open_hdf5: every HDF5 reader's errors name the file and say what to do."""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from foundation.errors import DataError
from foundation.hdf5 import open_hdf5


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
            f"import h5py, sys; f = h5py.File({str(path)!r}, 'w'); print('open', flush=True); sys.stdin.read()",
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
