"""Model directories of released weights: `model.safetensors` + `config.json`, and `hf:` sources.

A `foundation convert` directory holds

    model.safetensors   the weights under our parameter names (safetensors: no pickle)
    config.json         format "foundation.converted", version, family, source (what was
                        converted and how), config (a pretraining config whose `model:` section
                        records the architecture, variant and field vocabulary)

`load_pretrained` reads it through `load_converted`, so every job that takes a run takes it too.
Family-agnostic: each family's converter builds the state dict, this module stores and loads it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from foundation import atomic
from foundation.errors import ConfigError, DataError

FORMAT = "foundation.converted"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
#: config.json is small; anything larger is not one of ours.
MAX_CONFIG_BYTES = 4 * 2**20
HUB_EXTRA = "pip install 'foundation[hub]' (or pip install huggingface_hub)"


# ----------------------------------------------------------------------------- checkpoint sources


def parse_hub_source(source: str) -> tuple[str, str | None, str | None]:
    """`hf:ORG/REPO[/FILE][@REVISION]` → (repo id, file or None, revision or None)."""
    body = source[len("hf:") :]
    body, _, revision = body.partition("@") if "@" in body else (body, "", "")
    parts = body.split("/")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"{source!r}: expected hf:ORG/REPO[/FILE][@REVISION]")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None, revision or None


def resolve_checkpoint(source: str) -> Path:
    """A local checkpoint path for a local file or an `hf:` source (downloaded or from the cache)."""
    if not source.startswith("hf:"):
        return Path(source)
    repo_id, filename, revision = parse_hub_source(source)
    try:
        import huggingface_hub
        from huggingface_hub.errors import HFValidationError
    except ImportError:
        raise ConfigError(f"{source!r} needs huggingface_hub, which is not installed: {HUB_EXTRA}") from None
    try:
        if filename is not None:
            return Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision))
        folder = Path(huggingface_hub.snapshot_download(repo_id, revision=revision))
    except (OSError, ValueError, HFValidationError) as exc:
        # LocalEntryNotFoundError (offline, not cached), network and not-found errors.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{source!r}: cannot fetch from the Hugging Face Hub: {first}") from None
    return _single_checkpoint(folder, source)


def _single_checkpoint(folder: Path, source: str) -> Path:
    """The one checkpoint-like file of a downloaded repository (else name them)."""
    suffixes = (".tar", ".pt", ".pth", ".ckpt", ".bin")
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(suffixes))
    if len(found) != 1:
        names = [str(p.relative_to(folder)) for p in found] or ["none"]
        raise DataError(
            f"{source!r} holds {len(found)} checkpoint files ({', '.join(names)}); "
            "name one as hf:ORG/REPO/FILE"
        )
    return found[0]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- the model directory


def write_converted(out: Path, family: str, cfg: Any, state: dict, source: dict[str, Any]) -> None:
    """Write DIR (weights + config) into a temporary folder beside it, then rename; never overwrite."""
    from safetensors.torch import save_file

    from foundation import config

    out = Path(out)
    if out.exists():
        raise ConfigError(f"{str(out)!r} already exists; choose a new --out folder (nothing was written)")
    with atomic.replacing(out, overwrite=False) as tmp:  # fails if `out` appeared meanwhile
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / WEIGHTS))
        meta = {"format": FORMAT, "version": VERSION, "family": family, "source": source}
        meta["config"] = config.to_dict(cfg)
        (tmp / CONFIG).write_text(json.dumps(meta, indent=1) + "\n")


def is_converted(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def _read_meta(path: Path) -> dict[str, Any]:
    config_file = path / CONFIG
    if config_file.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{str(config_file)!r} is larger than {MAX_CONFIG_BYTES} bytes; not a model config")
    try:
        meta = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{str(config_file)!r} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise ConfigError(
            f"{str(config_file)!r} is not a converted-model config (format {FORMAT!r} expected)"
        )
    if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise ConfigError(
            f"{str(config_file)!r} has version {meta.get('version')!r}; this reads <= {VERSION}"
        )
    return meta


def load_converted(path: str | Path, map_location: Any = "cpu"):
    """`(model, config, family)` from a `foundation convert` directory, as `load_pretrained` returns."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from foundation.train.export import _pretrain_config

    path = Path(path)
    meta = _read_meta(path)
    cfg, family = _pretrain_config(meta["config"])
    model = family.build_model(cfg.model, None)
    try:
        state = load_file(str(path / WEIGHTS), device="cpu")
    except SafetensorError as exc:
        raise ConfigError(f"{str(path / WEIGHTS)!r} is not a readable safetensors file: {exc}") from None
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ConfigError(
            f"{str(path / WEIGHTS)!r} does not match its config.json: missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}"
        )
    model.load_state_dict(state)
    return model.float().to(map_location).eval(), cfg, family


def load_converted_state(model: Any, state: dict[str, Any], where: str) -> None:
    """Load a converter's mapped `state` into `model` with every shape checked first, so that a
    mis-sized tensor of a mismatched checkpoint is named instead of raising a size traceback."""
    target = model.state_dict()
    for key, value in state.items():
        if key in target and target[key].shape != value.shape:
            raise DataError(
                f"{where}: converted {key!r} has shape {tuple(value.shape)}, the architecture "
                f"read from the checkpoint needs {tuple(target[key].shape)} (mismatched checkpoint)"
            )
    model.load_state_dict(state, strict=True)  # a miss here is a bug in the tables, not bad input
