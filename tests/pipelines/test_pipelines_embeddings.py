"""The embeddings HDF5 file: round trip, resume, merge, and clear errors on malformed files."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from foundation.embeddings import (
    EmbeddingsWriter,
    find_parts,
    merge_embeddings,
    open_embeddings,
    part_path,
    partial_path,
)
from foundation.errors import DataError


def test_round_trip_layout_and_attributes(make_embeddings):
    path, data = make_embeddings(n=300, dim=8, attrs={"config": {"model": {"dim": 8}}})
    with h5py.File(path, "r") as f:  # the documented layout, readable without this package
        assert f["object_id"].shape == (300,)
        assert f["image"].shape == (300, 8) and f["image"].dtype == np.float32
        assert f["targets/redshift"].shape == (300,)
        assert f.attrs["checkpoint"] == "synthetic"
        assert bool(f.attrs["complete"])
    with open_embeddings(path) as emb:
        assert emb.ids.tolist() == data["ids"]
        assert emb.modalities == ["image", "spectrum"]
        np.testing.assert_array_equal(emb.vectors("spectrum"), data["vectors"]["spectrum"])
        np.testing.assert_allclose(emb.target("redshift"), data["targets"]["redshift"])
        assert emb.split.tolist() == data["split"]
        assert emb.attrs["config"] == {"model": {"dim": 8}}
        assert emb.normalized("image") is False
        rows = emb.rows_of(["gal-00007", "gal-00002"])
        np.testing.assert_array_equal(emb.vectors("image", rows), data["vectors"]["image"][[7, 2]])
    assert not partial_path(path).exists()


def test_normalised_flag_is_measured(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    writer = EmbeddingsWriter(tmp_path / "e.h5")
    writer.append([str(i) for i in range(20)], {"a": x / np.linalg.norm(x, axis=1, keepdims=True), "b": x})
    writer.finish()
    with open_embeddings(tmp_path / "e.h5") as emb:
        assert emb.normalized("a") and not emb.normalized("b")


def test_resume_truncates_an_uncommitted_chunk(tmp_path):
    path = tmp_path / "e.h5"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    writer = EmbeddingsWriter(path, attrs={"checkpoint": "c1"})
    writer.append([f"o{i}" for i in range(10)], {"v": x[:10]}, {"t": np.arange(10.0)})
    writer.close()
    # Simulate a crash mid-chunk: datasets grew but the commit (attribute `rows`) never happened.
    with h5py.File(partial_path(path), "a") as f:
        f["v"].resize(17, axis=0)
        f["object_id"].resize(15, axis=0)
        f["object_id"][10:15] = ["junk"] * 5
    assert not path.exists()
    with pytest.raises(DataError, match="unfinished export"):
        open_embeddings(path)
    writer = EmbeddingsWriter(path, attrs={"checkpoint": "c1"})
    assert writer.resumed_rows == 10 and writer.done_ids == {f"o{i}" for i in range(10)}
    with pytest.raises(DataError, match="already in"):
        writer.append(["o3"], {"v": x[:1]}, {"t": [0.0]})
    writer.append([f"o{i}" for i in range(10, 30)], {"v": x[10:]}, {"t": np.arange(10.0, 30.0)})
    writer.finish()
    with open_embeddings(path) as emb:
        assert emb.ids.tolist() == [f"o{i}" for i in range(30)]
        np.testing.assert_array_equal(emb.vectors("v"), x)
        np.testing.assert_array_equal(emb.target("t"), np.arange(30.0))


def test_resume_refuses_a_different_checkpoint_and_overwrite_is_explicit(tmp_path):
    path = tmp_path / "e.h5"
    writer = EmbeddingsWriter(path, attrs={"checkpoint": "c1"})
    writer.append(["a"], {"v": np.ones((1, 2))})
    writer.close()
    with pytest.raises(DataError, match="checkpoint='c1'"):
        EmbeddingsWriter(path, attrs={"checkpoint": "c2"})
    writer = EmbeddingsWriter(path, attrs={"checkpoint": "c2"}, overwrite=True)
    assert writer.resumed_rows == 0
    writer.append(["b"], {"v": np.ones((1, 2))})
    writer.finish()
    with pytest.raises(DataError, match="already exists"):
        EmbeddingsWriter(path, attrs={"checkpoint": "c2"})


def test_writer_rejects_bad_rows(tmp_path):
    writer = EmbeddingsWriter(tmp_path / "e.h5")
    with pytest.raises(DataError, match="duplicate object ids"):
        writer.append(["a", "a"], {"v": np.ones((2, 2))})
    with pytest.raises(DataError, match="non-finite"):
        writer.append(["a"], {"v": np.array([[np.nan, 1.0]])})
    with pytest.raises(DataError, match="expected \\(2, D\\)"):
        writer.append(["a", "b"], {"v": np.ones((3, 2))})
    with pytest.raises(DataError, match="cannot be a modality"):
        writer.append(["a"], {"object_id": np.ones((1, 2))})
    writer.append(["a"], {"v": np.ones((1, 2))})
    with pytest.raises(DataError, match="rows of shape"):
        writer.append(["b"], {"v": np.ones((1, 3))})
    with pytest.raises(DataError, match="missing modalities"):
        writer.append(["b"], {"w": np.ones((1, 2))})
    writer.close()


def _write_raw(path, build):
    with h5py.File(path, "w") as f:
        build(f)
    return path


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda f: f.create_dataset("image", data=np.ones((3, 2))), "no 'object_id'"),
        (
            lambda f: (
                f.create_dataset("object_id", data=["a", "b", "c"]),
                f.create_dataset("image", data=np.ones((2, 4))),
            ),
            "has 2 rows but there are 3 object ids",
        ),
        (
            lambda f: (
                f.create_dataset("object_id", data=["a", "a"]),
                f.create_dataset("image", data=np.ones((2, 4))),
            ),
            "appear more than once",
        ),
        (lambda f: f.create_dataset("object_id", data=["a", "b"]), "no embedding datasets"),
        (
            lambda f: (
                f.create_dataset("object_id", data=["a", "b"]),
                f.create_dataset("image", data=np.ones((2, 4))),
                f.create_dataset("targets/z", data=np.ones(1)),
            ),
            "target 'z' has 1 values",
        ),
        (
            lambda f: (
                f.attrs.update({"format": "foundation-embeddings", "complete": False}),
                f.create_dataset("object_id", data=["a"]),
                f.create_dataset("image", data=np.ones((1, 4))),
            ),
            "marked incomplete",
        ),
        (lambda f: f.attrs.update({"format": "something-else"}), "format attribute"),
        (
            lambda f: (
                f.attrs.update({"modalities": '["image"]'}),
                f.create_dataset("object_id", data=["a"]),
                f.create_dataset("image", data=np.ones(1)),
            ),
            "must be a 2-D float dataset",
        ),
    ],
)
def test_malformed_files_give_clear_errors(tmp_path, build, message):
    path = _write_raw(tmp_path / "bad.h5", build)
    with pytest.raises(DataError, match=message) as info:
        open_embeddings(path)
    assert str(path) in str(info.value)


def test_not_hdf5_missing_and_nan(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_embeddings(tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(DataError, match="not an HDF5 file"):
        open_embeddings(tmp_path / "text.h5")
    path = _write_raw(
        tmp_path / "nan.h5",
        lambda f: (
            f.create_dataset("object_id", data=["a", "b"]),
            f.create_dataset("image", data=[[1.0, np.nan], [0, 1]]),
        ),
    )
    with open_embeddings(path) as emb:
        with pytest.raises(DataError, match="NaN or infinite"):
            emb.vectors("image")
        with pytest.raises(DataError, match="no modality 'spectrum'"):
            emb.vectors("spectrum")
        with pytest.raises(DataError, match="no target 'z'"):
            emb.target("z")
        with pytest.raises(DataError, match="not in"):
            emb.rows_of(["zzz"])


def test_foreign_file_with_the_same_layout_is_read(tmp_path):
    """A file written by someone else's tool (integer ids, no format attributes) still opens."""
    path = _write_raw(
        tmp_path / "foreign.h5",
        lambda f: (
            f.create_dataset("object_id", data=np.array([11, 12, 13])),
            f.create_dataset("spectrum", data=np.eye(3, dtype=np.float32)),
            f.create_dataset("targets/Z", data=[0.1, 0.2, 0.3]),
        ),
    )
    with open_embeddings(path) as emb:
        assert emb.ids.tolist() == ["11", "12", "13"] and emb.modalities == ["spectrum"]
        assert emb.target_names == ["Z"]


