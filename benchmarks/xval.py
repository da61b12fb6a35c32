"""Training throughput of the xVal model (6 x 768) against a reference-style implementation.

"Reference style" follows PolymathicAI/xVal's Numformer: `nn.TransformerEncoder` (pre-LN, with
biases), a 2-layer MLP token head (d -> 4d -> V) and number head evaluated at every position,
batches padded to the longest sample with no attention mask. Ours: bias-free trunk through
`foundation.attention` (SDPA), tied token head and number head evaluated only at the masked
positions, and training batches packed first-fit into rows of max_len (no padding compute).

Both see the same samples (the built-in arithmetic + orbits corpora, prepared into shards, so
lengths vary like real text) and the same MLM masks, and the same optimiser (AdamW, fused,
as `foundation pretrain` builds it); steps of the two alternate in one process so a shared,
loaded machine slows both alike. Reported: real (non-padding) tokens per second of wall time and
of process CPU time, for the whole training step and for forward + backward alone (the
optimiser step is a fixed cost per step, the same for both up to the parameter count).

    python benchmarks/xval.py                   # 6 x 768, 64 samples per step, 2 rounds x 2 steps
    python benchmarks/xval.py --d-model 128 --layers 2 --batch-size 16   # quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from encoders.xval import synth
from encoders.xval.family import FAMILY
from encoders.xval.loss import xval_loss
from encoders.xval.model import XValConfig
from encoders.xval.prepare import PrepareOptions, prepare
from encoders.xval.tokenizer import MASK_ID, NUM_ID
from foundation.data import ShardDataset


class ReferenceNumformer(nn.Module):
    """The reference repository's model shape, re-expressed: nn.TransformerEncoder + MLP heads."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, ff: int, max_len: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d, heads, ff, dropout=0.0, activation=nn.GELU(), batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.lm_head = nn.Sequential(
            nn.Linear(d, ff, bias=False), nn.GELU(), nn.Linear(ff, vocab, bias=False)
        )
        self.num_head = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, 1))

    def forward(self, x, x_num):
        h = self.tok(x) * x_num.unsqueeze(-1) + self.pos.weight[: x.shape[1]].unsqueeze(0)
        h = self.encoder(h)
        return self.lm_head(h), self.num_head(h).squeeze(-1)


def reference_batch(samples_batch: dict, pad_id: int = 0) -> dict:
    """Re-lay a packed batch as the reference collator would: one sample per row, padded to the
    longest, masks carried over token for token (same masked tokens as our step)."""
    n = len(samples_batch["__key__"])
    sample = samples_batch["sample"]
    lengths = torch.bincount(sample[sample >= 0], minlength=n)
    width = int(lengths.max())
    x = torch.full((n, width), pad_id, dtype=torch.long)
    x_num = torch.ones(n, width)
    target = torch.zeros(n, width)
    mask = torch.zeros(n, width, dtype=torch.bool)
    for i in range(n):
        where = sample == i
        k = int(where.sum())
        x[i, :k] = samples_batch["ids"][where]
        x_num[i, :k] = samples_batch["num"][where]
        target[i, :k] = samples_batch["target"][where]
        mask[i, :k] = samples_batch["mlm_mask"][where]
    return {"x": x, "x_num": x_num, "target": target, "mask": mask, "real": int(lengths.sum())}


