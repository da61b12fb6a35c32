"""Training throughput of the AstroCLIP towers on CPU: ours vs a reference-style implementation.

Both implementations share one set of weights (same architecture, same sizes: the paper's
SpecFormer — 7781-pixel DESI spectra, 778 slices + statistics token, width 768, 6 blocks, 6 heads —
and the paper's ViT-L/12 image tower on 144x144 g,r,z crops); rounds alternate between them in
one process, so machine load hits both alike. One training step = forward, masked-modelling loss,
backward and an AdamW update.

- reference-style: what the reference code runs — attention as explicit softmax(QKᵀ/√d)V with
  dropout on the attention probabilities, spectra sliced and masked with per-sample Python loops;
- ours (fp32): `foundation.attention` (SDPA's fused CPU kernel; attention probabilities are not
  dropped), vectorised slicing (`unfold`) and masks built in the loader workers;
- ours (bf16): the same under CPU bf16 autocast (AMX / AVX512-BF16 matmuls where the CPU has them).

    python benchmarks/astroclip.py                 # both towers, paper sizes
    python benchmarks/astroclip.py --tower spectrum --steps 3 --batch 2
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoders.astroclip import towers  # noqa: E402
from encoders.astroclip.augment import random_patch_mask, segment_mask  # noqa: E402
from encoders.astroclip.family import FAMILY  # noqa: E402
from encoders.astroclip.model import AstroCLIP, AstroCLIPConfig, ImageTowerConfig, SpectrumTowerConfig  # noqa: E402


def explicit_attention(dropout_p: float):
    """The reference's attention: explicit softmax, dropout on the probabilities."""

    def attend(q, k, v, **_):
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = F.dropout(F.softmax(att, dim=-1), p=dropout_p, training=True)
        return att @ v

    return attend


@contextlib.contextmanager
def reference_attention(dropout_p: float):
    original = towers.attention
    towers.attention = explicit_attention(dropout_p)
    try:
        yield
    finally:
        towers.attention = original


def reference_spectrum_batch(flux: torch.Tensor, cfg: SpectrumTowerConfig, rng: np.random.Generator) -> dict:
    """Reference-style preprocessing: slices by a Python list, masks drawn per sample in a loop."""
    starts = np.arange(0, flux.shape[1] - cfg.stride, cfg.patch - cfg.stride)
    sections = [flux[:, s : s + cfg.patch] for s in starts]
    sections = [s for s in sections if s.shape[1] == cfg.patch]
    _ = torch.stack(sections, 1)  # the reference's sliced input (its model then re-embeds it)
    masks = []
    for _row in range(len(flux)):
        m = torch.zeros(cfg.tokens, dtype=torch.bool)
        seg = cfg.tokens // cfg.mask_segments
        for s in range(cfg.mask_segments):
            start = s * seg + int(rng.integers(0, seg - cfg.mask_length + 1))
            m[start : start + cfg.mask_length] = True
        masks.append(m)
    return {
        "spectrum": flux,
        "spectrum_bad": torch.zeros_like(flux, dtype=torch.bool),
        "spectrum_token_mask": torch.stack(masks),
    }


def ours_spectrum_batch(flux: torch.Tensor, cfg: SpectrumTowerConfig, rng: np.random.Generator) -> dict:
    masks = np.stack(
        [segment_mask(cfg.tokens, cfg.mask_segments, cfg.mask_length, rng) for _ in range(len(flux))]
    )
    return {
        "spectrum": flux,
        "spectrum_bad": torch.zeros_like(flux, dtype=torch.bool),
        "spectrum_token_mask": torch.from_numpy(masks),
    }


