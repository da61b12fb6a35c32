"""Pretraining config validation, launch detection, optimiser groups and the lr schedule (fast)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from foundation.cli import main as cli_main
from foundation.config import OptimSection, load_pretrain_config
from foundation.errors import ConfigError
from foundation.train import optim
from foundation.train.distributed import expand_nodelist, read_launch
from foundation.train.trainer import config_changes, resolve_parallel, resume_hash
from tests.testkit import toyfamily
from tests.testkit.configs import TOY_FAMILY, config_dict, write_config


@pytest.fixture
def cfg_path(shards, tmp_path):
    return write_config(tmp_path / "cfg.yaml", config_dict(shards, tmp_path / "run"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.setps=3", r"unknown config key 'train\.setps'; did you mean 'steps'"),
        ("optim.warmup=5", r"unknown config key 'optim\.warmup'; did you mean 'warmup_steps'"),
        ("train.steps=many", r"train\.steps: expected an integer, got 'many'"),
        ("train.parallel=zero3", r"train\.parallel: 'zero3' is not one of 'auto', 'none', 'ddp', 'fsdp'"),
        ("train.grad_accum=0", r"train\.grad_accum must lie in \[1, "),
        ("optim.min_lr_ratio=2", r"optim\.min_lr_ratio must lie in \[0, 1\]"),
        ("data.batch_size=0", r"data\.batch_size must lie in \[1, "),
        ("model.widht=8", r"unknown config key 'model\.widht'; did you mean 'width'"),
        ("model.width=15", r"width 15 is not divisible by heads 2"),
    ],
)
def test_bad_values_get_a_clear_message(cfg_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_pretrain_config(cfg_path, [override])


def test_missing_required_key(tmp_path):
    path = write_config(tmp_path / "cfg.yaml", {"family": TOY_FAMILY, "data": {"batch_size": 2}})
    with pytest.raises(ConfigError, match=r"missing required key\(s\) 'data\.path'"):
        load_pretrain_config(path)


def test_cli_prints_one_line_and_exits_2(cfg_path, capsys):
    assert cli_main(["pretrain", str(cfg_path), "train.setps=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: unknown config key 'train.setps'")


def test_missing_shards_are_a_data_error(shards, tmp_path, capsys):
    path = write_config(tmp_path / "cfg.yaml", config_dict(tmp_path / "nowhere", tmp_path / "run"))
    assert cli_main(["pretrain", str(path)]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_resume_hash_ignores_only_the_harmless_keys(cfg_path):
    from foundation.config import to_dict

    base = to_dict(load_pretrain_config(cfg_path))
    harmless = to_dict(load_pretrain_config(cfg_path, ["train.log_every=7", "run.dir=/elsewhere"]))
    harmful = to_dict(load_pretrain_config(cfg_path, ["optim.lr=0.5", "train.steps=99"]))
    assert resume_hash(base) == resume_hash(harmless)
    assert resume_hash(base) != resume_hash(harmful)
    assert config_changes(base, harmful) == ["optim.lr: 0.01 -> 0.5", "train.steps: 12 -> 99"]


def test_launch_from_torchrun_srun_and_plain_environments():
    assert read_launch({}).launcher == "single"
    torchrun = read_launch(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    )
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.launcher) == (
        3,
        4,
        1,
        "torchrun",
    )
    srun = read_launch(
        {
            "SLURM_PROCID": "5",
            "SLURM_STEP_NUM_TASKS": "8",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "gpu[007-008,010],login1",
            "SLURM_JOB_ID": "123456",
        }
    )
    assert (srun.rank, srun.world_size, srun.local_rank, srun.master_addr) == (5, 8, 1, "gpu007")
    assert srun.master_port == 20000 + 123456 % 20000 and srun.launcher == "slurm"
    # The batch script itself (no srun step) running plain python is one process.
    batch = read_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[1-2]"})
    assert batch.launcher == "single"
    assert expand_nodelist("a[1-3],b,c[09-10]") == ["a1", "a2", "a3", "b", "c09", "c10"]


def test_parallel_none_with_many_processes_is_refused():
    assert resolve_parallel("auto", 1) == "none" and resolve_parallel("auto", 2) == "ddp"
    with pytest.raises(ConfigError, match="2 processes"):
        resolve_parallel("none", 2)


def test_weight_decay_skips_biases_norms_and_embeddings_and_every_parameter_is_optimised():
    model = toyfamily.ToyNet(toyfamily.ToyConfig())
    model.blocks[1].out.weight.requires_grad_(False)  # frozen: not optimised
    decay, no_decay = optim.decay_split(model)
    assert "proj.weight" in decay and "blocks.0.qkv.weight" in decay
    assert "position.weight" in no_decay  # an embedding table, 2-D but not decayed
    assert {"proj.bias", "norm.weight", "blocks.0.norm1.bias"} <= set(no_decay)
    opt = optim.build_optimizer(model, OptimSection(weight_decay=0.1))
    grouped = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(grouped) == trainable
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i, wd in grouped.items() if wd > 0} == set(decay)


def test_registered_optimizer_is_used_and_unknown_names_are_refused():
    calls = []

    def build(groups, cfg):
        calls.append(len(groups))
        return torch.optim.SGD(groups, lr=cfg.lr)

    optim.register_optimizer("test-sgd", build)
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    assert isinstance(optim.build_optimizer(model, OptimSection(name="test-sgd")), torch.optim.SGD)
    assert calls == [2]
    with pytest.raises(ConfigError, match="unknown optimiser optim.name='lion'; available: adamw"):
        optim.build_optimizer(model, OptimSection(name="lion"))


def test_warmup_then_cosine_to_the_floor():
    cfg = SimpleNamespace(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    factors = [optim.lr_factor(step, cfg, total_steps=14) for step in range(15)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[9] == pytest.approx(0.55) and factors[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:], strict=False))
    constant = SimpleNamespace(warmup_steps=0, schedule="constant", min_lr_ratio=0.1)
    assert {optim.lr_factor(s, constant, 10) for s in range(10)} == {1.0}
    assert not math.isnan(
        optim.lr_factor(0, SimpleNamespace(warmup_steps=0, schedule="cosine", min_lr_ratio=0.0), 0)
    )
