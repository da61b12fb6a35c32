"""`foundation export` and `foundation export merge` with the toy family's two towers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from foundation.cli import main
from foundation.data.raw_inputs import fetch_samples
from foundation.embeddings import open_embeddings, part_path, partial_path
from foundation.errors import ConfigError, DataError
from foundation.export import ExportSettings, export_embeddings, load_model, start_export
from tests.testkit import toyfamily


def _export(loaded, data, out, **settings):
    return export_embeddings(loaded, data, out, ExportSettings(**settings))


def _export_stopped(loaded, data, out, batches, **settings):
    """An export interrupted after `batches` batches: its `.partial` file stays, to resume from."""
    job = start_export(loaded, data, out, ExportSettings(**settings))
    for done, _ in enumerate(job.batches(), 1):
        if done == batches:
            break
    return job.stop()


def _expected(model, shards, ids):
    """What the towers give for these ids, computed directly from the raw samples."""
    samples = fetch_samples(shards, ids)
    image = torch.from_numpy(np.stack([samples[i]["image"] for i in ids]))
    spectrum = torch.from_numpy(np.stack([samples[i]["spectrum"] for i in ids]))
    with torch.no_grad():
        out = model.towers(image, spectrum)
    return {m: v.numpy() for m, v in out.items()}, samples


def test_export_cli_writes_every_sample_once(tmp_path, tiny_shards, tiny_checkpoint, capsys):
    ckpt, model = tiny_checkpoint
    out = tmp_path / "emb.h5"
    code = main(
        [
            "export",
            "--checkpoint",
            str(ckpt),
            "--data",
            str(tiny_shards),
            "--out",
            str(out),
            "--num-workers",
            "0",
            "--batch-size",
            "7",
        ]
    )
    assert code == 0
    assert "exported 120 objects (120 new, image, spectrum)" in capsys.readouterr().out
    with open_embeddings(out) as emb:
        ids = emb.ids.tolist()
        assert sorted(ids) == [f"obj-{i:04d}" for i in range(120)]
        expected, samples = _expected(model, tiny_shards, ids)
        np.testing.assert_allclose(emb.vectors("image"), expected["image"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(emb.vectors("spectrum"), expected["spectrum"], rtol=1e-5, atol=1e-6)
        # Targets: a scalar field and a key of the JSON metadata, named by the manifest.
        np.testing.assert_allclose(emb.target("redshift"), [samples[i]["redshift"] for i in ids])
        np.testing.assert_allclose(
            emb.target("stellar_mass"), [samples[i]["meta"]["stellar_mass"] for i in ids]
        )
        assert set(emb.split.tolist()) == {"train", "valid", "test"}
        attrs = emb.attrs
        assert attrs["checkpoint"] == str(ckpt.resolve())
        assert attrs["family"] == toyfamily.FAMILY.name
        assert attrs["precision"] == "fp32" and attrs["config"]["model"]["width"] == 8
        assert not emb.normalized("image")
    # Re-running finds the finished file and does nothing.
    assert main(["export", "--checkpoint", str(ckpt), "--data", str(tiny_shards), "--out", str(out)]) == 0
    assert "complete already" in capsys.readouterr().out


def test_interrupted_export_resumes_without_re_embedding(
    tmp_path, tiny_shards, tiny_checkpoint, monkeypatch, caplog
):
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "emb.h5"
    loaded = load_model(ckpt)
    toyfamily.KEYS_SEEN.clear()
    monkeypatch.setattr("foundation.export.REPORT_EVERY_S", 0.0)  # without a TTY: progress as log lines
    with caplog.at_level("INFO", logger="foundation.export"):
        first = _export_stopped(
            loaded,
            tiny_shards,
            out,
            3,
            batch_size=10,
            num_workers=0,
            chunk_rows=10,
            progress=False,
        )
    assert "exported 30 / 120 objects" in caplog.text
    assert first.path == partial_path(out) and not out.exists()
    assert first.rows == 30 and len(toyfamily.KEYS_SEEN) == 30
    done = list(toyfamily.KEYS_SEEN)
    toyfamily.KEYS_SEEN.clear()
    # Resume through the CLI, with loader workers this time.
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(ckpt),
                "--data",
                str(tiny_shards),
                "--out",
                str(out),
                "--batch-size",
                "10",
                "--num-workers",
                "1",
            ]
        )
        == 0
    )
    # Worker processes embed nothing themselves: the model runs in this process, on new rows only.
    assert len(toyfamily.KEYS_SEEN) == 90 and not set(done) & set(toyfamily.KEYS_SEEN)
    reference = tmp_path / "ref.h5"
    _export(load_model(ckpt), tiny_shards, reference, batch_size=10, num_workers=0)
    with open_embeddings(out) as resumed, open_embeddings(reference) as full:
        assert resumed.ids.tolist() == full.ids.tolist()
        np.testing.assert_array_equal(resumed.vectors("spectrum"), full.vectors("spectrum"))
        np.testing.assert_array_equal(resumed.target("redshift"), full.target("redshift"))


def test_resume_with_other_weights_is_refused(tmp_path, tiny_shards, tiny_checkpoint):
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "emb.h5"
    _export_stopped(load_model(ckpt), tiny_shards, out, 1, batch_size=10, num_workers=0, chunk_rows=10)
    other = tmp_path / "other" / "model.pt"
    other.parent.mkdir()
    toyfamily.write_checkpoint(other, tiny_shards, seed=1)
    with pytest.raises(DataError, match="cannot resume"):
        _export(load_model(other), tiny_shards, out, batch_size=10, num_workers=0)
    # --overwrite starts again.
    _export(load_model(other), tiny_shards, out, batch_size=10, num_workers=0, overwrite=True)
    with open_embeddings(out) as emb:
        assert emb.rows == 120


def test_family_collate_modalities_normalize_and_random_init(tmp_path, tiny_shards):
    ckpt = tmp_path / "model.pt"
    trained = toyfamily.write_checkpoint(ckpt, tiny_shards, collate=True)
    out = tmp_path / "spec.h5"
    result = _export(
        load_model(ckpt),
        tiny_shards,
        out,
        modalities=["spectrum"],
        splits=["test"],
        normalize=True,
        num_workers=0,
        targets=["redshift"],
    )
    with open_embeddings(out) as emb:
        assert emb.modalities == ["spectrum"] and emb.target_names == ["redshift"]
        assert set(emb.split.tolist()) == {"test"} and emb.rows == result.rows
        assert emb.normalized("spectrum") and emb.attrs["normalized"]
        expected, _ = _expected(trained, tiny_shards, emb.ids.tolist())
        unit = expected["spectrum"] / np.linalg.norm(expected["spectrum"], axis=1, keepdims=True)
        np.testing.assert_allclose(emb.vectors("spectrum"), unit, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="no modality"):
        _export(load_model(ckpt), tiny_shards, tmp_path / "x.h5", modalities=["sed"], num_workers=0)
    with pytest.raises(DataError, match="no split 'dev'"):
        _export(load_model(ckpt), tiny_shards, tmp_path / "y.h5", splits=["dev"], num_workers=0)
    random_out = tmp_path / "random.h5"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(ckpt),
                "--data",
                str(tiny_shards),
                "--out",
                str(random_out),
                "--random-init",
                "--seed",
                "5",
                "--splits",
                "test",
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    # Config overrides change the fresh architecture (and only apply to --random-init).
    wide = load_model(ckpt, random_init=True, overrides=["model.width=5"])
    assert wide.model.image.out_features == 5 and "model.width=5" in wide.source
    with pytest.raises(Exception, match="only applies with --random-init"):
        load_model(ckpt, overrides=["model.width=5"])
    with open_embeddings(random_out) as rnd, open_embeddings(out) as trained_emb:
        assert rnd.attrs["checkpoint"].startswith("random-init:")
        assert rnd.ids.tolist() == trained_emb.ids.tolist()
        assert not np.allclose(rnd.vectors("spectrum"), trained_emb.vectors("spectrum"), atol=1e-2)


def test_parts_then_merge_cover_every_sample(tmp_path, tiny_shards, tiny_checkpoint, capsys):
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "emb.h5"
    for part in range(3):
        assert (
            main(
                [
                    "export",
                    "--checkpoint",
                    str(ckpt),
                    "--data",
                    str(tiny_shards),
                    "--out",
                    str(out),
                    "--part",
                    str(part),
                    "--parts",
                    "3",
                    "--num-workers",
                    "0",
                ]
            )
            == 0
        )
    assert not out.exists() and part_path(out, 2, 3).exists()
    sizes = []
    for part in range(3):
        with open_embeddings(part_path(out, part, 3)) as emb:
            sizes.append(emb.rows)
    assert sum(sizes) == 120 and min(sizes) > 0
    assert main(["export", "merge", "--out", str(out), "--parts-expected", "3", "--delete-parts"]) == 0
    assert "merged 3 parts" in capsys.readouterr().out
    assert not part_path(out, 0, 3).exists()
    reference = tmp_path / "ref.h5"
    _export(load_model(ckpt), tiny_shards, reference, num_workers=0)
    with open_embeddings(out) as merged, open_embeddings(reference) as full:
        order = np.argsort(merged.ids.astype(str))
        ref_order = np.argsort(full.ids.astype(str))
        assert merged.ids[order].tolist() == full.ids[ref_order].tolist()
        np.testing.assert_allclose(
            merged.vectors("image")[order], full.vectors("image")[ref_order], atol=1e-6
        )
    assert main(["export", "merge", "--out", str(tmp_path / "none.h5")]) == 2
    assert "no finished part files" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_ranks_write_parts_and_merge(tmp_path, tiny_shards, tiny_checkpoint, torchrun):
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "emb.h5"
    args = ["export", "--checkpoint", str(ckpt), "--data", str(tiny_shards), "--out", str(out)]
    env = {"FOUNDATION_FAMILY_MODULES": "tests.testkit.toyfamily"}
    proc = torchrun([*args, "--num-workers", "0", "--device", "cpu"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "merged 2 parts" in proc.stdout
    with open_embeddings(out) as emb:
        assert sorted(emb.ids.tolist()) == [f"obj-{i:04d}" for i in range(120)]
        assert emb.attrs["merged_from"] == [part_path(out, r, 2).name for r in range(2)]


def test_export_precision_follows_the_training_rule_on_cpu(tmp_path, tiny_shards, tiny_checkpoint):
    # One rule with training (foundation.device): auto is fp32 on a CPU, an explicit bf16 runs the
    # forward under CPU bf16 autocast (it used to fall back to fp32), and the file records which.
    ckpt, trained = tiny_checkpoint
    fp32 = _export(load_model(ckpt), tiny_shards, tmp_path / "auto.h5", device="cpu", num_workers=0)
    bf16 = _export(
        load_model(ckpt), tiny_shards, tmp_path / "bf16.h5", device="cpu", precision="bf16", num_workers=0
    )
    with open_embeddings(fp32.path) as auto, open_embeddings(bf16.path) as low:
        assert auto.attrs["precision"] == "fp32" and low.attrs["precision"] == "bf16"
        expected, _ = _expected(trained, tiny_shards, low.ids.tolist())
        np.testing.assert_allclose(auto.vectors("image"), expected["image"], rtol=1e-5, atol=1e-6)
        rounded = low.vectors("image")
        # bf16 keeps 8 significant bits: close to the fp32 vectors, but not equal to them.
        np.testing.assert_allclose(rounded, expected["image"], rtol=0.05, atol=0.05)
        assert not np.array_equal(rounded, expected["image"])
    with pytest.raises(ConfigError, match="--precision"):
        _export(load_model(ckpt), tiny_shards, tmp_path / "x.h5", precision="fp8", num_workers=0)


@pytest.mark.slow
def test_query_plot_draws_inputs_from_the_shards(tmp_path, tiny_shards, tiny_checkpoint, capsys):
    ckpt, _ = tiny_checkpoint
    emb = tmp_path / "emb.h5"
    _export(load_model(ckpt), tiny_shards, emb, num_workers=0)
    assert (
        main(
            [
                "search",
                "build",
                "--embeddings",
                str(emb),
                "--modality",
                "spectrum",
                "--out",
                str(tmp_path / "idx"),
            ]
        )
        == 0
    )
    png = tmp_path / "q.png"
    code = main(
        [
            "search",
            "query",
            "--index",
            str(tmp_path / "idx"),
            "--query-modality",
            "image",
            "--id",
            "obj-0001",
            "--id",
            "obj-0002",
            "--k",
            "3",
            "--plot",
            str(png),
            "--save",
            str(tmp_path / "q.json"),
        ]
    )
    assert code == 0 and png.stat().st_size > 10_000
    assert "plot ->" in capsys.readouterr().out
    saved = json.loads((tmp_path / "q.json").read_text())
    assert [r["query"] for r in saved] == ["obj-0001", "obj-0002"]
