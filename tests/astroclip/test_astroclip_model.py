"""Towers, heads, temperature, freezing, augmentations, config and manifest checks."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from encoders.astroclip.collate import Collate, augment_image, crop, segment_mask
from encoders.astroclip.family import FAMILY, check_manifest
from encoders.astroclip.heads import AttentionPoolHead
from encoders.astroclip.model import AstroCLIP, AstroCLIPConfig
from foundation import config
from foundation.data import FieldSpec
from foundation.errors import ConfigError
from tests.testkit.configs import ASTROCLIP_SMALL, tiny_model_config


def tiny(stage="align", **kw) -> AstroCLIPConfig:
    return tiny_model_config("astroclip", ASTROCLIP_SMALL, {"image": {"max_shift": 2}}, stage=stage, **kw)


def batch(cfg: AstroCLIPConfig, n=4, seed=0, train=True) -> dict:
    rng = np.random.default_rng(seed)
    length = cfg.spectrum.length
    samples = [
        {
            "__key__": f"k{i}",
            "image": rng.normal(size=(3, 20, 20)).astype(np.float32) + 1.0,
            "image_ivar": np.ones((3, 20, 20), np.float32),
            "spectrum": rng.normal(size=length).astype(np.float32) + 3.0,
            "spectrum_mask": rng.random(length) < 0.05,
            "redshift": 0.1 * i,
        }
        for i in range(n)
    ]
    return FAMILY.make_collate(cfg, SimpleNamespace(extra={"targets": {"redshift": {}}}), train)(samples, rng)


def test_specformer_slices_and_statistics_token():
    cfg = tiny("spectrum_masked")
    model = AstroCLIP(cfg)
    b = batch(cfg)
    out = model.spectrum(b["spectrum"], b["spectrum_bad"])
    tokens = cfg.spectrum.tokens
    assert out["tokens"].shape == (4, tokens + 1, 32)
    x, good, _ = model.spectrum.standardise(b["spectrum"], b["spectrum_bad"])
    assert torch.equal(out["target"][:, 3], x[:, 12:20])  # slice 3 = pixels 3*stride .. +patch
    assert torch.all(x[b["spectrum_bad"]] == 0)
    assert torch.allclose((x * good).sum(1) / good.sum(1), torch.zeros(4), atol=1e-5)
    with pytest.raises(ValueError, match="re-run `foundation prepare astroclip` with the model's --grid"):
        model.spectrum(torch.zeros(2, cfg.spectrum.length + 3))


def test_masked_pretraining_scores_only_masked_segments():
    cfg = tiny("spectrum_masked")
    model = AstroCLIP(cfg)
    b = batch(cfg)
    mask = b["spectrum_token_mask"]
    assert mask.sum(1).tolist() == [cfg.spectrum.mask_segments * cfg.spectrum.mask_length] * 4
    loss, _ = FAMILY.loss(model, b)
    noise = torch.randn(4, cfg.spectrum.tokens, cfg.spectrum.patch) * 100 * (~mask)[..., None]
    handle = model.spectrum_decoder.register_forward_hook(lambda m, i, o: o + noise)
    perturbed, _ = FAMILY.loss(model, b)
    handle.remove()
    assert perturbed.item() == pytest.approx(loss.item(), rel=1e-6)
    # every masked token is scored: perturbing one masked prediction changes the loss
    bump = torch.zeros_like(noise)
    bump[0, int(torch.nonzero(mask[0])[0])] = 1.0
    handle = model.spectrum_decoder.register_forward_hook(lambda m, i, o: o + bump)
    assert FAMILY.loss(model, b)[0].item() != pytest.approx(loss.item(), rel=1e-6)
    handle.remove()


def test_segment_mask_puts_one_run_in_each_segment():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = segment_mask(30, 3, 4, rng)
        assert m.sum() == 12
        for s in range(3):
            seg = m[s * 10 : (s + 1) * 10]
            assert seg.sum() == 4 and np.all(np.diff(np.flatnonzero(seg)) == 1)


def test_image_head_sees_position():
    cfg = tiny()
    model = AstroCLIP(cfg).eval()
    b = batch(cfg, train=False)
    image = b["image"]
    # swap two 4x4 patches: a bag of patches would not notice
    swapped = image.clone()
    swapped[..., 0:4, 0:4], swapped[..., 12:16, 12:16] = image[..., 12:16, 12:16], image[..., 0:4, 0:4]
    e1 = model.image_head(model.image(image)["tokens"])
    e2 = model.image_head(model.image(swapped)["tokens"])
    assert not torch.allclose(e1, e2, atol=1e-4)
    with torch.no_grad():
        model.image.pos.zero_()
    e1 = model.image_head(model.image(image)["tokens"])
    e2 = model.image_head(model.image(swapped)["tokens"])
    assert torch.allclose(e1, e2, atol=1e-5)  # without positional embeddings: permutation invariant


def test_head_returns_attention_probabilities():
    head = AttentionPoolHead(8, 16, heads=4)
    tokens = torch.randn(3, 7, 8)
    out, weights = head(tokens, return_weights=True)
    assert out.shape == (3, 16) and weights.shape == (3, 4, 7)
    assert torch.allclose(weights.sum(-1), torch.ones(3, 4), atol=1e-6)
    q, k, v = head._qkv(tokens)
    manual = torch.softmax(q @ k.transpose(-2, -1) / (16 / 4) ** 0.5, dim=-1)[:, :, 0]
    assert torch.allclose(weights, manual, atol=1e-6)
    assert torch.allclose(head(tokens), out)


def test_temperature_is_learned_and_clamped():
    cfg = tiny(temperature=0.1, min_temperature=0.05)
    model = AstroCLIP(cfg)
    assert isinstance(model.log_logit_scale, torch.nn.Parameter)
    opt = torch.optim.SGD([model.log_logit_scale], lr=1.0)
    before = model.logit_scale().item()
    loss, metrics = FAMILY.loss(model, batch(cfg))
    loss.backward()
    assert model.log_logit_scale.grad is not None and model.log_logit_scale.grad.abs() > 0
    opt.step()
    assert model.logit_scale().item() != pytest.approx(before)
    assert metrics["temperature"] == pytest.approx(0.1, rel=1e-5)
    with torch.no_grad():
        model.log_logit_scale.fill_(10.0)
    assert model.logit_scale().item() == pytest.approx(20.0)  # 1 / min_temperature
    fixed = AstroCLIP(tiny(learn_temperature=False))
    assert "log_logit_scale" not in dict(fixed.named_parameters())
    assert fixed.logit_scale().item() == pytest.approx(15.5, rel=1e-5)


def test_frozen_towers_get_no_gradient_and_stay_in_eval_mode():
    cfg = tiny(freeze_spectrum=True)
    model = FAMILY.build_model(cfg, None)
    model.train()
    assert not model.spectrum.training and model.image.training
    loss, _ = FAMILY.loss(model, batch(cfg))
    loss.backward()
    assert all(p.grad is None for p in model.spectrum.parameters())
    assert any(p.grad is not None for p in model.spectrum_head.parameters())
    assert any(p.grad is not None for p in model.image.parameters())
    # freezing is an alignment option: a pretraining stage trains its tower whatever the flags say
    stage1 = FAMILY.build_model(tiny("spectrum_masked", freeze_spectrum=True), None)
    assert all(p.requires_grad for p in stage1.spectrum.parameters())


def test_frozen_spectrum_cache_runs_the_tower_once_per_object_and_changes_nothing():
    cfg = tiny(freeze_spectrum=True, frozen_spectrum_cache_mb=1)
    cached = FAMILY.build_model(cfg, None).train()
    plain = FAMILY.build_model(tiny(freeze_spectrum=True), None).train()
    plain.load_state_dict(cached.state_dict())  # the cache is no part of the state
    seen = []
    cached.spectrum.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    first, second = batch(cfg, n=4, seed=0), batch(cfg, n=6, seed=0)  # keys k0..k3, then k0..k5
    for b in (first, second, second):
        got, want = cached(b)["spectrum"], plain(b)["spectrum"]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert seen == [4, 2]  # new objects only; the third batch ran no tower at all
    tokens = cfg.spectrum.tokens + 1
    assert cached.spectrum_cache.bytes == 6 * tokens * cfg.spectrum.width * 4
    loss, _ = FAMILY.loss(cached, second)
    loss.backward()
    assert all(p.grad is None for p in cached.spectrum.parameters())
    assert any(p.grad is not None for p in cached.spectrum_head.parameters())


def test_frozen_spectrum_cache_keeps_to_its_budget():
    cfg = tiny(freeze_spectrum=True, frozen_spectrum_cache_mb=1)
    model = FAMILY.build_model(cfg, None).train()
    per_object = (cfg.spectrum.tokens + 1) * cfg.spectrum.width * 4
    model.spectrum_cache.max_bytes = 3 * per_object
    seen = []
    model.spectrum.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    b = batch(cfg, n=5)
    model(b)
    model(b)
    assert model.spectrum_cache.bytes == 3 * per_object and seen == [5, 2]
    model.spectrum_cache = type(model.spectrum_cache)(1 << 20)
    twice = batch(cfg, n=2)
    twice["__key__"] = ["same", "same"]  # a key met twice in one batch is kept once
    model(twice)
    assert model.spectrum_cache.bytes == per_object


def test_frozen_spectrum_cache_needs_a_frozen_spectrum_tower():
    with pytest.raises(ConfigError, match="frozen_spectrum_cache_mb needs stage align with freeze_spectrum"):
        config.from_dict(AstroCLIPConfig, {"frozen_spectrum_cache_mb": 64})
    with pytest.raises(ConfigError, match="frozen_spectrum_cache_mb needs stage align"):
        config.from_dict(
            AstroCLIPConfig,
            {"stage": "spectrum_masked", "freeze_spectrum": True, "frozen_spectrum_cache_mb": 64},
        )


def test_embed_gives_unit_vectors_per_modality():
    cfg = tiny()
    model = FAMILY.build_model(cfg, None).eval()
    out = FAMILY.embed(model, batch(cfg, train=False))
    assert set(out) == {"image", "spectrum"}
    for v in out.values():
        assert v.shape == (4, 16) and torch.allclose(v.norm(dim=1), torch.ones(4), atol=1e-5)
    stage1 = FAMILY.build_model(tiny("spectrum_masked"), None).eval()
    assert set(FAMILY.embed(stage1, batch(tiny("spectrum_masked"), train=False))) == {"spectrum"}


def test_augmentations_preserve_flux_and_colours():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:24, 0:24]
    blob = np.exp(-((x - 11.5) ** 2 + (y - 11.5) ** 2) / 4.0)
    image = np.stack([blob, 2 * blob, 3 * blob]).astype(np.float32)
    ivar = np.full_like(image, 1e4)
    for _ in range(20):
        view = augment_image(image, ivar, rng, 16, max_shift=3, rotate=True, flip=True, noise=0.0)
        np.testing.assert_allclose(view.sum(axis=(1, 2)), image.sum(axis=(1, 2)), rtol=1e-3)
        np.testing.assert_allclose(view[1], 2 * view[0], rtol=1e-5, atol=1e-12)  # colours untouched
    # rotations and flips are exact permutations of pixels
    exact = augment_image(image, ivar, rng, 24, 0, True, True, 0.0)
    np.testing.assert_allclose(np.sort(exact.ravel()), np.sort(image.ravel()))
    # added noise has zero mean and the pixel's own sigma
    views = np.stack([augment_image(image, ivar, rng, 24, 0, False, False, 1.0) for _ in range(400)])
    np.testing.assert_allclose(views.mean(0), image, atol=4 * 0.01 / np.sqrt(400) * 3)
    assert np.std(views - image) == pytest.approx(0.01, rel=0.05)
    np.testing.assert_array_equal(crop(image, 16), image[:, 4:20, 4:20])


def test_eval_collate_is_deterministic_and_centred():
    cfg = tiny()
    c = Collate(stage="align", train=False, crop=16)
    rng = np.random.default_rng(0)
    samples = [
        {
            "__key__": "a",
            "image": rng.normal(size=(3, 20, 20)).astype(np.float32),
            "image_ivar": np.ones((3, 20, 20), np.float32),
            "spectrum": np.ones(cfg.spectrum.length, np.float32),
            "spectrum_mask": np.zeros(cfg.spectrum.length, bool),
        }
    ]
    b = c(samples)
    assert torch.equal(b["image"][0], torch.from_numpy(samples[0]["image"][:, 2:18, 2:18]))


def test_config_validation_gives_clear_errors():
    with pytest.raises(ConfigError, match="mask_length 40 must fit"):
        config.from_dict(
            AstroCLIPConfig, {"spectrum": {"wave_step": 40.0, "patch": 8, "stride": 4, "mask_length": 40}}
        )
    with pytest.raises(ConfigError, match="multiple of image.patch"):
        config.from_dict(AstroCLIPConfig, {"image": {"size": 30, "patch": 4}})
    with pytest.raises(ConfigError, match="'align'"):
        config.from_dict(AstroCLIPConfig, {"stage": "aligned"})


def _manifest(**changes):
    schema = {
        "image": FieldSpec("npy", "float32", (3, 20, 20)),
        "image_ivar": FieldSpec("npy", "float32", (3, 20, 20)),
        "spectrum": FieldSpec("npy", "float32", (tiny().spectrum.length,)),
        "spectrum_mask": FieldSpec("npy", "bool", (tiny().spectrum.length,)),
    }
    extra = {"bands": ["g", "r", "z"], "wavelength": {"start": 3600.0, "stop": 9800.0, "step": 40.0}}
    m = SimpleNamespace(family="astroclip", schema=schema, extra=extra, stats={}, path="SHARDS")
    for k, v in changes.items():
        setattr(m, k, v)
    return m


def test_manifest_mismatches_are_clear_errors():
    check_manifest(tiny(), _manifest())
    with pytest.raises(
        ConfigError, match=r"bands \['g', 'r', 'i'\] but model.image.bands is \['g', 'r', 'z'\]"
    ):
        check_manifest(tiny(), _manifest(extra={**_manifest().extra, "bands": ["g", "r", "i"]}))
    with pytest.raises(ConfigError, match="wavelength grid 3600.0:9800.0:20.0 .* --grid 3600.0:9824.0:40.0"):
        check_manifest(
            tiny(),
            _manifest(
                extra={**_manifest().extra, "wavelength": {"start": 3600.0, "stop": 9800.0, "step": 20.0}}
            ),
        )
    schema = dict(_manifest().schema)
    del schema["image_ivar"]
    with pytest.raises(ConfigError, match="no field\\(s\\) image_ivar, which stage 'align' reads"):
        check_manifest(tiny(), _manifest(schema=schema))
    check_manifest(tiny("spectrum_masked"), _manifest(schema=schema))  # stage 1 needs no images
    with pytest.raises(ConfigError, match="prepared for family 'xval'"):
        check_manifest(tiny(), _manifest(family="xval"))


@pytest.mark.parametrize("visible_only", [True, False])
def test_image_masked_pretraining_scores_only_masked_patches(visible_only):
    cfg = tiny("image_masked")
    cfg.image.encode_visible_only = visible_only
    model = AstroCLIP(cfg)
    b = batch(cfg)
    mask = b["image_token_mask"]
    assert mask.shape == (4, 16) and mask.sum(1).tolist() == [8] * 4  # mask_ratio 0.5 of 4x4 patches
    loss, metrics = FAMILY.loss(model, b)
    assert loss.item() == pytest.approx(metrics["masked_mse"])
    noise = torch.randn(4, 16, 3 * 16) * 100 * (~mask)[..., None]
    handle = model.image_decoder.register_forward_hook(lambda m, i, o: o + noise)
    assert FAMILY.loss(model, b)[0].item() == pytest.approx(loss.item(), rel=1e-6)
    handle.remove()
    # the targets are the standardised pixels of each patch, in token order
    x, _ = model.image.standardise(b["image"])
    assert torch.equal(model.image.patches(x)[:, 5], x[:, :, 4:8, 4:8].reshape(4, -1))


@pytest.mark.parametrize("stage", ["align", "spectrum_masked", "image_masked"])
def test_every_trainable_parameter_gets_a_gradient(stage):
    """DDP (find_unused_parameters=False) needs every trainable parameter in every step's graph."""
    cfg = tiny(stage)
    model = FAMILY.build_model(cfg, None)
    loss, _ = FAMILY.loss(model, batch(cfg))
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_visible_only_encoder_never_sees_the_masked_patches():
    """MAE-style image_masked: the encoder runs on the visible patches alone (fewer tokens), so
    moving pixels around among the masked patches (same overall scale) changes no prediction."""
    cfg = tiny("image_masked")
    assert cfg.image.encode_visible_only  # the default
    torch.manual_seed(0)
    model = AstroCLIP(cfg).eval()
    b = batch(cfg)
    mask = b["image_token_mask"]
    out = model.image(b["image"], mask, drop_masked=True)
    assert out["tokens"].shape == (4, 2 + 8, 32)  # cls, scale and the 8 visible of 16 patches
    prediction = model(b)["prediction"]
    assert prediction.shape == (4, 16, 3 * 16)
    shuffled = b["image"].clone()
    p = model.image.patch
    for row in range(4):
        masked = mask[row].nonzero().flatten().tolist()
        cells = [(i // 4 * p, i % 4 * p) for i in masked]
        tiles = [shuffled[row, :, y : y + p, x : x + p].clone() for y, x in cells]
        for (y, x), tile in zip(cells, tiles[1:] + tiles[:1], strict=True):
            shuffled[row, :, y : y + p, x : x + p] = tile
    assert not torch.equal(shuffled, b["image"])
    torch.testing.assert_close(model({**b, "image": shuffled})["prediction"], prediction)
    assert not model.image.mask_token.requires_grad  # unused: DDP must not wait for its gradient
    uneven = mask.clone()
    uneven[0, mask[0].nonzero()[0]] = False
    with pytest.raises(ValueError, match="same number of masked patches"):
        model.image(b["image"], uneven, drop_masked=True)


def test_mae_pretrained_image_encoder_initialises_alignment(tmp_path):
    """Only the encoder carries over from image_masked to align; the MAE decoder stays behind."""
    from encoders.astroclip.model import init_towers

    torch.manual_seed(0)
    pretrained = AstroCLIP(tiny("image_masked"))
    assert any(name.startswith("image_decoder.blocks.") for name in pretrained.state_dict())
    torch.save(pretrained.state_dict(), tmp_path / "image.pt")
    aligned = AstroCLIP(tiny("align", image_init=str(tmp_path / "image.pt")))
    init_towers(aligned)
    for name, tensor in pretrained.image.state_dict().items():
        assert torch.equal(aligned.image.state_dict()[name], tensor), name


@pytest.mark.slow
def test_frozen_spectrum_cache_refuses_a_sharded_tower():
    """FSDP2 gathers a sharded tower's weights on every rank together: a cache that skips the
    tower on one rank would hang the others, so it is refused (one rank here, the same check).
    In a child process: a gloo group left behind in this one made later forks crash."""
    import subprocess
    import sys

    from tests.testkit import child_env

    code = """
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from encoders.astroclip.family import FAMILY
from foundation.errors import ConfigError
from tests.astroclip.test_astroclip_model import batch, tiny

cfg = tiny(freeze_spectrum=True, frozen_spectrum_cache_mb=1)
model = FAMILY.build_model(cfg, None).train()
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
fully_shard(model.spectrum, mesh=init_device_mesh("cpu", (1,)))
try:
    model(batch(cfg))
except ConfigError as exc:
    print("refused:", exc)
dist.destroy_process_group()
"""
    result = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused: model.frozen_spectrum_cache_mb does not work with train.parallel fsdp" in result.stdout
