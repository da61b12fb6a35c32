"""`foundation pretrain CONFIG.yaml [dotted.key=value ...]`: run or resume a pretraining job.

Launch with plain `python`/`foundation` (one process), `torchrun --nproc-per-node N foundation
pretrain ...` or `srun foundation pretrain ...` (one process per device). Exit codes:
0 finished; 75 stopped on request (SIGUSR1/SIGTERM or the stop file) after saving a checkpoint,
re-run the same command to resume; 3 stopped on a non-finite loss/gradient (nothing saved after
the last good checkpoint); 2 invalid config or data.
"""

from __future__ import annotations

import argparse
import sys

from foundation.cli import Command


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="Pretraining config YAML (see `foundation config describe FAMILY`).")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="Dotted overrides, e.g. train.steps=2000 run.dir=runs/a",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="Resume even if the config differs from the checkpoint's in keys that affect training.",
    )


def _run(args: argparse.Namespace) -> int:
    from foundation.config import load_pretrain_config
    from foundation.train import EXIT_DIVERGED, EXIT_PREEMPTED, TrainingDiverged, train

    cfg = load_pretrain_config(args.config, args.overrides)
    try:
        result = train(cfg, force=args.force)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    return EXIT_PREEMPTED if result.status == "preempted" else 0


COMMANDS = [Command(("pretrain",), "Pretrain (or resume) a model from a config.", _add_arguments, _run)]
