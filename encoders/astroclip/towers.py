"""The two towers: a ViT for multi-band galaxy images and SpecFormer for spectra.

Both are pre-LayerNorm transformers whose attention goes through `foundation.attention`
(SDPA on CPU, xformers on CUDA where it loads), with one fused q/k/v projection. Each tower
standardises its input per sample and hands the statistics it removed to the network as an extra
token, so absolute brightness is not lost: SpecFormer keeps the spectrum's mean and standard
deviation (as in Parker et al.), the image tower the image's overall flux scale (one scale for all
bands, so colours are kept exactly).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from foundation.attention import TransformerBlock

#: DINOv2's initial LayerScale gain.
DINOV2_LAYER_SCALE = 1e-5


def _init_weights(module: nn.Module, depth: int) -> None:
    """Truncated-normal init scaled by depth (as the reference SpecFormer), zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            std = 1.0 / math.sqrt(2.0 * m.in_features * max(depth, 1))
            nn.init.trunc_normal_(m.weight, std=std, a=-3 * std, b=3 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _init_embeddings(params: tuple[torch.Tensor, ...], width: int) -> None:
    """Truncated-normal init at the scale of a width-`width` embedding (std 1/sqrt(width))."""
    std = 1.0 / math.sqrt(width)
    for p in params:
        nn.init.trunc_normal_(p, std=std, a=-3 * std, b=3 * std)


def sinusoidal(positions: torch.Tensor, width: int) -> torch.Tensor:
    """(N,) positions → (N, width) sine/cosine features (transformer-style frequencies), scaled to
    the standard deviation of the other embeddings' initialisation (1/sqrt(width))."""
    half = width // 2
    freq = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float64) / half)
    angle = positions.double()[:, None] * freq[None, :]
    features = torch.cat([angle.sin(), angle.cos()], dim=1)
    if features.shape[1] < width:
        features = torch.cat([features, torch.zeros(len(positions), width - features.shape[1])], dim=1)
    return (features / features.std() / math.sqrt(width)).float()


