"""Training throughput of the MPP AViT on CPU against a reference-style implementation.

The reference style follows PolymathicAI/multiple_physics_pretraining's structure: (T, B, C, H, W)
tensors, einops rearranges between every stage, 1×1 convolutions for projections, instance norms
over the spatial plane, explicit softmax attention (q·kᵀ + bias → softmax → ·v), a conv
hMLP stem/de-stem that decodes every time step. Both models have the same width, depth, heads,
patching and history. Both run in this one process, interleaved round by round, so that load from
other jobs on a shared machine hits them alike; the table reports medians and the ratio.

    python benchmarks/mpp.py                     # AViT-Ti, 64x64, history 16, batch 4
    python benchmarks/mpp.py --size tiny --rounds 3 --steps 2   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from encoders.mpp.loss import normalized_mse_loss
from encoders.mpp.model import AViT, MPPConfig, RelativePositionBias

SIZES = {"tiny": (32, 2, 2), "ti": (192, 3, 12), "s": (384, 6, 12)}


# ----------------------------------------------------------------------------- reference style


class RMSInstanceNorm2d(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        std = torch.std(x, dim=(-2, -1), keepdim=True)
        return x / (std + self.eps) * self.weight[None, :, None, None]


def explicit_attention(q, k, v, bias):
    scores = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5 + bias
    return scores.softmax(dim=-1) @ v


class RefTimeBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.InstanceNorm2d(dim, affine=True)
        self.norm2 = nn.InstanceNorm2d(dim, affine=True)
        self.input_head = nn.Conv2d(dim, 3 * dim, 1)
        self.output_head = nn.Conv2d(dim, dim, 1)
        self.qnorm = nn.LayerNorm(dim // heads)
        self.knorm = nn.LayerNorm(dim // heads)
        self.bias = RelativePositionBias(heads)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))

    def forward(self, x):
        t, b, c, h, w = x.shape
        residual = x.clone()
        x = rearrange(x, "t b c h w -> (t b) c h w")
        x = self.input_head(self.norm1(x))
        x = rearrange(x, "(t b) (he c) h w -> (b h w) he t c", t=t, he=self.heads)
        q, k, v = x.tensor_split(3, dim=-1)
        x = explicit_attention(self.qnorm(q), self.knorm(k), v, self.bias(t))
        x = rearrange(x, "(b h w) he t c -> (t b) (he c) h w", h=h, w=w)
        x = self.output_head(self.norm2(x))
        x = rearrange(x, "(t b) c h w -> t b c h w", t=t)
        return residual + x * self.gamma[None, None, :, None, None]


class RefAxialBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = RMSInstanceNorm2d(dim)
        self.norm2 = RMSInstanceNorm2d(dim)
        self.input_head = nn.Conv2d(dim, 3 * dim, 1)
        self.output_head = nn.Conv2d(dim, dim, 1)
        self.qnorm = nn.LayerNorm(dim // heads)
        self.knorm = nn.LayerNorm(dim // heads)
        self.bias = RelativePositionBias(heads)
        self.gamma_att = nn.Parameter(1e-6 * torch.ones(dim))
        self.gamma_mlp = nn.Parameter(1e-6 * torch.ones(dim))
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.mlp_norm = RMSInstanceNorm2d(dim)

    def forward(self, x, periodic):
        b, c, h, w = x.shape
        residual = x.clone()
        x = self.input_head(self.norm1(x))
        x = rearrange(x, "b (he c) h w -> b he h w c", he=self.heads)
        q, k, v = x.tensor_split(3, dim=-1)
        q, k = self.qnorm(q), self.knorm(k)
        qx, kx, vx = (rearrange(z, "b he h w c -> (b h) he w c") for z in (q, k, v))
        xx = rearrange(
            explicit_attention(qx, kx, vx, self.bias(w, periodic)), "(b h) he w c -> b (he c) h w", h=h
        )
        qy, ky, vy = (rearrange(z, "b he h w c -> (b w) he h c") for z in (q, k, v))
        xy = rearrange(
            explicit_attention(qy, ky, vy, self.bias(h, periodic)), "(b w) he h c -> b (he c) h w", w=w
        )
        x = self.output_head(self.norm2((xx + xy) / 2))
        x = residual + x * self.gamma_att[None, :, None, None]
        residual = x.clone()
        x = rearrange(self.mlp(rearrange(x, "b c h w -> b h w c")), "b h w c -> b c h w")
        return residual + self.mlp_norm(x) * self.gamma_mlp[None, :, None, None]


class RefAViT(nn.Module):
    """Reference-style AViT (patch 16: 4×4 conv, 2×2, 2×2)."""

    def __init__(self, dim: int, heads: int, depth: int, n_fields: int):
        super().__init__()
        self.embed_weight = nn.Parameter(nn.Linear(n_fields, dim // 4).weight.detach().clone())
        self.embed_bias = nn.Parameter(torch.zeros(dim // 4))
        q = dim // 4
        self.stem = nn.Sequential(
            nn.Conv2d(q, q, 4, 4, bias=False),
            RMSInstanceNorm2d(q),
            nn.GELU(),
            nn.Conv2d(q, q, 2, 2, bias=False),
            RMSInstanceNorm2d(q),
            nn.GELU(),
            nn.Conv2d(q, dim, 2, 2, bias=False),
            RMSInstanceNorm2d(dim),
        )
        self.time = nn.ModuleList(RefTimeBlock(dim, heads) for _ in range(depth))
        self.space = nn.ModuleList(RefAxialBlock(dim, heads) for _ in range(depth))
        self.destem = nn.Sequential(
            nn.ConvTranspose2d(dim, q, 2, 2, bias=False),
            RMSInstanceNorm2d(q),
            nn.GELU(),
            nn.ConvTranspose2d(q, q, 2, 2, bias=False),
            RMSInstanceNorm2d(q),
            nn.GELU(),
        )
        self.out_kernel = nn.Parameter(nn.ConvTranspose2d(q, n_fields, 4, 4).weight.detach().clone())
        self.out_bias = nn.Parameter(torch.zeros(n_fields))

    def forward(self, x, labels, periodic: bool):
        t = x.shape[0]
        with torch.no_grad():
            std, mean = torch.std_mean(x, dim=(0, -2, -1), keepdim=True)
            std = std + 1e-7
        x = (x - mean) / std
        scale = (self.embed_weight.shape[1] / len(labels)) ** 0.5
        x = scale * F.linear(
            rearrange(x, "t b c h w -> t b h w c"), self.embed_weight[:, labels], self.embed_bias
        )
        x = self.stem(rearrange(x, "t b h w c -> (t b) c h w"))
        x = rearrange(x, "(t b) c h w -> t b c h w", t=t)
        for time_block, space_block in zip(self.time, self.space, strict=True):
            x = time_block(x)
            x = rearrange(
                space_block(rearrange(x, "t b c h w -> (t b) c h w"), periodic),
                "(t b) c h w -> t b c h w",
                t=t,
            )
        x = self.destem(rearrange(x, "t b c h w -> (t b) c h w"))
        x = F.conv_transpose2d(x, self.out_kernel[:, labels], self.out_bias[labels], stride=4)
        x = rearrange(x, "(t b) c h w -> t b c h w", t=t)
        return (x * std + mean)[-1]


# ----------------------------------------------------------------------------- timing


def _steps(step, n: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        step()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="ti")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--history", type=int, default=16)
    parser.add_argument("--fields", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="Training steps per timed round.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="Intra-op threads (1: on a loaded machine more threads stall on barriers).",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dim, heads, depth = SIZES[args.size]
    vocab = 12
    ours = AViT(
        MPPConfig(embed_dim=dim, num_heads=heads, depth=depth, patch_size=16, history=args.history),
        [f"f{i}" for i in range(vocab)],
    )
    with torch.no_grad():
        ours.destem.out_weight.normal_(0, 0.02)  # a trained-looking head: every layer gets gradients
    ref = RefAViT(dim, heads, depth, vocab)
    b, t, c, n = args.batch, args.history, args.fields, args.resolution
    x = torch.randn(b, t, c, n, n)
    y = torch.randn(b, c, n, n)
    ids = torch.arange(c)
    bcs = torch.full((b, 2), 2)
    mask = torch.ones(b, c, dtype=torch.bool)
    labels = list(range(c))
    x_ref = x.permute(1, 0, 2, 3, 4).contiguous()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-4)

    def step_ours():
        opt_ours.zero_grad(set_to_none=True)
        loss, _ = normalized_mse_loss(ours(x, ids, mask, bcs), y, mask)
        loss.backward()
        opt_ours.step()

    def step_ref():
        opt_ref.zero_grad(set_to_none=True)
        loss, _ = normalized_mse_loss(ref(x_ref, labels, True), y, mask)
        loss.backward()
        opt_ref.step()

    step_ours(), step_ref()  # warm-up (allocator, kernels)
    results = {"foundation AViT": [], "reference style": []}
    cpu = {"foundation AViT": [], "reference style": []}
    for _ in range(args.rounds):
        for name, step in (("foundation AViT", step_ours), ("reference style", step_ref)):
            wall, used = _steps(step, args.steps)
            results[name].append(args.steps * b / wall)
            cpu[name].append(args.steps * b / used)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    print(
        f"MPP AViT-{args.size} training on CPU: {n}x{n}, history {t}, {c} fields, batch {b}, "
        f"{args.threads} threads, {args.rounds} interleaved rounds x {args.steps} steps"
    )
    print(
        f"{'implementation':18s} {'params':>9s} {'samples/s (median)':>19s} {'min..max':>14s} "
        f"{'samples/CPU-s':>14s}"
    )
    for name, params in (("foundation AViT", n_ours), ("reference style", n_ref)):
        r = results[name]
        print(
            f"{name:18s} {params / 1e6:8.2f}M {statistics.median(r):19.2f} "
            f"{min(r):6.2f}..{max(r):6.2f} {statistics.median(cpu[name]):14.2f}"
        )
    ratios = [a / b for a, b in zip(results["foundation AViT"], results["reference style"], strict=True)]
    print(
        f"speed-up (median of per-round ratios): {statistics.median(ratios):.2f}x "
        f"(range {min(ratios):.2f}..{max(ratios):.2f}); CPU-time ratio "
        f"{statistics.median(cpu['foundation AViT']) / statistics.median(cpu['reference style']):.2f}x"
    )


if __name__ == "__main__":
    main()
