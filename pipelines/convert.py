"""`foundation convert`: released checkpoints → an ordinary model directory.

    foundation convert mpp CKPT --out DIR [--velocity-slots compressible|incompressible] [--history N]
    foundation convert astroclip CKPT --out DIR
    foundation convert astrodino CKPT --out DIR [--heads N]
    foundation convert specformer CKPT --out DIR

CKPT is a local file or `hf:ORG/REPO[/FILE][@REVISION]`, fetched with huggingface_hub (its cache,
and `HF_HUB_OFFLINE=1` to use only the cache). DIR receives the
weights and config described in `foundation/weights.py`, written into a temporary folder beside
DIR and renamed; an existing DIR is never overwritten. `evaluate rollout --checkpoint DIR`,
`export --checkpoint DIR` and `model.init_from: DIR` accept it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from foundation.cli import Command
from foundation.errors import ConfigError
from foundation.weights import resolve_checkpoint, sha256_file, write_converted

# ----------------------------------------------------------------------------- both families


def _start_conversion(checkpoint: str, out: str | Path, option: str, value: int | None) -> tuple[Path, Path]:
    """(the new model folder, the local checkpoint file), once the folder is known not to exist
    and the family's count `option` (when given) to be positive: checked before any download."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{str(out)!r} already exists; choose a new --out folder (nothing was written)")
    if value is not None and value < 1:
        raise ConfigError(f"{option} must be >= 1, got {value}")
    return out, resolve_checkpoint(checkpoint)


def _finish_conversion(out: Path, cfg: Any, model: Any, checkpoint: str, local: Path, **details: Any) -> Path:
    """Write the converted model with its provenance: the source, its sha256 and `details`."""
    source = {"checkpoint": checkpoint, "sha256": sha256_file(local), **details}
    write_converted(out, cfg.family, cfg, model.state_dict(), source)
    return out


# ----------------------------------------------------------------------------- foundation convert mpp


def convert_mpp(
    checkpoint: str, out: str | Path, velocity_slots: str = "compressible", history: int | None = None
) -> Path:
    """Convert a reference MPP checkpoint (path or hf: source) into the model directory `out`;
    `history` (input steps that evaluation windows take) defaults to the reference's 16."""
    from encoders.mpp.convert import REFERENCE_REPO, convert_reference_checkpoint, field_slots
    from foundation.config import DataSection, PretrainConfig

    out, local = _start_conversion(checkpoint, out, "--history", history)
    model = convert_reference_checkpoint(local, velocity_slots)
    model.cfg.history = history or model.cfg.history
    n_states = int(model.embed.reference_size)
    cfg = PretrainConfig(family="mpp", data=DataSection(path=""), model=model.cfg)
    return _finish_conversion(
        out,
        cfg,
        model,
        checkpoint,
        local,
        reference=REFERENCE_REPO,
        velocity_slots=velocity_slots,
        slots=field_slots(n_states, velocity_slots),
        n_states=n_states,
    )


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


# ----------------------------------------------------------------------------- foundation convert astroclip


def convert_astroclip(kind: str, checkpoint: str, out: str | Path, heads: int | None = None) -> Path:
    """Convert a released AstroCLIP, AstroDINO or SpecFormer checkpoint (`kind`) into `out`;
    `heads` sets AstroDINO's attention heads (default: 64 channels each, as DINOv2's ViTs)."""
    from encoders.astroclip import convert
    from foundation.config import DataSection, PretrainConfig

    out, local = _start_conversion(checkpoint, out, "--heads", heads)
    if kind == "astroclip":
        model = convert.convert_astroclip_checkpoint(local)
    elif kind == "astrodino":
        model = convert.convert_astrodino_checkpoint(local, heads)
    else:
        model = convert.convert_specformer_checkpoint(local)
    cfg = PretrainConfig(family="astroclip", data=DataSection(path=""), model=model.cfg)
    return _finish_conversion(
        out, cfg, model, checkpoint, local, reference=convert.REFERENCE_REPO, release=kind
    )


def _astroclip_arguments(kind: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("checkpoint", help=f"released {kind}.ckpt, or hf:ORG/REPO[/FILE][@REVISION]")
        parser.add_argument("--out", required=True, help="new model directory (must not exist)")
        if kind == "astrodino":
            parser.add_argument(
                "--heads", type=int, default=None, help="attention heads (default: width / 64, as DINOv2)"
            )

    return add


def _astroclip_runner(kind: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        out = convert_astroclip(kind, args.checkpoint, args.out, getattr(args, "heads", None))
        print(f"wrote {out} (AstroCLIP family, {kind}, variant reference)")
        return 0

    return run


_RELEASES = {
    "astroclip": "the released AstroCLIP model (both towers and heads)",
    "astrodino": "the released AstroDINO image ViT",
    "specformer": "the released SpecFormer spectrum model",
}

COMMANDS = [
    Command(
        ("convert", "mpp"),
        "Convert a released MPP AViT checkpoint into a model directory.",
        _add_mpp_arguments,
        _run_mpp,
    ),
    *(
        Command(
            ("convert", kind),
            f"Convert {what} checkpoint into a model directory.",
            _astroclip_arguments(kind),
            _astroclip_runner(kind),
        )
        for kind, what in _RELEASES.items()
    ),
]
