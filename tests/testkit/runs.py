"""What a finished training run left behind, and how two runs are compared."""

from __future__ import annotations

from pathlib import Path


def final_weights(run_dir: Path) -> dict:
    """The state dict of the run's `model.pt`."""
    import torch

    return torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"
