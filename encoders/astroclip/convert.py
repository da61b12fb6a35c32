"""Released AstroCLIP checkpoints (PolymathicAI/AstroCLIP) → our AstroCLIP, variant reference.

Three releases, three layouts:

- `astroclip.ckpt`: a Lightning checkpoint of `AstroClipModel` — `state_dict` (the DINOv2 image
  backbone under `image_encoder.backbone.`, SpecFormer under `spectrum_encoder.backbone.`, the
  cross-attention heads under `{image,spectrum}_encoder.cross_attention.` and `.mlp.`) and
  `hyper_parameters`, which hold the two encoder *modules* themselves (Lightning pickles them).
  → stage `align`.
- `astrodino.ckpt`: DINOv2's teacher checkpoint, `{"teacher": {"backbone.…", "dino_head.…",
  "ibot_head.…"}}` — what AstroCLIP's DINOv2 trainer writes at each evaluation
  (`teacher_checkpoint.pth`) and what its `ImageHead` loads through DINOv2's
  `load_pretrained_weights(…, "teacher")`. Also read, as that loader reads them: a bare ViT state,
  with or without `backbone.` / DDP's `module.` prefixes, or `state_dict`-wrapped; and DINOv2's
  whole-model layout `{"model": {"teacher.backbone.…", "student.…", …}}` (its fvcore checkpointer's,
  when consolidated), whose student is ignored. FSDP's per-rank shards (`flat_param`) are refused.
  → stage `image_masked`, which embeds with the class token as DINOv2 does (our masked training is
  refused for it).
- `specformer.ckpt`: a Lightning checkpoint of `SpecFormer` (`state_dict`, plain
  `hyper_parameters`). → stage `spectrum_masked`, the reconstruction head kept.

Files are read with `torch.load(weights_only=True)`. The modules Lightning pickles into
`hyper_parameters` name classes of the reference code (`astroclip.`, `dinov2.`, `torch.nn.`,
`lightning.`, `torchvision.` …): each such name is mapped to an inert stand-in that only records
the pickled state (`_Opaque`) — no reference code is imported or run, and any other global
(`os.system`, `builtins.eval` …) is refused. The stand-ins are read only for head counts, which
weights do not show; without them the released defaults apply (DINOv2: 64 channels per head;
SpecFormer: 128; heads: 4).

Parameters (`{i}`: block; DINOv2's chunked `blocks.{chunk}.{i}.` is read as `blocks.{i}.`):

    SpecFormer (`spectrum.`)                    ours
    data_embed.{weight,bias}                    embed.*                (2 + patch features)
    position_embed.weight (max_len, W)          pos (1, T+1, W)        first T+1 rows
    blocks.{i}.layernorm1 / layernorm2          encoder.blocks.{i}.norm1 / norm2
    blocks.{i}.attention.attention              encoder.blocks.{i}.attn.qkv   ([q|k|v] rows, as ours)
    blocks.{i}.attention.projection             encoder.blocks.{i}.attn.proj
    blocks.{i}.mlp.encoder / mlp.decoder        encoder.blocks.{i}.mlp.0 / mlp.2
    final_layernorm                             encoder.norm
    head (22 outputs)                           spectrum_decoder (its 20 pixel outputs; specformer only)
    —                                           mask_token = data_embed.bias (a zeroed token's embedding)

    DINOv2 ViT (`image.`)                       ours
    patch_embed.proj                            patch_embed
    cls_token / pos_embed / mask_token          cls / pos / mask_token
    blocks.{i}.norm1, attn.qkv, attn.proj       encoder.blocks.{i}.norm1, attn.qkv, attn.proj
    blocks.{i}.ls1.gamma / ls2.gamma            encoder.blocks.{i}.ls1 / ls2
    blocks.{i}.norm2, mlp.fc1, mlp.fc2          encoder.blocks.{i}.norm2, mlp.0, mlp.2
    norm                                        encoder.norm
    dino_head.*, ibot_head.* (astrodino)        dropped (self-distillation heads)

    heads (`{image,spectrum}_encoder.` → `{image,spectrum}_head.`)
    cross_attention.query                       query
    cross_attention.multihead_attn.in_proj_weight, or q_/k_/v_proj_weight (key width ≠ E)
                                                q.weight ← q rows; kv.weight ← [k; v]
    cross_attention.multihead_attn.in_proj_bias q.bias ← [:E]; kv.bias ← [E:]
    cross_attention.multihead_attn.out_proj     proj
    cross_attention.layernorm                   norm
    mlp.encoder / mlp.decoder                   mlp.0 / mlp.2
    logit_scale (only when learnable)           log_logit_scale
"""

