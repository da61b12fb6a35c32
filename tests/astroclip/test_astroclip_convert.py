"""Released AstroCLIP, AstroDINO and SpecFormer checkpoints: conversion to our AstroCLIP (variant
reference) against golden embeddings of the reference code (tests/golden/astroclip, made by
benchmarks/golden/make_astroclip_golden.py), refusal of truncated, mismatched and code-carrying
files, the `foundation convert` verbs and converted directories as tower initialisations."""

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.nn.functional import cosine_similarity

from encoders.astroclip.convert import (
    convert_astroclip_checkpoint,
    convert_astroclip_state,
    convert_astrodino_checkpoint,
    convert_specformer_checkpoint,
    read_checkpoint,
)
from encoders.astroclip.family import FAMILY, make_collate
from encoders.astroclip.model import AstroCLIP, AstroCLIPConfig
from foundation.cli import main
from foundation.data import Manifest, ShardDataset
from foundation.errors import ConfigError, DataError
from foundation.train import load_pretrained
from tests.astroclip import mmu_layouts

GOLDEN = Path(__file__).parents[1] / "golden" / "astroclip"
CASES = torch.load(GOLDEN / "cases.pt", weights_only=True)
ASTROCLIP, ASTRODINO, SPECFORMER = (GOLDEN / f"{n}.ckpt" for n in ("astroclip", "astrodino", "specformer"))


def survey_cutouts(images: torch.Tensor) -> np.ndarray:
    """The golden images, rows of the reference data set (column, row, band), as the survey cutouts
    they were made from: (band, row, column), the layout of MMU files and of our shards. The data set
    transposed the cutouts (`.T` when it was exported); the reference collator transposes them back."""
    return images.permute(0, 3, 2, 1).numpy()


def _batch(model: AstroCLIP) -> dict:
    """The golden objects through our own evaluation collate (centre crop), as `export` runs them."""
    images = survey_cutouts(CASES["images"])
    spectra = CASES["spectra"].numpy()
    samples = [
        {
            "__key__": f"obj{i}",
            "image": images[i],
            "image_ivar": np.ones_like(images[i]),
            "spectrum": spectra[i],
            "spectrum_mask": np.zeros(spectra.shape[1], dtype=bool),
        }
        for i in range(len(images))
    ]
    return make_collate(model.cfg, None, train=False)(samples)


def _cosines(model: AstroCLIP, modality: str, golden: str) -> torch.Tensor:
    return cosine_similarity(FAMILY.embed(model, _batch(model))[modality], CASES[golden].float(), dim=-1)


@pytest.fixture(scope="module")
def astroclip() -> AstroCLIP:
    return convert_astroclip_checkpoint(ASTROCLIP)


def test_converted_astroclip_reproduces_both_reference_embeddings(astroclip):
    assert bool((_cosines(astroclip, "image", "astroclip_image") >= 0.9999).all())
    assert bool((_cosines(astroclip, "spectrum", "astroclip_spectrum") >= 0.9999).all())


def test_converted_astrodino_and_specformer_reproduce_the_reference_embeddings():
    astrodino = convert_astrodino_checkpoint(ASTRODINO, heads=2)
    assert bool((_cosines(astrodino, "image", "astrodino") >= 0.9999).all())
    specformer = convert_specformer_checkpoint(SPECFORMER)
    assert bool((_cosines(specformer, "spectrum", "specformer") >= 0.9999).all())


def _teacher() -> dict[str, torch.Tensor]:
    """The golden AstroDINO's teacher state: `backbone.…` (chunked blocks) and `dino_head.…`."""
    return read_checkpoint(ASTRODINO, "an AstroDINO")["teacher"]


def _whole_model(teacher: dict[str, torch.Tensor]) -> dict:
    """DINOv2's fvcore layout: the whole SSLMetaArch state, a student beside the teacher (zeroed
    here: reading it would break the embeddings), optimizer and iteration."""
    model = {f"teacher.{k}": v for k, v in teacher.items()}
    model |= {f"student.{k}": torch.zeros_like(v) for k, v in teacher.items()}
    return {"model": model, "optimizer": {"state": {}, "param_groups": []}, "iteration": 12499}


