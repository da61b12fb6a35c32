"""Export throughput: `foundation export` samples/s against the bare model forward on the same batches.

    python benchmarks/export.py [--data SHARDS --checkpoint RUN] [--config YAML] [--n 1024]
                                [--batch-size 64] [--workers 0,1,2] [--rounds 3]

The bare forward is `Family.embed(model, batch)` under `torch.inference_mode` on batches that were
loaded and collated beforehand and sit in memory: the upper bound an exporter can reach. The export
is the whole `foundation.export.export_embeddings` (shard reading, the family's collate in loader
workers, the forward, device-to-host copies, chunked HDF5 writes, the final rename) into a fresh
file. Rounds alternate the two and the best time of each is kept, which damps the noise of a shared
machine; the ratio is the number that matters (target >= 0.8).

Without --data/--checkpoint it makes its own data: `foundation synth astroclip` + `prepare` (--n
objects, the demo's recipe) in a temporary directory, and a randomly initialised model built from
--config (default configs/astroclip/align-tiny.yaml, with no pretrained tower to load).

`--released` measures the released AstroCLIP instead: the architecture `foundation convert
astroclip` makes of the published checkpoint (DINOv2 ViT-L/12 + SpecFormer, variant `reference`),
with random weights (the same computation), on data prepared for it (use
`--config configs/astroclip/align-paper.yaml`: 152-pixel cutouts, the DESI grid).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # for the default config path


def make_data(workdir: Path, n: int, config: Path) -> Path:
    from pipelines.demo import data_recipe, prepare_argv, synth_argv

    recipe = data_recipe(str(config))
    survey, shards = workdir / "survey", workdir / "shards"
    run = [sys.executable, "-m", "foundation.cli"]
    subprocess.run([*run, *synth_argv(survey, n, recipe)], check=True, capture_output=True)
    subprocess.run([*run, *prepare_argv(survey, shards, recipe)], check=True, capture_output=True)
    return shards


def load(args: argparse.Namespace, shards: Path):
    import torch

    from foundation import config, registry
    from foundation.data import Manifest
    from foundation.export import LoadedModel, load_model

    if args.checkpoint:
        return load_model(args.checkpoint)
    if args.released:
        return released_astroclip(shards)
    data = config.read_yaml(args.config)
    model_section = data.get("model") or {}
    model_section.pop("spectrum_init", None)
    model_section.pop("image_init", None)
    cfg = config.load_pretrain_config(None, [f"family={data['family']}", f"data.path={shards}"])
    family = registry.get(data["family"])
    cfg.model = config.from_dict(family.model_config, model_section, "model")
    torch.manual_seed(0)
    model = family.build_model(cfg.model, Manifest.load(shards)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, cfg, family, f"random-init:{args.config}")


def released_astroclip(shards: Path):
    """The released AstroCLIP's architecture and variant (as converted), random weights."""
    import torch

    from encoders.astroclip.convert import (
        REFERENCE_HEAD_DROPOUT,
        REFERENCE_HEAD_HEADS,
        REFERENCE_LOGIT_SCALE,
        RELEASED_BANDS,
    )
    from encoders.astroclip.model import AstroCLIPConfig, ImageTowerConfig, SpectrumTowerConfig
    from foundation import config, registry
    from foundation.export import LoadedModel

    model_cfg = AstroCLIPConfig(
        stage="align",
        spectrum=SpectrumTowerConfig(dropout=0.0),
        image=ImageTowerConfig(bands=list(RELEASED_BANDS), dropout=0.0),
        embed_dim=1024,
        head_heads=REFERENCE_HEAD_HEADS,
        head_mlp_ratio=4.0,
        head_dropout=REFERENCE_HEAD_DROPOUT,
        temperature=1.0 / REFERENCE_LOGIT_SCALE,
        freeze_spectrum=True,
        freeze_image=True,
        variant="reference",
    )
    cfg = config.load_pretrain_config(None, ["family=astroclip", f"data.path={shards}"])
    cfg.model = model_cfg
    family = registry.get("astroclip")
    torch.manual_seed(0)
    model = family.build_model(model_cfg, None).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, cfg, family, "released-architecture:random-weights")


def bare_batches(loaded, shards: Path, batch_size: int) -> list:
    """Every batch of every split, collated by the family's evaluation collate, in memory."""
    from foundation.data import Manifest, ShardDataset

    manifest = Manifest.load(shards)
    collate = (
        loaded.family.make_collate(loaded.config.model, manifest, False)
        if loaded.family.make_collate
        else None
    )
    batches = []
    for split in sorted(manifest.splits):
        batches.extend(ShardDataset.in_order(shards, split, batch_size, collate))
    return batches


def time_bare(loaded, batches: list) -> tuple[float, int]:
    import torch

    n = 0
    with torch.inference_mode():
        loaded.family.embed(loaded.model, batches[0])  # warm-up
        start = time.perf_counter()
        for batch in batches:
            out = loaded.family.embed(loaded.model, batch)
            for v in out.values():
                v.float().cpu()
            n += len(batch["__key__"])
    return time.perf_counter() - start, n


def time_export(loaded, shards: Path, out: Path, batch_size: int, workers: int) -> tuple[float, int]:
    from foundation.export import ExportSettings, export_embeddings

    settings = ExportSettings(batch_size=batch_size, num_workers=workers, overwrite=True, progress=False)
    start = time.perf_counter()
    result = export_embeddings(loaded, shards, out, settings)
    return time.perf_counter() - start, result.new_rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="Shard set (default: make one with synth + prepare).")
    parser.add_argument("--checkpoint", help="Model to export with (default: random init from --config).")
    parser.add_argument("--config", default=str(REPO / "configs/astroclip/align-tiny.yaml"))
    parser.add_argument(
        "--released", action="store_true", help="The released AstroCLIP's architecture (see above)."
    )
    parser.add_argument("--n", type=int, default=1024, help="Objects to synthesise when --data is not given.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default="0,1,2", help="Loader worker counts to measure.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)."
    )
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        tmp = Path(tmp)
        shards = Path(args.data) if args.data else make_data(tmp, args.n, Path(args.config))
        loaded = load(args, shards)
        batches = bare_batches(loaded, shards, args.batch_size)
        params = sum(p.numel() for p in loaded.model.parameters())
        objects = sum(len(b["__key__"]) for b in batches)
        print(
            f"# {loaded.family.name}, {params / 1e6:.2f} M parameters, {objects} "
            f"objects, batch {args.batch_size}, torch threads {torch.get_num_threads()}, device cpu, fp32"
        )
        print("| workers | bare forward samples/s | export samples/s | export / bare |")
        print("|---|---|---|---|")
        for workers in [int(w) for w in args.workers.split(",")]:
            bare, export = float("inf"), float("inf")
            for _ in range(args.rounds):
                t, n_bare = time_bare(loaded, batches)
                bare = min(bare, t)
                t, n_export = time_export(loaded, shards, tmp / "emb.h5", args.batch_size, workers)
                export = min(export, t)
            assert n_bare == n_export, (n_bare, n_export)
            print(
                f"| {workers} | {n_bare / bare:.1f} | {n_export / export:.1f} | {bare / export:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
