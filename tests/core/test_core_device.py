"""foundation.device: one rule for device and precision, degrading cleanly to the CPU."""

import pytest
import torch

from foundation import device
from foundation.errors import ConfigError

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only degradation")


@needs_no_cuda
def test_auto_is_the_cpu_and_cuda_is_refused_with_the_option_named():
    assert device.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"--device: cuda:0 was asked for but torch sees no CUDA"):
        device.resolve_device("cuda:0")
    assert "expected auto, cpu, cuda or cuda:N" in device.check_device_name("gpu")
    assert "expected" in device.check_device_name("cuda:x")


def test_precision_auto_is_fp32_on_cpu_and_explicit_bf16_autocasts():
    cpu = torch.device("cpu")
    assert device.resolve_precision("auto", cpu) == "fp32"
    assert device.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ConfigError, match="train.precision must be auto, fp32 or bf16"):
        device.resolve_precision("fp8", cpu, option="train.precision")
    layer = torch.nn.Linear(4, 4)
    with device.autocast(cpu, "bf16"):
        assert layer(torch.ones(2, 4)).dtype == torch.bfloat16
    with device.autocast(cpu, "fp32"):
        assert layer(torch.ones(2, 4)).dtype == torch.float32


def test_precision_auto_on_a_gpu_without_bf16_is_fp32_and_explicit_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    gpu = torch.device("cuda", 0)
    assert device.resolve_precision("auto", gpu) == "fp32"
    with pytest.raises(ConfigError, match="train.precision is bf16 but this GPU does not support bf16"):
        device.resolve_precision("bf16", gpu, option="train.precision")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert device.resolve_precision("auto", gpu) == "bf16"


@needs_no_cuda
def test_the_trainer_picks_its_device_by_the_same_rule_and_names_train_device():
    import torch.distributed as dist

    from foundation.train.distributed import init_distributed

    with pytest.raises(ConfigError, match=r"^train\.device: cuda was asked for but torch sees no CUDA"):
        init_distributed("cuda")
    with pytest.raises(ConfigError, match=r"^train\.device: expected auto, cpu, cuda or cuda:N, got 'gpu'"):
        init_distributed("gpu")
    assert not dist.is_initialized()  # refused before any process group was made


@pytest.mark.parametrize(
    ("amx", "caps", "fast"),
    [
        (False, {}, False),
        (True, {}, True),
        (True, {"ONEDNN_MAX_CPU_ISA": "ALL"}, True),
        (True, {"ONEDNN_MAX_CPU_ISA": "avx512_core_amx"}, True),
        (True, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, False),  # measured 0.78x of fp32 there
        (True, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),
        (True, {"DNNL_MAX_CPU_ISA": "AVX2"}, False),
    ],
)
def test_bf16_is_fast_only_with_amx_tiles_that_onednn_may_use(monkeypatch, amx, caps, fast):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    for variable in device.ONEDNN_ISA_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in caps.items():
        monkeypatch.setenv(variable, value)
    assert device.cpu_bf16_is_fast() is fast