def image_batch(images: torch.Tensor, cfg: ImageTowerConfig, rng: np.random.Generator) -> dict:
    patches = (cfg.size // cfg.patch) ** 2
    masks = np.stack([random_patch_mask(patches, cfg.mask_ratio, rng) for _ in range(len(images))])
    return {"image": images, "image_token_mask": torch.from_numpy(masks)}


def measure(model, optimizer, make_batch, mode: str, steps: int, rng) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per training step."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "ours (bf16)")
    attention = (
        reference_attention(
            model.cfg.spectrum.dropout if model.stage == "spectrum_masked" else model.cfg.image.dropout
        )
        if mode == "reference-style"
        else contextlib.nullcontext()
    )
    wall = cpu = 0.0
    with attention:
        for i in range(steps + 1):  # the first step warms up and is not timed
            t0, c0 = time.perf_counter(), time.process_time()
            batch = make_batch(rng)
            with autocast:
                loss, _ = FAMILY.loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i:
                wall += time.perf_counter() - t0
                cpu += time.process_time() - c0
    return wall / steps, cpu / steps


def run_tower(
    name: str, cfg: AstroCLIPConfig, make_batches, batch: int, steps: int, rounds: int
) -> list[dict]:
    torch.manual_seed(0)
    model = AstroCLIP(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    modes = ["reference-style", "ours (fp32)", "ours (bf16)"]
    results = {m: [] for m in modes}
    rng = np.random.default_rng(0)
    for r in range(rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            results[mode].append(measure(model, optimizer, make_batches[mode], mode, steps, rng))
    rows = []
    ref_wall = np.median([w for w, _ in results["reference-style"]])
    ref_cpu = np.median([c for _, c in results["reference-style"]])
    for mode in modes:
        wall = np.median([w for w, _ in results[mode]])
        cpu = np.median([c for _, c in results[mode]])
        rows.append(
            {
                "tower": name,
                "params_M": params,
                "mode": mode,
                "samples_per_s": batch / wall,
                "samples_per_cpu_s": batch / cpu,
                "speedup_wall": ref_wall / wall,
                "speedup_cpu": ref_cpu / cpu,
            }
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tower", choices=("spectrum", "image", "both"), default="both")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="Timed steps per round and mode.")
    p.add_argument("--rounds", type=int, default=3, help="Interleaved rounds (median reported).")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--image-depth", type=int, default=24, help="ViT blocks (paper ViT-L: 24).")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    if args.tower in ("spectrum", "both"):
        cfg = AstroCLIPConfig(stage="spectrum_masked", spectrum=SpectrumTowerConfig())
        flux = torch.randn(args.batch, cfg.spectrum.length) + 3.0
        makers = {
            "reference-style": lambda rng: reference_spectrum_batch(flux, cfg.spectrum, rng),
            "ours (fp32)": lambda rng: ours_spectrum_batch(flux, cfg.spectrum, rng),
            "ours (bf16)": lambda rng: ours_spectrum_batch(flux, cfg.spectrum, rng),
        }
        rows += run_tower(
            "SpecFormer (7781 px, 777+1 tokens, w768 d6)", cfg, makers, args.batch, args.steps, args.rounds
        )
    if args.tower in ("image", "both"):
        cfg = AstroCLIPConfig(stage="image_masked", image=ImageTowerConfig(depth=args.image_depth))
        images = torch.rand(args.batch, 3, cfg.image.size, cfg.image.size)
        makers = {
            m: (lambda rng: image_batch(images, cfg.image, rng))
            for m in ("reference-style", "ours (fp32)", "ours (bf16)")
        }
        rows += run_tower(
            f"ViT-L/12 image tower (144 px, 146 tokens, w1024 d{args.image_depth})",
            cfg,
            makers,
            args.batch,
            args.steps,
            args.rounds,
        )
    print(
        f"\nCPU training throughput, batch {args.batch}, {args.threads} threads, "
        f"median of {args.rounds} interleaved "
        f"rounds x {args.steps} steps (1-min load average at the end: {__import__('os').getloadavg()[0]:.1f})"
    )
    print(
        "| tower | params (M) | implementation | samples/s (wall) | samples/CPU-s "
        "| speed-up (wall) | speed-up (CPU) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['tower']} | {r['params_M']:.1f} | {r['mode']} | {r['samples_per_s']:.3f} | "
            f"{r['samples_per_cpu_s']:.3f} | {r['speedup_wall']:.2f}x | {r['speedup_cpu']:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