from __future__ import annotations

import math
import pickle
import pickletools
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from encoders.astroclip.model import AstroCLIP, AstroCLIPConfig, ImageTowerConfig, SpectrumTowerConfig
from foundation.errors import DataError
from foundation.weights import load_converted_state

REFERENCE_REPO = "PolymathicAI/AstroCLIP"
#: Modules whose classes a released checkpoint's hyper_parameters may name; they become stand-ins.
REFERENCE_MODULES = (
    "astroclip.",
    "dinov2.",
    "torch.nn.modules.",
    "torchvision.",
    "lightning.",
    "lightning_fabric.",
    "pytorch_lightning.",
    "jsonargparse.",
)
#: The pickle of a checkpoint's objects (not its tensors) is small; refuse to scan a larger one.
MAX_PICKLE_BYTES = 64 * 2**20
#: Channels per attention head where a checkpoint does not say (DINOv2 ViTs; the released SpecFormer).
DINO_HEAD_WIDTH = 64
SPECFORMER_HEAD_WIDTH = 128
REFERENCE_HEAD_HEADS = 4
REFERENCE_LOGIT_SCALE = 15.5
#: The reference's defaults for what weights do not show (configs/specformer.yaml, astroclip.yaml).
REFERENCE_SLICE_OVERLAP = 10
REFERENCE_HEAD_DROPOUT = 0.1
RELEASED_BANDS = ["g", "r", "z"]

Transform = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- reading safely


