"""Dataclass configs: YAML files, dotted command-line overrides, validation with clear messages.

Every config is a tree of dataclasses whose fields carry a one-line docstring (`option(...)`)
and, for numbers, the range they must lie in (`option(..., ge=1, le=65536)`).
`load(cls, path, overrides)` reads YAML, applies `a.b.c=value` overrides, and builds the tree,
refusing unknown keys (with the closest valid names), values of the wrong type, numbers that are
not finite or do not fit in 64 bits, and numbers outside their field's range.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from collections.abc import Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from foundation.atomic import write_text
from foundation.errors import ConfigError

T = TypeVar("T")


#: Largest magnitude of an integer config value: what fits in a signed 64-bit integer.
INT_LIMIT = 2**63 - 1
#: Largest config file read: configs are a few KiB; anything bigger is not a config.
MAX_CONFIG_BYTES = 1 << 20


def option(
    default: Any = dataclasses.MISSING,
    doc: str = "",
    *,
    factory: Any = dataclasses.MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field with a docstring (shown by `describe`). Use `factory` for mutable defaults.

    `ge`/`gt`/`le`/`lt` bound a numeric field (each item of a tuple/list of numbers); `from_dict`
    refuses a value outside them with a message naming the key, the value and the range.
    """
    metadata: dict[str, Any] = {"doc": doc}
    bounds = {name: v for name, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if bounds:
        metadata["bounds"] = bounds
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_BOUND_TESTS = {
    "ge": (lambda v, b: v >= b, ">="),
    "gt": (lambda v, b: v > b, ">"),
    "le": (lambda v, b: v <= b, "<="),
    "lt": (lambda v, b: v < b, "<"),
}


def range_text(bounds: Mapping[str, float]) -> str:
    """`lie in [1, 65536]` or `be > 0`: the allowed range of a bounded field, for messages and `describe`."""
    low = next(((name, v) for name, v in bounds.items() if name in ("ge", "gt")), None)
    high = next(((name, v) for name, v in bounds.items() if name in ("le", "lt")), None)
    if low and high:
        opening, closing = ("[" if low[0] == "ge" else "("), ("]" if high[0] == "le" else ")")
        return f"lie in {opening}{_limit_text(low[1])}, {_limit_text(high[1])}{closing}"
    name, limit = low or high
    return f"be {_BOUND_TESTS[name][1]} {_limit_text(limit)}"


def _limit_text(limit: float) -> str:
    """`1048576`, `2**63 - 1`, `0.5`: a bound as a reader would write it."""
    if limit == INT_LIMIT:
        return "2**63 - 1"
    return str(int(limit)) if float(limit).is_integer() else f"{limit:g}"


def check_bounds(value: Any, bounds: Mapping[str, float], where: str) -> None:
    """Raise a ConfigError unless number `value` (or every number in a tuple/list) is within `bounds`."""
    items = value if isinstance(value, list | tuple) else [value]
    for item in items:
        if item is None or isinstance(item, bool) or not isinstance(item, int | float):
            continue
        if not all(_BOUND_TESTS[name][0](item, limit) for name, limit in bounds.items()):
            raise ConfigError(f"{where} must {range_text(bounds)}, got {_short(item)}")


# ----------------------------------------------------------------------------- reading


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path`, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist (or is not a file)")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config file {str(path)!r} is {size} bytes, more than a config's limit of "
            f"{MAX_CONFIG_BYTES}; pass a YAML config file"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text; pass a YAML config file") from None
    data = parse_yaml(text, f"config file {str(path)!r}") or {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping (key: value lines) at the top level, "
            f"not a {type(data).__name__}"
        )
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: plain YAML keeps the last
    silently, so a second `train:` section would drop every setting of the first."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # keys merged in with << may be overridden: that is what << is for
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, Hashable):
                    continue  # the base loader refuses it, with its own message
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"found the key {key!r} twice in one mapping", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, what: str) -> Any:
    """`text` parsed as YAML, with errors (including nesting too deep to parse) that name `what`."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} is not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"{what} is nested too deeply to be a config") from None
    except ValueError as exc:  # e.g. an integer literal beyond Python's digit limit
        raise ConfigError(f"{what} holds a value Python cannot read: {exc}") from None


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        parts = key.split(".")
        if not all(part.strip() for part in parts):
            raise ConfigError(f"override {item!r}: the key {key!r} has an empty part")
        try:
            value = parse_yaml(raw, f"override {key!r}") if raw != "" else ""
        except ConfigError:
            if len(raw) > MAX_CONFIG_BYTES:
                raise
            value = raw
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


# ----------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(c) for c in get_args(tp))
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` converted to type `tp`, or a ConfigError naming `where`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option_tp in options:
            if option_tp is type(None):
                continue
            try:
                return _coerce(value, option_tp, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a section (mapping), got {_short(value)}")
        return from_dict(tp, value, where)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str) or not isinstance(value, Iterable):
            raise ConfigError(f"{where}: expected a list, got {_short(value)}")
        args = get_args(tp)
        items = list(value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(items)}")
            return tuple(
                _coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(items, args, strict=True))
            )
        item_tp = args[0] if args else Any
        out = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(items)]
        return tuple(out) if (origin is tuple or tp is tuple) else out
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {_short(value)}")
        args = get_args(tp)
        val_tp = args[1] if args else Any
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {_short(value)}")
    if tp is int:
        return _coerce_int(value, where)
    if tp is float:
        return _coerce_float(value, where)
    if tp is str:
        if isinstance(value, str):
            return _no_nul(value, where)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {_short(value)}")
    if tp is Path:
        if isinstance(value, str | Path):
            return Path(_no_nul(str(value), where))
        raise ConfigError(f"{where}: expected a path, got {_short(value)}")
    if isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_short(value)}")


