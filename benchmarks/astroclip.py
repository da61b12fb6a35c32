"""Training throughput of the AstroCLIP towers on CPU: ours vs a reference-style implementation.

One process, one set of weights, the same batches and the same precision on both sides; rounds
alternate between the implementations (ABBA order) so machine load hits both alike; warm-up steps
are not timed; the median wall and process-CPU time per step are reported. One training step =
forward + masked-modelling loss, backward, gradient clipping at 1 (`global_grad_norm`, as the
trainer) and the trainer's optimiser (`build_optimizer`: fused AdamW, its weight-decay groups).
Sizes are the paper's: SpecFormer on the 7781-pixel DESI grid (777 slices + statistics token,
width 768, 6 blocks, 6 heads, dropout 0.1) and the ViT-L/12 image tower on 144x144 g,r,z crops
(144 patches + class + scale tokens, width 1024, 24 blocks, 16 heads).

**reference-style** is the reference code's training step re-expressed op for op over our
parameters (so parameter counts and shapes are identical):

- SpecFormer, after PolymathicAI/AstroCLIP `astroclip/models/specformer.py` and
  `astroclip/modules.py`: slices cut by a Python list of slices concatenated with `torch.cat`
  (`_slice`), segment masks drawn and applied sample by sample in Python loops (`_mask_seq`),
  positions looked up in an embedding table, pre-LN blocks with one q/k/v projection split into
  three views, attention `F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)` in training —
  dropout on the attention probabilities, which sends SDPA on CPU to its math path (explicit
  softmax(QKᵀ/√d), dropout, ·V, the T×T matrix materialised; `--profile` shows the ops) — then
  `.transpose().contiguous().view()`, output projection, residual dropout, MLP with dropout.
- Image tower, after the DINOv2 ViT that AstroCLIP's `astrodino` trains (dinov2
  `layers/attention.py`; `MemEffAttention` falls back to `Attention` without xformers, i.e. always
  on CPU): Conv2d patch embedding, mask token, class token, learned positions, pre-LN blocks with
  explicit attention `softmax((q·scale) kᵀ) v` (no attention dropout), MLP.

Kept from our model on both sides so that both compute the same function: the per-sample
standardisation, the bad-pixel channel and statistics-token embedding, the scale token, the mask
token (the reference zeroes masked input slices), our decoder and masked MSE, and no dropout on
the summed input embeddings (the reference has one more 10 % dropout there — leaving it out
favours the reference). With dropout off the two give the same loss; every run checks that first.

**ours** is `FAMILY.loss(model, batch)`, the towers as the trainer runs them: SDPA without
attention dropout (fused flash kernel on CPU in fp32, plain matmul + softmax in bf16, the faster
CPU kernel there: `foundation.attention`), `unfold` slicing, masks from the loader. For the image
tower that is the default `image.encode_visible_only` step (MAE, He et al. 2022): the encoder runs
on the unmasked patches only and a 2-block decoder of half the width predicts the masked ones.
That computes less than the reference, which sends mask tokens through the encoder (as DINOv2's
iBOT and SimMIM do), so the image rows also show **ours, mask tokens through the encoder**: the
reference's function, i.e. the speed-up of the implementation alone. The MAE model's encoder starts
from the same weights.

    python benchmarks/astroclip.py --tower spectrum --batch 2 --steps 2 --rounds 3
    python benchmarks/astroclip.py --tower image --precision fp32,bf16
    python benchmarks/astroclip.py --tower spectrum --profile 2   # where the time goes, by category
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from encoders.astroclip.collate import random_patch_mask, segment_mask
from encoders.astroclip.family import FAMILY
from encoders.astroclip.loss import masked_mse
from encoders.astroclip.model import (
    AstroCLIP,
    AstroCLIPConfig,
    ImageTowerConfig,
    SpectrumTowerConfig,
)
from foundation.config import OptimSection
from foundation.train.optim import build_optimizer
from foundation.train.trainer import global_grad_norm

REFERENCE, OURS, COMPILED = "reference-style", "ours", "ours + torch.compile"
SAME_FUNCTION = "ours, mask tokens through the encoder"
"""The image tower with the reference's masking (same function, so the attention and code speed-up
alone); OURS is the default `encode_visible_only` (MAE) step, which computes less."""

# ----------------------------------------------------------------------------- reference-style


def reference_slices(x: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """SpecFormer._slice: (B, L) → (B, T, patch) from a Python list of slices and torch.cat."""
    x = x[..., None]
    starts = np.arange(0, x.shape[1] - (patch - stride), stride)
    sections = [x[:, s : s + patch].transpose(1, 2) for s in starts]
    return torch.cat([s for s in sections if s.shape[2] == patch], 1)


def reference_segment_masks(
    batch: int, tokens: int, segments: int, length: int, generator: torch.Generator
) -> torch.Tensor:
    """SpecFormer._mask_seq's draw: per sample, per segment, one torch.randint in a Python loop."""
    masks = torch.zeros(batch, tokens, dtype=torch.bool)
    seg = tokens // segments
    for row in range(batch):
        for s in range(segments):
            start = s * seg + int(torch.randint(0, seg - length + 1, (1,), generator=generator))
            masks[row, start : start + length] = True
    return masks


