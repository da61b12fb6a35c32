"""Optimisers by name, parameter groups for weight decay, and the warm-up + cosine schedule.

Weight decay goes only to parameters with two or more dimensions that are not embeddings
(matrices of linear and convolution layers): biases, norm scales/shifts, layer-scale vectors
and embedding tables are not decayed, as in GPT-2/torchtitan practice — decaying them shrinks
quantities that set a scale rather than a feature. A family can exclude more parameters by
naming them with a `no_weight_decay` set attribute on its model (parameter names as in
`named_parameters()` of the plain model).

Other optimisers plug in with `register_optimizer(name, builder)`; the builder receives the
two parameter groups and the `optim` config section and returns a `torch.optim.Optimizer`:

    def build_lion(groups, cfg):
        return Lion(groups, lr=cfg.lr, betas=cfg.betas)
    register_optimizer("lion", build_lion)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from foundation.errors import ConfigError

ParamGroups = list[dict[str, Any]]
OptimizerBuilder = Callable[[ParamGroups, Any], torch.optim.Optimizer]

_OPTIMIZERS: dict[str, OptimizerBuilder] = {}


def register_optimizer(name: str, builder: OptimizerBuilder) -> OptimizerBuilder:
    """Make `optim.name: <name>` build `builder(param_groups, optim_cfg)`."""
    _OPTIMIZERS[name] = builder
    return builder


def available_optimizers() -> list[str]:
    return sorted(_OPTIMIZERS)


def _adamw(groups: ParamGroups, cfg: Any) -> torch.optim.Optimizer:
    # Fused kernels (CPU and CUDA, plain and FSDP2 DTensor parameters): measured 2-6x less CPU time per
    # step than foreach on a 43.5 M-parameter model, and deterministic run to run.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)


def _sgd(groups: ParamGroups, cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.betas[0])


register_optimizer("adamw", _adamw)
register_optimizer("sgd", _sgd)


def decay_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters that get weight decay and those that do not."""
    extra = set(getattr(model, "no_weight_decay", ()) or ())
    embedding_params = {
        id(p)
        for m in model.modules()
        if isinstance(m, nn.Embedding | nn.EmbeddingBag)
        for p in m.parameters()
    }
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim >= 2 and id(param) not in embedding_params and name not in extra:
            decay.append(name)
        else:
            no_decay.append(name)
    return decay, no_decay


def build_optimizer(model: nn.Module, cfg: Any, decay_names: tuple[list[str], list[str]] | None = None):
    """The optimiser over *every* trainable parameter of `model` (build it after the model is final).

    `decay_names` (from `decay_split` on the plain model) lets a wrapped model (FSDP, DDP) keep the
    plain model's decisions.
    """
    if cfg.name not in _OPTIMIZERS:
        raise ConfigError(
            f"unknown optimiser optim.name={cfg.name!r}; available: {', '.join(available_optimizers())}"
        )
    decay, _ = decay_names if decay_names is not None else decay_split(model)
    decay_set = set(decay)
    groups: ParamGroups = [
        {"params": [], "weight_decay": cfg.weight_decay},
        {"params": [], "weight_decay": 0.0},
    ]
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        plain = name.removeprefix("module.")  # DDP's wrapper prefix; FSDP2 keeps the plain names
        groups[0 if plain in decay_set else 1]["params"].append(param)
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    return _OPTIMIZERS[cfg.name](groups, cfg)


def lr_factor(step: int, cfg: Any, total_steps: int) -> float:
    """Multiplier of the peak lr at 0-based optimiser step `step`: linear warm-up, then cosine."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_schedule(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int):
    """A stateful LambdaLR (its state goes into checkpoints) applying `lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
