"""`foundation convert`: released checkpoints → an ordinary model directory.

    foundation convert mpp CKPT --out DIR [--velocity-slots compressible|incompressible] [--history N]

CKPT is a local file or `hf:ORG/REPO[/FILE][@REVISION]`, fetched with huggingface_hub (its cache,
and `HF_HUB_OFFLINE=1` to use only the cache). DIR receives the
weights and config described in `foundation/weights.py`, written into a temporary folder beside
DIR and renamed; an existing DIR is never overwritten. `evaluate rollout --checkpoint DIR`,
`export --checkpoint DIR` and `model.init_from: DIR` accept it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from foundation.cli import Command
from foundation.errors import ConfigError
from foundation.weights import resolve_checkpoint, sha256_file, write_converted

# ----------------------------------------------------------------------------- foundation convert mpp


def convert_mpp(
    checkpoint: str, out: str | Path, velocity_slots: str = "compressible", history: int | None = None
) -> Path:
    """Convert a reference MPP checkpoint (path or hf: source) into the model directory `out`;
    `history` (input steps that evaluation windows take) defaults to the reference's 16."""
    from encoders.mpp.convert import REFERENCE_REPO, convert_reference_checkpoint, field_slots
    from foundation.config import DataSection, PretrainConfig

    out = Path(out)
    if out.exists():
        raise ConfigError(f"{str(out)!r} already exists; choose a new --out folder (nothing was written)")
    if history is not None and history < 1:
        raise ConfigError(f"--history must be >= 1, got {history}")
    local = resolve_checkpoint(checkpoint)
    model = convert_reference_checkpoint(local, velocity_slots)
    model.cfg.history = history or model.cfg.history
    n_states = int(model.embed.reference_size)
    cfg = PretrainConfig(family="mpp", data=DataSection(path=""), model=model.cfg)
    source = {
        "checkpoint": checkpoint,
        "sha256": sha256_file(local),
        "reference": REFERENCE_REPO,
        "velocity_slots": velocity_slots,
        "slots": field_slots(n_states, velocity_slots),
        "n_states": n_states,
    }
    write_converted(out, "mpp", cfg, model.state_dict(), source)
    return out


def _add_mpp_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="reference checkpoint file, or hf:ORG/REPO[/FILE][@REVISION]")
    parser.add_argument("--out", required=True, help="new model directory (must not exist)")
    parser.add_argument(
        "--velocity-slots",
        choices=("compressible", "incompressible"),
        default="compressible",
        help="which of the reference's two velocity slot pairs becomes velocity_x/velocity_y",
    )
    parser.add_argument(
        "--history",
        type=int,
        default=None,
        help="input steps per window recorded in the config (default 16, as the models were trained)",
    )


def _run_mpp(args: argparse.Namespace) -> int:
    out = convert_mpp(args.checkpoint, args.out, args.velocity_slots, args.history)
    print(f"wrote {out} (MPP AViT, variant reference)")
    return 0


COMMANDS = [
    Command(
        ("convert", "mpp"),
        "Convert a released MPP AViT checkpoint into a model directory.",
        _add_mpp_arguments,
        _run_mpp,
    )
]
