"""The toy family's tiny pretraining config, as a dict to adjust and a YAML file to run."""

from __future__ import annotations

from pathlib import Path

import yaml

TOY_FAMILY = "tests.testkit.toyfamily:FAMILY"


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
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return data


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path
