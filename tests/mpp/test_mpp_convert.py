"""Released MPP checkpoints: conversion to our AViT (variant reference) against golden outputs of
the reference code (tests/golden/mpp, made by benchmarks/golden/make_mpp_golden.py), refusal of
truncated, mismatched and code-carrying files, and the `foundation convert mpp` round trip."""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from encoders.mpp.convert import (
    convert_reference_checkpoint,
    convert_reference_state,
    field_slots,
    read_reference_checkpoint,
)
from encoders.mpp.model import AViT, MPPConfig
from foundation.cli import main
from foundation.errors import ConfigError, DataError
from foundation.train import load_pretrained
from foundation.weights import parse_hub_source
from pipelines.convert import convert_mpp

GOLDEN = Path(__file__).parents[1] / "golden" / "mpp"
CKPT = GOLDEN / "reference_ckpt.tar"
CASES = torch.load(GOLDEN / "cases.pt", weights_only=True)
NAMES = sorted({key.split("/")[0] for key in CASES})
PERIODIC, OPEN = 2, 1  # our (The Well's) boundary codes; the reference says 1 / 0


def _relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _predict(model: AViT, name: str, velocity_slots: str = "compressible") -> torch.Tensor:
    """Our model on a golden window: (T, B, ...) → (B, T, ...), slots → our field ids."""
    by_slot = {slot: field for field, slot in field_slots(12, velocity_slots).items()}
    x = CASES[f"{name}/x"].permute(1, 0, 2, 3, 4)
    ids = torch.tensor(model.field_ids([by_slot[int(s)] for s in CASES[f"{name}/labels"]]))
    bcs = torch.full((x.shape[0], 2), PERIODIC if int(CASES[f"{name}/bc"]) == 1 else OPEN)
    with torch.no_grad():
        return model(x, ids, None, bcs)


def _usable(name: str, velocity_slots: str) -> bool:
    kept = set(field_slots(12, velocity_slots).values())
    return all(int(s) in kept for s in CASES[f"{name}/labels"])


@pytest.fixture(scope="module")
def converted():
    return {v: convert_reference_checkpoint(CKPT, v) for v in ("compressible", "incompressible")}


@pytest.mark.parametrize("velocity_slots", ["compressible", "incompressible"])
def test_converted_model_reproduces_the_reference_next_step(converted, velocity_slots):
    model = converted[velocity_slots]
    checked = [name for name in NAMES if _usable(name, velocity_slots)]
    assert len(checked) == 2  # the periodic odd-width case or the incompressible one, and diffusion
    for name in checked:
        assert _relative_l2(_predict(model, name, velocity_slots), CASES[f"{name}/y"]) <= 1e-4, name


def test_converted_model_records_the_reference_variant(converted):
    model = converted["compressible"]
    assert model.cfg.variant == "reference" and model.cfg.residual is False
    assert model.cfg.bias_max_distance == 32 and (model.cfg.embed_dim, model.cfg.num_heads) == (32, 2)
    assert model.fields == [
        "height",
        "particles",
        "activator",
        "inhibitor",
        "velocity_x",
        "velocity_y",
        "density",
        "pressure",
    ]
    assert float(model.embed.reference_size) == 12.0  # the rescale keeps the checkpoint's n_states


def test_our_default_layers_would_not_reproduce_the_reference(converted):
    """The parity test can fail: the same weights in the foundation variant's layers differ."""
    reference = converted["compressible"]
    ours = AViT(MPPConfig(**{**vars(reference.cfg), "variant": "foundation"}), reference.fields).eval()
    shared = {k: v for k, v in reference.state_dict().items() if k in ours.state_dict()}
    ours.load_state_dict(shared, strict=False)
    name = "compressible_periodic"
    assert _relative_l2(_predict(ours, name), CASES[f"{name}/y"]) > 1e-2


def test_bare_state_dict_without_ddp_prefix_converts_the_same(converted, tmp_path):
    state = read_reference_checkpoint(CKPT)
    assert not any(k.startswith("module.") for k in state)
    bare = tmp_path / "bare.pt"
    torch.save(state, bare)
    model = convert_reference_checkpoint(bare)
    for key, value in converted["compressible"].state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_truncated_checkpoint_gets_one_line_error(tmp_path):
    data = CKPT.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated") as err:
        convert_reference_checkpoint(cut)
    assert "\n" not in str(err.value)


def test_missing_and_unexpected_keys_are_named_in_one_line():
    state = read_reference_checkpoint(CKPT)
    del state["blocks.1.temporal.gamma"]
    state["blocks.0.spatial.extra.weight"] = torch.zeros(3)
    with pytest.raises(DataError) as err:
        convert_reference_state(state)
    message = str(err.value)
    assert "missing keys: blocks.1.temporal.gamma" in message
    assert "unexpected keys: blocks.0.spatial.extra.weight" in message and "\n" not in message


def test_a_checkpoint_of_another_size_is_refused_by_shape():
    state = read_reference_checkpoint(CKPT)
    state["blocks.0.spatial.mlp.fc2.weight"] = torch.zeros(32, 64)
    with pytest.raises(DataError, match=r"space\.mlp\.2\.weight.*mismatched checkpoint"):
        convert_reference_state(state)