def _no_nul(text: str, where: str) -> str:
    """`text`, unless it holds a NUL character, which no file name or setting can contain."""
    if "\x00" in text:
        raise ConfigError(f"{where}: {_short(text)} contains a NUL character")
    return text


def _coerce_int(value: Any, where: str) -> int:
    """An integer from an int, an integral float or a number-like string (`1e3`), within 64 bits."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{where}: expected an integer, got {_short(value)}")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {_short(value)}") from None
    if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
        raise ConfigError(f"{where}: expected an integer, got {_short(value)}")
    if abs(value) > INT_LIMIT:
        raise ConfigError(f"{where} must be within +-(2**63 - 1) (a 64-bit integer), got {_short(value)}")
    return int(value)


def _coerce_float(value: Any, where: str) -> float:
    """A finite float; YAML 1.1 reads `3e-4` as a string, so number-like strings are accepted."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{where}: expected a number, got {_short(value)}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise ConfigError(f"{where}: expected a number, got {_short(value)}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{where} must be a finite number, got {_short(value)}")
    return number


def _short(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters so that a huge value makes a one-line message."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"a {value.bit_length()}-bit integer"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unknown_key_message(key: str, valid: Iterable[str], where: str) -> str:
    """`unknown key 'x.lr_rate'; did you mean 'x.lr'?` with the closest valid names."""
    valid = list(valid)
    full = f"{where}.{key}" if where else key
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown config key {full!r}{hint} (valid keys here: {', '.join(valid)})"


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping, validating keys and types recursively."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(unknown_key_message(str(key), fields, where))
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            path = f"{where}.{name}" if where else name
            kwargs[name] = _coerce(data[name], hints[name], path)
            check_bounds(kwargs[name], f.metadata.get("bounds", {}), path)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        names = ", ".join(repr(f"{where}.{m}" if where else m) for m in missing)
        raise ConfigError(f"config is missing required key(s) {names}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # raised by a __post_init__ check
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def to_dict(obj: Any) -> Any:
    """A plain (YAML/JSON-safe) copy of a config tree."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def config_hash(obj: Any) -> str:
    """A short stable hash of a config tree (recorded in checkpoints)."""
    blob = json.dumps(to_dict(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save(obj: Any, path: str | Path) -> None:
    """Write a config tree as YAML, atomically."""
    write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


def load(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Build `cls` from a YAML file (optional) plus dotted overrides."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, overrides)
    return from_dict(cls, data)


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per key, `dotted.key (type, default): doc`, for `--help`-style listings."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{key}: {f.metadata.get('doc', '')}".rstrip(": "))
            lines.extend(describe(tp, key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(to_dict(f.default_factory()))
        else:
            default = "required"
        bounds = f", must {range_text(f.metadata['bounds'])}" if "bounds" in f.metadata else ""
        lines.append(f"{key} ({_type_name(tp)}, {default}{bounds}): {f.metadata.get('doc', '')}")
    return lines


# ----------------------------------------------------------------------------- shared model bounds

# Sanity bounds of the model families' hyperparameters: generous beyond any model that fits a
# machine, tight enough that a typo (an extra few zeros) is refused before anything is allocated.
MAX_WIDTH = 1 << 16
"""Largest width (d_model, embed_dim) of a transformer."""
MAX_DEPTH = 1024
"""Largest number of blocks or attention heads."""
MAX_MLP_RATIO = 64
"""Largest MLP hidden width as a multiple of the model width."""
MAX_TOKENS = 1 << 20
"""Largest sequence length, patch/stride in pixels, or other per-sample count."""
MAX_VOCAB = 1 << 24
"""Largest vocabulary size."""
MAX_IMAGE_SIZE = 1 << 16
"""Largest image side, pixels."""

# ----------------------------------------------------------------------------- pretraining config

#: Upper bound of step counts and intervals: far beyond any run, far below overflow.
MAX_STEPS = 10**12
#: Upper bound of per-process batch sizes: beyond it one batch alone would exhaust any memory.
MAX_BATCH = 1 << 20


@dataclasses.dataclass
class RunSection:
    dir: str = option("runs/default", "Run directory: resolved config, checkpoints, metrics, exports.")
    seed: int = option(
        0, "The one seed every random stream (data order, init, dropout) derives from.", ge=0, le=INT_LIMIT
    )

    def __post_init__(self) -> None:
        if not self.dir.strip():
            raise ValueError("run.dir is empty; name the run directory")


@dataclasses.dataclass
class DataSection:
    path: str = option(doc="Shard set directory (holds manifest.json).")
    train_split: str = option("train", "Split to train on.")
    val_split: str | None = option("valid", "Split for periodic validation; null disables validation.")
    batch_size: int = option(
        32,
        "Micro-batch size per process (global batch = this x world size x grad_accum).",
        ge=1,
        le=MAX_BATCH,
    )
    num_workers: int = option(
        2, "Loader worker processes per training process (0 = load in the main process).", ge=0, le=256
    )
    shuffle: bool = option(True, "Shuffle shard order and samples within shards (seeded).")
    prefetch: int = option(
        2, "Batches each loader worker prepares ahead (ignored with num_workers: 0).", ge=1, le=1024
    )


@dataclasses.dataclass
class OptimSection:
    name: str = option(
        "adamw", "Optimiser, by name in foundation.train.optim's registry (adamw, sgd, or registered)."
    )
    lr: float = option(3e-4, "Peak learning rate.", gt=0)
    weight_decay: float = option(
        0.05, "Decoupled weight decay, on >=2-D weights only (not biases, norms, embeddings).", ge=0
    )
    betas: tuple[float, float] = option(
        (0.9, 0.95), "Adam betas (sgd: betas[0] is the momentum).", ge=0, lt=1
    )
    eps: float = option(1e-8, "Adam epsilon.", gt=0)
    warmup_steps: int = option(100, "Linear warm-up steps from 0 to lr.", ge=0, le=MAX_STEPS)
    schedule: Literal["cosine", "constant"] = option(
        "cosine", "Decay after warm-up (cosine over train.steps)."
    )
    min_lr_ratio: float = option(0.1, "Final learning rate as a fraction of lr (cosine).", ge=0, le=1)


@dataclasses.dataclass
class TrainSection:
    steps: int = option(1000, "Optimiser steps to run in total.", ge=1, le=MAX_STEPS)
    grad_accum: int = option(1, "Micro-batches per optimiser step.", ge=1, le=MAX_BATCH)
    grad_clip: float | None = option(
        1.0, "Clip the global gradient norm to this; null disables clipping.", gt=0
    )
    parallel: Literal["auto", "none", "ddp", "fsdp"] = option(
        "auto", "Data parallelism: auto = DDP when world size > 1; fsdp = FSDP2 fully_shard."
    )
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", "auto = bf16 autocast on CUDA with fp32 master weights, fp32 on CPU."
    )
    attention: Literal["auto", "sdpa", "xformers"] = option(
        "auto", "Attention kernels: xformers where it loads and runs, else torch SDPA."
    )
    log_every: int = option(10, "Steps between metrics.jsonl records.", ge=1, le=MAX_STEPS)
    val_every: int = option(500, "Steps between validations (0 disables).", ge=0, le=MAX_STEPS)
    val_batches: int = option(20, "Batches per validation.", ge=1, le=MAX_STEPS)
    ckpt_every: int = option(
        500, "Steps between checkpoints (0 = only at the end and on preemption).", ge=0, le=MAX_STEPS
    )
    keep_last: int = option(3, "Checkpoints to keep.", ge=1, le=10_000)
    progress: bool | Literal["auto"] = option(
        "auto", "Progress bar on rank 0: true, false, or auto (only when stderr is a TTY)."
    )
    device: Literal["auto", "cuda", "cpu"] = option("auto", "auto = CUDA when torch sees a GPU, else CPU.")
    tensorboard: bool = option(
        True, "Also write TensorBoard events to <run>/tensorboard when it is installed."
    )
    peak_tflops: float | None = option(
        None, "Peak TFLOP/s of one device for MFU; null = built-in GPU table (no MFU on CPU).", gt=0
    )
    stop_file: str = option(
        "STOP", "Creating <run>/<this> stops the run like SIGUSR1 (checkpoint, exit 75); for torchrun."
    )

    def __post_init__(self) -> None:
        name = self.stop_file
        if not name.strip() or "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(
                f"train.stop_file must be a plain file name inside the run directory, got {name!r}"
            )


@dataclasses.dataclass
class PretrainConfig:
    """A pretraining run. `model:` is the chosen family's own config dataclass."""

    family: str = option(doc="Model family (xval, astroclip, mpp, or one registered at run time).")
    data: DataSection = option(doc="Shards to train on.")
    model: Any = option(None, "The family's model config (see `foundation config describe FAMILY`).")
    run: RunSection = option(doc="Where the run lives and its seed.", factory=RunSection)
    optim: OptimSection = option(doc="Optimiser and learning-rate schedule.", factory=OptimSection)
    train: TrainSection = option(
        doc="Loop, parallelism, precision, logging and checkpoints.", factory=TrainSection
    )


def load_pretrain_config(path: str | Path | None, overrides: Iterable[str] = ()) -> PretrainConfig:
    """Read a pretraining config; the `model:` section is validated against the family's dataclass."""
    from foundation import registry

    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, overrides)
    if "family" not in data:
        raise ConfigError(f"config is missing 'family' (one of: {', '.join(registry.available())})")
    family = registry.get(str(data["family"]))
    model_data = data.pop("model", None)
    model_data = {} if model_data is None else model_data  # `model: false` or `0` is refused, not a default
    cfg = from_dict(PretrainConfig, data)
    cfg.model = _coerce(model_data, family.model_config, "model")
    return cfg
