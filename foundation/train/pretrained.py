"""Inference weights: `<run>/model.pt` and `load_pretrained` for every downstream job.

`model.pt` is a plain `torch.save` of a dict readable with `torch.load(weights_only=True)`:
    format "foundation.model", version 1, family (name), step,
    config (the resolved pretraining config as a plain dict),
    dataset ({file name: uint8 tensor}: the shard set's manifest.json and extra files such as a
             tokenizer, so the model can be rebuilt without the shards; None if there was none),
    state_dict (plain CPU tensors, parameter names of the unwrapped model).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from foundation import atomic
from foundation.errors import ConfigError, DataError

FORMAT = "foundation.model"
VERSION = 1
#: Environment variable naming the modules whose `module:ATTRIBUTE` families saved files may load.
TRUSTED_FAMILY_MODULES = "FOUNDATION_FAMILY_MODULES"
#: Dataset snapshot files (manifest, tokenizer, ...) up to this size travel inside model.pt.
MAX_EMBEDDED_BYTES = 64 * 2**20


def snapshot_dataset(data_path: str | Path, dest: Path) -> None:
    """Copy the shard set's manifest.json and its extra files (tokenizer, ...) into `dest`, so the
    model can be rebuilt where the shards are not (export, evaluation on another machine)."""
    from foundation.data import Manifest

    source = Path(data_path)
    dest.mkdir(parents=True, exist_ok=True)
    if not (source / "manifest.json").is_file():
        return
    manifest = Manifest.load(source)  # checks that every file it names is a plain name
    for name, info in sorted(manifest.files.items()):
        _check_extra_file(source / name, info.bytes, info.sha256)
    for name in [*sorted(manifest.files), "manifest.json"]:
        with atomic.replacing(dest / name) as tmp:
            shutil.copyfile(source / name, tmp)


def _check_extra_file(path: Path, size: int, sha256: str) -> None:
    """An extra file of a shard set (a tokenizer, say) is the one its manifest names."""
    if not path.is_file():
        raise DataError(f"{str(path)!r} is listed in the shard set's manifest but missing")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if path.stat().st_size != size or digest.hexdigest() != sha256:
        raise DataError(
            f"{str(path)!r} differs from the file the shard set's manifest records (size or sha256); "
            "restore it, or prepare the shard set again"
        )


def _bytes_tensor(data: bytes) -> torch.Tensor:
    """A uint8 tensor of `data`, empty files included (`torch.frombuffer` refuses those)."""
    return (
        torch.empty(0, dtype=torch.uint8)
        if not data
        else torch.frombuffer(bytearray(data), dtype=torch.uint8)
    )


def dataset_fingerprint(folder: Path) -> str:
    """Content identity of a shard set: its family, schema, statistics, and every shard and extra
    file by name and SHA-256, as its manifest.json records them (paths and provenance left out,
    so a copied or moved shard set keeps its identity)."""
    file = folder / "manifest.json"
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
        identity = {
            "family": manifest.get("family"),
            "schema": manifest.get("schema"),
            "stats": manifest.get("stats"),
            "splits": {
                name: [[s.get("name"), s.get("samples"), s.get("sha256")] for s in split.get("shards", [])]
                for name, split in sorted(manifest.get("splits", {}).items())
            },
            "files": sorted([f.get("name"), f.get("sha256")] for f in manifest.get("files", [])),
        }
        text = json.dumps(identity, sort_keys=True, allow_nan=True)
    except FileNotFoundError:
        raise DataError(f"{str(folder)!r} has no manifest.json (is it a shard set?)") from None
    except (UnicodeDecodeError, ValueError, RecursionError, AttributeError, TypeError) as exc:
        raise DataError(f"{str(file)!r} is not a readable shard-set manifest ({exc})") from None
    return hashlib.sha256(text.encode()).hexdigest()


def _dataset_payload(run_dir: Path) -> dict[str, torch.Tensor] | None:
    """The run's dataset snapshot as {file name: uint8 tensor}, embedded in model.pt when small."""
    folder = run_dir / "dataset"
    if not (folder / "manifest.json").is_file():
        return None
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.endswith(".tmp"))
    if sum(p.stat().st_size for p in files) > MAX_EMBEDDED_BYTES:
        return {"manifest.json": _bytes_tensor((folder / "manifest.json").read_bytes())}
    return {p.name: _bytes_tensor(p.read_bytes()) for p in files}


def export_model(path: Path, model: nn.Module, cfg: Any, step: int, dist_info: Any) -> None:
    """Write the final weights of a (possibly wrapped/sharded) model; collective, rank 0 writes."""
    from foundation import config

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if not dist_info.is_main:
        return
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "family": cfg.family,
        "step": step,
        "config": config.to_dict(cfg),
        "dataset": _dataset_payload(path.parent),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state.items()},
    }
    with atomic.replacing(path) as tmp:  # a full disk leaves no half-written file behind
        torch.save(payload, tmp)


def _manifest_from_folder(folder: Path):
    from foundation.data import Manifest

    return Manifest.load(folder) if (folder / "manifest.json").is_file() else None