@pytest.mark.parametrize(
    "layout",
    [
        "bare backbone",
        "backbone. prefixes",
        "DDP module. prefixes",
        "state_dict-wrapped",
        "whole model (fvcore)",
    ],
)
def test_astrodino_layouts_the_reference_loader_reads(tmp_path, layout):
    """Every layout DINOv2's `load_pretrained_weights(…, "teacher")` reads gives the golden embedding."""
    teacher = _teacher()
    backbone = {k.removeprefix("backbone."): v for k, v in teacher.items() if k.startswith("backbone.")}
    payload = {
        "bare backbone": backbone,
        "backbone. prefixes": teacher,
        "DDP module. prefixes": {f"module.{k}": v for k, v in teacher.items()},
        "state_dict-wrapped": {"state_dict": teacher},
        "whole model (fvcore)": _whole_model(teacher),
    }[layout]
    torch.save(payload, tmp_path / "astrodino.ckpt")
    model = convert_astrodino_checkpoint(tmp_path / "astrodino.ckpt", heads=2)
    assert bool((_cosines(model, "image", "astrodino") >= 0.9999).all())


def test_astrodino_training_shards_and_student_only_states_are_refused(tmp_path):
    shards = {
        "model": {
            "teacher.backbone.flat_param": torch.zeros(10),
            "student.backbone.flat_param": torch.zeros(10),
        }
    }
    torch.save(shards, tmp_path / "model_0012499.rank_0.pth")
    with pytest.raises(DataError, match="FSDP flat parameters.*teacher_checkpoint.pth") as err:
        convert_astrodino_checkpoint(tmp_path / "model_0012499.rank_0.pth", heads=2)
    assert "\n" not in str(err.value)
    student = {
        "model": {k: v for k, v in _whole_model(_teacher())["model"].items() if k.startswith("student.")}
    }
    torch.save(student, tmp_path / "student.pth")
    with pytest.raises(DataError, match="no 'teacher.' keys"):
        convert_astrodino_checkpoint(tmp_path / "student.pth", heads=2)


def test_converted_astroclip_records_the_reference_variant(astroclip):
    cfg = astroclip.cfg
    assert (cfg.stage, cfg.variant, cfg.embed_dim, cfg.head_heads) == ("align", "reference", 32, 2)
    # head counts are read from the modules pickled in hyper_parameters
    assert (cfg.image.heads, cfg.spectrum.heads) == (2, 2)
    assert (cfg.image.size, cfg.image.patch, cfg.image.depth, list(cfg.image.bands)) == (
        36,
        12,
        4,
        ["g", "r", "z"],
    )
    assert (cfg.spectrum.patch, cfg.spectrum.stride, cfg.spectrum.length) == (20, 10, 7781)
    assert cfg.freeze_image and cfg.freeze_spectrum and not cfg.learn_temperature
    assert abs(float(astroclip.logit_scale()) - 15.5) < 1e-4


def test_the_reference_details_matter(astroclip):
    """The parity test can fail: the image head's missing residual and the row/column swap count."""
    astroclip.image_head.residual = True
    try:
        assert bool((_cosines(astroclip, "image", "astroclip_image") < 0.999).any())
    finally:
        astroclip.image_head.residual = False
    batch = _batch(astroclip)
    swapped = {**batch, "image": batch["image"].transpose(-1, -2)}
    cos = cosine_similarity(FAMILY.embed(astroclip, swapped)["image"], CASES["astroclip_image"], dim=-1)
    assert bool((cos < 0.999).any())


def test_truncated_checkpoint_gets_one_line_error(tmp_path):
    data = ASTROCLIP.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated") as err:
        convert_astroclip_checkpoint(cut)
    assert "\n" not in str(err.value)


def test_missing_and_unexpected_keys_are_named_in_one_line():
    payload = read_checkpoint(ASTROCLIP, "an AstroCLIP")
    state = dict(payload["state_dict"])
    del state["spectrum_encoder.cross_attention.layernorm.bias"]
    state["image_encoder.backbone.blocks.1.3.extra.weight"] = torch.zeros(3)
    with pytest.raises(DataError) as err:
        convert_astroclip_state(state, payload["hyper_parameters"])
    message = str(err.value)
    assert "missing keys: spectrum_encoder.cross_attention.layernorm.bias" in message
    assert "unexpected keys: image_encoder.backbone.blocks.3.extra.weight" in message and "\n" not in message