def test_reading_while_another_process_writes_a_different_file(tmp_path, make_embeddings):
    """A reader of a finished file is unaffected by a writer holding another file open."""
    done, data = make_embeddings("done.h5", n=50, dim=4)
    script = textwrap.dedent(
        f"""
        import sys, time, numpy as np
        from foundation.embeddings import EmbeddingsWriter
        w = EmbeddingsWriter({str(tmp_path / "busy.h5")!r})
        w.append(["x"], {{"v": np.ones((1, 2))}})
        print("ready", flush=True)
        sys.stdin.readline()
        w.finish()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        with open_embeddings(done) as emb:
            np.testing.assert_array_equal(emb.vectors("image"), data["vectors"]["image"])
        with pytest.raises(DataError, match="unfinished export"):
            open_embeddings(tmp_path / "busy.h5")
    finally:
        proc.communicate("\n", timeout=60)
    assert proc.returncode == 0
    with open_embeddings(tmp_path / "busy.h5") as emb:
        assert emb.ids.tolist() == ["x"]


def test_parts_and_merge(tmp_path, make_embeddings):
    out = tmp_path / "emb.h5"
    _, data = make_embeddings("unused.h5", n=90, dim=4)
    bounds = [0, 40, 41, 90]
    for part in range(3):
        sl = slice(bounds[part], bounds[part + 1])
        writer = EmbeddingsWriter(
            part_path(out, part, 3), attrs={"checkpoint": "c", "part": part, "parts": 3}
        )
        writer.append(
            data["ids"][sl],
            {m: v[sl] for m, v in data["vectors"].items()},
            {t: v[sl] for t, v in data["targets"].items()},
            split=data["split"][sl],
        )
        writer.finish()
    assert part_path(out, 2, 3).name == "emb.part-00002-of-00003.h5"
    parts = find_parts(out)
    assert [p.name for p in parts] == [part_path(out, i, 3).name for i in range(3)]
    merge_embeddings(parts, out)
    with open_embeddings(out) as emb:
        assert emb.ids.tolist() == data["ids"]
        np.testing.assert_array_equal(emb.vectors("image"), data["vectors"]["image"])
        assert emb.split.tolist() == data["split"]
        assert emb.attrs["checkpoint"] == "c" and "part" not in emb.attrs
    with pytest.raises(DataError, match="already exists"):
        merge_embeddings(parts, out)
    part_path(out, 1, 3).unlink()
    with pytest.raises(DataError, match="1 of 3 parts"):
        find_parts(out)
    with pytest.raises(DataError, match="repeats object ids"):
        merge_embeddings([parts[0], parts[0]], tmp_path / "dup.h5")
