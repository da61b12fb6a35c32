"""Batch assembly in the loader workers: crops, galaxy-safe augmentations, pretraining masks.

Augmentations keep photometry: random shifts of the crop window (the galaxy stays near the
centre), rotations by multiples of 90° and flips (exact permutations of pixels), and optional
extra noise drawn from each pixel's own inverse variance (zero mean). No colour jitter, no
rescaling of flux. Spectra are not augmented: any warp of the wavelength axis would change the
redshift the spectrum encodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from encoders.astroclip.model import StageInputs


def crop(image: np.ndarray, size: int, dy: int = 0, dx: int = 0) -> np.ndarray:
    """(..., H, W) → (..., size, size) window centred at the image centre shifted by (dy, dx)."""
    h, w = image.shape[-2:]
    top, left = (h - size) // 2 + dy, (w - size) // 2 + dx
    if top < 0 or left < 0 or top + size > h or left + size > w:
        raise ValueError(f"a {size}-pixel crop shifted by ({dy}, {dx}) does not fit in {h}x{w}")
    return image[..., top : top + size, left : left + size]


def augment_image(
    image: np.ndarray,
    ivar: np.ndarray,
    rng: np.random.Generator,
    size: int,
    max_shift: int,
    rotate: bool,
    flip: bool,
    noise: float,
) -> np.ndarray:
    """One training view of a (bands, H, W) cutout."""
    room = (min(image.shape[-2:]) - size) // 2
    shift = min(max_shift, room)
    dy, dx = rng.integers(-shift, shift + 1, 2) if shift > 0 else (0, 0)
    out = crop(image, size, int(dy), int(dx))
    if noise > 0:
        var = crop(ivar, size, int(dy), int(dx))
        sigma = np.where(var > 0, 1.0 / np.sqrt(np.where(var > 0, var, 1.0)), 0.0)
        out = out + noise * sigma * rng.standard_normal(out.shape)
    if rotate:
        out = np.rot90(out, int(rng.integers(4)), axes=(-2, -1))
    if flip and rng.random() < 0.5:
        out = out[..., ::-1]
    return np.ascontiguousarray(out, dtype=np.float32)


def segment_mask(tokens: int, segments: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """(tokens,) bool: one contiguous run of `length` tokens masked inside each of `segments`
    equal segments (SpecFormer's masked-segment objective)."""
    mask = np.zeros(tokens, dtype=bool)
    seg = tokens // segments
    for s in range(segments):
        start = s * seg + int(rng.integers(0, seg - length + 1))
        mask[start : start + length] = True
    return mask


def random_patch_mask(patches: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros(patches, dtype=bool)
    mask[rng.choice(patches, max(1, int(round(ratio * patches))), replace=False)] = True
    return mask


@dataclass(frozen=True)
class Collate(StageInputs):
    """samples → batch for one stage; picklable (runs in loader workers)."""

    stage: str
    train: bool
    crop: int
    max_shift: int = 0
    rotate: bool = False
    flip: bool = False
    noise: float = 0.0
    spectrum_tokens: int = 0
    mask_segments: int = 0
    mask_length: int = 0
    image_patches: int = 0
    image_mask_ratio: float = 0.0
    targets: tuple[str, ...] = ()

    def __call__(self, samples: list[dict], rng: np.random.Generator | None = None) -> dict:
        rng = rng if rng is not None else np.random.default_rng(0)
        batch: dict = {"__key__": [s["__key__"] for s in samples]}
        if self.uses_images:
            if self.train:
                images = [
                    augment_image(
                        s["image"],
                        s["image_ivar"],
                        rng,
                        self.crop,
                        self.max_shift,
                        self.rotate,
                        self.flip,
                        self.noise,
                    )
                    for s in samples
                ]
            else:
                images = [
                    np.ascontiguousarray(crop(s["image"], self.crop), dtype=np.float32) for s in samples
                ]
            batch["image"] = torch.from_numpy(np.stack(images))
        if self.uses_spectra:
            batch["spectrum"] = torch.from_numpy(
                np.stack([s["spectrum"] for s in samples]).astype(np.float32)
            )
            batch["spectrum_bad"] = torch.from_numpy(
                np.stack([s["spectrum_mask"] for s in samples]).astype(bool)
            )
        if self.stage == "spectrum_masked":  # validation scores masked segments too
            masks = [
                segment_mask(self.spectrum_tokens, self.mask_segments, self.mask_length, rng) for _ in samples
            ]
            batch["spectrum_token_mask"] = torch.from_numpy(np.stack(masks))
        if self.stage == "image_masked":
            masks = [random_patch_mask(self.image_patches, self.image_mask_ratio, rng) for _ in samples]
            batch["image_token_mask"] = torch.from_numpy(np.stack(masks))
        for name in self.targets:
            values = [s.get(name) for s in samples]
            batch[name] = torch.tensor(
                [np.nan if v is None else float(v) for v in values], dtype=torch.float32
            )
        return batch
