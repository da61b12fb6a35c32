"""GPU faiss where it is installed (`pip install 'foundation[gpu]'`) and a GPU is visible; CPU otherwise.

Only training (the k-means of the inverted lists and the PQ codebooks, the costly part of a large
build) moves to the GPU; the trained index comes back to the CPU, where it is filled, saved and
searched like any other, so a GPU-trained index is an ordinary index file.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from foundation.errors import ConfigError

DEVICES = ("auto", "cpu", "gpu")


def gpu_count(faiss: Any) -> int:
    """GPUs faiss can use: 0 for a CPU-only build (faiss-cpu has no StandardGpuResources)."""
    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "get_num_gpus"):
        return 0
    return int(faiss.get_num_gpus())


def resolve_faiss_device(requested: str) -> str:
    """`auto` -> gpu where faiss can use one, else cpu; `gpu` without one is a ConfigError."""
    from foundation.search.kinds import import_faiss

    if requested not in DEVICES:
        raise ConfigError(f"--device {requested!r} is not one of {', '.join(DEVICES)}")
    if requested == "cpu":
        return "cpu"
    available = gpu_count(import_faiss()) > 0
    if requested == "gpu" and not available:
        raise ConfigError(
            "--device gpu needs faiss built with GPU support and a visible GPU; this faiss has none "
            "(pip install 'foundation[gpu]', then pip uninstall faiss-cpu), or pass --device cpu/auto"
        )
    return "gpu" if available else "cpu"


def train_index(faiss: Any, index: Any, train: np.ndarray, device: str) -> Any:
    """`index` trained on `train`, on the GPU when `device` is gpu; always a CPU index back."""
    if device == "gpu":
        resources = faiss.StandardGpuResources()
        on_gpu = faiss.index_cpu_to_gpu(resources, 0, index)
        on_gpu.train(train)
        return faiss.index_gpu_to_cpu(on_gpu)
    index.train(train)
    return index
