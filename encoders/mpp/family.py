"""The MPP family as the trainer, exporter and CLI see it: model building (fresh, or fine-tuned
from a pretrained AViT), the collate function (`encoders/mpp/collate.py`), the training loss and
the hooks for FLOPs, tokens and embeddings.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from encoders.mpp.collate import MPPCollate
from encoders.mpp.finetune import apply_freeze, expand_vocabulary
from encoders.mpp.loss import normalized_mse_loss
from encoders.mpp.metrics import nrmse, vrmse
from encoders.mpp.model import AViT, MPPConfig
from foundation.errors import ConfigError
from foundation.registry import Family

_log = logging.getLogger(__name__)

#: Config keys that define the network's shape; fine-tuning takes them from the checkpoint.
ARCHITECTURE_KEYS = (
    "embed_dim",
    "num_heads",
    "depth",
    "patch_size",
    "mlp_ratio",
    "bias_buckets",
    "bias_max_distance",
    "variant",
    "residual",
)


def manifest_info(manifest: Any) -> dict[str, Any]:
    """The `extra["mpp"]` block `prepare mpp` writes into a shard set's manifest ({} if none)."""
    extra = getattr(manifest, "extra", None) or {}
    return extra.get("mpp", {}) if isinstance(extra, dict) else {}


def manifest_fields(manifest: Any) -> list[str]:
    return list(manifest_info(manifest).get("fields", []))


def _load_init(path: str) -> nn.Module:
    from foundation.train import load_pretrained

    model, cfg, family = load_pretrained(path)
    if family.name != "mpp" or not isinstance(model, AViT):
        raise ConfigError(f"model.init_from={path!r} is a {family.name!r} model, not an MPP AViT")
    return model


def build_model(cfg: MPPConfig, manifest: Any) -> AViT:
    """A fresh AViT, or — with `init_from` — the pretrained one with its vocabulary extended by the
    shard set's unseen fields and the freezing preset applied. `cfg.fields` (and, when
    fine-tuning, the architecture keys) are updated in place to what was built, so the exported
    config describes the model exactly."""
    data_fields = manifest_fields(manifest) if manifest is not None else []
    if cfg.init_from and cfg.fields and not Path(cfg.init_from).exists():
        # A saved fine-tuned model (model.pt records the extended `fields` and the architecture)
        # can be rebuilt without the pretrained run; its own weights are loaded next.
        _log.warning(
            "model.init_from=%r does not exist: building the recorded architecture and %d fields "
            "without pretrained weights (expected when loading a saved fine-tuned model; a new "
            "fine-tuning run would start from scratch)",
            cfg.init_from,
            len(cfg.fields),
        )
        model = AViT(cfg, list(cfg.fields))
        apply_freeze(model, cfg.freeze)
        return model.train()
    if cfg.init_from:
        pretrained = _load_init(cfg.init_from)
        for key in ARCHITECTURE_KEYS:
            theirs, ours = getattr(pretrained.cfg, key), getattr(cfg, key)
            if theirs != ours:
                _log.info("model.%s: using the checkpoint's %r (config said %r)", key, theirs, ours)
                setattr(cfg, key, theirs)
        model = AViT(dataclasses.replace(cfg, fields=[]), list(pretrained.fields))
        model.load_state_dict(pretrained.state_dict())
        added = expand_vocabulary(model, [*cfg.fields, *data_fields])
        if added:
            _log.info(
                "fine-tuning: new field slots %s after %d pretrained ones", added, len(pretrained.fields)
            )
        apply_freeze(model, cfg.freeze)
    else:
        fields = list(cfg.fields) or data_fields
        if not fields:
            raise ConfigError(
                "model.fields is empty and the shard set records no MPP fields; "
                "prepare the data with `foundation prepare mpp` or list model.fields"
            )
        missing = [f for f in data_fields if f not in fields]
        if missing:
            raise ConfigError(
                f"the shard set has fields {missing} that model.fields {fields} lacks; "
                "add them or leave model.fields empty"
            )
        model = AViT(cfg, fields)
        if cfg.freeze != "none":
            apply_freeze(model, cfg.freeze)
    cfg.fields = list(model.fields)
    model.cfg = cfg
    return model.train()


# ----------------------------------------------------------------------------- batching


def make_collate(cfg: MPPConfig, manifest: Any, train: bool) -> MPPCollate:
    fields = list(cfg.fields) or manifest_fields(manifest)
    if cfg.init_from and not cfg.fields:
        fields = list(build_model(dataclasses.replace(cfg), manifest).fields)
    return MPPCollate(fields, cfg.history, 1, train, cfg.loss, cfg.patch_size)


# ----------------------------------------------------------------------------- loss and hooks


def loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training objective and the mean VRMSE/NRMSE over real fields (0-d tensors left on the
    device: the trainer reads them only when it logs)."""
    pred = model(batch["x"], batch["field_ids"], batch["field_mask"], batch["bcs"])
    value, _ = normalized_mse_loss(pred, batch["y"], batch["field_mask"], batch.get("loss", "nmse"))
    with torch.no_grad():
        mask = batch["field_mask"].float()
        count = mask.sum().clamp(min=1)
        v = (vrmse(pred.float(), batch["y"].float()) * mask).sum() / count
        n = (nrmse(pred.float(), batch["y"].float()) * mask).sum() / count
    return value, {"vrmse": v, "nrmse": n}


def flops_per_sample(cfg: MPPConfig, manifest: Any) -> float:
    """Training FLOPs per sample (3 × forward, forward = 2 × multiply-adds) at the shard set's size."""
    info = manifest_info(manifest)
    nx, ny = info.get("resolution") or (64, 64)
    d, t, p = cfg.embed_dim, cfg.history, cfg.patch_size
    h, w = nx // p, ny // p
    tokens = t * h * w
    c = max(len(info.get("fields", [])) or 4, 1)
    per_token = 4 * d * d + 2 * t * d  # time block: qkv + proj, scores + values
    per_token += (4 + 2 * cfg.mlp_ratio) * d * d + 2 * (h + w) * d  # space block
    macs = cfg.depth * tokens * per_token
    macs += t * nx * ny * c * d / 4 + tokens * (d / 4) ** 2 * 16 * 2 + h * w * (d / 4) * 16 * c
    return float(6 * macs)


def tokens_per_batch(batch: dict[str, Any]) -> int:
    return int(batch["n_tokens"])


def embed(model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Mean-pooled processor tokens of the history: one (B, D) vector per window."""
    tokens, _, _ = model.features(batch["x"], batch["field_ids"], batch["field_mask"], batch["bcs"])
    return {"fields": tokens.mean(dim=(1, 2, 3))}


def merge_stats(parts):
    """`foundation shards merge`: the rule of `prepare.merge_stats` (imported when a merge runs)."""
    from encoders.mpp.prepare import merge_stats as rule

    return rule(parts)


FAMILY = Family(
    name="mpp",
    model_config=MPPConfig,
    build_model=build_model,
    loss=loss,
    make_collate=make_collate,
    flops_per_sample=flops_per_sample,
    tokens_per_batch=tokens_per_batch,
    embed=embed,
    merge_stats=merge_stats,
)

__all__ = ["FAMILY", "build_model", "loss"]
