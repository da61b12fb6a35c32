"""Where and in what precision a command computes: one rule for training, export and evaluation.

`auto` means the first CUDA device this process owns where torch sees one, else the CPU. Precision
`auto` means bf16 autocast on a CUDA device that supports it and fp32 elsewhere (so the same config
gives the same numbers on every CPU); an explicit `bf16` is honoured on the CPU too, under CPU
autocast, which is fast only where the CPU multiplies bf16 matrices in hardware (`cpu_bf16_is_fast`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from foundation.errors import ConfigError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("auto", "fp32", "bf16")


def check_device_name(name: str) -> str | None:
    """Why `name` cannot be used as a device on this machine, or None when it can."""
    kind, colon, index = name.partition(":")
    if name in ("auto", "cpu"):
        return None
    if kind != "cuda" or (colon and not index.isdigit()):
        return f"expected {DEVICE_CHOICES}, got {name[:40]!r}"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return f"{name} was asked for but torch sees no CUDA device; use cpu or auto"
    if colon and int(index) >= count:
        return f"{name} does not exist: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    return None


def resolve_device(name: str, local_rank: int = 0, *, option: str = "--device") -> torch.device:
    """The torch device for `name` (auto, cpu, cuda, cuda:N); plain `cuda` takes this process's
    local rank modulo the visible devices, so one launch line serves every rank of a node."""
    problem = check_device_name(name)
    if problem:
        raise ConfigError(f"{option}: {problem}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    _, colon, index = name.partition(":")
    if colon:
        return torch.device("cuda", int(index))
    return torch.device("cuda", local_rank % torch.cuda.device_count())


#: oneDNN's cap on the instructions it uses (and its older name): it runs the bf16 matrix products.
ONEDNN_ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def cpu_bf16_is_fast() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX tiles) and oneDNN may use
    them: there bf16 autocast beats fp32 (GEMMs ~4x the fp32 FLOP/s); elsewhere it is emulated or
    runs on vector units, slower than fp32 (an AMX CPU capped at AVX512_CORE_BF16: 0.78x). `auto`
    precision stays fp32 on CPU regardless; commands that only want speed (the demo) ask this."""
    is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if not (is_amx is not None and is_amx()):
        return False
    for variable in ONEDNN_ISA_VARIABLES:
        cap = os.environ.get(variable, "").strip().upper()
        if cap and cap not in ("ALL", "DEFAULT") and "AMX" not in cap:
            return False
    return True


def resolve_precision(requested: str, device: torch.device, *, option: str = "precision") -> str:
    """fp32 or bf16 for `requested` on `device` (see the module docstring for `auto`)."""
    if requested not in PRECISIONS:
        raise ConfigError(f"{option} must be auto, fp32 or bf16, got {requested!r}")
    if requested == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{option} is bf16 but this GPU does not support bf16; use fp32")
    return requested


def autocast(device: torch.device, precision: str) -> Any:
    """The context manager that runs a forward pass in `precision` (already resolved) on `device`."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
