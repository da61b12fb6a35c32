"""Regenerate tests/golden/mpp/well_metrics.json: The Well's own metrics on small seeded arrays.

    pip install the_well==1.2.0      # PolymathicAI/the_well, the_well/benchmark/metrics/
    python benchmarks/golden/make_well_metrics_golden.py [--out tests/golden/mpp/well_metrics.json]

The arrays cover the cases where definitions differ most: a random field, a constant target
with an error (zero variance: VRMSE is set by ε), a constant target predicted exactly (0/ε), an
all-zero target (zero energy: NRMSE is set by ε) and a non-square grid (the spectral bins). The
Well's classes run on channel-last tensors (B, H, W, C); the file stores channel-first
(B, C, H, W) arrays, the layout of `encoders.mpp.metrics`. The test suite reads only this file,
never the_well.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

WELL_VERSION = "1.2.0"
WELL_COMMIT = "215f55d838d161964a49ce28d3dc1517c6e74b90"
"""A commit of PolymathicAI/the_well whose metrics/spatial.py and spectral.py equal version 1.2.0's."""


def make_arrays(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pred, target), each (2, 4, 8, 6) float32, channel-first."""
    rng = np.random.default_rng(seed)
    target = rng.standard_normal((2, 4, 8, 6)).astype(np.float32)
    pred = (target + 0.3 * rng.standard_normal(target.shape)).astype(np.float32)
    target[:, 1] = 1.5  # constant target, predicted with an error
    target[:, 2] = -0.75  # constant target ...
    pred[:, 2] = -0.75  # ... predicted exactly
    target[1, 3] = 0.0  # zero energy in one sample
    return pred, target


def well_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, list]:
    from the_well.benchmark.metrics import spatial, spectral

    class Meta:
        n_spatial_dims = 2

    x = torch.from_numpy(pred).movedim(1, -1)
    y = torch.from_numpy(target).movedim(1, -1)
    classes = {
        "mse": spatial.MSE,
        "nmse": spatial.NMSE,
        "rmse": spatial.RMSE,
        "nrmse": spatial.NRMSE,
        "vmse": spatial.VMSE,
        "vrmse": spatial.VRMSE,
        "linf": spatial.LInfinity,
        "pearson_r": spatial.PearsonR,
    }
    out = {name: cls()(x, y, Meta).tolist() for name, cls in classes.items()}
    spectral_out = spectral.binned_spectral_mse()(x, y, Meta)
    for i, name in enumerate(("low", "mid", "high")):
        out[f"spectral_mse_{name}"] = spectral_out[f"spectral_error_mse_per_bin_{i}"].tolist()
        out[f"spectral_nmse_{name}"] = spectral_out[f"spectral_error_nmse_per_bin_{i}"].tolist()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/golden/mpp/well_metrics.json")
    args = parser.parse_args()
    import the_well

    if the_well.__version__ != WELL_VERSION:
        raise SystemExit(f"need the_well {WELL_VERSION}, found {the_well.__version__}")
    pred, target = make_arrays()
    golden = {
        "the_well": {"version": WELL_VERSION, "commit": WELL_COMMIT},
        "layout": "pred and target (B, C, H, W) float32; each metric (B, C)",
        "pred": pred.tolist(),
        "target": target.tolist(),
        "metrics": well_metrics(pred, target),
    }
    Path(args.out).write_text(json.dumps(golden, indent=None) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
