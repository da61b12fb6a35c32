"""Released MPP AViT checkpoints (PolymathicAI/multiple_physics_pretraining) → our AViT.

The reference training script saves `{"model_state", "optimizer_state_dict", "iters", "epoch"}`
with `torch.save`, the model state under DDP's `module.` prefix or without it; a bare state dict
is accepted too. The file is read with `torch.load(weights_only=True)` only (tensors, plain
containers and numbers); anything needing more is refused, never unpickled.

State slots (`space_bag` columns, `debed.out_kernel`/`out_bias` entries) → our field names. The
reference fills its n_states = 12 slots in the order of its dataset classes; slots 10 and 11 are
never used and are dropped. The velocities appear twice (incompressible and compressible NS); our
data pipeline names both `velocity_x`/`velocity_y`, so one pair is kept (`velocity_slots`,
compressible by default: four of the five pretraining sets and the paper's transfer target use it).

    slot  reference (dataset: field)   ours
    0     swe: h                       height
    1     incompNS: Vx                 velocity_x   (velocity_slots=incompressible)
    2     incompNS: Vy                 velocity_y   (velocity_slots=incompressible)
    3     incompNS: particles          particles
    4     diffre2d: activator          activator
    5     diffre2d: inhibitor          inhibitor
    6     compNS: Vx                   velocity_x   (velocity_slots=compressible, default)
    7     compNS: Vy                   velocity_y   (velocity_slots=compressible, default)
    8     compNS: density              density
    9     compNS: pressure             pressure

Parameters (`PARAMETER_TABLE`; {i} = block index): 1×1 convolutions become linear weights, the
stride=kernel convolutions become patchify+linear weights (`_conv_as_linear`,
`_conv_transpose_as_linear`), the per-head interleaved q/k/v rows are reordered to our
[q | k | v] layout (`_qkv_rows`), and the unused biases of the reference's RMS instance norms
are dropped. The embedding rescale keeps the checkpoint's n_states (`embed.reference_size`).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from encoders.mpp.model import AViT, MPPConfig
from foundation.errors import DataError
from foundation.weights import load_converted_state

REFERENCE_REPO = "PolymathicAI/multiple_physics_pretraining"
#: The reference's state slots: (slot, dataset class, its field name, our field name).
REFERENCE_SLOTS = (
    (0, "swe", "h", "height"),
    (1, "incompNS", "Vx", "velocity_x"),
    (2, "incompNS", "Vy", "velocity_y"),
    (3, "incompNS", "particles", "particles"),
    (4, "diffre2d", "activator", "activator"),
    (5, "diffre2d", "inhibitor", "inhibitor"),
    (6, "compNS", "Vx", "velocity_x"),
    (7, "compNS", "Vy", "velocity_y"),
    (8, "compNS", "density", "density"),
    (9, "compNS", "pressure", "pressure"),
)
#: Which dataset's velocity slots become our velocity_x/velocity_y.
VELOCITY_SLOTS = {"compressible": "compNS", "incompressible": "incompNS"}
#: The reference's n_steps (history) in every released configuration.
REFERENCE_HISTORY = 16
#: The reference calls its T5 bucket function without max_distance, whose default is 32.
REFERENCE_MAX_DISTANCE = 32
#: Reference keys read but not kept: the biases its RMS instance norms never use.
DROPPED_KEYS = (
    "embed.in_proj.1.bias",
    "embed.in_proj.4.bias",
    "embed.in_proj.7.bias",
    "debed.out_proj.1.bias",
    "debed.out_proj.4.bias",
    "blocks.{i}.spatial.norm1.bias",
    "blocks.{i}.spatial.norm2.bias",
    "blocks.{i}.spatial.mlp_norm.bias",
)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _squeeze_1x1(t: torch.Tensor) -> torch.Tensor:
    """1×1 convolution weight (out, in, 1, 1) → linear weight (out, in)."""
    return t.reshape(t.shape[0], t.shape[1])


def _conv_as_linear(t: torch.Tensor) -> torch.Tensor:
    """stride=kernel Conv2d weight (out, in, s, s) → our patchify+linear weight (out, s·s·in)
    (patch features ordered row, column, channel)."""
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)


def _conv_transpose_as_linear(t: torch.Tensor) -> torch.Tensor:
    """stride=kernel ConvTranspose2d weight (in, out, s, s) → our linear+unpatchify weight
    (s·s·out, in)."""
    return t.permute(2, 3, 1, 0).reshape(-1, t.shape[0])


def _qkv_rows(num_heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reference's qkv rows are (head, q/k/v, head_dim); ours (q/k/v, head, head_dim)."""

    def reorder(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(t.shape[0], -1) if t.ndim == 4 else t
        rest = t.shape[1:]
        return t.reshape(num_heads, 3, -1, *rest).transpose(0, 1).reshape(-1, *rest)

    return reorder


def parameter_table(num_heads: int) -> list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]]:
    """(reference key, our key, transform) for everything but the vocabulary-indexed tensors."""
    qkv = _qkv_rows(num_heads)
    table = [
        ("embed.in_proj.0.weight", "stem.projs.0.weight", _conv_as_linear),
        ("embed.in_proj.1.weight", "stem.norms.0.weight", _same),
        ("embed.in_proj.3.weight", "stem.projs.1.weight", _conv_as_linear),
        ("embed.in_proj.4.weight", "stem.norms.1.weight", _same),
        ("embed.in_proj.6.weight", "stem.projs.2.weight", _conv_as_linear),
        ("embed.in_proj.7.weight", "stem.norms.2.weight", _same),
        ("debed.out_proj.0.weight", "destem.projs.0.weight", _conv_transpose_as_linear),
        ("debed.out_proj.1.weight", "destem.norms.0.weight", _same),
        ("debed.out_proj.3.weight", "destem.projs.1.weight", _conv_transpose_as_linear),
        ("debed.out_proj.4.weight", "destem.norms.1.weight", _same),
    ]
    block = [
        ("temporal.norm1.weight", "time.qkv.norm.weight", _same),
        ("temporal.norm1.bias", "time.qkv.norm.bias", _same),
        ("temporal.input_head.weight", "time.qkv.qkv.weight", qkv),
        ("temporal.input_head.bias", "time.qkv.qkv.bias", qkv),
        ("temporal.qnorm.weight", "time.qkv.q_norm.weight", _same),
        ("temporal.qnorm.bias", "time.qkv.q_norm.bias", _same),
        ("temporal.knorm.weight", "time.qkv.k_norm.weight", _same),
        ("temporal.knorm.bias", "time.qkv.k_norm.bias", _same),
        ("temporal.rel_pos_bias.relative_attention_bias.weight", "time.bias.table.weight", _same),
        ("temporal.norm2.weight", "time.out_norm.weight", _same),
        ("temporal.norm2.bias", "time.out_norm.bias", _same),
        ("temporal.output_head.weight", "time.proj.weight", _squeeze_1x1),
        ("temporal.output_head.bias", "time.proj.bias", _same),
        ("temporal.gamma", "time.gamma", _same),
        ("spatial.norm1.weight", "space.qkv.norm.weight", _same),
        ("spatial.input_head.weight", "space.qkv.qkv.weight", qkv),
        ("spatial.input_head.bias", "space.qkv.qkv.bias", qkv),
        ("spatial.qnorm.weight", "space.qkv.q_norm.weight", _same),
        ("spatial.qnorm.bias", "space.qkv.q_norm.bias", _same),
        ("spatial.knorm.weight", "space.qkv.k_norm.weight", _same),
        ("spatial.knorm.bias", "space.qkv.k_norm.bias", _same),
        ("spatial.rel_pos_bias.relative_attention_bias.weight", "space.bias.table.weight", _same),
        ("spatial.norm2.weight", "space.out_norm.weight", _same),
        ("spatial.output_head.weight", "space.proj.weight", _squeeze_1x1),
        ("spatial.output_head.bias", "space.proj.bias", _same),
        ("spatial.gamma_att", "space.gamma_att", _same),
        ("spatial.mlp.fc1.weight", "space.mlp.0.weight", _same),
        ("spatial.mlp.fc1.bias", "space.mlp.0.bias", _same),
        ("spatial.mlp.fc2.weight", "space.mlp.2.weight", _same),
        ("spatial.mlp.fc2.bias", "space.mlp.2.bias", _same),
        ("spatial.mlp_norm.weight", "space.mlp_norm.weight", _same),
        ("spatial.gamma_mlp", "space.gamma_mlp", _same),
    ]
    return table + [(f"blocks.{{i}}.{ref}", f"blocks.{{i}}.{ours}", fn) for ref, ours, fn in block]