def reference_loss(model: nn.Module, b: dict) -> torch.Tensor:
    y = b["x"].clone()
    x = b["x"].masked_fill(b["mask"], MASK_ID)
    x_num = b["x_num"].masked_fill(b["mask"], 1.0)
    logits, num = model(x, x_num)
    ce = F.cross_entropy(logits[b["mask"]], y[b["mask"]])
    is_num = b["mask"] & (y == NUM_ID)
    mse = ((num - b["target"]) ** 2 * is_num).sum() / is_num.sum().clamp(min=1)
    return ce + mse


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="Steps per model per round.")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        records = list(synth.arithmetic(400, 0)) + list(synth.orbits(200, 0))
        synth.write_jsonl(iter(records), tmp / "mix.jsonl")
        manifest = prepare(
            [tmp / "mix.jsonl"],
            tmp / "shards",
            PrepareOptions(key_field="id", vocab_size=512, progress=False),
        )
        cfg = XValConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, max_len=args.max_len)
        ours = FAMILY.build_model(cfg, manifest).train()
        collate = FAMILY.make_collate(cfg, manifest, True)
        ds = ShardDataset(tmp / "shards", batch_size=args.batch_size, collate_fn=collate, epochs=None, seed=0)
        batches = iter(ds)
        vocab = ours.vocab_size
        ref = ReferenceNumformer(
            vocab, args.d_model, args.heads, args.layers, 4 * args.d_model, args.max_len
        ).train()
        opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
        opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-4, fused=True)

        def step_ours(batch):
            loss, _ = xval_loss(ours, batch, "mlm", cfg.mask_prob, 1.0)
            loss.backward()

        def step_ref(b):
            reference_loss(ref, b).backward()

        def update(opt):
            opt.step()
            opt.zero_grad(set_to_none=True)

        rows = {"ours": [], "reference": []}
        padded_fraction = []
        ours_slots = []
        # warm-up one step each (allocator, kernels)
        first = next(batches)
        step_ours(first)
        update(opt_ours)
        step_ref(reference_batch(first))
        update(opt_ref)
        for _ in range(args.rounds):
            for _ in range(args.steps):
                batch = next(batches)
                rb = reference_batch(batch)
                real = rb["real"]
                padded_fraction.append(1 - real / rb["x"].numel())
                ours_slots.append(batch["ids"].numel())
                w, c = timed(lambda b=batch: step_ours(b))
                w2, c2 = timed(lambda: update(opt_ours))
                rows["ours"].append((real, w + w2, c + c2, w, c))
                w, c = timed(lambda b=rb: step_ref(b))
                w2, c2 = timed(lambda: update(opt_ref))
                rows["reference"].append((real, w + w2, c + c2, w, c))

    n_params = ours.num_params(non_embedding=False) / 1e6
    ref_params = sum(p.numel() for p in ref.parameters()) / 1e6
    real_total = sum(r[0] for r in rows["ours"])
    print(
        f"xVal training throughput, d_model={args.d_model} layers={args.layers} heads={args.heads}, "
        f"{args.batch_size} samples per step, {torch.get_num_threads()} threads; "
        f"{args.rounds * args.steps} interleaved steps each; machine load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"token slots computed per real token: reference {1 / (1 - statistics.mean(padded_fraction)):.2f} "
        f"(padding to the longest sample), ours {sum(ours_slots) / real_total:.2f} (packed rows)"
    )
    print()
    print(
        "| implementation | params (M) | train step tokens/s (wall) | (CPU) | fwd+bwd tokens/s (wall) "
        "| (CPU) | s/step (median wall) |"
    )
    print("|---|---|---|---|---|---|---|")
    result = {}
    for key, name, params in (
        ("reference", "reference-style nn.TransformerEncoder", ref_params),
        ("ours", "foundation xVal", n_params),
    ):
        real = sum(r[0] for r in rows[key])
        sums = [sum(r[j] for r in rows[key]) for j in (1, 2, 3, 4)]
        result[key] = [real / s for s in sums]
        median = statistics.median(r[1] for r in rows[key])
        cells = " | ".join(f"{v:,.0f}" for v in result[key])
        print(f"| {name} | {params:.1f} | {cells} | {median:.1f} |")
    print()
    ratio = [o / r for o, r in zip(result["ours"], result["reference"], strict=True)]
    per_step = [r[1] / o[1] for o, r in zip(rows["ours"], rows["reference"], strict=True)]
    print(
        f"speed-up (ours / reference), train step: {ratio[0]:.2f}x wall, {ratio[1]:.2f}x CPU; "
        f"forward+backward: {ratio[2]:.2f}x wall, {ratio[3]:.2f}x CPU; "
        f"per interleaved step (wall) median {statistics.median(per_step):.2f}x "
        f"(min {min(per_step):.2f}, max {max(per_step):.2f})"
    )


if __name__ == "__main__":
    main()