class Encoder(nn.Module):
    """A stack of pre-LN blocks and a final LayerNorm; `layer_scale` gives every block DINOv2's
    LayerScale (learned per-channel branch gains starting at 1e-5), `eps` is the LayerNorms'
    epsilon (DINOv2: 1e-6)."""

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        dropout: float,
        eps: float = 1e-5,
        layer_scale: bool = False,
    ):
        super().__init__()
        gain = DINOV2_LAYER_SCALE if layer_scale else None
        self.blocks = nn.ModuleList(
            TransformerBlock(width, heads, mlp_ratio, dropout=dropout, eps=eps, layer_scale=gain)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width, eps=eps)
        _init_weights(self.blocks, depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ----------------------------------------------------------------------------- spectra


def spectrum_tokens(length: int, patch: int, stride: int) -> int:
    """Number of overlapping slices of `patch` pixels every `stride` pixels (no partial slice)."""
    return (length - patch) // stride + 1


def _checked_spectrum_tokens(length: int, patch: int, stride: int) -> int:
    """`spectrum_tokens`, refusing spectra too short for one slice."""
    tokens = spectrum_tokens(length, patch, stride)
    if tokens < 1:
        raise ValueError(f"spectra of {length} pixels are shorter than one {patch}-pixel slice")
    return tokens


def _check_spectrum_length(flux: torch.Tensor, length: int) -> None:
    """Refuse spectra on another wavelength grid than the tower's."""
    if flux.shape[1] != length:
        raise ValueError(
            f"spectra have {flux.shape[1]} pixels; this SpecFormer expects {length} (the model's "
            "wavelength grid): re-run `foundation prepare astroclip` with the model's --grid"
        )


class SpecFormer(nn.Module):
    """Spectrum transformer over overlapping wavelength slices plus one statistics token.

    Per spectrum, flux is standardised over its good pixels (std floored, as in the paper); bad
    pixels become 0 and each slice also carries its bad-pixel indicator, so "masked" is not
    confused with "flux at the mean". The statistics token embeds (asinh(mean), log std) after the
    data set's own normalisation (`stat_shift`, `stat_scale` buffers, set from the shard manifest).
    Token 0 is the statistics token; tokens 1..T are the slices.
    """

    def __init__(
        self,
        length: int,
        patch: int,
        stride: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        std_floor: float = 0.2,
        wavelength: tuple[float, float] | None = None,
    ):
        super().__init__()
        self.length, self.patch, self.stride, self.std_floor = length, patch, stride, std_floor
        self.tokens = _checked_spectrum_tokens(length, patch, stride)
        self.embed = nn.Linear(2 * patch, width)
        self.stats_embed = nn.Linear(2, width)
        self.pos = nn.Parameter(torch.zeros(1, self.tokens + 1, width))
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.encoder = Encoder(width, depth, heads, mlp_ratio, dropout)
        self.register_buffer("stat_shift", torch.zeros(2))
        self.register_buffer("stat_scale", torch.ones(2))
        _init_embeddings((self.pos, self.mask_token), width)
        with torch.no_grad():
            self.pos[0, 1:] = sinusoidal(self.slice_positions(wavelength), width)
        _init_embeddings((self.embed.weight, self.stats_embed.weight), width)
        for layer in (self.embed, self.stats_embed):
            nn.init.zeros_(layer.bias)

    def slice_positions(self, wavelength: tuple[float, float] | None) -> torch.Tensor:
        """Position of each slice for the initial positional embeddings: ln λ of its centre in
        units of one stride at the blue end, so a redshift is the same shift everywhere (given
        (first pixel, pixel width) in Å); plain slice indices without a wavelength grid."""
        index = torch.arange(self.tokens, dtype=torch.float64)
        if wavelength is None:
            return index
        start, step = wavelength
        centre = start + step * (index * self.stride + (self.patch - 1) / 2.0)
        return torch.log(centre / centre[0]) / math.log1p(self.stride * step / centre[0].item())

    def standardise(
        self, flux: torch.Tensor, bad: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(standardised flux with bad pixels 0, good-pixel weights, stats features (B, 2))."""
        good = torch.ones_like(flux) if bad is None else (~bad).to(flux.dtype)
        count = good.sum(dim=1, keepdim=True).clamp_min(1.0)
        mean = (flux * good).sum(dim=1, keepdim=True) / count
        var = (((flux - mean) * good) ** 2).sum(dim=1, keepdim=True) / count
        std = var.sqrt().clamp_min(self.std_floor)
        x = (flux - mean) / std * good
        stats = torch.cat([torch.asinh(mean), std.log()], dim=1)
        return x, good, (stats - self.stat_shift) / self.stat_scale

    def slices(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L) → (B, T, patch) overlapping slices."""
        return x.unfold(1, self.patch, self.stride)

    def forward(
        self, flux: torch.Tensor, bad: torch.Tensor | None = None, token_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """tokens (B, 1+T, W); and for masked modelling the targets: slices (B, T, patch) and
        their good-pixel weights. token_mask (B, T) bool: slices replaced by the mask token."""
        _check_spectrum_length(flux, self.length)
        x, good, stats = self.standardise(flux, bad)
        target = self.slices(x)
        weight = self.slices(good)
        h = self.embed(torch.cat([target, 1.0 - weight], dim=-1))
        if token_mask is not None:
            h = torch.where(token_mask[..., None], self.mask_token.to(h.dtype), h)
        h = torch.cat([self.stats_embed(stats)[:, None], h], dim=1) + self.pos
        return {"tokens": self.encoder(h), "target": target, "weight": weight}


# ----------------------------------------------------------------------------- images


def _patch_grid(size: int, patch: int) -> int:
    """Patches per side of a `size`-pixel crop, refusing a size that is not a whole number of them."""
    if size % patch:
        raise ValueError(f"image size {size} is not a multiple of the patch size {patch}")
    return size // patch


def _check_image_shape(image: torch.Tensor, bands: int, size: int) -> None:
    """Refuse images whose bands or crop size are not the tower's."""
    if image.shape[1:] != (bands, size, size):
        raise ValueError(
            f"images have shape {tuple(image.shape[1:])}; this tower expects "
            f"({bands}, {size}, {size}) (bands, crop size)"
        )


class ImageViT(nn.Module):
    """Vision transformer for (B, bands, S, S) cutouts in flux units.

    Each image is divided by one scale common to all bands (its RMS, floored at the sky noise),
    which keeps colours; log10 of the scale, normalised by the data set's statistics, becomes a
    token next to the class token. Tokens: [cls, scale, patch_1..patch_N], each with its learned
    positional embedding (so the pooling head sees where each patch is).
    """

    def __init__(
        self,
        bands: int,
        size: int,
        patch: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        grid = _patch_grid(size, patch)
        self.bands, self.size, self.patch = bands, size, patch
        self.grid = grid
        self.patch_embed = nn.Conv2d(bands, width, patch, stride=patch)
        self.scale_embed = nn.Linear(1, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.zeros(1, 2 + self.grid**2, width))
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.encoder = Encoder(width, depth, heads, mlp_ratio, dropout)
        self.register_buffer("scale_floor", torch.tensor(1e-3))
        self.register_buffer("scale_shift", torch.zeros(1))
        self.register_buffer("scale_scale", torch.ones(1))
        _init_embeddings((self.cls, self.pos, self.mask_token), width)
        with torch.no_grad():
            self.pos[0, 2:] = grid_positions(self.grid, width)
        nn.init.zeros_(self.scale_embed.bias)

    def standardise(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image / scale, normalised log10 scale (B, 1))."""
        scale = image.square().mean(dim=(1, 2, 3)).sqrt().clamp_min(self.scale_floor)
        x = image / scale[:, None, None, None]
        log_scale = (scale.log10()[:, None] - self.scale_shift) / self.scale_scale
        return x, log_scale

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) → (B, N, C·p·p) pixel patches in the order of the patch tokens."""
        return rearrange(x, "b c (gh p1) (gw p2) -> b (gh gw) (c p1 p2)", p1=self.patch, p2=self.patch)

    def forward(
        self, image: torch.Tensor, token_mask: torch.Tensor | None = None, drop_masked: bool = False
    ) -> dict[str, torch.Tensor]:
        """tokens (B, 2+N, W) and the standardised pixel patches (B, N, C·p·p) as targets.

        token_mask (B, N) bool marks masked patches: they become the mask token, or with
        `drop_masked` (MAE) they are left out, so tokens are (B, 2+V, W) for the V visible patches
        of each image in patch order (every row must mask the same number)."""
        _check_image_shape(image, self.bands, self.size)
        x, log_scale = self.standardise(image)
        h = rearrange(self.patch_embed(x), "b w gh gw -> b (gh gw) w")
        b, n, w = h.shape
        if token_mask is not None and not drop_masked:
            h = torch.where(token_mask[..., None], self.mask_token.to(h.dtype), h)
        h = h + self.pos[:, 2:]
        if token_mask is not None and drop_masked:
            masked = token_mask.sum(dim=1)
            if not bool((masked == masked[0]).all()):
                raise ValueError("drop_masked needs the same number of masked patches in every image")
            h = h[~token_mask].view(b, n - int(masked[0]), w)
        head = torch.cat([self.cls.expand(b, -1, -1), self.scale_embed(log_scale)[:, None]], dim=1)
        h = torch.cat([head + self.pos[:, :2], h], dim=1)
        return {"tokens": self.encoder(h), "target": self.patches(x)}


class VisiblePatchDecoder(nn.Module):
    """MAE's decoder (He et al. 2022) for an image encoder that saw only the visible patches.

    It narrows the encoder's tokens, puts a learned mask token at every masked position, adds its
    own positions and predicts every patch's pixels with a few narrow blocks. The encoder then
    costs about (1 - mask ratio) of running on all patches, and this decoder a few per cent more.
    """

    def __init__(
        self,
        width: int,
        grid: int,
        out_features: int,
        decoder_width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.proj = nn.Linear(width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(decoder_width))
        self.pos = nn.Parameter(torch.zeros(1, 2 + grid**2, decoder_width))
        self.blocks = Encoder(decoder_width, depth, heads, mlp_ratio, 0.0)
        self.out = nn.Linear(decoder_width, out_features)
        _init_embeddings((self.mask_token, self.pos), decoder_width)
        with torch.no_grad():
            self.pos[0, 2:] = grid_positions(grid, decoder_width)

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """tokens (B, 2+V, W) from the encoder, token_mask (B, N) → predicted patches (B, N, out)."""
        h = self.proj(tokens)
        b, n = token_mask.shape
        patches = h.new_zeros(b, n, h.shape[-1]).masked_scatter(~token_mask[..., None], h[:, 2:])
        patches = torch.where(token_mask[..., None], self.mask_token.to(h.dtype), patches)
        h = torch.cat([h[:, :2], patches], dim=1) + self.pos
        return self.out(self.blocks(h)[:, 2:])


def grid_positions(grid: int, width: int) -> torch.Tensor:
    """(grid², width) initial patch positions: 2-D sine/cosine features of (row, column)."""
    rows = torch.arange(grid, dtype=torch.float64).repeat_interleave(grid)
    cols = torch.arange(grid, dtype=torch.float64).repeat(grid)
    half = width // 2
    return torch.cat(
        [
            sinusoidal(rows, half) * math.sqrt(half / width),
            sinusoidal(cols, width - half) * math.sqrt((width - half) / width),
        ],
        dim=1,
    )


# ----------------------------------------------------------------------------- the released towers

#: The released SpecFormer's statistics features: ((mean - 2) / 2, (std - 2) / 8).
REFERENCE_STAT_SHIFT = (2.0, 2.0)
REFERENCE_STAT_SCALE = (2.0, 8.0)
#: Legacy Survey viewer colours (the reference's `ToRGB`): band → (RGB plane, scale).
RGB_SCALES = {"u": (2, 1.5), "g": (2, 6.0), "r": (1, 3.4), "i": (0, 1.0), "z": (0, 2.2)}
RGB_SOFTENING = 0.03  # `m`
RGB_STRETCH = 20.0  # `Q`


class ReferenceSpecFormer(nn.Module):
    """SpecFormer as released with AstroCLIP (Parker et al. 2024), input featurisation included.

    Each spectrum is standardised over all its pixels (unbiased std, floored at `std_floor`); every
    token has 2 + patch features: token 0 carries ((mean - 2) / 2, (std - 2) / 8) and zeros, the
    slice tokens two zeros and their pixels. One linear embedding, learned positions, a pre-LN
    encoder (LayerNorm eps 1e-5). Bad-pixel masks are ignored, as the reference ignores them.
    """

    def __init__(
        self,
        length: int,
        patch: int,
        stride: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        std_floor: float = 0.2,
    ):
        super().__init__()
        self.length, self.patch, self.stride, self.std_floor = length, patch, stride, std_floor
        self.tokens = _checked_spectrum_tokens(length, patch, stride)
        self.embed = nn.Linear(2 + patch, width)
        self.pos = nn.Parameter(torch.zeros(1, self.tokens + 1, width))
        # The reference masks by zeroing a token's features, whose embedding is the bias: the
        # converter sets the mask token to it.
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.dropout = nn.Dropout(dropout)
        self.encoder = Encoder(width, depth, heads, mlp_ratio, dropout)

    def features(self, flux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) flux → token features (B, 1+T, 2+patch) and the standardised slices (B, T, patch)."""
        std = flux.std(dim=1, keepdim=True).clamp_min(self.std_floor)
        mean = flux.mean(dim=1, keepdim=True)
        slices = ((flux - mean) / std).unfold(1, self.patch, self.stride)
        shift = flux.new_tensor(REFERENCE_STAT_SHIFT)
        scale = flux.new_tensor(REFERENCE_STAT_SCALE)
        stats = (torch.cat([mean, std], dim=1) - shift) / scale
        first = torch.cat([stats, flux.new_zeros(len(flux), self.patch)], dim=1)[:, None]
        rest = torch.cat([slices.new_zeros(*slices.shape[:2], 2), slices], dim=-1)
        return torch.cat([first, rest], dim=1), slices

    def forward(
        self, flux: torch.Tensor, bad: torch.Tensor | None = None, token_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """tokens (B, 1+T, W), the standardised slices as targets and unit weights."""
        _check_spectrum_length(flux, self.length)
        features, target = self.features(flux)
        h = self.embed(features)
        if token_mask is not None:
            slices = torch.where(token_mask[..., None], self.mask_token.to(h.dtype), h[:, 1:])
            h = torch.cat([h[:, :1], slices], dim=1)
        h = self.dropout(h + self.pos)
        return {"tokens": self.encoder(h), "target": target, "weight": torch.ones_like(target)}


def lupton_rgb(image: torch.Tensor, bands: list[str]) -> torch.Tensor:
    """(B, 3, H, W) fluxes (nanomaggies) → the reference's RGB in [0, 1] (B, 3, H, W).

    The Legacy Survey viewer's asinh colour stretch as AstroCLIP's `ToRGB` computes it: per band
    scale and soften, stretch the mean intensity, clip; band g lands in plane 2, r in 1, z in 0."""
    scales = image.new_tensor([RGB_SCALES[b][1] for b in bands])[None, :, None, None]
    scaled = image * scales + RGB_SOFTENING
    intensity = scaled.clamp_min(0).sum(dim=1) / len(bands)
    stretched = torch.asinh(RGB_STRETCH * intensity) / math.sqrt(RGB_STRETCH)
    intensity = intensity + (intensity == 0) * 1e-6
    rgb = torch.zeros_like(scaled)
    planes = [RGB_SCALES[b][0] for b in bands]
    rgb[:, planes] = scaled * stretched[:, None] / intensity[:, None]
    return rgb.clamp(0, 1)


class ReferenceImageViT(nn.Module):
    """The released image tower: AstroDINO's DINOv2 ViT, with AstroCLIP's image preprocessing.

    Input (B, 3, S, S) fluxes in the bands of `RGB_SCALES`, (band, row, column) as the survey
    cutouts store them, are turned into the viewer's RGB (`lupton_rgb`). The reference sees the same
    orientation: its data set holds each Stein et al. cutout transposed to (column, row, band), and
    its collator's `permute(0, 3, 2, 1)` transposes it back. DINOv2: conv patch embedding, blocks
    with LayerScale, LayerNorm eps 1e-6. With `class_token` (AstroDINO alone) the tokens are
    [cls, patches] plus learned positions and the embedding is the class token; without it (inside
    AstroCLIP) the patch embeddings go through the blocks with neither class token nor positions, as
    AstroCLIP's image head calls them.
    """

    def __init__(
        self,
        bands: list[str],
        size: int,
        patch: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        class_token: bool = True,
    ):
        super().__init__()
        grid = _patch_grid(size, patch)
        self.band_names, self.size, self.patch = list(bands), size, patch
        self.bands = len(bands)
        self.grid = grid
        self.class_token = class_token
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.zeros(1, 1 + self.grid**2, width))
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.encoder = Encoder(width, depth, heads, mlp_ratio, dropout, eps=1e-6, layer_scale=True)

    def forward(
        self, image: torch.Tensor, token_mask: torch.Tensor | None = None, drop_masked: bool = False
    ) -> dict[str, torch.Tensor]:
        """tokens (B, 1+N, W) with the class token, else (B, N, W)."""
        if token_mask is not None:
            raise ValueError("the released image tower is for embedding and alignment, not masked training")
        _check_image_shape(image, self.bands, self.size)
        x = lupton_rgb(image, self.band_names)
        h = rearrange(self.patch_embed(x), "b w gh gw -> b (gh gw) w")
        if self.class_token:
            h = torch.cat([self.cls.expand(len(h), -1, -1), h], dim=1) + self.pos
        return {"tokens": self.encoder(h)}
