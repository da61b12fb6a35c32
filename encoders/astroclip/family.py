"""The AstroCLIP `Family`: what the trainer, exporter and CLI need from this package."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from encoders.astroclip.collate import Collate
from encoders.astroclip.loss import info_nce, masked_mse
from encoders.astroclip.model import AstroCLIP, AstroCLIPConfig, count_parameters, init_towers
from foundation.errors import ConfigError
from foundation.registry import Family

log = logging.getLogger(__name__)

#: Fields each stage reads from the shards.
STAGE_FIELDS = {
    "spectrum_masked": ("spectrum", "spectrum_mask"),
    "image_masked": ("image", "image_ivar"),
    "align": ("image", "image_ivar", "spectrum", "spectrum_mask"),
}


def _unwrap(model: nn.Module) -> AstroCLIP:
    while hasattr(model, "module") and not isinstance(model, AstroCLIP):
        model = model.module
    return model  # type: ignore[return-value]


def check_manifest(cfg: AstroCLIPConfig, manifest: Any) -> None:
    """Clear errors when the shards do not fit the model: family, fields, bands, grid, sizes."""
    if manifest is None:
        return
    where = f"shard set {manifest.path}" if getattr(manifest, "path", None) else "the shard set"
    if manifest.family not in (None, "astroclip"):
        raise ConfigError(f"{where} was prepared for family {manifest.family!r}, not astroclip")
    missing = [f for f in STAGE_FIELDS[cfg.stage] if f not in manifest.schema]
    if missing:
        raise ConfigError(
            f"{where} has no field(s) {', '.join(missing)}, which stage {cfg.stage!r} reads; it has "
            f"{', '.join(sorted(manifest.schema))} (prepare it with `foundation prepare astroclip`)"
        )
    extra = manifest.extra or {}
    if cfg.uses_images:
        bands = list(extra.get("bands", []))
        if bands and bands != list(cfg.image.bands):
            raise ConfigError(
                f"{where} holds images in bands {bands} but model.image.bands is {list(cfg.image.bands)}: "
                f"set model.image.bands={','.join(bands)} or re-run prepare with --bands "
                f"{','.join(cfg.image.bands)}"
            )
        shape = manifest.schema["image"].shape
        if shape and shape[-1] is not None and shape[-1] < cfg.image.size:
            raise ConfigError(
                f"{where} stores {shape[-1]}-pixel cutouts, smaller than model.image.size={cfg.image.size}"
            )
    if cfg.uses_spectra:
        grid = extra.get("wavelength")
        want = cfg.spectrum.wavelength()
        shape = manifest.schema["spectrum"].shape
        pixels = shape[-1] if shape else None
        bad = pixels is not None and pixels != len(want)
        if grid:
            bad = bad or abs(grid["start"] - want[0]) > 1e-3 * cfg.spectrum.wave_step
            bad = bad or abs(grid["step"] - cfg.spectrum.wave_step) > 1e-6 * cfg.spectrum.wave_step
        if bad:
            have = (
                f"{grid['start']}:{grid['stop']}:{grid['step']} ({pixels} pixels)"
                if grid
                else f"{pixels} pixels"
            )
            s = cfg.spectrum
            raise ConfigError(
                f"{where} stores spectra on the wavelength grid {have}, but model.spectrum expects "
                f"{s.wave_min}:{s.wave_max}:{s.wave_step} ({len(want)} pixels): re-run prepare with "
                f"--grid {s.wave_min}:{s.wave_max}:{s.wave_step} or change model.spectrum.wave_*"
            )


def _set_normalisation(model: AstroCLIP, manifest: Any) -> None:
    """Copy the data set's normalisation statistics (from prepare) into the towers' buffers."""
    if manifest is None or model.cfg.variant == "reference":  # the released towers use fixed constants
        return
    stats = getattr(manifest, "stats", None) or {}
    missing = []
    if model.spectrum is not None:
        if "spectrum_stats_token" in stats:
            s = stats["spectrum_stats_token"]
            model.spectrum.stat_shift.copy_(torch.tensor(s["mean"], dtype=torch.float32))
            model.spectrum.stat_scale.copy_(torch.tensor(s["std"], dtype=torch.float32).clamp_min(1e-3))
        else:
            missing.append("spectrum_stats_token")
    if model.image is not None:
        if "image_log_scale" in stats:
            s = stats["image_log_scale"]
            model.image.scale_shift.fill_(float(s["mean"]))
            model.image.scale_scale.fill_(max(float(s["std"]), 1e-3))
            model.image.scale_floor.fill_(float(stats.get("image_scale_floor", 1e-3)))
        else:
            missing.append("image_log_scale")
    if missing:
        log.warning(
            "the shard manifest has no %s statistics (written by `prepare astroclip`); using defaults",
            " / ".join(missing),
        )


def _warn_if_masked_pixels_zeroed(cfg: AstroCLIPConfig, manifest: Any) -> None:
    """The released models saw the survey's values at masked pixels; zeroed ones change embeddings."""
    if manifest is None or cfg.variant != "reference":
        return
    if (getattr(manifest, "extra", None) or {}).get("masked_pixels", "zero") == "zero":
        log.warning(
            "these shards hold 0 at masked pixels, the released AstroCLIP saw the survey values there: "
            "for its embeddings, prepare with `foundation prepare astroclip --masked-pixels keep`"
        )


