"""AstroCLIP model config and module: towers, pooling heads, and the stage being trained.

One family, three kinds of runs, chosen by `model.stage`:
- `spectrum_masked`: SpecFormer masked-segment pretraining (only the spectrum tower is built);
- `image_masked`: masked-patch pretraining of the image ViT (only the image tower);
- `align`: both towers + attention-pooling heads trained with symmetric InfoNCE; towers can
  start from earlier runs (`spectrum_init` / `image_init`) and be trainable or frozen.

`variant: reference` builds the architecture of the released AstroCLIP models (converted by
`foundation convert astroclip|astrodino|specformer`, see encoders/astroclip/convert.py) with the
preprocessing the reference applies before them, so that the same shards give its embeddings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from encoders.astroclip.heads import AttentionPoolHead
from encoders.astroclip.survey import DESI_GRID, wavelength_grid
from encoders.astroclip.towers import (
    RGB_SCALES,
    ImageViT,
    ReferenceImageViT,
    ReferenceSpecFormer,
    SpecFormer,
    VisiblePatchDecoder,
    spectrum_tokens,
)
from foundation.config import MAX_DEPTH, MAX_IMAGE_SIZE, MAX_MLP_RATIO, MAX_TOKENS, MAX_WIDTH, option
from foundation.errors import ConfigError

log = logging.getLogger(__name__)

MAX_WAVELENGTH = 1e5
"""Largest wavelength of the spectrum grid, Å (10 µm)."""
MIN_WAVE_STEP = 0.01
"""Smallest pixel width of the spectrum grid, Å: with MAX_WAVELENGTH, at most 10**7 pixels."""

Stage = Literal["spectrum_masked", "image_masked", "align"]
Variant = Literal["foundation", "reference"]


class StageInputs:
    """Which inputs a training stage reads, for the classes that carry a `stage`."""

    stage: str

    @property
    def uses_images(self) -> bool:
        return self.stage in ("align", "image_masked")

    @property
    def uses_spectra(self) -> bool:
        return self.stage in ("align", "spectrum_masked")


@dataclass
class SpectrumTowerConfig:
    wave_min: float = option(
        DESI_GRID[0],
        "First pixel centre of the model's wavelength grid, Å (DESI: 3600).",
        gt=0,
        le=MAX_WAVELENGTH,
    )
    wave_max: float = option(DESI_GRID[1], "Last pixel centre, Å (DESI: 9824).", gt=0, le=MAX_WAVELENGTH)
    wave_step: float = option(
        DESI_GRID[2], "Pixel width, Å (DESI: 0.8). Shards must be prepared on this grid.", ge=MIN_WAVE_STEP
    )
    patch: int = option(20, "Pixels per slice (token).", ge=1, le=MAX_TOKENS)
    stride: int = option(
        10, "Pixels between the starts of consecutive slices (overlap = patch - stride).", ge=1, le=MAX_TOKENS
    )
    width: int = option(768, "Transformer width.", ge=1, le=MAX_WIDTH)
    depth: int = option(6, "Transformer blocks.", ge=1, le=MAX_DEPTH)
    heads: int = option(6, "Attention heads.", ge=1, le=MAX_DEPTH)
    mlp_ratio: float = option(4.0, "MLP hidden width / width.", gt=0, le=MAX_MLP_RATIO)
    dropout: float = option(
        0.1,
        "Residual and MLP dropout (attention weights are never dropped, so SDPA stays on its fused kernels).",
        ge=0,
        lt=1,
    )
    std_floor: float = option(0.2, "Floor of the per-spectrum standard deviation (flux units).", gt=0)
    mask_segments: int = option(
        6, "Masked pretraining: segments the token sequence is split into.", ge=1, le=MAX_TOKENS
    )
    mask_length: int = option(
        50, "Masked pretraining: contiguous tokens masked in each segment.", ge=1, le=MAX_TOKENS
    )

    @property
    def length(self) -> int:
        return len(self.wavelength())

    @property
    def tokens(self) -> int:
        return spectrum_tokens(self.length, self.patch, self.stride)

    def wavelength(self) -> np.ndarray:
        return wavelength_grid(self.wave_min, self.wave_max, self.wave_step)

    def __post_init__(self) -> None:
        if not 0 < self.wave_step < self.wave_max - self.wave_min:
            raise ValueError(f"spectrum grid {self.wave_min}:{self.wave_max}:{self.wave_step} is empty")
        if self.stride < 1 or self.patch < self.stride:
            raise ValueError(f"need 1 <= stride <= patch, got patch {self.patch}, stride {self.stride}")
        if self.tokens < 1:
            raise ValueError(f"the grid has {self.length} pixels, fewer than one {self.patch}-pixel slice")
        if self.width % self.heads:
            raise ValueError(f"spectrum.width {self.width} is not divisible by spectrum.heads {self.heads}")
        if (
            self.mask_segments < 1
            or self.mask_length < 1
            or self.mask_length > self.tokens // self.mask_segments
        ):
            raise ValueError(
                f"spectrum.mask_length {self.mask_length} must fit in each of {self.mask_segments} "
                "segments of "
                f"the {self.tokens} tokens (at most {self.tokens // max(self.mask_segments, 1)})"
            )


@dataclass
class ImageTowerConfig:
    bands: list[str] = option(
        doc="Bands, in order, the tower reads (must be in the shards).", factory=lambda: ["g", "r", "z"]
    )
    size: int = option(
        144, "Crop size the tower sees, pixels (paper: 144 from 152 cutouts).", ge=1, le=MAX_IMAGE_SIZE
    )
    patch: int = option(12, "Patch size, pixels.", ge=1, le=MAX_IMAGE_SIZE)
    width: int = option(1024, "Transformer width (ViT-L: 1024).", ge=1, le=MAX_WIDTH)
    depth: int = option(24, "Transformer blocks (ViT-L: 24).", ge=1, le=MAX_DEPTH)
    heads: int = option(16, "Attention heads.", ge=1, le=MAX_DEPTH)
    mlp_ratio: float = option(4.0, "MLP hidden width / width.", gt=0, le=MAX_MLP_RATIO)
    dropout: float = option(0.0, "Residual and MLP dropout.", ge=0, lt=1)
    max_shift: int = option(
        4, "Training augmentation: largest shift of the crop window, pixels.", ge=0, le=MAX_IMAGE_SIZE
    )
    rotate: bool = option(True, "Training augmentation: random rotations by multiples of 90 degrees.")
    flip: bool = option(True, "Training augmentation: random mirror flips.")
    noise: float = option(
        0.0, "Training augmentation: extra Gaussian noise, in units of each pixel's sigma.", ge=0
    )
    mask_ratio: float = option(0.5, "image_masked stage: fraction of patches masked.", gt=0, lt=1)
    encode_visible_only: bool = option(
        True,
        "image_masked stage: the encoder sees only the unmasked patches and a light decoder predicts "
        "the masked ones (MAE, He et al. 2022; the encoder costs about 1 - mask_ratio of a full pass). "
        "false: mask tokens go through the encoder and a linear head predicts the patches (SimMIM, "
        "DINOv2's iBOT).",
    )
    decoder_width: int | None = option(
        None,
        "image_masked with encode_visible_only: decoder width (default: width // 2).",
        ge=1,
        le=MAX_WIDTH,
    )
    decoder_depth: int = option(
        2, "image_masked with encode_visible_only: decoder blocks.", ge=1, le=MAX_DEPTH
    )

    def __post_init__(self) -> None:
        if not self.bands:
            raise ValueError("image.bands must name at least one band")
        if self.size % self.patch:
            raise ValueError(f"image.size {self.size} must be a multiple of image.patch {self.patch}")
        if self.width % self.heads:
            raise ValueError(f"image.width {self.width} is not divisible by image.heads {self.heads}")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"image.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.decoder_width is None:
            self.decoder_width = self.width // 2
        if self.decoder_width % self.heads or self.decoder_depth < 1:
            raise ValueError(
                f"image.decoder_width {self.decoder_width} must be divisible by image.heads "
                f"{self.heads} and image.decoder_depth ({self.decoder_depth}) at least 1"
            )


@dataclass
class AstroCLIPConfig(StageInputs):
    stage: Stage = option(
        "align",
        "What this run trains: spectrum_masked (SpecFormer masked-segment "
        "pretraining), image_masked (image ViT masked-patch pretraining) or align "
        "(contrastive alignment of both towers).",
    )
    spectrum: SpectrumTowerConfig = option(doc="Spectrum tower (SpecFormer).", factory=SpectrumTowerConfig)
    image: ImageTowerConfig = option(doc="Image tower (ViT).", factory=ImageTowerConfig)
    embed_dim: int = option(
        1024, "Shared embedding dimension (width of the pooling heads).", ge=1, le=MAX_WIDTH
    )
    head_heads: int = option(4, "Attention heads of each pooling head.", ge=1, le=MAX_DEPTH)
    head_mlp_ratio: float = option(
        4.0, "MLP hidden width / embed_dim in the pooling heads.", gt=0, le=MAX_MLP_RATIO
    )
    head_dropout: float = option(0.0, "Dropout in the pooling heads.", ge=0, lt=1)
    temperature: float = option(
        1.0 / 15.5, "Initial InfoNCE temperature tau (logits = cos / tau); paper: 1/15.5.", gt=0
    )
    learn_temperature: bool = option(True, "Learn the temperature (its log is a parameter), clamped below.")
    min_temperature: float = option(0.01, "Smallest temperature the learned one may reach.", gt=0)
    gather_negatives: bool = option(
        True, "Use every rank's embeddings as negatives (all-gather with gradients)."
    )
    spectrum_init: str | None = option(
        None,
        "Start the spectrum tower from this run dir / checkpoint / model.pt (or a torch state dict file).",
    )
    image_init: str | None = option(None, "Start the image tower from this run dir / checkpoint / model.pt.")
    freeze_spectrum: bool = option(False, "Keep the spectrum tower fixed during alignment.")
    freeze_image: bool = option(False, "Keep the image tower fixed during alignment.")
    frozen_spectrum_cache_mb: int = option(
        0,
        "Alignment with freeze_spectrum: keep the frozen tower's output tokens of each object (by sample "
        "key) in memory, up to this many MiB, so that the tower runs once per object rather than once "
        "per epoch (it is a third of a tiny alignment step). Costs tokens x width x 4 bytes an object; "
        "objects beyond the budget are recomputed. 0: off. Not with train.parallel fsdp.",
        ge=0,
        le=1 << 20,
    )
    variant: Variant = option(
        "foundation",
        "Architecture: foundation (ours) or reference (the released AstroCLIP: DINOv2 image tower on "
        "the Legacy Survey viewer's RGB, no class token or positions inside AstroCLIP; "
        "SpecFormer with its (mean, std) features in token 0; heads without input LayerNorm, the image "
        "head without its MLP residual). Set by `foundation convert`.",
    )

    def __post_init__(self) -> None:
        if self.frozen_spectrum_cache_mb and not (self.stage == "align" and self.freeze_spectrum):
            raise ValueError(
                "frozen_spectrum_cache_mb needs stage align with freeze_spectrum true (a trained "
                "tower's tokens change every step); set it to 0"
            )
        if self.embed_dim % self.head_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by head_heads {self.head_heads}")
        if not 0 < self.min_temperature <= self.temperature:
            raise ValueError(
                f"need 0 < min_temperature ({self.min_temperature}) <= temperature ({self.temperature})"
            )
        if self.variant == "reference" and self.uses_images:
            planes = [RGB_SCALES[b][0] for b in self.image.bands if b in RGB_SCALES]
            if len(self.image.bands) != 3 or sorted(planes) != [0, 1, 2]:
                raise ValueError(
                    f"variant reference needs three bands that fill the RGB planes of {sorted(RGB_SCALES)} "
                    f"(released: g, r, z), got image.bands {list(self.image.bands)}"
                )


def build_spectrum_tower(cfg: SpectrumTowerConfig, variant: Variant = "foundation") -> nn.Module:
    sizes = (cfg.length, cfg.patch, cfg.stride, cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio)
    if variant == "reference":
        return ReferenceSpecFormer(*sizes, cfg.dropout, cfg.std_floor)
    return SpecFormer(*sizes, cfg.dropout, cfg.std_floor, wavelength=(cfg.wave_min, cfg.wave_step))


def build_image_tower(cfg: ImageTowerConfig, variant: Variant = "foundation", class_token: bool = True):
    """Our ViT, or the released DINOv2 one (`class_token`: as AstroDINO alone, else as inside
    AstroCLIP, which reads the patch tokens without class token or positions)."""
    if variant == "reference":
        return ReferenceImageViT(
            cfg.bands,
            cfg.size,
            cfg.patch,
            cfg.width,
            cfg.depth,
            cfg.heads,
            cfg.mlp_ratio,
            cfg.dropout,
            class_token,
        )
    return ImageViT(
        len(cfg.bands), cfg.size, cfg.patch, cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.dropout
    )


class FrozenTokenCache:
    """A frozen tower's output tokens by sample key, up to a byte budget (not part of the state dict).

    A frozen tower in eval mode maps an unaugmented input (spectra are never augmented) to the same
    tokens every epoch, so alignment need only run it on objects it has not seen yet. Tokens are
    kept in float32 on the tower's device; objects beyond the budget are recomputed each time."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._tokens: dict[str, torch.Tensor] = {}
        self._checked = False

    def tokens(
        self, keys: list[str], run: Callable[[torch.Tensor], torch.Tensor], tower: nn.Module
    ) -> torch.Tensor:
        """(B, T, width) tokens of the batch's objects; `run(rows)` computes those of the given
        batch rows (the ones not kept yet)."""
        if not self._checked:
            _refuse_sharded(tower)
            self._checked = True
        missing = [i for i, key in enumerate(keys) if key not in self._tokens]
        rows: list[torch.Tensor | None] = [self._tokens.get(key) for key in keys]
        if missing:
            fresh = run(torch.tensor(missing, dtype=torch.long)).float()
            for i, tokens in zip(missing, fresh, strict=True):
                rows[i] = tokens
                if keys[i] not in self._tokens and self.bytes + tokens.nbytes <= self.max_bytes:
                    self._tokens[keys[i]] = tokens.clone()  # not a view pinning the whole batch
                    self.bytes += tokens.nbytes
        return torch.stack(rows)


