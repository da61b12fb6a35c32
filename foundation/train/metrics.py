"""Run metrics: `<run>/metrics.jsonl` always, TensorBoard when installed, a tqdm bar on a TTY.

Records (one JSON object per line, written by rank 0):
- training, every `train.log_every` steps: `step`, `loss` (mean over the steps since the last
  record and over ranks), the family's own metrics (same averaging), `lr`, `grad_norm` (global,
  before clipping), `samples_per_s` and `tokens_per_s` (whole job), `data_wait_pct` (share of
  wall time the ranks spent waiting for the loader), `step_time_s`, `rss_mb` (rank 0, resident
  memory), `cuda_max_alloc_mb` (on CUDA), `mfu` (where the family reports FLOPs per sample and
  the device's peak is known), `time` (seconds since the run (re)started);
- validation: `step`, `val_loss` and `val_<metric>` for the family's metrics.

MFU = FLOPs per sample x samples/s / (peak FLOP/s per device x devices). Peak values are dense
bf16 tensor-core figures from vendor data sheets (TF32 is half of them on A100/H100/H200);
`train.peak_tflops` overrides them, and on CPU (no reliable peak) MFU is reported only when
that option is set.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from foundation import atomic

_log = logging.getLogger(__name__)

#: Dense bf16 peak TFLOP/s by (lower-case) substring of the CUDA device name; first match wins.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),
    ("gh200", 989.0),
    ("a100", 312.0),
    ("a800", 312.0),
    ("l40s", 362.0),
    ("l40", 181.0),
    ("a40", 150.0),
    ("a10", 125.0),
    ("l4", 121.0),
    ("rtx 4090", 165.0),
    ("rtx a6000", 155.0),
    ("v100", 125.0),  # fp16 tensor cores (no bf16 on Volta)
    ("mi300x", 1307.0),
    ("mi250x", 383.0),
]


def peak_flops(device: torch.device, precision: str, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device for this precision, or None where unknown."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12 * (1.0 if precision == "bf16" else 0.5)
    return None


def rss_mb() -> float:
    """Current resident memory of this process in MiB (peak where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsWriter:
    """Rank 0's sinks for metric records; other ranks get a writer that does nothing."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        resume_step: int,
        total_steps: int,
        progress: bool | str,
        tensorboard: bool,
    ) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                _log.debug("tensorboard is not installed; metrics go to metrics.jsonl only")
        show = progress is True or (progress == "auto" and sys.stderr.isatty())
        if show:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step, unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """Drop records past the step we resume from: they belong to work that is redone."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a line cut short by a kill
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line)
        atomic.write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record, default=float) + "\n")
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, int | float):
                    group = "val" if key.startswith("val_") else "train"
                    self._tb.add_scalar(f"{group}/{key.removeprefix('val_')}", value, step)
        if self._bar is None and "loss" in record:
            _log.info(
                "step %d loss %.4g lr %.3g %.1f samples/s data-wait %.0f%%",
                record["step"],
                record["loss"],
                record.get("lr", float("nan")),
                record.get("samples_per_s", float("nan")),
                record.get("data_wait_pct", float("nan")),
            )
        elif self._bar is None and "val_loss" in record:
            _log.info("step %d val_loss %.4g", record["step"], record["val_loss"])

    def advance(self, step: int, loss: float | None = None) -> None:
        if self._bar is not None:
            self._bar.n = step
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
