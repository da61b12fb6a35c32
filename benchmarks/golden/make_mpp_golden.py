"""Regenerate tests/golden/mpp/: a small MPP AViT run by the reference code itself.

    git clone https://github.com/PolymathicAI/multiple_physics_pretraining REF
    git -C REF checkout e751fc25ae5274c3ddc869bf73afd6fcd4163cb5
    python benchmarks/golden/make_mpp_golden.py REF [--out tests/golden/mpp]

The reference classes (`models/avit.py` and the modules it imports, built with `build_avit` as
`train_basic.py` does) are given seeded random weights — every parameter perturbed, layer
scales near 0.5, so that every layer shapes the output — and saved in the layout the reference
training script writes (`model_state` under DDP's `module.` prefix, `optimizer_state_dict`,
`iters`, `epoch`). The reference's next-step predictions on seeded windows are saved beside it.
The test suite reads only these files, never the reference code.

The reference needs torch, einops and numpy; it imports `timm.layers.DropPath`, which is
replaced by a stand-in when timm is absent (drop-path is the identity in eval mode, the only mode
run here). The reference's n_states is 12, as in every released checkpoint.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path

import torch
from torch import nn

REFERENCE_REPO = "PolymathicAI/multiple_physics_pretraining"
REFERENCE_COMMIT = "e751fc25ae5274c3ddc869bf73afd6fcd4163cb5"
N_STATES = 12
SIZE = {"embed_dim": 32, "num_heads": 2, "processor_blocks": 2}
# (name, reference state slots, boundary code (1 = periodic in the reference), T, B, H, W).
# The width 48 gives 3 tokens: an odd periodic length, where the reference's wrap is unusual.
CASES = [
    ("compressible_periodic", [6, 7, 8, 9], 1, 3, 2, 32, 48),
    ("incompressible_open", [1, 2, 3], 0, 2, 1, 48, 64),
    ("diffusion_reaction_open", [4, 5], 0, 4, 1, 32, 32),
]


def _stub_timm() -> None:
    """`timm.layers.DropPath` for a machine without timm: identity in eval mode."""
    try:
        import timm.layers  # noqa: F401

        return
    except ImportError:
        pass

    class DropPath(nn.Module):
        def __init__(self, p: float = 0.0):
            super().__init__()
            self.p = p

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training and self.p > 0:
                raise RuntimeError("the timm stand-in supports eval mode only")
            return x

    timm = types.ModuleType("timm")
    layers = types.ModuleType("timm.layers")
    layers.DropPath = DropPath
    timm.layers = layers
    sys.modules.update({"timm": timm, "timm.layers": layers})


def _reference_commit(reference: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(reference), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def build_reference(reference: Path) -> nn.Module:
    _stub_timm()
    sys.path.insert(0, str(reference / "models"))
    from avit import build_avit  # the reference's own builder

    params = types.SimpleNamespace(
        **SIZE,
        n_states=N_STATES,
        patch_size=[16, 16],
        block_type="axial",
        space_type="axial_attention",
        time_type="attention",
        bias_type="rel",
        gradient_checkpointing=False,
    )
    torch.manual_seed(0)
    model = build_avit(params)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "gamma" in name:
                param.uniform_(0.3, 0.7)
            elif param.ndim == 1:  # norm weights/biases, linear biases
                param.add_(0.2 * torch.randn_like(param))
            else:
                param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def _window(t: int, b: int, c: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """(T, B, C, H, W) fields with their own offsets and scales per channel and sample."""
    offset = 5 * torch.randn(1, b, c, 1, 1, generator=gen)
    scale = torch.exp(torch.randn(1, b, c, 1, 1, generator=gen))
    return offset + scale * torch.randn(t, b, c, h, w, generator=gen)


def _optimizer_state(model: nn.Module) -> dict:
    """A real optimiser state after one step, as the released checkpoints carry one."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt.state_dict()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path, help="checkout of " + REFERENCE_REPO)
    parser.add_argument("--out", type=Path, default=Path("tests/golden/mpp"))
    args = parser.parse_args(argv)
    commit = _reference_commit(args.reference)
    if commit not in (None, REFERENCE_COMMIT):
        print(f"warning: {args.reference} is at {commit}, the golden files name {REFERENCE_COMMIT}")

    model = build_reference(args.reference)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer_state = _optimizer_state(model)
    model.load_state_dict(weights)  # undo the optimiser step: the saved weights are the ones run

    gen = torch.Generator().manual_seed(1)
    cases: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, labels, bc, t, b, h, w in CASES:
            x = _window(t, b, len(labels), h, w, gen)
            bcs = torch.full((b, 2), bc, dtype=torch.long)
            y = model(x, [labels] * b, bcs)
            cases[f"{name}/x"] = x.contiguous()
            cases[f"{name}/labels"] = torch.tensor(labels)
            cases[f"{name}/bc"] = torch.tensor(bc)
            cases[f"{name}/y"] = y.contiguous()

    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "iters": 2000,
        "epoch": 1,
        "model_state": {"module." + k: v for k, v in weights.items()},  # saved from the DDP wrapper
        "optimizer_state_dict": optimizer_state,
    }
    torch.save(checkpoint, args.out / "reference_ckpt.tar")
    torch.save(cases, args.out / "cases.pt")
    print(f"wrote {args.out}/reference_ckpt.tar and cases.pt ({len(CASES)} cases, commit {REFERENCE_COMMIT})")


if __name__ == "__main__":
    main()