class _Opaque:
    """What an object of the reference code becomes: its pickled state, never its class's code."""

    reference_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:
        self = super().__new__(cls)
        self.args, self.state = args, None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _pickle_globals(path: Path) -> set[str]:
    """Every `module.name` the checkpoint's pickle refers to, read from its opcodes (nothing runs)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [i for i in archive.infolist() if i.filename.endswith("data.pkl")]
            if len(members) != 1 or members[0].file_size > MAX_PICKLE_BYTES:
                return set()
            data = archive.read(members[0])
    except (zipfile.BadZipFile, OSError):
        return set()
    names: set[str] = set()
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                names.add(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.add(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except (ValueError, EOFError):
        return names  # a damaged pickle: torch.load reports it
    return names


def _stand_ins(path: Path) -> list[tuple[type, str]]:
    """(stand-in, name) for each reference class the pickle names; Lightning's AttributeDict (a
    dict that the pickle fills item by item) becomes a plain dict."""
    names = sorted(n for n in _pickle_globals(path) if n.startswith(REFERENCE_MODULES))
    return [
        (
            dict
            if n.endswith(".AttributeDict")
            else type(n.rsplit(".", 1)[-1], (_Opaque,), {"reference_name": n}),
            n,
        )
        for n in names
    ]


def read_checkpoint(path: str | Path, what: str) -> Mapping[str, Any]:
    """The payload of a released checkpoint, read as data only (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{str(path)!r} does not exist (expected {what} checkpoint file)")
    try:
        with torch.serialization.safe_globals(_stand_ins(path)):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL ([\w.]+)", str(exc))
        culprit = named.group(1) if named else "an object that is not plain data"
        raise DataError(
            f"{str(path)!r} refers to {culprit}, which is neither data nor a class of the reference "
            f"code ({', '.join(m.rstrip('.') for m in REFERENCE_MODULES)}); it is not loaded, since "
            "that could run code from the file: re-save the checkpoint's state_dict alone with torch.save"
        ) from None
    except Exception as exc:  # noqa: BLE001 - zip/EOF/format errors all mean the same to the user
        raise DataError(f"{str(path)!r} is not a readable torch checkpoint (truncated?): {exc}") from None
    if not isinstance(payload, Mapping):
        raise DataError(f"{str(path)!r} holds a {type(payload).__name__}, not {what} checkpoint (a dict)")
    return payload


def _tensor_state(state: Any, where: str, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise DataError(f"{where}: not {what} checkpoint: expected a state_dict (name → tensor)")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _walk(obj: Any, seen: set[int] | None = None, depth: int = 0) -> Iterator[Any]:
    """Every object reachable through stand-ins' state, dicts, lists and tuples, each once (a
    pickle may share or nest objects in cycles), to a bounded depth."""
    seen = set() if seen is None else seen
    if depth > 64 or id(obj) in seen:
        return
    seen.add(id(obj))
    yield obj
    if isinstance(obj, _Opaque):
        children: list[Any] = [obj.state, list(obj.args)]
    elif isinstance(obj, Mapping):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    else:
        return
    for child in children:
        yield from _walk(child, seen, depth + 1)


def _stand_in_attribute(obj: Any, class_name: str, attribute: str) -> Any:
    """`attribute` of the first pickled `class_name` object inside `obj`, else None."""
    for found in _walk(obj):
        if isinstance(found, _Opaque) and found.reference_name.endswith("." + class_name):
            if isinstance(found.state, Mapping) and attribute in found.state:
                return found.state[attribute]
    return None


def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


# ----------------------------------------------------------------------------- tables


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _wb(ref: str, ours: str) -> list[tuple[str, str, Transform]]:
    return [(f"{ref}.weight", f"{ours}.weight", _same), (f"{ref}.bias", f"{ours}.bias", _same)]


def specformer_table(depth: int) -> list[tuple[str, str, Transform]]:
    """(SpecFormer key, our spectrum-tower key, transform); position rows are cut separately."""
    table = _wb("data_embed", "embed") + _wb("final_layernorm", "encoder.norm")
    for i in range(depth):
        ref, ours = f"blocks.{i}", f"encoder.blocks.{i}"
        table += _wb(f"{ref}.layernorm1", f"{ours}.norm1") + _wb(f"{ref}.layernorm2", f"{ours}.norm2")
        table += _wb(f"{ref}.attention.attention", f"{ours}.attn.qkv")
        table += _wb(f"{ref}.attention.projection", f"{ours}.attn.proj")
        table += _wb(f"{ref}.mlp.encoder", f"{ours}.mlp.0") + _wb(f"{ref}.mlp.decoder", f"{ours}.mlp.2")
    return table


def dino_table(depth: int) -> list[tuple[str, str, Transform]]:
    """(DINOv2 key with chunks removed, our image-tower key, transform)."""
    table = _wb("patch_embed.proj", "patch_embed") + _wb("norm", "encoder.norm")
    table += [("cls_token", "cls", _same), ("pos_embed", "pos", _same)]
    table += [("mask_token", "mask_token", lambda t: t.reshape(-1))]
    for i in range(depth):
        ref, ours = f"blocks.{i}", f"encoder.blocks.{i}"
        table += _wb(f"{ref}.norm1", f"{ours}.norm1") + _wb(f"{ref}.norm2", f"{ours}.norm2")
        table += _wb(f"{ref}.attn.qkv", f"{ours}.attn.qkv") + _wb(f"{ref}.attn.proj", f"{ours}.attn.proj")
        table += _wb(f"{ref}.mlp.fc1", f"{ours}.mlp.0") + _wb(f"{ref}.mlp.fc2", f"{ours}.mlp.2")
        table += [(f"{ref}.ls1.gamma", f"{ours}.ls1", _same), (f"{ref}.ls2.gamma", f"{ours}.ls2", _same)]
    return table


def head_table() -> list[tuple[str, str, Transform]]:
    """(reference head key, our head key, transform) for everything but the attention input."""
    table = [("cross_attention.query", "query", _same)]
    table += _wb("cross_attention.multihead_attn.out_proj", "proj") + _wb("cross_attention.layernorm", "norm")
    return table + _wb("mlp.encoder", "mlp.0") + _wb("mlp.decoder", "mlp.2")


def _unchunk(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2's `blocks.{chunk}.{i}.` (block_chunks > 0) → `blocks.{i}.`."""
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}


def _depth(state: Mapping[str, torch.Tensor]) -> int:
    return len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})


def _listed(keys: set[str], limit: int = 6) -> str:
    names = sorted(keys)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_keys(state: Mapping[str, Any], expected: set[str], where: str, what: str) -> None:
    """One line naming the missing and unexpected keys when the state is not the released layout."""
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        parts = [f"missing keys: {_listed(missing)}"] if missing else []
        parts += [f"unexpected keys: {_listed(unexpected)}"] if unexpected else []
        raise DataError(f"{where}: not {what} checkpoint in the released layout ({'; '.join(parts)})")