#: The vocabulary-indexed tensors (columns/entries picked by `field_slots`).
VOCABULARY_KEYS = ("space_bag.weight", "space_bag.bias", "debed.out_kernel", "debed.out_bias")


# ----------------------------------------------------------------------------- reading


def read_reference_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state of a reference checkpoint file, without DDP's `module.` prefix."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{str(path)!r} does not exist (expected an MPP checkpoint file)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{str(path)!r} holds objects beyond tensors, containers and numbers, which are not "
            f"loaded (that would run code from the file): {first}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - zip/EOF/format errors all mean the same to the user
        raise DataError(f"{str(path)!r} is not a readable torch checkpoint (truncated?): {exc}") from None
    state = payload.get("model_state", payload) if isinstance(payload, Mapping) else None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise DataError(
            f"{str(path)!r} is not an MPP checkpoint: expected a dict with 'model_state' "
            "(name → tensor), as the reference's train_basic.py saves, or such a dict itself"
        )
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _require(state: Mapping[str, torch.Tensor], key: str, ndim: int, where: str) -> torch.Tensor:
    if key not in state:
        raise DataError(f"{where}: not an MPP AViT checkpoint in the reference layout: missing key {key!r}")
    if state[key].ndim != ndim:
        raise DataError(f"{where}: {key!r} has shape {tuple(state[key].shape)}, expected {ndim} dimensions")
    return state[key]