class _Payload:
    """Pickles as a call that would create a marker file if the checkpoint were unpickled freely."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.tar"
    torch.save({"model_state": {}, "optimizer_state_dict": _Payload(marker)}, evil)
    with pytest.raises(DataError, match="not loaded"):
        convert_reference_checkpoint(evil)
    assert not marker.exists()


def test_cli_round_trip_through_load_pretrained(tmp_path):
    out = tmp_path / "mpp-ti"
    assert main(["convert", "mpp", str(CKPT), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    model, cfg, family = load_pretrained(out)
    assert family.name == "mpp" and cfg.model.variant == "reference" and not model.training
    name = "compressible_periodic"
    assert _relative_l2(_predict(model, name), CASES[f"{name}/y"]) <= 1e-4
    # Never overwritten, and nothing half-written is left behind.
    before = (out / "model.safetensors").read_bytes()
    assert main(["convert", "mpp", str(CKPT), "--out", str(out)]) == 2
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mpp-ti"]


def test_tampered_model_directory_is_refused(tmp_path):
    out = tmp_path / "m"
    assert main(["convert", "mpp", str(CKPT), "--out", str(out)]) == 0
    save_file({"stranger": torch.zeros(2)}, str(out / "model.safetensors"))
    with pytest.raises(
        ConfigError, match=r"does not match its config.json: missing \[.*unexpected \['stranger'\]"
    ):
        load_pretrained(out)
    (out / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        load_pretrained(out)


def test_hub_sources_are_parsed():
    assert parse_hub_source("hf:org/repo") == ("org/repo", None, None)
    assert parse_hub_source("hf:org/repo/sub/ckpt.tar@v1") == ("org/repo", "sub/ckpt.tar", "v1")
    with pytest.raises(ConfigError, match="hf:ORG/REPO"):
        parse_hub_source("hf:repo-only")


def test_hub_source_from_a_prepared_offline_cache(tmp_path, monkeypatch):
    """`hf:` through huggingface_hub's own cache layout in offline mode (what HF_HUB_OFFLINE=1 and
    HF_HUB_CACHE set, patched in this process because huggingface_hub reads them at import)."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--polymathic-ai--mpp-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copyfile(CKPT, repo / "snapshots" / commit / "ckpt.tar")
    for i, source in enumerate(["hf:polymathic-ai/mpp-tiny/ckpt.tar", f"hf:polymathic-ai/mpp-tiny@{commit}"]):
        assert main(["convert", "mpp", source, "--out", str(tmp_path / f"out{i}")]) == 0
        assert load_pretrained(tmp_path / f"out{i}")[1].model.variant == "reference"
    with pytest.raises(
        DataError, match=r"^'hf:polymathic-ai/not-cached': cannot fetch from the Hugging Face Hub"
    ):
        convert_mpp("hf:polymathic-ai/not-cached", tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


FINETUNE_PUBLISHED = str(Path(__file__).parents[2] / "configs" / "mpp" / "finetune-published.yaml")


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """32x32 windows (two 16-pixel patches per side): NS (a new field, tracer) and diffusion."""
    root = tmp_path_factory.mktemp("published")
    well = root / "well"
    synth = ["synth", "mpp", "--out", str(well), "--resolution", "32", "--steps", "6"]
    assert main([*synth, "--systems", "navier_stokes,diffusion_reaction", "--trajectories", "1,1,1"]) == 0
    common = ["--history", "2", "--window", "4", "--stride", "2"]
    ns, dr = root / "ns", root / "dr"
    assert main(["prepare", "mpp", str(well / "navier_stokes"), "--out", str(ns), *common]) == 0
    assert main(["prepare", "mpp", str(well / "diffusion_reaction"), "--out", str(dr), *common]) == 0
    return ns, dr


@pytest.mark.slow
def test_finetune_from_a_converted_model_and_rollout_with_it(small_shards, tmp_path):
    ns, dr = small_shards
    converted = tmp_path / "mpp-converted"
    assert main(["convert", "mpp", str(CKPT), "--out", str(converted), "--history", "2"]) == 0
    # The converted directory itself is a model for `evaluate rollout`.
    rollout = ["evaluate", "rollout", "--data", str(dr), "--steps", "2", "--split", "train"]
    assert main([*rollout, "--checkpoint", str(converted), "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "rollout.json").read_text())
    assert set(report["one_step"]["vrmse"]["per_field"]) == {"activator", "inhibitor"}
    assert math.isfinite(report["one_step"]["vrmse"]["mean"])
    run = tmp_path / "ft"
    overrides = [f"model.init_from={converted}", f"data.path={ns}", f"run.dir={run}", "model.history=2"]
    overrides += ["train.steps=2", "train.val_every=0", "train.ckpt_every=0", "optim.warmup_steps=1"]
    overrides += ["data.batch_size=1", "data.num_workers=0", "train.log_every=1"]
    assert main(["pretrain", FINETUNE_PUBLISHED, *overrides]) == 0
    tuned, cfg, _ = load_pretrained(run)
    assert cfg.model.variant == "reference" and cfg.model.residual is False
    assert tuned.fields[-1] == "tracer" and tuned.fields[:-1] == load_pretrained(converted)[0].fields
    assert float(tuned.embed.reference_size) == 12.0


def test_hub_source_without_huggingface_hub_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as when not installed
    with pytest.raises(ConfigError, match=r"huggingface_hub.*foundation\[hub\]"):
        convert_mpp("hf:org/repo/ckpt.tar", tmp_path / "out")
    assert not (tmp_path / "out").exists()
