"""Fine-tuning on new physics: extend the field vocabulary and pick what trains.

The reference code builds its optimiser before swapping in the enlarged embedding and output
head, so the new parameters are never trained. Here the model is finished (expanded, frozen)
inside `build_model`, and the trainer builds its optimiser afterwards from the model's
`requires_grad` parameters — every trainable parameter is optimised (tested).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from encoders.mpp.model import AViT

FREEZE_PRESETS = ("none", "middle", "processor")


def expand_vocabulary(model: AViT, names: Iterable[str]) -> list[str]:
    """Append the names not yet in `model.fields` as new embedding/output slots.

    Existing slots keep their weights and the embedding rescale keeps its reference size, so the
    outputs for samples made only of existing fields are bit-identical. Returns the added names.
    """
    new = [n for n in dict.fromkeys(names) if n not in model.fields]
    if new:
        model.embed.expand(len(new))
        model.destem.expand(len(new))
        model.fields.extend(new)
        model.cfg.fields = list(model.fields)
    return new


def apply_freeze(model: AViT, preset: str) -> None:
    """none: everything trains; middle: only the field embedding and the per-field output head
    (the reference's `freeze_middle`); processor: the embedding, stem and de-stem train, the
    space-time blocks are frozen (the reference's `freeze_processor`)."""
    if preset not in FREEZE_PRESETS:
        raise ValueError(f"unknown freeze preset {preset!r}; use one of {', '.join(FREEZE_PRESETS)}")
    trainable: list[nn.Parameter]
    if preset == "none":
        trainable = list(model.parameters())
    elif preset == "middle":
        trainable = [*model.embed.parameters(), model.destem.out_weight, model.destem.out_bias]
    else:
        trainable = [*model.embed.parameters(), *model.stem.parameters(), *model.destem.parameters()]
    keep = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
