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
