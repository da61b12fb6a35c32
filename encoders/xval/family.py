"""The xVal family as the trainer sees it (registered as `xval` through an entry point).

A shard set written by `foundation prepare xval` / `synth xval` records in its manifest:
`stats["normalizer"]` (the per-field maps, `Normalizer.to_dict`), `stats["lengths"]` (mean text
tokens and numbers per sample, for FLOPs), `extra["xval"]` (text vocabulary size, grammar
settings) and the file `tokenizer.json`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from encoders.xval.collate import XValCollate
from encoders.xval.encodings import get_encoding
from encoders.xval.loss import xval_loss
from encoders.xval.model import XValConfig, XValModel
from encoders.xval.normalizer import Normalizer
from encoders.xval.tokenizer import TOKENIZER_FILE, TextTokenizer
from foundation.errors import ConfigError, DataError
from foundation.registry import Family

FAMILY_NAME = "xval"


def _xval_extra(manifest: Any, required: bool = False) -> dict[str, Any]:
    if manifest is None:
        if required:
            raise DataError("xval needs the shard set's manifest (tokenizer and normaliser); none was given")
        return {}
    if manifest.family not in (None, FAMILY_NAME):
        raise DataError(f"shard set {manifest.path} holds {manifest.family!r} data, not xval data")
    extra = manifest.extra.get("xval")
    if not isinstance(extra, dict) or "normalizer" not in manifest.stats:
        raise DataError(
            f"shard set {manifest.path} lacks the xval tokenizer/normaliser records; "
            "write it with `foundation prepare xval` or `foundation synth xval`"
        )
    return extra


def normalizer_from(manifest: Any) -> Normalizer:
    _xval_extra(manifest, required=True)
    return Normalizer.from_dict(manifest.stats["normalizer"])


def tokenizer_from(manifest: Any) -> TextTokenizer:
    _xval_extra(manifest, required=True)
    return TextTokenizer.load(manifest.file_path(TOKENIZER_FILE))


def text_vocab_size(cfg: XValConfig, manifest: Any) -> int:
    recorded = int(_xval_extra(manifest).get("text_vocab_size", 0))
    if cfg.text_vocab_size and recorded and cfg.text_vocab_size != recorded:
        raise ConfigError(
            f"model.text_vocab_size={cfg.text_vocab_size} but the shard set's tokenizer has {recorded} "
            "tokens; set it to 0 (read from the data)"
        )
    size = cfg.text_vocab_size or recorded
    if not size:
        raise ConfigError("model.text_vocab_size is 0 and no xval shard set is known to read it from")
    return size


def build_model(cfg: XValConfig, manifest: Any) -> XValModel:
    return XValModel(cfg, text_vocab_size(cfg, manifest))


def mask_field_ids(cfg: XValConfig, normalizer: Normalizer) -> list[int]:
    """The normaliser's ids of `model.mask_fields`; a name the shard set lacks is a config error."""
    unknown = [name for name in cfg.mask_fields if name not in normalizer.fields]
    if unknown:
        raise ConfigError(
            f"model.mask_fields: {', '.join(map(repr, unknown))} not among the shard set's number fields "
            f"({', '.join(normalizer.fields)}); name fields of the data"
        )
    return [normalizer.fields.index(name) for name in cfg.mask_fields]


def make_collate(cfg: XValConfig, manifest: Any, train: bool) -> XValCollate:
    normalizer = normalizer_from(manifest)
    return XValCollate(
        normalizer,
        get_encoding(cfg.encoding),
        text_vocab_size(cfg, manifest),
        cfg.max_len,
        pack=cfg.pack and train,
        mask_prob=cfg.mask_prob if cfg.mode == "mlm" else None,
        mask_fields=mask_field_ids(cfg, normalizer),
    )


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """The configured objective; metrics are detached 0-d tensors left on the device (the trainer
    reads them only when it logs)."""
    cfg = _unwrap(model).cfg
    return xval_loss(model, batch, cfg.mode, cfg.mask_prob, cfg.number_loss_weight)


def tokens_per_batch(batch: dict[str, Any]) -> int:
    return int((~batch["pad"]).sum())


def flops_per_sample(cfg: XValConfig, manifest: Any) -> float | None:
    """Forward + backward FLOPs of one average sample: 6·N·T for the matrices, 12·layers·d·T·T̄
    for attention scores (T̄ = attended length), and the token head on the predicted tokens."""
    lengths = manifest.stats.get("lengths") if manifest is not None else None
    if not lengths:
        return None
    enc = get_encoding(cfg.encoding)
    tokens = min(cfg.max_len, lengths["text_tokens"] + enc.tokens_per_number * lengths["numbers"])
    d, layers = cfg.d_model, cfg.n_layers
    hidden = int(cfg.mlp_ratio * d)
    matrices = layers * (4 * d * d + 2 * d * hidden)
    vocab = text_vocab_size(cfg, manifest) + enc.vocab_size
    predicted = tokens * (cfg.mask_prob if cfg.mode == "mlm" else 1.0)
    return float(6 * matrices * tokens + 12 * layers * d * tokens * tokens + 6 * d * vocab * predicted)


def embed(model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """{"text": (n_samples, d_model)}: the final hidden states averaged over each sample's tokens."""
    out = model(
        batch["ids"],
        batch["num"],
        pos=batch["pos"],
        pad=batch["pad"],
        seg=batch.get("seg"),
        return_hidden=True,
    )
    hidden = out["hidden"]
    n = len(batch["__key__"])
    sample = batch["sample"].reshape(-1)
    real = sample >= 0
    sums = torch.zeros(n, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
    sums.index_add_(0, sample[real], hidden.reshape(-1, hidden.shape[-1])[real])
    counts = torch.bincount(sample[real], minlength=n).clamp(min=1).to(hidden.dtype)
    return {"text": sums / counts[:, None]}


def merge_stats(parts):
    """`foundation shards merge`: the rule of `prepare.merge_stats` (imported when a merge runs)."""
    from encoders.xval.prepare import merge_stats as rule

    return rule(parts)


FAMILY = Family(
    name=FAMILY_NAME,
    model_config=XValConfig,
    build_model=build_model,
    loss=loss,
    make_collate=make_collate,
    flops_per_sample=flops_per_sample,
    tokens_per_batch=tokens_per_batch,
    embed=embed,
    merge_stats=merge_stats,
)
