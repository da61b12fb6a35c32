"""Tiny configs, one form each: the toy family's pretraining config (`config_dict`), and the real
families' shipped tiny configs read from `configs/` (`tiny_model_config`, `tiny_config_dict`), with
the sizes a test needs passed as overrides."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.testkit import REPO

TOY_FAMILY = "tests.testkit.toyfamily:FAMILY"
CONFIGS = REPO / "configs"

#: The shipped tiny configs of each real family (those its docs and demos train on a CPU); AstroCLIP
#: has one per tower (align-tiny.yaml only adds the alignment and a stage-1 run to start from).
TINY_CONFIGS = {
    "xval": [CONFIGS / "xval" / "tiny.yaml"],
    "mpp": [CONFIGS / "mpp" / "tiny.yaml"],
    "astroclip": [CONFIGS / "astroclip" / "specformer-tiny.yaml", CONFIGS / "astroclip" / "image-tiny.yaml"],
}

#: Smaller than the shipped tiny AstroCLIP config, so that a test can build a model per case in
#: well under a second: the sizes its model, benchmark and pipeline tests share.
ASTROCLIP_SMALL = {
    "spectrum": {
        "wave_step": 40,
        "patch": 8,
        "stride": 4,
        "width": 32,
        "depth": 1,
        "heads": 2,
        "mask_segments": 3,
        "mask_length": 4,
    },
    "image": {"size": 16, "patch": 4, "width": 32, "depth": 1, "heads": 2},
    "embed_dim": 16,
    "head_heads": 2,
}


def _updated(data: dict, sections: dict) -> dict:
    """`data` with `sections` applied: a dict value updates the keys of that section, any other
    value replaces it."""
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return data


def config_dict(shards: Path, run_dir: Path, **sections) -> dict:
    """A tiny, fast pretraining config of the toy family; keyword arguments update sections
    (`train={...}` updates keys of `train`; a non-dict value replaces the section)."""
    data = {
        "family": TOY_FAMILY,
        "data": {"path": str(shards), "batch_size": 4, "num_workers": 0, "shuffle": True},
        "model": {"width": 16, "depth": 2},
        "run": {"dir": str(run_dir), "seed": 7},
        "optim": {"lr": 0.01, "warmup_steps": 3, "min_lr_ratio": 0.1},
        "train": {
            "steps": 12,
            "log_every": 2,
            "val_every": 6,
            "val_batches": 2,
            "ckpt_every": 4,
            "keep_last": 2,
            "progress": False,
            "tensorboard": False,
        },
    }
    return _updated(data, sections)


def tiny_config_dict(family: str, shards: Path | str, run_dir: Path | str, **sections) -> dict:
    """The (first) shipped tiny pretraining config of `family` on `shards`, run in `run_dir`;
    keyword arguments update sections as in `config_dict`."""
    data = yaml.safe_load(TINY_CONFIGS[family][0].read_text())
    data["data"]["path"] = str(shards)
    data["run"]["dir"] = str(run_dir)
    return _updated(data, sections)


def _merged(base: dict, layer: dict) -> dict:
    """`base` with `layer`'s keys replaced; a dict in both (a nested section) is merged the same way."""
    out = dict(base)
    for key, value in layer.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def tiny_model_config(family: str, *layers: dict, **overrides):
    """The family's model dataclass from the model sections of its shipped tiny configs, with the
    `layers` (such as `ASTROCLIP_SMALL`) and then `overrides` (the sizes or options a test needs)
    merged over them, nested sections key by key."""
    from foundation import config, registry

    shipped = [yaml.safe_load(path.read_text())["model"] for path in TINY_CONFIGS[family]]
    section: dict = {}
    for layer in (*shipped, *layers, overrides):
        section = _merged(section, layer)
    return config.from_dict(registry.get(family).model_config, section, "model")


def model_overrides(section: dict, prefix: str = "model") -> list[str]:
    """`section` as command-line overrides (`model.spectrum.width=32`), nested sections flattened."""
    out = []
    for key, value in section.items():
        if isinstance(value, dict):
            out += model_overrides(value, f"{prefix}.{key}")
        else:
            out.append(f"{prefix}.{key}={value}")
    return out


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path
