"""The MPP AViT: shared field embedding + RevIN + patch stem + space-time axial attention blocks.

Shapes: inputs are (B, T, C, H, W) physical fields (T = history, C = fields present in the batch,
named by `field_ids` into the model's field vocabulary); the output is the next step (B, C, H, W)
in the same units. Inside, tokens are channels-last (B, T, h, w, D) so that every projection is
one matmul and both attention passes are plain reshapes.

Deliberate differences from the reference code (PolymathicAI/multiple_physics_pretraining):
- Mixed batches: samples may carry different fields (`field_mask`) and different boundary
  conditions (`bcs`, one code pair per sample), instead of the first sample's labels and BCs
  applying to the whole batch.
- Token-wise LayerNorm everywhere instead of instance norms over the spatial plane: a block
  is then exactly local in the axial sense (perturbing one token changes only its row and
  column — tested), and constant inputs cannot blow up a divide-by-std.
- RevIN treats (near-)constant fields exactly: they are fed as zeros and predicted as their
  constant value, so f(a·x+b) = a·f(x)+b holds for constant and non-constant fields alike.
- The embedding rescale uses the vocabulary size the model was *created* with (a buffer), so
  appending fields for fine-tuning leaves the outputs of existing fields bit-identical.
- Only the last time step is decoded; by default (`residual`) the decoder predicts the change
  from the last input step, so an untrained model starts as persistence.

`variant: reference` restores the released model's layers, so that converted published weights
(`foundation convert mpp`) give the reference's outputs: instance norms over the spatial plane
(the time block's mean-centring `InstanceNorm`, the space block's and stem's `RMSInstanceNorm`),
a norm after attention (before the output projection), the space MLP post-normed instead of
pre-normed, RevIN with the unbiased std + 1e-7, and the reference's periodic wrap of T5 buckets.
The q/k/v layout (the reference interleaves q, k, v per head) is a permutation of weights that
the converter applies; it needs no variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from foundation.attention import attention
from foundation.config import MAX_DEPTH, MAX_MLP_RATIO, MAX_TOKENS, MAX_WIDTH, option

PERIODIC = 2  # The Well's boundary code for periodic axes


@dataclass
class MPPConfig:
    """AViT hyperparameters (the `model:` section of an MPP config). Paper sizes: Ti 192/3/12,
    S 384/6/12, B 768/12/12, L 1024/16/24 (embed_dim/num_heads/depth), patch 16."""

    embed_dim: int = option(192, "Token width D (Ti 192, S 384, B 768, L 1024).", ge=8, le=MAX_WIDTH)
    num_heads: int = option(3, "Attention heads (Ti 3, S 6, B 12, L 16).", ge=1, le=MAX_DEPTH)
    depth: int = option(12, "Space-time blocks (12; L uses 24).", ge=1, le=MAX_DEPTH)
    patch_size: int = option(16, "Pixels per token side: 4, 8 or 16 (16 in the paper).")
    mlp_ratio: float = option(4.0, "MLP hidden width as a multiple of embed_dim.", gt=0, le=MAX_MLP_RATIO)
    layer_scale_init: float = option(1e-6, "Initial layer-scale of every residual branch.", ge=0)
    drop_path: float = option(
        0.0, "Stochastic-depth rate of the last block (linear ramp from 0).", ge=0, lt=1
    )
    bias_buckets: int = option(
        32, "T5 relative-position buckets (both directions together).", ge=1, le=MAX_TOKENS
    )
    bias_max_distance: int = option(
        128, "Distance beyond which relative positions share a bucket.", ge=1, le=MAX_TOKENS
    )
    history: int = option(4, "Input time steps per sample (16 in the paper).", ge=1, le=MAX_TOKENS)
    residual: bool = option(
        True,
        "Predict the change from the last input step (in RevIN units); false = the state itself (paper).",
    )
    fields: list[str] = option(
        doc="Field vocabulary (embedding slots, in order); empty = the shard set's fields.", factory=list
    )
    loss: Literal["nmse", "vmse"] = option(
        "nmse", "Training loss: nmse (paper: MSE / mean(y²)) or vmse (MSE / var(y))."
    )
    init_from: str | None = option(
        None, "Fine-tune: pretrained run dir / checkpoint; unseen fields get new embedding slots."
    )
    freeze: Literal["none", "middle", "processor"] = option(
        "none", "Fine-tune freezing: none, middle (only field embedding/head), processor."
    )
    variant: Literal["foundation", "reference"] = option(
        "foundation",
        "Layer details: foundation (token LayerNorms, exact RevIN) or reference (the released MPP "
        "AViT's instance norms and RevIN; set by `foundation convert mpp`).",
    )

    def __post_init__(self) -> None:
        if self.embed_dim % 4 or self.embed_dim < 8:
            raise ValueError(f"embed_dim must be a multiple of 4 and >= 8, got {self.embed_dim}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.patch_size not in (4, 8, 16):
            raise ValueError(f"patch_size must be 4, 8 or 16, got {self.patch_size}")
        if self.depth < 1 or self.history < 1:
            raise ValueError(f"depth and history must be >= 1, got {self.depth}, {self.history}")
        if self.loss not in ("nmse", "vmse"):
            raise ValueError(f"loss must be nmse or vmse, got {self.loss!r}")
        if self.freeze not in ("none", "middle", "processor"):
            raise ValueError(f"freeze must be none, middle or processor, got {self.freeze!r}")
        if self.variant not in ("foundation", "reference"):
            raise ValueError(f"variant must be foundation or reference, got {self.variant!r}")
        if len(set(self.fields)) != len(self.fields):
            raise ValueError(f"fields has duplicates: {self.fields}")


# ----------------------------------------------------------------------------- normalisation


def revin_normalize(
    x: torch.Tensor, field_mask: torch.Tensor | None = None, rel_eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample, per-field statistics over time and space of (B, T, C, H, W).

    Returns (normalised x, mean, scale), mean/scale (B, 1, C, 1, 1), with
    `x = mean + scale * normalised`. A field whose std is <= rel_eps × its RMS (constant fields,
    and absent fields, which are zeros) gets normalised values 0 and scale 0, so it is predicted as
    exactly its constant value and no division by ~0 ever happens.
    """
    x = x.float()
    with torch.no_grad():  # statistics are constants of the sample (as in the reference)
        mean = x.mean(dim=(1, 3, 4), keepdim=True)
        std = (x - mean).square().mean(dim=(1, 3, 4), keepdim=True).sqrt()
        rms = x.square().mean(dim=(1, 3, 4), keepdim=True).sqrt()
    centred = x - mean
    constant = std <= rel_eps * rms
    if field_mask is not None:
        constant = constant | ~field_mask[:, None, :, None, None]
    safe = torch.where(constant, torch.ones_like(std), std)
    normalised = torch.where(constant, torch.zeros_like(x), centred / safe)
    scale = torch.where(constant, torch.zeros_like(std), std)
    return normalised, mean, scale


