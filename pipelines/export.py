"""`foundation export`: embed a shard set with a frozen pretrained model into an embeddings file.

    foundation export --checkpoint RUN --data SHARDS --out embeddings.h5 [--modalities image,spectrum]
    foundation export ... --part I --parts N        # one output part per array task / rank
    foundation export merge --out embeddings.h5     # concatenate the parts into embeddings.h5

The export itself is `foundation.export` (batched `Family.embed`, no grad, in the precision the
trainer would use: bf16 autocast on CUDA, and on the CPU when `--precision bf16` asks for it; rows
written in chunks to `<out>.partial`, renamed to `<out>` when complete; layout:
foundation/embeddings.py). This module parses the options, holds the output's lock, and merges parts.

Resume: re-running the same command continues an interrupted export; the rows already written are
identified by object id and skipped before the model sees them, and the checkpoint's weights hash,
config hash, data set and selection must match the interrupted run's.

Parts: `--part I --parts N` (or, under torchrun/srun, RANK and WORLD_SIZE) exports a disjoint
contiguous share of every split (the loader's rank interval with drop_last=False: every sample
exactly once over all parts) into `<stem>.part-0000I-of-0000N.h5`. Under torchrun the ranks meet at
a barrier and rank 0 merges; array jobs run `foundation export merge --out OUT` afterwards.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from foundation.cli import Command, add_progress_argument, progress_enabled
from foundation.errors import ConfigError, DataError
from foundation.export import (
    DEFAULT_CHUNK_ROWS,
    ExportSettings,
    check_output_path,
    export_embeddings,
    load_model,
)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", help="Run directory, checkpoints/step-N folder or model.pt (required)."
    )
    parser.add_argument("--data", help="Shard set to embed (directory with manifest.json) (required).")
    parser.add_argument("--out", help="Embeddings HDF5 file to write, e.g. embeddings.h5 (required).")
    parser.add_argument(
        "--modalities", help="Comma-separated modalities to keep (default: all the family embeds)."
    )
    parser.add_argument("--splits", help="Comma-separated splits (default: all splits of the shard set).")
    parser.add_argument(
        "--targets",
        help="Comma-separated target fields to store (default: the manifest's targets, else float scalars).",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="Samples per forward pass (default 64).")
    parser.add_argument(
        "--num-workers", type=int, help="Loader worker processes (default: 0 on CPU, up to 4 per GPU)."
    )
    parser.add_argument(
        "--part", type=int, help="This part's index (0-based); default: RANK under torchrun/srun, else 0."
    )
    parser.add_argument(
        "--parts", type=int, help="Number of parts; default: WORLD_SIZE under torchrun/srun, else 1."
    )
    parser.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available), cuda or cpu.")
    parser.add_argument(
        "--precision",
        default="auto",
        help="auto (bf16 on CUDA, fp32 on CPU), bf16 (CPU autocast too) or fp32.",
    )
    parser.add_argument("--normalize", action="store_true", help="L2-normalise the vectors before writing.")
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="Embed with a freshly initialised model of the checkpoint's architecture (a control).",
    )
    parser.add_argument("--seed", type=int, help="Seed of --random-init (default: the run's seed).")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="With --random-init: a config change for the fresh model (e.g. model.spectrum_init=null).",
    )
    parser.add_argument(
        "--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="Rows per HDF5 write (default 1024)."
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace an existing output (and any partial one)."
    )
    parser.add_argument("--no-merge", action="store_true", help="Under torchrun, leave the parts unmerged.")
    add_progress_argument(parser)


def _run(args: argparse.Namespace) -> int:
    from foundation.embeddings import find_parts, merge_embeddings, part_path
    from foundation.lock import FolderLock, command_line
    from foundation.train.distributed import read_launch

    missing = [f"--{name}" for name in ("checkpoint", "data", "out") if not getattr(args, name)]
    if missing:
        raise ConfigError(f"foundation export needs {', '.join(missing)} (see `foundation export --help`)")
    launch = read_launch()
    part = args.part if args.part is not None else (launch.rank if args.parts is None else 0)
    parts = args.parts if args.parts is not None else (launch.world_size if args.part is None else 1)
    if parts < 1 or not 0 <= part < parts:
        raise ConfigError(f"--part {part} is not in [0, --parts {parts})")
    out = Path(args.out)
    target = part_path(out, part, parts) if parts > 1 else out
    check_output_path(target)
    with FolderLock(target, command_line()):
        loaded = load_model(
            args.checkpoint, random_init=args.random_init, seed=args.seed, overrides=args.override
        )
        settings = ExportSettings(
            modalities=_csv(args.modalities),
            splits=_csv(args.splits),
            targets=_csv(args.targets),
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            part=part,
            parts=parts,
            device=args.device,
            local_rank=launch.local_rank,
            precision=args.precision,
            normalize=args.normalize,
            overwrite=args.overwrite,
            chunk_rows=args.chunk_rows,
            progress=progress_enabled(args.progress),
        )
        result = export_embeddings(loaded, args.data, target, settings)
    if result.complete_already:
        print(
            f"{target} is complete already, from this checkpoint, data and selection "
            "(pass --overwrite to export again)"
        )
    else:
        print(
            f"exported {result.rows} objects ({result.new_rows} new, {', '.join(result.modalities)}) "
            f"-> {result.path} "
            f"[{result.samples_per_s:.1f} samples/s]"
        )
    if parts > 1 and launch.world_size > 1 and launch.master_addr and not args.no_merge:
        _barrier_then_merge(launch, out, args.overwrite, find_parts, merge_embeddings)
    return 0


def _barrier_then_merge(launch: Any, out: Path, overwrite: bool, find_parts: Any, merge: Any) -> None:
    """torchrun/srun: wait for every rank's part (gloo barrier), then rank 0 merges them."""
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():  # gloo is enough for a barrier; srun sets no env:// variables
        tcp = f"tcp://{launch.master_addr}:{launch.master_port}"
        dist.init_process_group(
            "gloo",
            init_method="env://" if launch.launcher == "torchrun" else tcp,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(hours=24),
        )
    try:
        dist.barrier()
        if launch.rank == 0:
            if out.exists() and not overwrite:
                print(f"{out} exists already; not merging again")
            else:
                merged = merge(find_parts(out), out, overwrite=overwrite)
                print(f"merged {launch.world_size} parts -> {merged}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, help="The merged file; its parts are <stem>.part-*-of-*.h5 beside it."
    )
    parser.add_argument(
        "parts", nargs="*", help="Part files to merge in this order (default: find them next to --out)."
    )
    parser.add_argument("--parts-expected", type=int, help="Fail unless exactly this many parts are found.")
    parser.add_argument(
        "--delete-parts", action="store_true", help="Delete the part files after a successful merge."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing merged file.")


def _run_merge(args: argparse.Namespace) -> int:
    from foundation.embeddings import find_parts, merge_embeddings, open_embeddings
    from foundation.lock import FolderLock, command_line

    out = Path(args.out)
    parts = [Path(p) for p in args.parts] if args.parts else find_parts(out)
    if args.parts_expected is not None and len(parts) != args.parts_expected:
        raise DataError(f"found {len(parts)} parts of {out}, expected {args.parts_expected}")
    check_output_path(out)
    with FolderLock(out, command_line()):
        merged = merge_embeddings(parts, out, overwrite=args.overwrite)
    with open_embeddings(merged) as emb:
        print(f"merged {len(parts)} parts -> {merged} ({emb.rows} objects, {', '.join(emb.modalities)})")
    if args.delete_parts:
        for p in parts:
            p.unlink()
    return 0


def _csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


COMMANDS = [
    Command(
        ("export",),
        "Embed a shard set with a frozen pretrained model into an embeddings HDF5 file (resumable).",
        _add_arguments,
        _run,
    ),
    Command(
        ("export", "merge"),
        "Merge the part files of a multi-part export into one file.",
        _add_merge_arguments,
        _run_merge,
    ),
]