def reference_apply_mask(h: torch.Tensor, token_mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """SpecFormer.mask_sequence: clone each sample and overwrite its masked tokens, then stack."""
    rows = []
    for row, mask in zip(h, token_mask, strict=True):
        row = row.clone()
        row[mask] = mask_token.to(row.dtype)
        rows.append(row)
    return torch.stack(rows)


def reference_specformer_attention(attn, x: torch.Tensor, training: bool) -> torch.Tensor:
    """astroclip/modules.py SelfAttention.forward (PyTorch >= 2 branch)."""
    b, t, c = x.shape
    p = attn.dropout.p
    q, k, v = attn.qkv(x).split(c, dim=2)
    nh, hs = attn.heads, c // attn.heads
    k = k.view(b, t, nh, hs).transpose(1, 2)
    q = q.view(b, t, nh, hs).transpose(1, 2)
    v = v.view(b, t, nh, hs).transpose(1, 2)
    y = F.scaled_dot_product_attention(
        q, k, v, attn_mask=None, dropout_p=p if training else 0.0, is_causal=False
    )
    y = y.transpose(1, 2).contiguous().view(b, t, c)
    return F.dropout(attn.proj(y), p, training)


def reference_mlp(mlp, x: torch.Tensor, training: bool) -> torch.Tensor:
    """astroclip/modules.py MLP (encoder, GELU, decoder, dropout); dinov2 Mlp with drop=0 alike."""
    encoder, activation, decoder, dropout = mlp
    return F.dropout(decoder(activation(encoder(x))), dropout.p, training)


def reference_spectrum_loss(model: AstroCLIP, batch: dict) -> torch.Tensor:
    tower, training = model.spectrum, model.training
    x, good, stats = tower.standardise(batch["spectrum"], batch.get("spectrum_bad"))
    target = reference_slices(x, tower.patch, tower.stride)
    weight = reference_slices(good, tower.patch, tower.stride)
    h = tower.embed(torch.cat([target, 1.0 - weight], dim=-1))
    h = reference_apply_mask(h, batch["spectrum_token_mask"], tower.mask_token)
    h = torch.cat([tower.stats_embed(stats)[:, None], h], dim=1)
    h = h + F.embedding(torch.arange(h.shape[1], device=h.device), tower.pos[0])
    for block in tower.encoder.blocks:
        h = h + reference_specformer_attention(block.attn, block.norm1(h), training)
        h = h + reference_mlp(block.mlp, block.norm2(h), training)
    h = tower.encoder.norm(h)
    prediction = model.spectrum_decoder(h[:, 1:])
    return masked_mse(prediction, target, batch["spectrum_token_mask"], weight)


def reference_dinov2_attention(attn, x: torch.Tensor, training: bool) -> torch.Tensor:
    """dinov2/layers/attention.py Attention.forward (attn_drop = proj_drop = our dropout, 0)."""
    b, n, c = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.heads, c // attn.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (c // attn.heads) ** -0.5, qkv[1], qkv[2]
    a = q @ k.transpose(-2, -1)
    a = F.dropout(a.softmax(dim=-1), attn.dropout.p, training)
    x = (a @ v).transpose(1, 2).reshape(b, n, c)
    return F.dropout(attn.proj(x), attn.dropout.p, training)


def reference_image_loss(model: AstroCLIP, batch: dict) -> torch.Tensor:
    tower, training = model.image, model.training
    x, log_scale = tower.standardise(batch["image"])
    h = tower.patch_embed(x).flatten(2).transpose(1, 2)
    mask = batch["image_token_mask"]
    h = torch.where(mask.unsqueeze(-1), tower.mask_token.to(h.dtype).unsqueeze(0), h)
    h = torch.cat((tower.cls.expand(h.shape[0], -1, -1), tower.scale_embed(log_scale)[:, None], h), dim=1)
    h = h + tower.pos
    for block in tower.encoder.blocks:
        h = h + reference_dinov2_attention(block.attn, block.norm1(h), training)
        h = h + reference_mlp(block.mlp, block.norm2(h), training)
    h = tower.encoder.norm(h)
    prediction = model.image_decoder(h[:, 2:])
    return masked_mse(prediction, tower.patches(x), mask)


def reference_loss(model: AstroCLIP, batch: dict) -> torch.Tensor:
    if model.stage == "spectrum_masked":
        return reference_spectrum_loss(model, batch)
    if model.stage == "image_masked":
        return reference_image_loss(model, batch)
    raise ValueError(f"no reference-style step for stage {model.stage!r}")


def ours_loss(model: AstroCLIP, batch: dict) -> torch.Tensor:
    return FAMILY.loss(model, batch)[0]


# ----------------------------------------------------------------------------- batches


def spectrum_batch(flux: torch.Tensor, mask: torch.Tensor) -> dict:
    return {
        "spectrum": flux,
        "spectrum_bad": torch.zeros_like(flux, dtype=torch.bool),
        "spectrum_token_mask": mask,
    }


def batch_makers(
    cfg: AstroCLIPConfig, batch: int, seed: int
) -> tuple[dict[str, Callable[[], dict]], Callable[[], dict]]:
    """Per implementation, a function drawing the next training batch (the same data; masks drawn
    the implementation's way), and one fixed batch for the equivalence check."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    if cfg.stage == "spectrum_masked":
        s = cfg.spectrum
        flux = torch.randn(batch, s.length, generator=g) + 3.0

        def ours() -> dict:
            masks = np.stack(
                [segment_mask(s.tokens, s.mask_segments, s.mask_length, rng) for _ in range(batch)]
            )
            return spectrum_batch(flux, torch.from_numpy(masks))

        def reference() -> dict:
            return spectrum_batch(
                flux, reference_segment_masks(batch, s.tokens, s.mask_segments, s.mask_length, g)
            )

        fixed = ours()
        return {REFERENCE: reference, OURS: ours}, lambda: fixed
    i = cfg.image
    images = torch.rand(batch, len(i.bands), i.size, i.size, generator=g)
    patches = (i.size // i.patch) ** 2

    def image() -> dict:  # DINOv2 draws its masks in the collate as well
        masks = np.stack([random_patch_mask(patches, i.mask_ratio, rng) for _ in range(batch)])
        return {"image": images, "image_token_mask": torch.from_numpy(masks)}

    fixed = image()
    return {REFERENCE: image, OURS: image}, lambda: fixed


# ----------------------------------------------------------------------------- measuring


def check_equivalence(model: AstroCLIP, batch: dict) -> float:
    """Relative difference of the two losses with dropout off (fp32): same function, or abort."""
    model.eval()
    with torch.no_grad():
        ours, ref = float(ours_loss(model, batch)), float(reference_loss(model, batch))
    model.train()
    rel = abs(ours - ref) / max(abs(ref), 1e-12)
    if not rel < 1e-4:
        raise SystemExit(f"reference-style and ours disagree: loss {ref} vs {ours} (rel. {rel:.2e})")
    return rel


class Trainer:
    """One optimiser step exactly as foundation.train does it, for a given loss function."""

    def __init__(self, model: AstroCLIP):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, OptimSection())

    def step(self, loss_fn: Callable, batch: dict, precision: str, profile: bool = False) -> None:
        phase = (
            (lambda name: torch.profiler.record_function(f"phase:{name}"))
            if profile
            else (lambda name: contextlib.nullcontext())
        )
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        with phase("forward"), autocast:
            loss = loss_fn(self.model, batch)
        with phase("backward"):
            loss.backward()
        with phase("clip"):
            global_grad_norm(self.params, 1.0)
        with phase("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def categorise(event, tokens: int) -> str:
    """Category of one profiler event's self time (attention = anything on (…, T, T) tensors)."""
    chain, parent = [event.name], event.cpu_parent
    while parent is not None:
        chain.append(parent.name)
        parent = parent.cpu_parent
    phases = [n.split(":", 1)[1] for n in chain if n.startswith("phase:")]
    if phases and phases[0] in ("clip", "optimizer"):
        return {"clip": "gradient clipping", "optimizer": "AdamW (fused)"}[phases[0]]
    text = " ".join(chain)
    shapes = [s for s in (event.input_shapes or []) if isinstance(s, list | tuple) and len(s) >= 2]
    if any(
        key in text for key in ("scaled_dot_product", "ScaledDotProduct", "Softmax", "softmax", "bmm", "Bmm")
    ) or any(list(s[-2:]) == [tokens, tokens] for s in shapes):
        return "attention"
    if event.name in ("aten::mm", "aten::addmm"):
        return "linear layers (GEMM)"
    if "dropout" in text or event.name == "aten::bernoulli_":
        return "dropout (residual, MLP)"
    if "layer_norm" in text:
        return "LayerNorm"
    if "gelu" in text.lower():
        return "GELU"
    if "convolution" in text:
        return "patch embedding (conv)"
    return "other (copies, casts, adds, loss, ...)"


def profile_step(trainer: Trainer, loss_fn, batch: dict, precision: str, tokens: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        trainer.step(loss_fn, batch, precision, profile=True)
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.name.startswith("phase:"):
            continue
        totals[categorise(event, tokens)] += event.self_cpu_time_total / 1e3
    return dict(totals)


def implementations(cfg: AstroCLIPConfig, args) -> tuple[dict[str, tuple[Trainer, Callable]], AstroCLIP]:
    """Per implementation its trainer (model + optimiser) and loss; and the model the reference
    shares (same parameters, same function). For the image tower with `encode_visible_only`, OURS
    is an MAE model whose encoder starts from the same weights."""
    mae = cfg.stage == "image_masked" and cfg.image.encode_visible_only
    torch.manual_seed(args.seed)
    shared_cfg = replace(cfg, image=replace(cfg.image, encode_visible_only=False)) if mae else cfg
    shared = Trainer(AstroCLIP(shared_cfg).train())
    impls: dict[str, tuple[Trainer, Callable]] = {REFERENCE: (shared, reference_loss)}
    if mae:
        model = AstroCLIP(cfg).train()
        model.image.load_state_dict(shared.model.image.state_dict())
        impls[SAME_FUNCTION] = (shared, ours_loss)
        impls[OURS] = (Trainer(model), ours_loss)
    else:
        impls[OURS] = (shared, ours_loss)
    if args.compile:
        impls[COMPILED] = (impls[OURS][0], torch.compile(ours_loss))
    return impls, shared.model


def run_tower(name: str, cfg: AstroCLIPConfig, args) -> tuple[list[dict], list[str]]:
    impls, shared = implementations(cfg, args)
    makers, fixed = batch_makers(cfg, args.batch, args.seed)
    next_batch = {impl: makers[REFERENCE if impl == REFERENCE else OURS] for impl in impls}
    rel = check_equivalence(shared, fixed())
    notes = [
        f"{name}: reference-style and ours give the same loss with dropout off "
        f"(relative difference {rel:.1e})"
    ]
    modes = [(impl, prec) for prec in args.precision for impl in impls]
    for impl, prec in modes:  # warm-up: allocations, kernel selection, optimiser state, compilation
        trainer, loss_fn = impls[impl]
        for _ in range(args.warmup):
            trainer.step(loss_fn, next_batch[impl](), prec)
    times: dict[tuple[str, str], list[tuple[float, float]]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for impl, prec in modes if r % 2 == 0 else modes[::-1]:
            trainer, loss_fn = impls[impl]
            for _ in range(args.steps):
                batch = next_batch[impl]()  # mask drawing counts: the reference draws them in its step
                t0, c0 = time.perf_counter(), time.process_time()
                trainer.step(loss_fn, batch, prec)
                times[(impl, prec)].append((time.perf_counter() - t0, time.process_time() - c0))
    rows = []
    for impl, prec in modes:
        wall = np.array([w for w, _ in times[(impl, prec)]])
        cpu = np.array([c for _, c in times[(impl, prec)]])
        ref_wall = np.median([w for w, _ in times[(REFERENCE, prec)]])
        ref_cpu = np.median([c for _, c in times[(REFERENCE, prec)]])
        rows.append(
            {
                "tower": name,
                "params_M": sum(p.numel() for p in impls[impl][0].model.parameters()) / 1e6,
                "precision": prec,
                "impl": impl,
                "step_s": float(np.median(wall)),
                "step_range": (float(wall.min()), float(wall.max())),
                "samples_per_s": args.batch / float(np.median(wall)),
                "samples_per_cpu_s": args.batch / float(np.median(cpu)),
                "speedup_wall": float(ref_wall / np.median(wall)),
                "speedup_cpu": float(ref_cpu / np.median(cpu)),
            }
        )
    if args.profile:
        tokens = (
            cfg.spectrum.tokens + 1
            if cfg.stage == "spectrum_masked"
            else 2 + (cfg.image.size // cfg.image.patch) ** 2
        )
        shares: dict[tuple[str, str], dict[str, float]] = {m: defaultdict(float) for m in modes}
        for r in range(args.profile):  # interleaved like the timing, summed
            for impl, prec in modes if r % 2 == 0 else modes[::-1]:
                trainer, loss_fn = impls[impl]
                for category, ms in profile_step(trainer, loss_fn, next_batch[impl](), prec, tokens).items():
                    shares[(impl, prec)][category] += ms / args.profile
        for impl, prec in modes:
            total = sum(shares[(impl, prec)].values())
            notes.append(
                f"profile, {name}, {impl}, {prec}: {total / 1e3:.2f} s of op self time per step "
                f"(mean of {args.profile})"
            )
            for category, ms in sorted(shares[(impl, prec)].items(), key=lambda kv: -kv[1]):
                notes.append(f"    {category:40s} {ms:9.1f} ms  {100 * ms / total:5.1f} %")
    return rows, notes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tower", choices=("spectrum", "image", "both"), default="both")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="Timed steps per round and implementation.")
    p.add_argument("--rounds", type=int, default=3, help="Interleaved rounds (ABBA order).")
    p.add_argument(
        "--warmup", type=int, default=1, help="Untimed steps per implementation before the rounds."
    )
    p.add_argument(
        "--precision",
        type=lambda s: s.split(","),
        default=["fp32"],
        help="fp32, bf16 (CPU autocast, both sides) or fp32,bf16.",
    )
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--image-depth", type=int, default=24, help="ViT blocks (paper ViT-L: 24).")
    p.add_argument("--compile", action="store_true", help="Add ours under torch.compile (inductor).")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="Profile N steps per implementation (time by category).",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not set(args.precision) <= {"fp32", "bf16"}:
        p.error(f"--precision takes fp32, bf16 or fp32,bf16, not {','.join(args.precision)}")
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    rows, notes = [], []
    if args.tower in ("spectrum", "both"):
        cfg = AstroCLIPConfig(stage="spectrum_masked", spectrum=SpectrumTowerConfig())
        s = cfg.spectrum
        r, n = run_tower(
            f"SpecFormer ({s.length} px, {s.tokens}+1 tokens, w{s.width} d{s.depth} h{s.heads})", cfg, args
        )
        rows, notes = rows + r, notes + n
    if args.tower in ("image", "both"):
        cfg = AstroCLIPConfig(stage="image_masked", image=ImageTowerConfig(depth=args.image_depth))
        i = cfg.image
        tokens = 2 + (i.size // i.patch) ** 2
        r, n = run_tower(
            f"ViT image tower ({i.size} px / {i.patch}, {tokens} tokens, w{i.width} d{i.depth} h{i.heads})",
            cfg,
            args,
        )
        rows, notes = rows + r, notes + n
    print()
    for note in notes:
        print(note)
    print(
        f"\nCPU training step (forward, backward, clip, fused AdamW), batch {args.batch}, "
        f"{args.threads} threads, median of {args.rounds} interleaved rounds x {args.steps} steps "
        f"after {args.warmup} warm-up step(s); "
        f"1-min load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    print(
        "| tower | params (M) | precision | implementation | s/step (median; min-max) | samples/s (wall) "
        "| samples/CPU-s | speed-up (wall) | speed-up (CPU) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["step_range"]
        print(
            f"| {r['tower']} | {r['params_M']:.1f} | {r['precision']} | {r['impl']} | "
            f"{r['step_s']:.2f} ({lo:.2f}-{hi:.2f}) | {r['samples_per_s']:.3f} | "
            f"{r['samples_per_cpu_s']:.3f} | "
            f"{r['speedup_wall']:.2f}x | {r['speedup_cpu']:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