def build_model(cfg: AstroCLIPConfig, manifest: Any) -> AstroCLIP:
    check_manifest(cfg, manifest)
    model = AstroCLIP(cfg)
    _set_normalisation(model, manifest)
    init_towers(model)
    model.freeze()
    return model


def loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """Masked-token MSE (spectrum pretraining) or the CLIP loss (alignment); metrics are detached
    0-d tensors left on the device (the trainer reads them only when it logs)."""
    out = model(batch)
    if "prediction" in out:
        value = masked_mse(out["prediction"], out["target"], out["token_mask"], out.get("weight"))
        return value, {"masked_mse": value.detach()}
    return info_nce(
        out["image"], out["spectrum"], out["logit_scale"], gather=_unwrap(model).cfg.gather_negatives
    )


def make_collate(cfg: AstroCLIPConfig, manifest: Any, train: bool) -> Collate:
    _warn_if_masked_pixels_zeroed(cfg, manifest)
    targets = (
        tuple((getattr(manifest, "extra", None) or {}).get("targets", {})) if manifest is not None else ()
    )
    return Collate(
        stage=cfg.stage,
        train=train,
        crop=cfg.image.size,
        max_shift=cfg.image.max_shift,
        rotate=cfg.image.rotate,
        flip=cfg.image.flip,
        noise=cfg.image.noise,
        spectrum_tokens=cfg.spectrum.tokens,
        mask_segments=cfg.spectrum.mask_segments,
        mask_length=cfg.spectrum.mask_length,
        image_patches=(cfg.image.size // cfg.image.patch) ** 2,
        image_mask_ratio=cfg.image.mask_ratio,
        targets=targets,
    )


def _tower_flops(params: int, tokens: int, depth: int, width: int, trainable: bool) -> float:
    forward = 2.0 * params * tokens + 4.0 * depth * tokens**2 * width
    return forward * (3.0 if trainable else 1.0)


def flops_per_sample(cfg: AstroCLIPConfig, manifest: Any) -> float:
    """Matmul FLOPs per training sample (forward + backward of trainable parts)."""
    model = AstroCLIP(cfg)
    total = 0.0
    if model.spectrum is not None:
        s = cfg.spectrum
        frozen = cfg.stage == "align" and cfg.freeze_spectrum
        total += _tower_flops(
            count_parameters(model.spectrum.encoder), s.tokens + 1, s.depth, s.width, not frozen
        )
    if model.image is not None:
        i = cfg.image
        frozen = cfg.stage == "align" and cfg.freeze_image
        tokens = 2 + (i.size // i.patch) ** 2
        total += _tower_flops(
            count_parameters(model.image.encoder) + count_parameters(model.image.patch_embed),
            tokens,
            i.depth,
            i.width,
            not frozen,
        )
    return total


def embed(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    return _unwrap(model).embed(batch)


def merge_stats(parts):
    """`foundation shards merge`: the rule of `partition.merge_stats` (imported when a merge runs)."""
    from encoders.astroclip.partition import merge_stats as rule

    return rule(parts)


FAMILY = Family(
    name="astroclip",
    model_config=AstroCLIPConfig,
    build_model=build_model,
    loss=loss,
    make_collate=make_collate,
    flops_per_sample=flops_per_sample,
    embed=embed,
    merge_stats=merge_stats,
)

__all__ = ["FAMILY", "build_model", "check_manifest", "embed", "loss", "make_collate"]