def _require(state: Mapping[str, torch.Tensor], key: str, ndim: int, where: str, what: str) -> torch.Tensor:
    if key not in state:
        raise DataError(f"{where}: not {what} checkpoint in the released layout: missing key {key!r}")
    if state[key].ndim != ndim:
        raise DataError(f"{where}: {key!r} has shape {tuple(state[key].shape)}, expected {ndim} dimensions")
    return state[key]


def _mapped(
    table: list[tuple[str, str, Transform]], state: Mapping[str, torch.Tensor], ref: str, ours: str
) -> dict[str, torch.Tensor]:
    return {ours + mine: fn(state[ref + theirs].float()) for theirs, mine, fn in table}


# ----------------------------------------------------------------------------- the towers' configs


def spectrum_config(
    state: Mapping[str, torch.Tensor], where: str, heads: int | None, hparams: Mapping[str, Any]
) -> SpectrumTowerConfig:
    """Our spectrum-tower config for a SpecFormer state (sizes from shapes, the rest from hparams)."""
    what = "a SpecFormer"
    embed = _require(state, "data_embed.weight", 2, where, what)
    hidden = _require(state, "blocks.0.mlp.encoder.weight", 2, where, what).shape[0]
    width, patch = embed.shape[0], embed.shape[1] - 2
    overlap = _int_or(hparams.get("slice_overlap"), REFERENCE_SLICE_OVERLAP)
    try:
        cfg = SpectrumTowerConfig(
            patch=patch,
            stride=patch - overlap,
            width=width,
            depth=_depth(state),
            heads=heads or max(width // SPECFORMER_HEAD_WIDTH, 1),
            mlp_ratio=hidden / width,
            dropout=0.0,
            std_floor=0.2,
            mask_segments=_int_or(hparams.get("mask_num_chunks"), 6),
            mask_length=_int_or(hparams.get("mask_chunk_width"), 50),
        )
    except ValueError as exc:
        raise DataError(f"{where}: unsupported SpecFormer architecture: {exc}") from None
    rows = _require(state, "position_embed.weight", 2, where, what).shape[0]
    if rows < cfg.tokens + 1:
        raise DataError(
            f"{where}: the SpecFormer has {rows} positions, fewer than the {cfg.tokens + 1} tokens of a "
            f"spectrum on the DESI grid {cfg.wave_min}:{cfg.wave_max}:{cfg.wave_step}"
        )
    return cfg


def image_config(state: Mapping[str, torch.Tensor], where: str, heads: int | None) -> ImageTowerConfig:
    """Our image-tower config for a DINOv2 ViT state (chunks removed; sizes from shapes)."""
    what = "a DINOv2 ViT"
    proj = _require(state, "patch_embed.proj.weight", 4, where, what)
    positions = _require(state, "pos_embed", 3, where, what).shape[1] - 1
    hidden = _require(state, "blocks.0.mlp.fc1.weight", 2, where, what).shape[0]
    width, channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    grid = math.isqrt(positions)
    if channels != 3 or grid * grid != positions:
        raise DataError(
            f"{where}: the ViT reads {channels} channels on {positions} positions; the released "
            "AstroDINO reads 3 (RGB) on a square grid"
        )
    if "register_tokens" in state:
        raise DataError(f"{where}: the ViT has register tokens, which the released AstroDINO has not")
    try:
        return ImageTowerConfig(
            bands=list(RELEASED_BANDS),
            size=grid * patch,
            patch=patch,
            width=width,
            depth=_depth(state),
            heads=heads or max(width // DINO_HEAD_WIDTH, 1),
            mlp_ratio=hidden / width,
            dropout=0.0,
        )
    except ValueError as exc:
        raise DataError(f"{where}: unsupported DINOv2 architecture: {exc}") from None


def _load_checked(model: AstroCLIP, ours: dict[str, torch.Tensor], where: str) -> AstroCLIP:
    load_converted_state(model, ours, where)
    return model.eval()


def _spectrum_weights(state: Mapping[str, torch.Tensor], ref: str, cfg: SpectrumTowerConfig) -> dict:
    ours = _mapped(specformer_table(cfg.depth), state, ref, "spectrum.")
    ours["spectrum.pos"] = state[ref + "position_embed.weight"].float()[: cfg.tokens + 1][None]
    ours["spectrum.mask_token"] = state[ref + "data_embed.bias"].float().clone()
    return ours


def _head_weights(state: Mapping[str, torch.Tensor], ref: str, ours: str, where: str) -> dict:
    """One head's weights; the attention input is one (3E, E) matrix or three (when kdim ≠ E)."""
    out = _mapped(head_table(), state, ref, ours)
    attn = ref + "cross_attention.multihead_attn."
    bias = state[attn + "in_proj_bias"].float()
    e = bias.shape[0] // 3
    if attn + "in_proj_weight" in state:
        q, k, v = state[attn + "in_proj_weight"].float().split(e)
    else:
        q, k, v = (state[f"{attn}{n}_proj_weight"].float() for n in "qkv")
    out[ours + "q.weight"], out[ours + "q.bias"] = q, bias[:e]
    out[ours + "kv.weight"], out[ours + "kv.bias"] = torch.cat([k, v]), bias[e:]
    return out


def _head_keys(ref: str, same_width: bool) -> set[str]:
    attn = ref + "cross_attention.multihead_attn."
    inputs = ["in_proj_weight"] if same_width else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    return {ref + k for k, _, _ in head_table()} | {attn + n for n in [*inputs, "in_proj_bias"]}


# ----------------------------------------------------------------------------- the three releases


def convert_specformer_state(
    state: Mapping[str, torch.Tensor], hparams: Mapping[str, Any] | None = None, where: str = "checkpoint"
) -> AstroCLIP:
    """Our stage `spectrum_masked` model (variant reference) holding a SpecFormer state."""
    hparams = hparams or {}
    spectrum = spectrum_config(state, where, _int_or(hparams.get("num_heads"), 0) or None, hparams)
    expected = {k for k, _, _ in specformer_table(spectrum.depth)} | {"position_embed.weight"}
    _check_keys(state, expected | {"head.weight", "head.bias"}, where, "a SpecFormer")
    cfg = AstroCLIPConfig(stage="spectrum_masked", spectrum=spectrum, variant="reference")
    ours = _spectrum_weights(state, "", spectrum)
    ours["spectrum_decoder.weight"] = state["head.weight"].float()[2:]
    ours["spectrum_decoder.bias"] = state["head.bias"].float()[2:]
    return _load_checked(AstroCLIP(cfg), ours, where)


def convert_astrodino_state(
    state: Mapping[str, torch.Tensor], heads: int | None = None, where: str = "checkpoint"
) -> AstroCLIP:
    """Our stage `image_masked` model (variant reference, embeds with the class token)."""
    state = _unchunk(state)
    image = image_config(state, where, heads)
    _check_keys(state, {k for k, _, _ in dino_table(image.depth)}, where, "an AstroDINO (DINOv2 ViT)")
    cfg = AstroCLIPConfig(stage="image_masked", image=image, variant="reference")
    return _load_checked(AstroCLIP(cfg), _mapped(dino_table(image.depth), state, "", "image."), where)


def _teacher_backbone(payload: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """The ViT state of a DINOv2 checkpoint (the layouts of the module docstring): the teacher's
    backbone, its heads and any student dropped."""
    if "teacher" in payload:
        state = payload["teacher"]
    elif isinstance(payload.get("model"), Mapping):
        state = _teacher_of_whole_model(payload["model"], where)
    else:
        state = payload.get("state_dict", payload)
    state = _tensor_state(state, where, "an AstroDINO")
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def _teacher_of_whole_model(model: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`teacher.…` of DINOv2's whole-model state (`SSLMetaArch`: student, teacher, their heads)."""
    keys = [k for k in model if isinstance(k, str)]
    if any("flat_param" in k for k in keys):
        raise DataError(
            f"{where}: DINOv2 training shards (one rank's FSDP flat parameters), not a model: convert the "
            "teacher checkpoint its evaluation writes (teacher_checkpoint.pth) or the released astrodino.ckpt"
        )
    teacher = {k[len("teacher.") :]: v for k, v in model.items() if k.startswith("teacher.")}
    if not teacher:
        raise DataError(
            f"{where}: not an AstroDINO checkpoint: its 'model' holds no 'teacher.' keys (DINOv2's "
            "student/teacher layout)"
        )
    return teacher


def convert_astroclip_state(
    state: Mapping[str, torch.Tensor], hparams: Mapping[str, Any] | None = None, where: str = "checkpoint"
) -> AstroCLIP:
    """Our stage `align` model (variant reference) holding an `AstroClipModel` state."""
    hparams = hparams or {}
    image_ref, spectrum_ref = "image_encoder.", "spectrum_encoder."

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    query = _require(state, image_ref + "cross_attention.query", 3, where, "an AstroCLIP")
    image_state = _unchunk(part(image_ref + "backbone."))
    spectrum_state = part(spectrum_ref + "backbone.")
    image_heads = _stand_in_attribute(hparams.get("image_encoder"), "DinoVisionTransformer", "num_heads")
    spectrum_heads = _stand_in_attribute(hparams.get("spectrum_encoder"), "SelfAttention", "num_heads")
    head_heads = _stand_in_attribute(hparams.get("image_encoder"), "MultiheadAttention", "num_heads")
    image = image_config(image_state, where, _int_or(image_heads, 0) or None)
    spectrum = spectrum_config(spectrum_state, where, _int_or(spectrum_heads, 0) or None, {})
    embed_dim = query.shape[-1]
    hidden = _require(state, image_ref + "mlp.encoder.weight", 2, where, "an AstroCLIP").shape[0]

    expected = {image_ref + "backbone." + k for k, _, _ in dino_table(image.depth)}
    expected |= {spectrum_ref + "backbone." + k for k, _, _ in specformer_table(spectrum.depth)}
    expected |= {
        spectrum_ref + "backbone." + k for k in ("position_embed.weight", "head.weight", "head.bias")
    }
    expected |= _head_keys(image_ref, image.width == embed_dim)
    expected |= _head_keys(spectrum_ref, spectrum.width == embed_dim)
    learnable = "logit_scale" in state
    rekeyed = {image_ref + "backbone." + k: v for k, v in image_state.items()}
    rekeyed |= {k: v for k, v in state.items() if not k.startswith(image_ref + "backbone.")}
    _check_keys(rekeyed, expected | ({"logit_scale"} if learnable else set()), where, "an AstroCLIP")

    saved = hparams.get("logit_scale")
    if learnable:
        logit_scale = float(state["logit_scale"].exp())
    elif isinstance(saved, (int, float)) and not isinstance(saved, bool) and saved > 0:
        logit_scale = float(saved)
    else:
        logit_scale = REFERENCE_LOGIT_SCALE
    try:
        cfg = AstroCLIPConfig(
            stage="align",
            spectrum=spectrum,
            image=image,
            embed_dim=embed_dim,
            head_heads=_int_or(head_heads, REFERENCE_HEAD_HEADS),
            head_mlp_ratio=hidden / embed_dim,
            head_dropout=REFERENCE_HEAD_DROPOUT,
            temperature=1.0 / logit_scale,
            learn_temperature=learnable,
            min_temperature=min(0.01, 1.0 / logit_scale),
            freeze_spectrum=True,  # the reference trains the heads on frozen backbones
            freeze_image=True,
            variant="reference",
        )
    except ValueError as exc:
        raise DataError(f"{where}: unsupported AstroCLIP architecture: {exc}") from None
    ours = _mapped(dino_table(image.depth), image_state, "", "image.")
    ours |= _spectrum_weights(spectrum_state, "", spectrum)
    ours |= _head_weights(state, image_ref, "image_head.", where)
    ours |= _head_weights(state, spectrum_ref, "spectrum_head.", where)
    ours["log_logit_scale"] = torch.tensor(math.log(logit_scale))
    model = AstroCLIP(cfg)
    model.freeze()
    return _load_checked(model, ours, where)


def _lightning_parts(payload: Mapping[str, Any], where: str, what: str) -> tuple[dict, Mapping]:
    state = _tensor_state(payload.get("state_dict", payload), where, what)
    hparams = payload.get("hyper_parameters")
    return state, hparams if isinstance(hparams, Mapping) else {}


def convert_astroclip_checkpoint(path: str | Path) -> AstroCLIP:
    where = repr(str(path))
    state, hparams = _lightning_parts(read_checkpoint(path, "an AstroCLIP"), where, "an AstroCLIP")
    return convert_astroclip_state(state, hparams, where)


def convert_astrodino_checkpoint(path: str | Path, heads: int | None = None) -> AstroCLIP:
    where = repr(str(path))
    return convert_astrodino_state(
        _teacher_backbone(read_checkpoint(path, "an AstroDINO"), where), heads, where
    )


def convert_specformer_checkpoint(path: str | Path) -> AstroCLIP:
    where = repr(str(path))
    state, hparams = _lightning_parts(read_checkpoint(path, "a SpecFormer"), where, "a SpecFormer")
    return convert_specformer_state(state, hparams, where)