def _manifest_from_payload(files: dict[str, torch.Tensor] | None):
    """Materialise an embedded dataset snapshot (kept until the process exits) and load it."""
    if not files:
        return None
    if not isinstance(files, dict) or "manifest.json" not in files:
        raise DataError("the model file's embedded dataset snapshot has no manifest.json")
    for name, data in files.items():
        # Names come from the file: a path would write outside the temporary folder.
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise DataError(f"the model file's dataset snapshot names the file {name!r}, not a plain name")
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.ndim != 1:
            raise DataError(f"the model file's dataset snapshot entry {name!r} is not a byte tensor")
    folder = Path(tempfile.mkdtemp(prefix="foundation-dataset-"))
    atexit.register(shutil.rmtree, folder, True)
    for name, data in files.items():
        (folder / name).write_bytes(data.numpy().tobytes())
    return _manifest_from_folder(folder)


def _family_name_from_file(name: str) -> str:
    """A family named in a saved file. `module:ATTRIBUTE` names are honoured only for modules this
    process imported already or that the user named in `FOUNDATION_FAMILY_MODULES`: importing a
    module a received file names would run its code (a `module.py` shipped beside the file, say)."""
    module, sep, _ = name.partition(":")
    trusted = {m.strip() for m in os.environ.get(TRUSTED_FAMILY_MODULES, "").split(",") if m.strip()}
    if sep and module not in sys.modules and module not in trusted:
        raise ConfigError(
            f"the checkpoint's model family {name!r} is not an installed family; if you trust the "
            f"module {module!r}, name it in {TRUSTED_FAMILY_MODULES} (comma-separated) or register the "
            "family with an entry point"
        )
    return name


def _pretrain_config(cfg_dict: dict[str, Any]):
    from foundation import config, registry

    if not isinstance(cfg_dict, dict) or not isinstance(cfg_dict.get("family"), str):
        raise DataError("the saved config has no family name")
    data = dict(cfg_dict)
    family = registry.get(_family_name_from_file(data["family"]))
    model_data = data.pop("model", None) or {}
    cfg = config.from_dict(config.PretrainConfig, data)
    cfg.model = config.from_dict(family.model_config, model_data, "model")
    return cfg, family


def load_pretrained(path: str | Path, *, map_location: str | torch.device = "cpu"):
    """`(model, config, family)` from a run directory, a `step-<N>` checkpoint folder or a `model.pt`.

    model: the family's plain `nn.Module` in eval mode on `map_location`, fp32;
    config: the run's `PretrainConfig` (its `model` section is the family's dataclass);
    family: the `foundation.registry.Family`.
    A run directory gives the newer of `model.pt` and its newest complete checkpoint (the file on
    a tie). Raises ConfigError when the path holds none of these.
    """
    from foundation.train import checkpoint as ckpt
    from foundation.weights import is_converted, load_converted

    path = Path(path)
    if is_converted(path):  # a `foundation convert` directory (released weights)
        return load_converted(path, map_location)
    if path.is_dir() and (path / ckpt.META).exists() or path.name.startswith("step-"):
        return _from_checkpoint(path, map_location)
    if path.is_dir():
        candidates: list[tuple[int, int, Path]] = []
        if (path / "model.pt").is_file():
            candidates.append((_model_file_step(path / "model.pt"), 1, path / "model.pt"))
        latest = ckpt.latest_checkpoint(path)
        if latest is not None:
            candidates.append((latest[0], 0, latest[1]))
        if not candidates:
            raise ConfigError(
                f"{str(path)!r} holds neither model.pt nor a complete checkpoints/step-N folder"
            )
        _, _, best = max(candidates)
        return load_pretrained(best, map_location=map_location)
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} does not exist (expected a run dir, a step-N folder or a model.pt)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ConfigError(f"{str(path)!r} is not a foundation model file: {_load_failure(exc)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{str(path)!r} is not a foundation model file (format {FORMAT!r} expected)")
    if payload.get("version", 0) > VERSION:
        raise ConfigError(
            f"{str(path)!r} has model format version {payload['version']}; this reads <= {VERSION}"
        )
    cfg, family = _pretrain_config(payload["config"])
    local = path.parent / "dataset"
    manifest = (
        _manifest_from_folder(local) if local.is_dir() else _manifest_from_payload(payload.get("dataset"))
    )
    model = family.build_model(cfg.model, manifest)
    model.load_state_dict(payload["state_dict"])
    return model.to(map_location).eval(), cfg, family


def _model_file_step(path: Path) -> int:
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("step")
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ConfigError(f"{str(path)!r} is not a foundation model file: {_load_failure(exc)}") from None
    if not isinstance(step, int):
        raise ConfigError(f"{str(path)!r} is not a foundation model file (no step)")
    return step


def _load_failure(exc: BaseException) -> str:
    """Why `torch.load` refused a file, in one line; never torch's advice to retry with
    weights_only=False, which would run whatever code the file carries."""
    if isinstance(exc, pickle.UnpicklingError):
        return "it holds Python objects other than tensors and plain data, never loaded (they can run code)"
    text = str(exc).strip()
    return text.splitlines()[0] if text else f"{type(exc).__name__} (an empty or truncated file)"


def _from_checkpoint(path: Path, map_location):
    from foundation.train import checkpoint as ckpt

    meta = ckpt.read_meta(path)
    cfg, family = _pretrain_config(meta["config"])
    run_dir = path.parent.parent
    manifest = _manifest_from_folder(run_dir / "dataset") or _manifest_from_folder(Path(cfg.data.path))
    model = family.build_model(cfg.model, manifest)
    ckpt.load_model_weights(path, model)
    return model.to(map_location).eval(), cfg, family