def reference_config(state: Mapping[str, torch.Tensor], where: str = "checkpoint") -> MPPConfig:
    """Our config for the architecture a reference state describes (sizes read from shapes)."""
    embed_dim = _require(state, "embed.in_proj.6.weight", 4, where).shape[0]
    head_dim = _require(state, "blocks.0.temporal.qnorm.weight", 1, where).shape[0]
    buckets = _require(state, "blocks.0.temporal.rel_pos_bias.relative_attention_bias.weight", 2, where)
    hidden = _require(state, "blocks.0.spatial.mlp.fc1.weight", 2, where).shape[0]
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    if head_dim == 0 or embed_dim % head_dim:
        raise DataError(f"{where}: q-norm width {head_dim} does not divide the embedding width {embed_dim}")
    try:
        return MPPConfig(
            embed_dim=embed_dim,
            num_heads=embed_dim // head_dim,
            depth=depth,
            patch_size=16,
            mlp_ratio=hidden / embed_dim,
            bias_buckets=buckets.shape[0],
            bias_max_distance=REFERENCE_MAX_DISTANCE,
            history=REFERENCE_HISTORY,
            residual=False,
            drop_path=0.1,
            variant="reference",
        )
    except ValueError as exc:
        raise DataError(f"{where}: unsupported MPP architecture: {exc}") from None