def reference_revin_normalize(
    x: torch.Tensor, field_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's RevIN: (x - mean) / (unbiased std + 1e-7) over time and space, the same
    return values as `revin_normalize`. Absent fields get scale 0, so they come out as 0."""
    x = x.float()
    with torch.no_grad():
        std, mean = torch.std_mean(x, dim=(1, 3, 4), keepdim=True)
        std = std + 1e-7
    normalised = (x - mean) / std
    scale = std if field_mask is None else std * field_mask[:, None, :, None, None]
    return normalised, mean, scale


class InstanceNorm(nn.Module):
    """torch's affine InstanceNorm2d on channels-last tokens (..., h, w, D): each channel centred
    and scaled over the spatial plane (biased variance, eps 1e-5) — the reference's time-block norm."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # statistics in fp32 under bf16 autocast too, as LayerNorm's are
        var, mean = torch.var_mean(xf, dim=(-3, -2), keepdim=True, correction=0)
        return ((xf - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias).to(x.dtype)


class RMSInstanceNorm(nn.Module):
    """The reference's RMSInstanceNorm2d on channels-last tokens: x / (unbiased spatial std + 1e-8)
    per channel, times a weight; no centring and no bias (the reference's unused bias is dropped)."""

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        std = torch.std(xf, dim=(-3, -2), keepdim=True)
        return (xf / (std + self.eps) * self.weight).to(x.dtype)


def _norm(kind: Literal["layer", "instance", "rms_instance"], dim: int) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(dim)
    return InstanceNorm(dim) if kind == "instance" else RMSInstanceNorm(dim)


# ----------------------------------------------------------------------------- embedding / stem


class FieldEmbedding(nn.Module):
    """Per-pixel linear map from the present fields to D/4 channels, over a shared vocabulary.

    Equal to a full linear layer over the whole vocabulary applied to the input zero-padded to the
    vocabulary, times √(reference_size / n_present) per sample (the reference's init correction).
    `forward` is the definition; the AViT applies the same parameters fused with the stem
    (`AViT.embed_and_stem`), which is tested to agree with it.
    """

    def __init__(self, n_fields: int, dim: int):
        super().__init__()
        init = nn.Linear(n_fields, dim)
        self.weight = nn.Parameter(init.weight.detach().clone())  # (dim, n_fields)
        self.bias = nn.Parameter(init.bias.detach().clone())
        self.register_buffer("reference_size", torch.tensor(float(n_fields)))

    @property
    def n_fields(self) -> int:
        return self.weight.shape[1]

    def forward(self, x: torch.Tensor, field_ids: torch.Tensor, field_mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, C, H, W), zeros at absent fields → (B, T, H, W, dim)."""
        n_present = field_mask.sum(dim=1).clamp(min=1).to(x.dtype)
        scale = (self.reference_size.to(x.dtype) / n_present).sqrt()
        out = F.linear(x.permute(0, 1, 3, 4, 2), self.weight[:, field_ids], self.bias)
        return out * scale[:, None, None, None, None]

    def expand(self, n_new: int) -> None:
        """Append `n_new` vocabulary slots; existing columns and the rescale are unchanged."""
        fresh = nn.Linear(self.n_fields + n_new, self.weight.shape[0]).weight.detach()[:, :n_new]
        self.weight = nn.Parameter(torch.cat([self.weight.detach(), fresh.to(self.weight)], dim=1))


def _patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, H, W, C) → (N, H/p, W/p, p*p*C)."""
    return rearrange(x, "n (h p1) (w p2) c -> n h w (p1 p2 c)", p1=p, p2=p)


def _unpatchify(x: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """(N, h, w, p*p*c) → (N, h*p, w*p, c)."""
    return rearrange(x, "n h w (p1 p2 c) -> n (h p1) (w p2) c", p1=p, p2=p, c=c)


def _strides(patch_size: int) -> list[int]:
    return [4] + [2] * int(round(math.log2(patch_size // 4)))


class PatchStem(nn.Module):
    """Hierarchical patch embedding (4×4, then 2×2 stages) as stride=kernel convolutions,
    written as patchify + linear (the same parameters, one matmul each)."""

    def __init__(self, in_dim: int, dim: int, patch_size: int, norm: str = "layer"):
        super().__init__()
        self.strides = _strides(patch_size)
        widths = [in_dim] * len(self.strides) + [dim]
        # nn.Sequential, not nn.ModuleList: the trainer's FSDP2 wraps ModuleList elements as their own
        # units, but `AViT.embed_and_stem` reads the first projection's weight outside its forward.
        self.projs = nn.Sequential(
            *(nn.Linear(s * s * widths[i], widths[i + 1], bias=False) for i, s in enumerate(self.strides))
        )
        self.norms = nn.Sequential(*(_norm(norm, widths[i + 1]) for i in range(len(self.strides))))

    def forward(self, x: torch.Tensor, first_projected: bool = False) -> torch.Tensor:
        """(N, H, W, in_dim) → (N, H/p, W/p, dim). With `first_projected`, x is already the output
        of the first stage's projection (see `AViT.embed_and_stem`)."""
        for i, (s, proj, norm) in enumerate(zip(self.strides, self.projs, self.norms, strict=True)):
            x = norm(x if (i == 0 and first_projected) else proj(_patchify(x, s)))
            if i < len(self.strides) - 1:
                x = F.gelu(x)
        return x


class PatchDestem(nn.Module):
    """Mirror of the stem; the last 4×4 stage decodes only the requested fields (rows of a
    per-field weight gathered by vocabulary id)."""

    def __init__(self, dim: int, out_dim: int, n_fields: int, patch_size: int, norm: str = "layer"):
        super().__init__()
        self.strides = _strides(patch_size)[::-1]  # e.g. 2, 2, 4
        widths = [dim] + [out_dim] * (len(self.strides) - 1)
        self.projs = nn.ModuleList(
            nn.Linear(widths[i], s * s * widths[i + 1], bias=False) for i, s in enumerate(self.strides[:-1])
        )
        self.norms = nn.ModuleList(_norm(norm, widths[i + 1]) for i in range(len(self.strides) - 1))
        last = self.strides[-1]
        # Zero-initialised per-field head: an untrained model predicts "no change" (see `residual`).
        self.out_weight = nn.Parameter(torch.zeros(n_fields, last * last, widths[-1]))
        self.out_bias = nn.Parameter(torch.zeros(n_fields))
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor, field_ids: torch.Tensor) -> torch.Tensor:
        """(N, h, w, dim) → (N, C, H, W) for the C fields in `field_ids`."""
        for s, proj, norm in zip(self.strides[:-1], self.projs, self.norms, strict=True):
            x = F.gelu(norm(_unpatchify(proj(x), s, proj.out_features // (s * s))))
        last = self.strides[-1]
        c = field_ids.shape[0]
        weight = self.out_weight[field_ids].reshape(c * last * last, self.out_dim)
        y = F.linear(x, weight)  # (N, h, w, C*p*p)
        y = rearrange(y, "n h w (c p1 p2) -> n c (h p1) (w p2)", p1=last, p2=last)
        return y + self.out_bias[field_ids][None, :, None, None]

    def expand(self, n_new: int) -> None:
        """Append `n_new` zero-initialised field rows (new fields start as "no change")."""
        fresh = self.out_weight.new_zeros(n_new, *self.out_weight.shape[1:])
        self.out_weight = nn.Parameter(torch.cat([self.out_weight.detach(), fresh], dim=0))
        self.out_bias = nn.Parameter(torch.cat([self.out_bias.detach(), self.out_bias.new_zeros(n_new)]))


# ----------------------------------------------------------------------------- attention blocks


class RelativePositionBias(nn.Module):
    """T5 bucketed relative-position bias per head; on periodic axes the relative position is the
    minimum-image displacement, so the bias matrix is circulant and wraps across the boundary."""

    def __init__(
        self, num_heads: int, num_buckets: int = 32, max_distance: int = 128, reference_wrap: bool = False
    ):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.reference_wrap = reference_wrap
        self.table = nn.Embedding(num_buckets, num_heads)
        self._cache: dict[tuple[int, bool, str], torch.Tensor] = {}

    def buckets(self, length: int, periodic: bool, device: torch.device) -> torch.Tensor:
        key = (length, periodic, str(device))
        if key not in self._cache:
            pos = torch.arange(length, device=device)
            rel = pos[None, :] - pos[:, None]  # key − query
            if periodic and self.reference_wrap:
                rel = _reference_wrap(rel, length)
            elif periodic:
                rel = torch.remainder(rel + length // 2, length) - length // 2
            half = self.num_buckets // 2
            bucket = (rel > 0).long() * half
            n = rel.abs()
            max_exact = half // 2
            large = (
                max_exact
                + (
                    torch.log(n.float().clamp(min=1) / max_exact)
                    / math.log(self.max_distance / max_exact)
                    * (half - max_exact)
                ).long()
            )
            bucket = bucket + torch.where(n < max_exact, n, large.clamp(max=half - 1))
            self._cache[key] = bucket
        return self._cache[key]

    def forward(self, length: int, periodic: torch.Tensor | bool = False) -> torch.Tensor:
        """Additive bias (1 or B, heads, L, L); `periodic` is a bool or a (B,) bool tensor."""
        device = self.table.weight.device
        if isinstance(periodic, bool):
            return self.table(self.buckets(length, periodic, device)).permute(2, 0, 1)[None]
        both = torch.stack([self.buckets(length, False, device), self.buckets(length, True, device)])
        return self.table(both[periodic.long()]).permute(0, 3, 1, 2)


def _reference_wrap(rel: torch.Tensor, length: int) -> torch.Tensor:
    """The reference's periodic relative positions: beyond ±length//2 they are taken modulo
    length//2 (not length), which equals the minimum image only for even lengths, and ±length/2
    keep their sign."""
    half = length // 2
    rel = torch.where(rel < -half, torch.remainder(rel, half), rel)
    return torch.where(rel > half, torch.remainder(rel, -half), rel)


class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class _QKV(nn.Module):
    """Pre-norm, fused q/k/v projection and QK-LayerNorm, shared by the time and space blocks."""

    def __init__(self, dim: int, num_heads: int, norm: str = "layer"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = _norm(norm, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim)
        self.k_norm = nn.LayerNorm(self.head_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., D) → q, k, v each (..., heads, head_dim)."""
        qkv = self.qkv(self.norm(x)).unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k, v = qkv.unbind(-3)
        return self.q_norm(q), self.k_norm(k), v


#: Axial sequences of (B, T, h, w, heads, dh) tokens as attention's (N, heads, L, dh): the
#: sequence runs along one token axis (time, rows h or columns w), the other two join the batch.
_AXIAL = {"t": "(b h w) n t d", "h": "(b t w) n h d", "w": "(b t h) n w d"}


def _along(t: torch.Tensor, axis: Literal["t", "h", "w"]) -> torch.Tensor:
    """(B, T, h, w, heads, dh) → (N, heads, L, dh) with sequences along `axis`."""
    return rearrange(t, f"b t h w n d -> {_AXIAL[axis]}")


def _back(out: torch.Tensor, axis: Literal["t", "h", "w"], shape: torch.Size) -> torch.Tensor:
    """Inverse of `_along`: (N, heads, L, dh) → (B, T, h, w, heads*dh) for tokens of `shape`."""
    b, t, h, w = shape[:4]
    return rearrange(out, f"{_AXIAL[axis]} -> b t h w (n d)", b=b, t=t, h=h, w=w)


class TimeAttention(nn.Module):
    """Attention along time at each spatial token (relative bias, QK-norm, layer-scale, no MLP)."""

    def __init__(self, cfg: MPPConfig, drop_path: float = 0.0):
        super().__init__()
        dim = cfg.embed_dim
        reference = cfg.variant == "reference"
        self.qkv = _QKV(dim, cfg.num_heads, "instance" if reference else "layer")
        self.bias = RelativePositionBias(cfg.num_heads, cfg.bias_buckets, cfg.bias_max_distance, reference)
        self.out_norm = InstanceNorm(dim) if reference else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(cfg.layer_scale_init * torch.ones(dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_along(u, "t") for u in self.qkv(x))
        out = attention(q, k, v, attn_mask=self.bias(x.shape[1]).to(q.dtype))
        out = self.out_norm(_back(out, "t", x.shape))
        return x + self.drop_path(self.gamma * self.proj(out))


class AxialSpaceAttention(nn.Module):
    """Attention along x and along y (the two results averaged), then an MLP; relative bias that
    wraps on periodic axes, chosen per sample."""

    def __init__(self, cfg: MPPConfig, drop_path: float = 0.0):
        super().__init__()
        dim = cfg.embed_dim
        self.reference = cfg.variant == "reference"
        norm = "rms_instance" if self.reference else "layer"
        self.qkv = _QKV(dim, cfg.num_heads, norm)
        self.bias = RelativePositionBias(
            cfg.num_heads, cfg.bias_buckets, cfg.bias_max_distance, self.reference
        )
        self.out_norm = RMSInstanceNorm(dim) if self.reference else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.gamma_att = nn.Parameter(cfg.layer_scale_init * torch.ones(dim))
        hidden = int(dim * cfg.mlp_ratio)
        self.mlp_norm = _norm(norm, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.gamma_mlp = nn.Parameter(cfg.layer_scale_init * torch.ones(dim))
        self.drop_path = DropPath(drop_path)

    def _mask(
        self, length: int, periodic: torch.Tensor | bool, repeats: int, dtype: torch.dtype
    ) -> torch.Tensor:
        bias = self.bias(length, periodic).to(dtype)
        if bias.shape[0] == 1:
            return bias
        # One bias per sample, repeated for each of the sample's `repeats` sequences.
        return bias[:, None].expand(-1, repeats, -1, -1, -1).reshape(-1, *bias.shape[1:])

    def forward(
        self, x: torch.Tensor, periodic: tuple[torch.Tensor | bool, torch.Tensor | bool]
    ) -> torch.Tensor:
        b, t, h, w, _ = x.shape
        q, k, v = self.qkv(x)  # (B, T, h, w, heads, dh)
        qx, kx, vx = _along(q, "h"), _along(k, "h"), _along(v, "h")
        out_x = attention(qx, kx, vx, attn_mask=self._mask(h, periodic[0], t * w, qx.dtype))
        qy, ky, vy = _along(q, "w"), _along(k, "w"), _along(v, "w")
        out_y = attention(qy, ky, vy, attn_mask=self._mask(w, periodic[1], t * h, qy.dtype))
        out = self.out_norm(0.5 * (_back(out_x, "h", x.shape) + _back(out_y, "w", x.shape)))
        x = x + self.drop_path(self.gamma_att * self.proj(out))
        # The reference normalises the MLP's output (post-norm); ours its input (pre-norm).
        branch = self.mlp_norm(self.mlp(x)) if self.reference else self.mlp(self.mlp_norm(x))
        return x + self.drop_path(self.gamma_mlp * branch)


class SpaceTimeBlock(nn.Module):
    def __init__(self, cfg: MPPConfig, drop_path: float = 0.0):
        super().__init__()
        self.time = TimeAttention(cfg, drop_path)
        self.space = AxialSpaceAttention(cfg, drop_path)

    def forward(
        self, x: torch.Tensor, periodic: tuple[torch.Tensor | bool, torch.Tensor | bool]
    ) -> torch.Tensor:
        return self.space(self.time(x), periodic)


def periodic_flags(bcs: torch.Tensor | None, batch: int) -> tuple[torch.Tensor | bool, torch.Tensor | bool]:
    """Per axis: a bool when every sample agrees (one shared bias), else a (B,) bool tensor."""
    if bcs is None:
        return False, False
    flags = []
    for axis in range(2):
        p = bcs[:, axis] == PERIODIC
        flags.append(bool(p[0]) if batch > 0 and bool((p == p[0]).all()) else p)
    return flags[0], flags[1]


class AViT(nn.Module):
    """Axial Vision Transformer over a shared field vocabulary (MPP)."""

    def __init__(self, cfg: MPPConfig, fields: list[str] | None = None):
        super().__init__()
        self.cfg = cfg
        self.fields = list(fields if fields is not None else cfg.fields)
        if not self.fields:
            raise ValueError("the model needs a field vocabulary (model.fields or the shard set's fields)")
        dim = cfg.embed_dim
        stem_norm = "rms_instance" if cfg.variant == "reference" else "layer"
        self.embed = FieldEmbedding(len(self.fields), dim // 4)
        self.stem = PatchStem(dim // 4, dim, cfg.patch_size, stem_norm)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(SpaceTimeBlock(cfg, rate) for rate in rates)
        self.destem = PatchDestem(dim, dim // 4, len(self.fields), cfg.patch_size, stem_norm)

    def field_ids(self, names: list[str]) -> list[int]:
        index = {name: i for i, name in enumerate(self.fields)}
        return [index[n] for n in names]

    def embed_and_stem(
        self, x: torch.Tensor, field_ids: torch.Tensor, field_mask: torch.Tensor
    ) -> torch.Tensor:
        """`stem(embed(x))` for normalised (B, T, C, H, W) → (B·T, h, w, D), computed without the
        full-resolution D/4-channel embedding: both the per-pixel field embedding and the first
        4×4 patch projection are linear, so their composite — an (out, 16·C) matrix built per
        batch — is applied to the raw C-channel patches (16·D/4 / C times fewer multiply-adds in
        the largest stem matmul, and no full-resolution intermediate)."""
        t, c = x.shape[1:3]
        first = self.stem.projs[0]
        s = self.stem.strides[0]
        w1 = first.weight.view(first.out_features, s * s, -1)  # (out, s*s, D/4)
        composite = (w1 @ self.embed.weight[:, field_ids]).reshape(first.out_features, s * s * c)
        bias = w1.sum(dim=1) @ self.embed.bias
        n_present = field_mask.sum(dim=1).clamp(min=1).to(x.dtype)
        scale = (self.embed.reference_size.to(x.dtype) / n_present).sqrt().repeat_interleave(t)
        patches = _patchify(rearrange(x, "b t c h w -> (b t) h w c"), s)
        projected = F.linear(patches, composite, bias) * scale[:, None, None, None]
        return self.stem(projected, first_projected=True)

    def features(
        self,
        x: torch.Tensor,
        field_ids: torch.Tensor,
        field_mask: torch.Tensor | None = None,
        bcs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Processor output tokens (B, T, h, w, D) plus the RevIN mean and scale."""
        b, t, c, height, width = x.shape
        p = self.cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"spatial size {height}x{width} is not a multiple of patch_size {p}")
        if self.cfg.variant == "reference" and height * width < 2 * p * p:
            # Its instance norms take a std over each token plane, undefined for a single token.
            raise ValueError(f"the reference variant needs >= 2 tokens per frame; {height}x{width} gives 1")
        if field_mask is None:
            field_mask = torch.ones(b, c, dtype=torch.bool, device=x.device)
        normalise = reference_revin_normalize if self.cfg.variant == "reference" else revin_normalize
        normalised, mean, scale = normalise(x, field_mask)
        tokens = self.embed_and_stem(normalised, field_ids, field_mask)
        tokens = tokens.reshape(b, t, *tokens.shape[1:])
        periodic = periodic_flags(bcs, b)
        for block in self.blocks:
            tokens = block(tokens, periodic)
        return tokens, mean, scale

    def forward(
        self,
        x: torch.Tensor,
        field_ids: torch.Tensor,
        field_mask: torch.Tensor | None = None,
        bcs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next step (B, C, H, W) from a history (B, T, C, H, W); absent fields come out as 0."""
        tokens, mean, scale = self.features(x, field_ids, field_mask, bcs)
        y = self.destem(tokens[:, -1], field_ids)
        if self.cfg.residual:
            # The last input step in RevIN units: the prediction starts from persistence.
            safe = torch.where(scale[:, 0] > 0, scale[:, 0], torch.ones_like(scale[:, 0]))
            y = y + torch.where(scale[:, 0] > 0, (x[:, -1].float() - mean[:, 0]) / safe, torch.zeros_like(y))
        return mean[:, 0] + scale[:, 0] * y


def count_parameters(cfg: MPPConfig, n_fields: int) -> int:
    """Parameters of an AViT, counted on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        model = AViT(cfg, [f"f{i}" for i in range(n_fields)])
    return sum(p.numel() for p in model.parameters())