def test_a_specformer_checkpoint_is_not_an_astroclip_one():
    with pytest.raises(DataError, match=r"not an AstroCLIP checkpoint.*missing key"):
        convert_astroclip_checkpoint(SPECFORMER)


class _Payload:
    """Pickles as a call of `function`, which would create `marker` if it were ever called."""

    def __init__(self, function, marker: Path):
        self.function, self.marker = function, marker

    def __reduce__(self):
        return (self.function, (self.marker,))


def test_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.ckpt"
    payload = _Payload(os.system, f"touch {marker}")
    torch.save({"state_dict": {}, "hyper_parameters": {"image_encoder": payload}}, evil)
    with pytest.raises(DataError, match=r"refers to \S*system, which is neither data.*not loaded") as err:
        convert_astroclip_checkpoint(evil)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_reference_classes_in_hyper_parameters_are_never_called(tmp_path, monkeypatch):
    """A name under the reference's modules becomes an inert stand-in, even when importable."""
    marker = tmp_path / "ran"

    def write_marker(path):
        Path(path).touch()

    module = types.ModuleType("astroclip.models.astroclip")
    write_marker.__module__, write_marker.__qualname__ = module.__name__, "write_marker"
    module.write_marker = write_marker
    for name in ("astroclip", "astroclip.models"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    state = read_checkpoint(ASTROCLIP, "an AstroCLIP")["state_dict"]
    ckpt = tmp_path / "marked.ckpt"
    torch.save(
        {"state_dict": state, "hyper_parameters": {"image_encoder": _Payload(write_marker, str(marker))}},
        ckpt,
    )
    model = convert_astroclip_checkpoint(ckpt)
    assert not marker.exists()
    assert model.cfg.head_heads == 4  # no pickled modules to read: the released default


def test_cli_round_trip_through_load_pretrained(tmp_path):
    out = tmp_path / "astroclip"
    assert main(["convert", "astroclip", str(ASTROCLIP), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    model, cfg, family = load_pretrained(out)
    assert family.name == "astroclip" and cfg.model.variant == "reference" and not model.training
    assert bool((_cosines(model, "image", "astroclip_image") >= 0.9999).all())
    assert bool((_cosines(model, "spectrum", "astroclip_spectrum") >= 0.9999).all())
    before = (out / "model.safetensors").read_bytes()
    assert main(["convert", "astroclip", str(ASTROCLIP), "--out", str(out)]) == 2
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["astroclip"]


def test_mismatched_checkpoint_on_the_command_line_is_one_error_line(tmp_path, capsys):
    assert main(["convert", "specformer", str(ASTROCLIP), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing key" in err and "\n" not in err
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def tower_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    assert main(["convert", "astrodino", str(ASTRODINO), "--out", str(root / "dino"), "--heads", "2"]) == 0
    assert main(["convert", "specformer", str(SPECFORMER), "--out", str(root / "spec")]) == 0
    return root / "dino", root / "spec"


def test_converted_towers_initialise_an_alignment_run(astroclip, tower_dirs):
    dino, spec = tower_dirs
    cfg = AstroCLIPConfig(**{**vars(astroclip.cfg), "image_init": str(dino), "spectrum_init": str(spec)})
    model = FAMILY.build_model(cfg, None)
    for tower in ("image", "spectrum"):
        theirs = getattr(astroclip, tower).state_dict()
        mine = getattr(model, tower).state_dict()
        # the golden AstroCLIP's backbones are the golden AstroDINO and SpecFormer
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), tower


def test_a_released_tower_needs_the_reference_variant(astroclip, tower_dirs):
    fields = {**vars(astroclip.cfg), "variant": "foundation", "image_init": str(tower_dirs[0])}
    with pytest.raises(ConfigError, match="variant 'reference' model.*model.variant=reference"):
        FAMILY.build_model(AstroCLIPConfig(**fields), None)


def test_masked_image_training_of_the_released_tower_is_refused(tower_dirs):
    model, _, _ = load_pretrained(tower_dirs[0])
    batch = {"image": torch.zeros(1, 3, 36, 36), "image_token_mask": torch.zeros(1, 9, dtype=torch.bool)}
    with pytest.raises(ConfigError, match="embeds only"):
        model(batch)


@pytest.mark.slow
def test_prepare_then_export_with_a_converted_model(tmp_path):
    """Shards on the released grid and cutouts → `foundation export --checkpoint DIR` gives the
    converted model's own embeddings of those objects (the golden test covers the reference)."""
    h5py = pytest.importorskip("h5py")
    raw, shards, model_dir, out = (tmp_path / n for n in ("raw", "shards", "model", "emb.h5"))
    synth = ["synth", "astroclip", "--out", str(raw), "--n", "4", "--image-size", "40", "--wave-step", "0.8"]
    assert main([*synth, "--seed", "1", "--progress", "off"]) == 0
    prepare = ["prepare", "astroclip", "--images", str(raw / "legacysurvey"), "--spectra", str(raw / "desi")]
    prepare += ["--catalog", str(raw / "provabgs"), "--grid", "3600:9824:0.8", "--cutout", "40"]
    assert main([*prepare, "--splits", "train=1", "--out", str(shards), "--progress", "off"]) == 0
    assert main(["convert", "astroclip", str(ASTROCLIP), "--out", str(model_dir)]) == 0
    assert main(["export", "--checkpoint", str(model_dir), "--data", str(shards), "--out", str(out)]) == 0
    model, cfg, _ = load_pretrained(model_dir)
    manifest = Manifest.load(shards)
    dataset = ShardDataset(
        shards,
        split="train",
        batch_size=4,
        shuffle=False,
        epochs=1,
        drop_last=False,
        collate_fn=make_collate(cfg.model, manifest, train=False),
        rank=0,
        world_size=1,
    )
    batch = next(iter(dataset))
    expected = FAMILY.embed(model, batch)
    with h5py.File(out) as f:
        order = [key.decode() for key in f["object_id"][:]]
        for modality in ("image", "spectrum"):
            exported = torch.from_numpy(f[modality][:]).float()
            rows = [order.index(k) for k in batch["__key__"]]
            assert bool((cosine_similarity(exported[rows], expected[modality], dim=-1) >= 0.9999).all())


def _golden_survey_in_mmu_files(root: Path) -> dict[str, int]:
    """The golden galaxies as MMU files: legacysurvey cutouts (g, r, z planes of the builder's four;
    ~3% of pixels masked) and desi spectra (~3% masked, on the DESI grid), written by the builders'
    writers and given the golden values, plus a desi_provabgs catalogue. Returns {TARGETID: case}."""
    ra, dec, z = 150.0 + 0.01 * np.arange(3), np.full(3, 2.0), np.array([0.1, 0.2, 0.3])
    ((images, columns),) = mmu_layouts.legacysurvey(root / "legacysurvey", ra, dec, seed=1, size=40).items()
    assert not columns["image_mask"].all()  # some pixels masked (True = clean)
    with h5py.File(images, "r+") as f:
        cutouts = f["image_array"][()]
        cutouts[:, [0, 1, 3]] = survey_cutouts(CASES["images"])  # des-g, des-r, des-z
        f["image_array"][...] = cutouts
    ((spectra, columns),) = mmu_layouts.desi(root / "desi", ra, dec, z, seed=2).items()
    assert columns["spectrum_mask"].any(axis=1).all()  # some pixels masked (True = bad)
    with h5py.File(spectra, "r+") as f:
        f["spectrum_flux"][...] = CASES["spectra"].numpy()
    mmu_layouts.desi_provabgs(root / "provabgs", ra, dec, columns["TARGETID"], z, seed=3)
    return {int(t): i for i, t in enumerate(columns["TARGETID"])}


def _prepare_and_export(root: Path, model_dir: Path, masked_pixels: str) -> dict[str, torch.Tensor]:
    shards, out = root / f"shards-{masked_pixels}", root / f"emb-{masked_pixels}.h5"
    prepare = ["prepare", "astroclip", "--images", str(root / "legacysurvey")]
    prepare += ["--spectra", str(root / "desi"), "--catalog", str(root / "provabgs")]
    prepare += ["--masked-pixels", masked_pixels, "--splits", "train=1"]
    assert main([*prepare, "--out", str(shards), "--progress", "off"]) == 0
    assert Manifest.load(shards).extra["masked_pixels"] == masked_pixels
    assert main(["export", "--checkpoint", str(model_dir), "--data", str(shards), "--out", str(out)]) == 0
    with h5py.File(out) as f:
        ids = [int(k) for k in f["object_id"][:]]
        return {"ids": ids, **{m: torch.from_numpy(f[m][:]).float() for m in ("image", "spectrum")}}


def test_mmu_files_prepare_export_give_the_reference_embeddings(tmp_path):
    """MMU files → `prepare astroclip --masked-pixels keep` (DESI grid and g, r, z by default) →
    `convert` → `export`: the reference's own embeddings of the same galaxies. Zeroing the masked
    pixels, as our default does, moves them off."""
    cases = _golden_survey_in_mmu_files(tmp_path)
    model_dir = tmp_path / "model"
    assert main(["convert", "astroclip", str(ASTROCLIP), "--out", str(model_dir)]) == 0
    for masked_pixels in ("keep", "zero"):
        exported = _prepare_and_export(tmp_path, model_dir, masked_pixels)
        rows = [cases[i] for i in exported["ids"]]
        assert sorted(rows) == [0, 1, 2]
        for modality in ("image", "spectrum"):
            golden = CASES[f"astroclip_{modality}"][rows].float()
            cos = cosine_similarity(exported[modality], golden, dim=-1)
            if masked_pixels == "keep":
                assert bool((cos >= 0.9999).all()), (modality, cos)
            else:
                assert bool((cos < 0.9999).any()), (modality, cos)


@pytest.mark.parametrize("stage", ["align", "spectrum_masked"])
def test_the_reference_variant_trains(astroclip, stage):
    """Fine-tuning a converted model: a training step's loss backpropagates; in alignment the
    class token and positions AstroCLIP never reads get no gradient."""
    cfg = AstroCLIPConfig(**{**vars(astroclip.cfg), "stage": stage, "freeze_image": False})
    model = FAMILY.build_model(cfg, None).train()
    rng = np.random.default_rng(0)
    samples = [
        {
            "__key__": f"k{i}",
            "image": rng.normal(0.1, 0.05, size=(3, 40, 40)).astype(np.float32),
            "image_ivar": np.ones((3, 40, 40), dtype=np.float32),
            "spectrum": rng.normal(2.0, 1.0, size=7781).astype(np.float32),
            "spectrum_mask": np.zeros(7781, dtype=bool),
        }
        for i in range(3)
    ]
    value, _ = FAMILY.loss(model, make_collate(cfg, None, train=True)(samples, rng))
    value.backward()
    assert torch.isfinite(value)
    if stage == "align":
        assert model.image.cls.grad is None and model.image.pos.grad is None
        assert model.image.patch_embed.weight.grad is not None
    else:
        assert model.spectrum.embed.weight.grad is not None


@pytest.mark.slow
def test_cyclic_hyper_parameters_are_walked_once(tmp_path):
    """A pickle may nest objects in cycles: reading head counts from them must still end."""
    state = read_checkpoint(ASTROCLIP, "an AstroCLIP")["state_dict"]
    cycle: list = []
    cycle.extend([cycle, cycle])
    ckpt = tmp_path / "cyclic.ckpt"
    torch.save(
        {"state_dict": state, "hyper_parameters": {"image_encoder": cycle, "spectrum_encoder": cycle}}, ckpt
    )
    code = (
        "import sys; from encoders.astroclip.convert import convert_astroclip_checkpoint as c; "
        "print(c(sys.argv[1]).cfg.head_heads)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "4"


def test_hub_source_from_a_prepared_offline_cache(tmp_path, monkeypatch):
    """`hf:polymathic-ai/astroclip` resolved from huggingface_hub's cache in offline mode."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / "models--polymathic-ai--astroclip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copyfile(ASTROCLIP, repo / "snapshots" / commit / "astroclip.ckpt")
    assert main(["convert", "astroclip", "hf:polymathic-ai/astroclip", "--out", str(tmp_path / "m")]) == 0
    model, cfg, _ = load_pretrained(tmp_path / "m")
    assert cfg.model.variant == "reference"
    assert bool((_cosines(model, "image", "astroclip_image") >= 0.9999).all())