def _refuse_sharded(tower: nn.Module) -> None:
    """FSDP2 all-gathers a sharded tower's weights in its forward, on every rank at once: a rank
    that skips the forward for cached objects would leave the others waiting forever."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in tower.parameters()):
        raise ConfigError(
            "model.frozen_spectrum_cache_mb does not work with train.parallel fsdp (the sharded "
            "tower must run on every rank together); set it to 0 or use DDP"
        )


class AstroCLIP(nn.Module):
    """Towers (+ pooling heads and temperature for alignment, + decoders for masked stages)."""

    def __init__(self, cfg: AstroCLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.stage = cfg.stage
        reference = cfg.variant == "reference"
        # Set only for alignment with a frozen spectrum tower (the config refuses it elsewhere).
        self.spectrum_cache = (
            FrozenTokenCache(cfg.frozen_spectrum_cache_mb << 20) if cfg.frozen_spectrum_cache_mb else None
        )
        self.spectrum = build_spectrum_tower(cfg.spectrum, cfg.variant) if cfg.uses_spectra else None
        self.image = (
            build_image_tower(cfg.image, cfg.variant, class_token=cfg.stage != "align")
            if cfg.uses_images
            else None
        )
        # A tower's mask token only exists for its own masked stage's loss; elsewhere it is kept
        # (checkpoints stay interchangeable) but not trained, so DDP sees no unused parameter.
        if self.spectrum is not None:
            self.spectrum.mask_token.requires_grad_(cfg.stage == "spectrum_masked")
        if self.image is not None:
            self.image.mask_token.requires_grad_(
                cfg.stage == "image_masked" and not cfg.image.encode_visible_only and not reference
            )
            if reference and cfg.stage == "align":  # AstroCLIP reads DINOv2 without them
                self.image.cls.requires_grad_(False)
                self.image.pos.requires_grad_(False)
        if cfg.stage == "spectrum_masked":
            self.spectrum_decoder = nn.Linear(cfg.spectrum.width, cfg.spectrum.patch)
        if cfg.stage == "image_masked" and not reference:
            i = cfg.image
            pixels = len(i.bands) * i.patch**2
            self.image_decoder = (
                VisiblePatchDecoder(
                    i.width, i.size // i.patch, pixels, i.decoder_width, i.decoder_depth, i.heads, i.mlp_ratio
                )
                if i.encode_visible_only
                else nn.Linear(i.width, pixels)
            )
        if cfg.stage == "align":
            head = dict(
                heads=cfg.head_heads,
                mlp_ratio=cfg.head_mlp_ratio,
                dropout=cfg.head_dropout,
                input_norm=not reference,
            )
            self.spectrum_head = AttentionPoolHead(cfg.spectrum.width, cfg.embed_dim, **head)
            self.image_head = AttentionPoolHead(
                cfg.image.width, cfg.embed_dim, residual=not reference, **head
            )
            log_scale = torch.tensor(math.log(1.0 / cfg.temperature))
            if cfg.learn_temperature:
                self.log_logit_scale = nn.Parameter(log_scale)
            else:
                self.register_buffer("log_logit_scale", log_scale)

    @property
    def no_weight_decay(self) -> list[str]:
        """Parameters the trainer should not decay: positional embeddings, learned tokens, queries."""
        tokens = ("pos", "cls", "mask_token", "query")
        return [n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in tokens]

    # ------------------------------------------------------------------ freezing

    def freeze(self) -> None:
        """Fix the towers the config freezes during alignment (no gradients, eval mode)."""
        if self.stage != "align":
            return
        for name, frozen in (("spectrum", self.cfg.freeze_spectrum), ("image", self.cfg.freeze_image)):
            tower = getattr(self, name)
            if frozen and tower is not None:
                tower.requires_grad_(False)

    def train(self, mode: bool = True) -> AstroCLIP:
        super().train(mode)
        if self.stage == "align":
            for name, frozen in (("spectrum", self.cfg.freeze_spectrum), ("image", self.cfg.freeze_image)):
                if frozen and getattr(self, name) is not None:
                    getattr(self, name).eval()
        return self

    def logit_scale(self) -> torch.Tensor:
        """1/τ, with τ clamped at min_temperature (the clamp stops the gradient at the bound)."""
        return self.log_logit_scale.exp().clamp(max=1.0 / self.cfg.min_temperature)

    # ------------------------------------------------------------------ forward

    def _spectrum_tokens(
        self, batch: dict, token_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        frozen = self.stage == "align" and self.cfg.freeze_spectrum
        cache = self.spectrum_cache
        if cache is not None and token_mask is None and "__key__" in batch:
            bad = batch.get("spectrum_bad")

            def run(rows: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    out = self.spectrum(batch["spectrum"][rows], None if bad is None else bad[rows])
                return out["tokens"]

            return {"tokens": cache.tokens(batch["__key__"], run, self.spectrum)}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            return self.spectrum(batch["spectrum"], batch.get("spectrum_bad"), token_mask)

    def _image_tokens(
        self, batch: dict, token_mask: torch.Tensor | None = None, drop_masked: bool = False
    ) -> dict[str, torch.Tensor]:
        frozen = self.stage == "align" and self.cfg.freeze_image
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            return self.image(batch["image"], token_mask, drop_masked)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Stage outputs the loss needs (see `encoders.astroclip.family.loss`)."""
        if self.stage == "spectrum_masked":
            mask = batch["spectrum_token_mask"]
            out = self._spectrum_tokens(batch, mask)
            return {
                "prediction": self.spectrum_decoder(out["tokens"][:, 1:]),
                "target": out["target"],
                "weight": out["weight"],
                "token_mask": mask,
            }
        if self.stage == "image_masked":
            if self.cfg.variant == "reference":
                raise ConfigError(
                    "stage image_masked with variant reference embeds only (the released tower was "
                    "trained by DINOv2 self-distillation): align with model.image_init set to it instead"
                )
            mask = batch["image_token_mask"]
            if self.cfg.image.encode_visible_only:
                out = self._image_tokens(batch, mask, drop_masked=True)
                prediction = self.image_decoder(out["tokens"], mask)
            else:
                out = self._image_tokens(batch, mask)
                prediction = self.image_decoder(out["tokens"][:, 2:])
            return {
                "prediction": prediction,
                "target": out["target"],
                "token_mask": mask,
            }
        return {
            "image": self.image_head(self._image_tokens(batch)["tokens"]),
            "spectrum": self.spectrum_head(self._spectrum_tokens(batch)["tokens"]),
            "logit_scale": self.logit_scale(),
        }

    @torch.no_grad()
    def embed(self, batch: dict) -> dict[str, torch.Tensor]:
        """L2-normalised embeddings of every modality this stage has and the batch holds.

        Alignment: the pooling heads' outputs. Pretraining stages: the mean of the tower's output
        tokens (the usual read-out of a self-supervised tower)."""
        out = {}
        if self.spectrum is not None and "spectrum" in batch:
            tokens = self.spectrum(batch["spectrum"], batch.get("spectrum_bad"))["tokens"]
            out["spectrum"] = self.spectrum_head(tokens) if self.stage == "align" else tokens.mean(dim=1)
        if self.image is not None and "image" in batch:
            tokens = self.image(batch["image"])["tokens"]
            if self.stage == "align":
                out["image"] = self.image_head(tokens)
            else:  # DINOv2's embedding is its class token
                out["image"] = tokens[:, 0] if self.cfg.variant == "reference" else tokens.mean(dim=1)
        return {k: nn.functional.normalize(v.float(), dim=-1) for k, v in out.items()}


