"""synth → prepare (HDF5 and FITS) → pretrain (SpecFormer, then alignment) through the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from foundation.cli import main
from foundation.data import Manifest, ShardDataset
from foundation.errors import DataError
from tests.testkit.configs import ASTROCLIP_SMALL, model_overrides

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "astroclip"
# Tiny overrides: shapes small enough for seconds of CPU, same code paths as the shipped configs.
SPECTRUM = model_overrides({"spectrum": ASTROCLIP_SMALL["spectrum"]})
IMAGE = model_overrides({key: ASTROCLIP_SMALL[key] for key in ("image", "embed_dim", "head_heads")})
LOOP = [
    "data.batch_size=8",
    "data.num_workers=0",
    "train.steps=3",
    "train.val_every=0",
    "train.log_every=1",
    "train.ckpt_every=0",
    "optim.warmup_steps=1",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("astroclip-cli")
    assert (
        main(
            [
                "synth",
                "astroclip",
                "--out",
                str(root / "raw"),
                "--n",
                "80",
                "--image-size",
                "24",
                "--wave-step",
                "8",
                "--format",
                "both",
                "--seed",
                "1",
                "--progress",
                "off",
            ]
        )
        == 0
    )
    common = [
        "--catalog",
        str(root / "raw" / "provabgs"),
        "--grid",
        "3600:9824:40",
        "--cutout",
        "20",
        "--splits",
        "train=0.7,valid=0.15,test=0.15",
        "--progress",
        "off",
    ]
    assert (
        main(
            [
                "prepare",
                "astroclip",
                "--images",
                str(root / "raw" / "legacysurvey"),
                "--spectra",
                str(root / "raw" / "desi"),
                "--out",
                str(root / "shards"),
                *common,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "prepare",
                "astroclip",
                "--images",
                str(root / "raw" / "fits" / "legacysurvey"),
                "--spectra",
                str(root / "raw" / "fits" / "desi"),
                "--out",
                str(root / "shards-fits"),
                *common,
            ]
        )
        == 0
    )
    return root


def _samples(path):
    manifest = Manifest.load(path)
    out = {}
    for split in manifest.splits:
        ds = ShardDataset(
            path,
            split=split,
            batch_size=1,
            shuffle=False,
            epochs=1,
            drop_last=False,
            collate_fn=lambda s: s[0],
            rank=0,
            world_size=1,
        )
        out.update({s["__key__"]: s for s in ds})
    return manifest, out


@pytest.mark.slow
def test_prepare_from_hdf5_and_fits_gives_the_same_shards(data, capsys):
    m1, a = _samples(data / "shards")
    m2, b = _samples(data / "shards-fits")
    assert m1.family == "astroclip" and len(a) >= 70
    assert set(a) == set(b)
    key = sorted(a)[0]
    for field in ("image", "image_ivar", "spectrum", "spectrum_mask"):
        np.testing.assert_allclose(a[key][field], b[key][field], rtol=1e-5)
    assert a[key]["redshift"] == pytest.approx(b[key]["redshift"])
    assert m1.extra["bands"] == ["g", "r", "z"]
    assert m1.extra["wavelength"]["pixels"] == len(a[key]["spectrum"]) == 156
    assert m1.schema["spectrum"].unit == "1e-17 erg/s/cm2/Angstrom"
    assert m1.schema["image"].shape == (3, 20, 20)
    assert set(m1.extra["targets"]) >= {"redshift", "stellar_mass", "ssfr"}
    assert {"spectrum_stats_token", "image_log_scale", "image_scale_floor"} <= set(m1.stats)
    match = m1.extra["match"]["match"]
    assert (
        match["unmatched_a"] > 0 and match["unmatched_b"] > 0
    )  # image-only and spectrum-only objects dropped


def test_prepare_reports_and_refuses_bad_input(data, capsys, tmp_path):
    raw = data / "raw"
    args = [
        "prepare",
        "astroclip",
        "--images",
        str(raw / "legacysurvey"),
        "--spectra",
        str(raw / "desi"),
        "--grid",
        "3600:9824:40",
        "--progress",
        "off",
    ]
    assert main([*args, "--out", str(data / "shards")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "x"), "--bands", "g,i"]) == 2
    assert "band(s) i requested" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "y"), "--targets", "NOPE:thing"]) == 2
    assert "no column 'NOPE'" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "z"), "--grid", "3600-9824"]) == 2
    assert "START:STOP:STEP" in capsys.readouterr().err
    assert main(["synth", "astroclip", "--out", str(raw), "--n", "5"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_specformer_then_alignment_through_pretrain(data, tmp_path, capsys):
    from encoders.astroclip.family import FAMILY
    from foundation.train import load_pretrained

    stage1 = tmp_path / "specformer"
    assert (
        main(
            [
                "pretrain",
                str(CONFIGS / "specformer-tiny.yaml"),
                f"data.path={data / 'shards'}",
                f"run.dir={stage1}",
                *SPECTRUM,
                *LOOP,
            ]
        )
        == 0
    )
    metrics = [json.loads(line) for line in (stage1 / "metrics.jsonl").read_text().splitlines()]
    assert any("masked_mse" in m for m in metrics)
    stage2 = tmp_path / "align"
    assert (
        main(
            [
                "pretrain",
                str(CONFIGS / "align-tiny.yaml"),
                f"data.path={data / 'shards'}",
                f"run.dir={stage2}",
                f"model.spectrum_init={stage1}",
                *SPECTRUM,
                *IMAGE,
                *LOOP,
            ]
        )
        == 0
    )
    model, cfg, family = load_pretrained(stage2)
    assert family is FAMILY and cfg.model.stage == "align"
    assert any(
        "top1_image_to_spectrum" in json.loads(line)
        for line in (stage2 / "metrics.jsonl").read_text().splitlines()
    )
    # the alignment run started from the stage-1 tower
    first, _, _ = load_pretrained(stage1)
    fresh = FAMILY.build_model(cfg.model, Manifest.load(data / "shards"))
    for name, value in first.spectrum.state_dict().items():
        assert torch.equal(fresh.spectrum.state_dict()[name], value), name
    # a tower of another shape is refused with the differing keys named
    capsys.readouterr()
    assert (
        main(
            [
                "pretrain",
                str(CONFIGS / "align-tiny.yaml"),
                f"data.path={data / 'shards'}",
                f"run.dir={tmp_path / 'bad'}",
                f"model.spectrum_init={stage1}",
                *SPECTRUM,
                *IMAGE,
                *LOOP,
                "model.spectrum.width=64",
            ]
        )
        == 2
    )
    assert "width: 32 there, 64 here" in capsys.readouterr().err


def test_pretrain_refuses_shards_on_another_wavelength_grid(data, tmp_path, capsys):
    assert (
        main(
            [
                "pretrain",
                str(CONFIGS / "specformer-tiny.yaml"),
                f"data.path={data / 'shards'}",
                f"run.dir={tmp_path / 'r'}",
                *SPECTRUM,
                "model.spectrum.wave_step=20",
                *LOOP,
            ]
        )
        == 2
    )
    assert "--grid 3600.0:9824.0:20.0" in capsys.readouterr().err


@pytest.mark.slow
def test_alignment_on_two_processes(data, tmp_path, torchrun):
    result = torchrun(
        [
            "pretrain",
            str(CONFIGS / "align-tiny.yaml"),
            f"data.path={data / 'shards'}",
            f"run.dir={tmp_path / 'run'}",
            "model.spectrum_init=null",
            *SPECTRUM,
            *IMAGE,
            *LOOP,
        ],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 x cpu, ddp" in result.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # 8 per rank: every rank scores its rows against the 16 gathered embeddings
    assert any(r.get("negatives") == 15 for r in records)


@pytest.mark.slow
def test_mae_image_pretraining_on_two_processes_then_alignment_from_it(data, tmp_path, torchrun):
    """image-tiny.yaml (MAE: the encoder skips masked patches) under DDP — every trainable
    parameter gets a gradient on every rank — then align-tiny.yaml starts its (frozen) image tower
    from it."""
    from foundation.train import load_pretrained

    image_overrides = [o for o in IMAGE if o.startswith("model.image.")]
    result = torchrun(
        [
            "pretrain",
            str(CONFIGS / "image-tiny.yaml"),
            f"data.path={data / 'shards'}",
            f"run.dir={tmp_path / 'image'}",
            *image_overrides,
            *LOOP,
        ],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 x cpu, ddp" in result.stderr
    records = [json.loads(line) for line in (tmp_path / "image" / "metrics.jsonl").read_text().splitlines()]
    assert any("masked_mse" in r for r in records)
    assert (
        main(
            [
                "pretrain",
                str(CONFIGS / "align-tiny.yaml"),
                f"data.path={data / 'shards'}",
                f"run.dir={tmp_path / 'align'}",
                "model.spectrum_init=null",
                f"model.image_init={tmp_path / 'image'}",
                *SPECTRUM,
                *IMAGE,
                *LOOP,
                "model.freeze_image=true",
            ]
        )
        == 0
    )
    pretrained, _, _ = load_pretrained(tmp_path / "image")
    aligned, _, _ = load_pretrained(tmp_path / "align")
    for name, value in pretrained.image.state_dict().items():
        assert torch.equal(aligned.image.state_dict()[name], value), name


@pytest.mark.parametrize("grid", ["3600:3600.5:1", "3600:inf:1", "0:1e9:1e-9", "nan:9824:0.8"])
def test_grid_of_under_two_or_unbounded_pixels_is_refused(grid):
    from encoders.astroclip.prepare import parse_grid

    with pytest.raises(DataError, match="--grid"):
        parse_grid(grid)


def test_prepare_takes_the_shared_split_fractions_option(capsys):
    from foundation.cli import build_parser, discover_commands, main

    parser = build_parser(discover_commands())
    base = ["prepare", "astroclip", "--images", "i", "--spectra", "s", "--out", "o"]
    for flag in ("--split-fractions", "--splits"):
        assert parser.parse_args([*base, flag, "train=0.9,test=0.1"]).split_fractions == {
            "train": 0.9,
            "test": 0.1,
        }
    assert parser.parse_args(base).split_fractions == {"train": 0.8, "valid": 0.1, "test": 0.1}
    assert main([*base, "--split-fractions", "train=0.5"]) == 2  # refused before any file is read
    assert "must add up to 1" in capsys.readouterr().err


@pytest.mark.slow
def test_prepare_writes_the_same_shards_with_one_or_two_workers(survey, tmp_path):
    from encoders.astroclip.prepare import prepare
    from tests.testkit.same_shards import assert_same_shard_sets

    root, _ = survey
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prepare(
            str(root / "legacysurvey"),
            str(root / "desi"),
            str(out),
            catalog=str(root / "provabgs"),
            grid=(3600.0, 9824.0, 40.0),
            samples_per_shard=10,
            chunk=7,  # several chunks, each a unit of work
            workers=workers,
        )
        outs.append(out)
    assert_same_shard_sets(*outs)


def test_prepare_astroclip_takes_the_workers_option(capsys):
    base = ["prepare", "astroclip", "--images", "i", "--spectra", "s", "--out", "o"]
    assert main([*base, "--workers", "0"]) == 2  # refused before any file is read
    assert "--workers" in capsys.readouterr().err


@pytest.mark.slow
def test_prepare_with_workers_reports_a_bad_mask_in_the_same_one_line(survey, tmp_path, capsys):
    """A mask value found by a worker stops the run with the one-process error, naming the file."""
    import shutil

    import h5py

    root, _ = survey
    images = tmp_path / "legacysurvey"
    shutil.copytree(root / "legacysurvey", images)
    path = sorted(images.rglob("*.hdf5"))[-1]
    with h5py.File(path, "r+") as f:
        mask = f["image_mask"][...].astype(np.uint8)
        mask[-1, 0, 0] = 5  # bit flags where booleans are declared, in the last object only
        del f["image_mask"]
        f["image_mask"] = mask
    errors = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        args = ["--images", str(images), "--spectra", str(root / "desi"), "--grid", "3600:9824:40"]
        assert main(["prepare", "astroclip", *args, "--out", str(out), "--workers", str(workers)]) == 2
        errors.append(capsys.readouterr().err)
        assert not (out / "manifest.json").exists()
    assert errors[0] == errors[1]
    assert str(path) in errors[0] and "bit flags" in errors[0] and errors[0].count("\n") == 1