def field_slots(n_states: int, velocity_slots: str = "compressible") -> dict[str, int]:
    """Our field name → the reference slot kept for it, in slot order."""
    if velocity_slots not in VELOCITY_SLOTS:
        raise DataError(f"velocity_slots must be one of {sorted(VELOCITY_SLOTS)}, got {velocity_slots!r}")
    dropped = "incompNS" if VELOCITY_SLOTS[velocity_slots] == "compNS" else "compNS"
    kept = {
        ours: slot
        for slot, dataset, ref, ours in REFERENCE_SLOTS
        if slot < n_states and not (dataset == dropped and ref in ("Vx", "Vy"))
    }
    return kept


def _per_block(pattern: str, depth: int) -> list[str]:
    return [pattern.format(i=i) for i in range(depth)] if "{i}" in pattern else [pattern]


def _expected_keys(depth: int, num_heads: int) -> set[str]:
    patterns = [ref for ref, _, _ in parameter_table(num_heads)] + list(DROPPED_KEYS)
    return set(VOCABULARY_KEYS) | {key for p in patterns for key in _per_block(p, depth)}


def _listed(keys: set[str], limit: int = 6) -> str:
    names = sorted(keys)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_keys(state: Mapping[str, torch.Tensor], cfg: MPPConfig, where: str) -> None:
    """One line naming the missing and unexpected keys when the state is not the reference AViT."""
    expected = _expected_keys(cfg.depth, cfg.num_heads)
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        parts = [f"missing keys: {_listed(missing)}"] if missing else []
        parts += [f"unexpected keys: {_listed(unexpected)}"] if unexpected else []
        raise DataError(f"{where}: not an MPP AViT checkpoint in the reference layout ({'; '.join(parts)})")


# ----------------------------------------------------------------------------- conversion


def convert_reference_state(
    state: Mapping[str, torch.Tensor], velocity_slots: str = "compressible", where: str = "checkpoint"
) -> AViT:
    """Our AViT (variant reference, eval mode, fp32) holding a reference model state's weights."""
    cfg = reference_config(state, where)
    check_keys(state, cfg, where)
    n_states = state["space_bag.weight"].shape[1]
    slots = field_slots(n_states, velocity_slots)
    if len(slots) < 1:
        raise DataError(f"{where}: the checkpoint has {n_states} state slots; none maps to a field")
    cfg.fields = list(slots)
    model = AViT(cfg, list(slots))
    ours: dict[str, torch.Tensor] = {}
    for ref, mine, fn in parameter_table(cfg.num_heads):
        for i in range(cfg.depth) if "{i}" in ref else [0]:
            ours[mine.format(i=i)] = _transformed(fn, state, ref.format(i=i), where)
    index = torch.tensor(list(slots.values()))
    kernel = state["debed.out_kernel"].float()  # (D/4, n_states, 4, 4)
    ours["embed.weight"] = state["space_bag.weight"].float()[:, index]
    ours["embed.bias"] = state["space_bag.bias"].float()
    ours["embed.reference_size"] = torch.tensor(float(n_states))
    ours["destem.out_weight"] = kernel[:, index].permute(1, 2, 3, 0).reshape(len(slots), -1, kernel.shape[0])
    ours["destem.out_bias"] = state["debed.out_bias"].float()[index]
    load_converted_state(model, ours, where)
    return model.eval()


def _transformed(
    fn: Callable[[torch.Tensor], torch.Tensor], state: Mapping[str, torch.Tensor], key: str, where: str
) -> torch.Tensor:
    try:
        return fn(state[key].float())
    except RuntimeError:  # a reshape that does not fit: the tensor has the wrong size
        raise DataError(
            f"{where}: {key!r} has shape {tuple(state[key].shape)}, which does not fit the "
            "architecture read from the checkpoint (mismatched checkpoint)"
        ) from None


def convert_reference_checkpoint(path: str | Path, velocity_slots: str = "compressible") -> AViT:
    """`convert_reference_state` of a checkpoint file."""
    return convert_reference_state(read_reference_checkpoint(path), velocity_slots, where=repr(str(path)))