# ----------------------------------------------------------------------------- pretrained towers


def load_tower_state(
    path: str, tower: str, expected: Any, variant: str | None = None
) -> dict[str, torch.Tensor]:
    """The state dict of `tower` ("spectrum" or "image") from an earlier run, a converted model
    directory or a state-dict file.

    `expected` is this run's tower config (and `variant` its model variant): they must match, or a
    ConfigError says what differs.
    """
    from pathlib import Path

    state: dict[str, torch.Tensor]
    source_cfg = None
    p = Path(path)
    if p.is_file() and p.suffix in (".pt", ".pth") and not _is_foundation_model_file(p):
        raw = torch.load(p, map_location="cpu", weights_only=True)
        state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
        if not isinstance(state, dict):
            raise ConfigError(f"{path}: expected a state dict (mapping of parameter names to tensors)")
    else:
        from foundation.train import load_pretrained

        model, cfg, family = load_pretrained(p)
        if family.name != "astroclip":
            raise ConfigError(f"model.{tower}_init: {path} is a {family.name!r} model, not an astroclip one")
        source_cfg = cfg.model
        if getattr(model, tower, None) is None:
            raise ConfigError(
                f"model.{tower}_init: {path} was trained with stage {cfg.model.stage!r} "
                f"and has no {tower} tower"
            )
        state = model.state_dict()
    prefix = f"{tower}."
    tower_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not tower_state:
        tower_state = dict(state)  # a bare tower state dict
    if source_cfg is not None:
        theirs = getattr(source_cfg, tower)
        fields_to_check = (
            ["wave_min", "wave_max", "wave_step", "patch", "stride", "width", "depth", "heads", "mlp_ratio"]
            if tower == "spectrum"
            else ["bands", "size", "patch", "width", "depth", "heads", "mlp_ratio"]
        )
        diff = [
            f"{name}: {getattr(theirs, name)} there, {getattr(expected, name)} here"
            for name in fields_to_check
            if getattr(theirs, name) != getattr(expected, name)
        ]
        if variant is not None and source_cfg.variant != variant:
            raise ConfigError(
                f"model.{tower}_init: {path} is a variant {source_cfg.variant!r} model and this config "
                f"builds variant {variant!r}; set model.variant={source_cfg.variant}"
            )
        if diff:
            raise ConfigError(
                f"model.{tower}_init: the {tower} tower in {path} does not match this config's model.{tower} "
                f"({'; '.join(diff)}); copy those values into model.{tower}"
            )
    return tower_state


def _is_foundation_model_file(path) -> bool:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a torch file at all: let the caller's loader report it
        return True
    return isinstance(payload, dict) and "format" in payload and "config" in payload


def init_towers(model: AstroCLIP) -> None:
    """Load the towers named by spectrum_init / image_init into `model` (strict shapes)."""
    for tower, path in (("spectrum", model.cfg.spectrum_init), ("image", model.cfg.image_init)):
        if path is None:
            continue
        module = getattr(model, tower)
        if module is None:
            raise ConfigError(f"model.{tower}_init is set but stage {model.stage!r} has no {tower} tower")
        state = load_tower_state(path, tower, getattr(model.cfg, tower), model.cfg.variant)
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"model.{tower}_init: {path} does not hold a compatible {tower} tower "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        log.info("loaded the %s tower from %s", tower, path)


def count_parameters(module: nn.Module | None, trainable_only: bool = False) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "AstroCLIP",
    "AstroCLIPConfig",
    "ImageTowerConfig",
    "SpectrumTowerConfig",
    "build_image_tower",
    "build_spectrum_tower",
    "count_parameters",
    "init_towers",
    "load_tower_state",
]
