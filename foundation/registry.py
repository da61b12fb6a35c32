"""Model families plug into the shared core through this registry.

`foundation/` never imports `encoders/`: a family is found through the `foundation.families`
entry-point group (see pyproject.toml) or registered at run time with `register()` (tests do
this with small models). The trainer only ever sees the `Family` interface.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import torch
from torch import nn

from foundation.errors import ConfigError

Batch = dict[str, Any]
Metrics = dict[str, torch.Tensor | float]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, Metrics]]


@dataclass(frozen=True)
class Family:
    """What the trainer, the exporter and the CLI need to know about one model family.

    `loss` receives the model *as wrapped for training* (DDP / FSDP) and must call it through
    `model(...)`, never through sub-module methods, so that gradient synchronisation hooks run.
    It returns the scalar loss tensor to back-propagate and a dict of logged metrics whose values
    are 0-d tensors, detached from the graph, left on the device where they were computed: the
    trainer sums them there and reads them back only when it writes a metrics record (every
    `train.log_every` steps, and at the end of a validation), so a micro-batch never waits for the
    GPU. Plain Python numbers are accepted too (counts the host knows, such as batch shapes), but
    `float(tensor)` or `.item()` inside `loss` stalls the GPU on every micro-batch.
    `manifest` arguments are `foundation.data.Manifest` objects of the shard set being read.
    """

    name: str
    model_config: type
    """Dataclass of the family's hyperparameters; it is the `model:` section of a config."""
    build_model: Callable[[Any, Any], nn.Module]
    """(model_config, manifest) -> a plain nn.Module on CPU, in fp32."""
    loss: LossFn
    """(model, batch) -> (scalar loss, {metric name: detached 0-d tensor, or float}) for one
    micro-batch (see the class docstring)."""
    make_collate: Callable[[Any, Any, bool], Callable[[list[dict]], Batch] | None] | None = None
    """(model_config, manifest, train) -> a picklable list-of-samples -> batch function that runs
    inside loader workers (augmentations, padding, tokenisation); None = default stacking."""
    flops_per_sample: Callable[[Any, Any], float] | None = None
    """(model_config, manifest) -> training FLOPs per sample (forward + backward), for MFU."""
    tokens_per_batch: Callable[[Batch], int] | None = None
    """batch -> number of real (non-padding) tokens, for tokens/s."""
    embed: Callable[[nn.Module, Batch], dict[str, torch.Tensor]] | None = None
    """(model, batch) -> {modality: (B, D) embeddings}, for `foundation export`."""
    merge_stats: Callable[[Sequence[Any]], tuple[dict[str, Any], dict[str, Any]]] | None = None
    """(parts: `foundation.data.merge.Part`s in merge order) -> the merged shard set's `stats` and
    `extra`, for `foundation shards merge`; raise DataError where the parts' cannot be combined.
    None: they must be equal in every part."""


_REGISTERED: dict[str, Family] = {}
_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
ENTRY_POINT_GROUP = "foundation.families"


def register(family: Family) -> Family:
    """Register a family at run time (replacing one of the same name)."""
    _REGISTERED[family.name] = family
    return family


def available() -> list[str]:
    """Names of every family this installation can load."""
    names = set(_REGISTERED)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def get(name: str) -> Family:
    """The family called `name`, loading its entry point on first use.

    `package.module:ATTRIBUTE` names a Family object directly (families outside this
    distribution, and test families that child processes must be able to import).
    """
    if name in _REGISTERED:
        return _REGISTERED[name]
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        if not _DOTTED_NAME.fullmatch(module_name) or not attribute.isidentifier():
            raise ConfigError(
                f"model family {name!r} is not of the form package.module:ATTRIBUTE "
                f"(or one of: {', '.join(available()) or 'none'})"
            )
        try:
            family = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot load model family {name!r}: {exc}") from None
        if not isinstance(family, Family):
            raise ConfigError(f"{name!r} is a {type(family).__name__}, not a foundation.registry.Family")
        _REGISTERED[name] = family
        return family
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        raise ConfigError(
            f"unknown model family {name!r}; available: {', '.join(available()) or 'none'} "
            "(a family that was added after `pip install -e .` needs the install to be re-run)"
        )
    family = matches[0].load()
    if not isinstance(family, Family):
        raise TypeError(f"entry point {matches[0].value} is {type(family).__name__}, not a Family")
    return register(family)
