"""Trainer overhead: samples/s of `foundation.train.train` against a bare training loop.

    python benchmarks/trainer.py [--width 128] [--depth 2] [--length 32] [--batch-size 32]
                                 [--steps 60] [--workers 0] [--rounds 3] [--threads 1]

Both loops train the same model (a pre-LN transformer regressor built here, registered as a family
at run time) from the same shard set through the same `ShardDataset` + `StatefulDataLoader`, with
AdamW and the same seed. The bare loop is `next(batch)`, forward, loss, backward, `optimizer.step()`,
`zero_grad()` — nothing else. The trainer loop is the real `train()`: gradient clipping, the
non-finite guard and stop-flag checks, lr schedule, metrics records every 10 steps, the progress
machinery (no checkpoints before the end, no validation). Throughput is measured the same way for
both: samples between step 10 and the last step divided by the wall time between them (the
trainer's from the `time` field of its metrics records, which counts everything between steps),
so start-up, worker spawn and the final checkpoint/export are outside both measurements. Both
wall-clock samples/s and samples per CPU-second of this process are reported: on a shared machine
the CPU-time ratio (with --workers 0 all the work is in this process) is the stable number. Rounds
alternate the two loops; the best round of each and the median of the per-round ratios are
reported. Target: ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from foundation import registry
from foundation.config import from_dict, load_pretrain_config, option
from foundation.registry import Family


@dataclasses.dataclass
class BenchConfig:
    features: int = option(16, "Features per token.")
    width: int = option(256, "Width.")
    heads: int = option(4, "Heads.")
    depth: int = option(4, "Blocks.")
    length: int = option(64, "Tokens per sample.")


class BenchNet(nn.Module):
    def __init__(self, cfg: BenchConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.features, cfg.width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                cfg.width, cfg.heads, 4 * cfg.width, 0.0, batch_first=True, norm_first=True
            )
            for _ in range(cfg.depth)
        )
        self.head = nn.Linear(cfg.width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(dim=1)).sum(-1)


def bench_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    prediction = model(batch["x"])
    return F.mse_loss(prediction, batch["y"].float()), {}


FAMILY = Family(
    name="bench-transformer",
    model_config=BenchConfig,
    build_model=lambda cfg, manifest: BenchNet(cfg),
    loss=bench_loss,
)


def write_shards(path: Path, n: int, cfg: BenchConfig) -> None:
    from foundation.data import ShardWriter

    rng = np.random.default_rng(0)
    with ShardWriter(path, split="train", samples_per_shard=256, family=FAMILY.name) as writer:
        for i in range(n):
            x = rng.normal(size=(cfg.length, cfg.features)).astype(np.float32)
            writer.write({"__key__": f"s{i:06d}", "x": x, "y": float(x.mean())})


def bare_loop(cfg, family, steps: int, skip: int) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second) of the minimal loop over the same loader."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from foundation.data import Manifest, ShardDataset

    torch.manual_seed(cfg.run.seed)
    manifest = Manifest.load(cfg.data.path)
    model = family.build_model(cfg.model, manifest)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, fused=True)
    collate = family.make_collate(cfg.model, manifest, True) if family.make_collate else None
    dataset = ShardDataset(
        cfg.data.path,
        "train",
        batch_size=cfg.data.batch_size,
        seed=cfg.run.seed,
        epochs=None,
        collate_fn=collate,
    )
    with warnings.catch_warnings():  # torchdata 0.11's deprecated set_vital call
        warnings.simplefilter("ignore", UserWarning)
        loader = StatefulDataLoader(
            dataset,
            batch_size=None,
            num_workers=cfg.data.num_workers,
            prefetch_factor=cfg.data.prefetch if cfg.data.num_workers else None,
        )
    batches = iter(loader)
    model.train()
    samples, wall, cpu = 0, 0.0, 0.0
    for step in range(steps):
        if step == skip:
            wall, cpu, samples = time.perf_counter(), time.process_time(), 0
        batch = next(batches)
        loss, _ = family.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        samples += len(batch["__key__"])
    return samples / (time.perf_counter() - wall), samples / (time.process_time() - cpu)


def trainer_loop(cfg, skip: int) -> tuple[float, float]:
    """The same two rates for `train()`, read at its metrics records of step `skip` and the last
    step (the benchmark notes this process's CPU time as each record is written)."""
    from foundation.train import metrics, train

    marks: dict[int, tuple[float, float]] = {}
    original = metrics.MetricsWriter.write

    def write(self, record):
        marks[record["step"]] = (time.perf_counter(), time.process_time())
        original(self, record)

    metrics.MetricsWriter.write = write
    try:
        train(cfg)
    finally:
        metrics.MetricsWriter.write = original
    last = cfg.train.steps
    samples = (last - skip) * cfg.data.batch_size * cfg.train.grad_accum
    (wall0, cpu0), (wall1, cpu1) = marks[skip], marks[last]
    return samples / (wall1 - wall0), samples / (cpu1 - cpu0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch default)")
    args = parser.parse_args()
    if args.steps % 10 or args.steps < 30:
        parser.error("--steps must be a multiple of 10 and >= 30 (metrics are recorded every 10 steps)")
    if args.threads:
        torch.set_num_threads(args.threads)
    registry.register(FAMILY)
    model_cfg = BenchConfig(width=args.width, depth=args.depth, length=args.length)

    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    try:
        shards = work / "shards"
        write_shards(shards, n=max(1024, 4 * args.batch_size), cfg=model_cfg)

        def config(run: int):
            overrides = [
                f"family={FAMILY.name}",
                f"data.path={shards}",
                f"data.batch_size={args.batch_size}",
                f"data.num_workers={args.workers}",
                "data.val_split=null",
                f"run.dir={work / f'run{run}'}",
                f"train.steps={args.steps}",
                "train.log_every=10",
                "train.ckpt_every=0",
                "train.val_every=0",
                "train.progress=false",
                "train.tensorboard=false",
                "optim.warmup_steps=5",
            ]
            cfg = load_pretrain_config(None, overrides)
            cfg.model = from_dict(BenchConfig, dataclasses.asdict(model_cfg))
            return cfg

        bare, trainer = [], []
        for round_ in range(args.rounds):
            bare.append(bare_loop(config(round_), FAMILY, args.steps, skip=10))
            trainer.append(trainer_loop(config(round_), skip=10))
            print(
                f"round {round_ + 1}: bare {bare[-1][0]:.1f} samples/s ({bare[-1][1]:.1f} per CPU-s), "
                f"trainer {trainer[-1][0]:.1f} samples/s ({trainer[-1][1]:.1f} per CPU-s)"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n_params = sum(p.numel() for p in BenchNet(model_cfg).parameters())
    print()
    print(
        f"model: transformer width {args.width}, depth {args.depth}, {args.length} tokens, "
        f"{n_params / 1e6:.2f} M parameters; batch {args.batch_size}; {args.workers} loader worker(s); "
        f"{torch.get_num_threads()} thread(s); {args.steps} steps (first 10 not timed); best of {args.rounds}"
    )
    print("| loop | samples/s, wall (best) | samples per CPU-second (best) | all rounds, wall |")
    print("|---|---|---|---|")
    for name, rates in (("bare forward/backward/step", bare), ("foundation trainer", trainer)):
        walls = ", ".join(f"{w:.1f}" for w, _ in rates)
        print(f"| {name} | {max(w for w, _ in rates):.1f} | {max(c for _, c in rates):.1f} | {walls} |")
    wall_ratio = max(w for w, _ in trainer) / max(w for w, _ in bare)
    cpu_ratio = max(c for _, c in trainer) / max(c for _, c in bare)
    print(f"| ratio trainer / bare (best / best) | {wall_ratio:.3f} | {cpu_ratio:.3f} | target >= 0.95 |")
    # Each round runs the two loops back to back: the median of per-round ratios cancels slow drifts.
    paired_wall = float(np.median([t[0] / b[0] for t, b in zip(trainer, bare, strict=True)]))
    paired_cpu = float(np.median([t[1] / b[1] for t, b in zip(trainer, bare, strict=True)]))
    print(f"| ratio trainer / bare (median of rounds) | {paired_wall:.3f} | {paired_cpu:.3f} | |")


if __name__ == "__main__":
    main()
