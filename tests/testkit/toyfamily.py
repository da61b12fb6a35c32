"""The toy model family of the trainer, SLURM and registry tests, loaded by spawned ranks and
jobs as `tests.testkit.toyfamily:FAMILY` (see `tests.testkit.child_env`).

Samples: `x` (L, D) float32 tokens and `y` a float32 target (`tests.testkit.shards.write_toy_shards`).
The model embeds the tokens, runs a few pre-LN attention blocks through `foundation.attention` (so
the backend choice is exercised), pools, and regresses `y`. It has biases, norms, an embedding
table and >=2-D weights, so the weight-decay split has something to split. Its pooled hidden state
is what `foundation export` writes for it (`hidden`).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from foundation.attention import attention
from foundation.config import option
from foundation.registry import Family


@dataclasses.dataclass
class ToyConfig:
    features: int = option(4, "Features per input token.")
    width: int = option(16, "Hidden width.")
    heads: int = option(2, "Attention heads.")
    depth: int = option(2, "Blocks.")
    length: int = option(4, "Tokens per sample.")
    dropout: float = option(0.0, "Dropout after attention (exercises the per-rank RNG).")

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, length, width = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = attention(q, k, v).transpose(1, 2).reshape(b, length, width)
        h = h + self.drop(self.out(a))
        return h + self.mlp(self.norm2(h))


class ToyNet(nn.Module):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.features, cfg.width)
        self.position = nn.Embedding(cfg.length, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, 1)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, width): the normalised hidden state averaged over tokens."""
        h = self.proj(x) + self.position.weight[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.norm(h).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(x)).sum(-1)  # (B,); not a view (FSDP2 warns on views)


MANIFESTS_SEEN: list = []  # every manifest build_model was given (tests check where it came from)


def build_model(cfg: ToyConfig, manifest) -> nn.Module:
    MANIFESTS_SEEN.append(manifest)
    return ToyNet(cfg)


_TRAIN_CALLS = 0


def _test_hook() -> None:
    """`TOY_ACTION=<call>:<action>[:<rank>]` fires at this process's <call>-th training loss call:
    action SIGUSR1/SIGTERM sends that signal to this very process (a scheduler's signal arriving
    mid-step), RAISE raises (a crash in model code), any other action is a path to create (the
    stop file). `TOY_SLEEP=<seconds>` sleeps in every call (changes no number); `TOY_HOLD=<path>`
    waits in every call while that file exists (up to a minute), so a test can act mid-run."""
    global _TRAIN_CALLS
    _TRAIN_CALLS += 1
    if os.environ.get("TOY_SLEEP"):  # stretch a run so that a test can signal it from outside
        time.sleep(float(os.environ["TOY_SLEEP"]))
    hold = os.environ.get("TOY_HOLD")
    deadline = time.monotonic() + 60
    while hold and Path(hold).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    spec = os.environ.get("TOY_ACTION")
    if not spec:
        return
    call, action, *rank = spec.split(":", 2)
    if int(call) != _TRAIN_CALLS or (rank and rank[0] != os.environ.get("RANK", "0")):
        return
    if action == "RAISE":
        raise RuntimeError("toy failure")
    if action.startswith("SIG"):
        os.kill(os.getpid(), getattr(signal, action))
    else:
        Path(action).touch()


def loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    if model.training:
        _test_hook()
    prediction = model(batch["x"])
    target = batch["y"].to(prediction.dtype).reshape(prediction.shape)
    mse = F.mse_loss(prediction.float(), target.float())
    return mse, {"mae": float((prediction.detach().float() - target.float()).abs().mean())}


def embed(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """The pooled hidden state: what `foundation export` writes for this family."""
    return {"hidden": model.pooled(batch["x"].float())}


def flops_per_sample(cfg: ToyConfig, manifest) -> float:
    params = cfg.depth * 12 * cfg.width**2 + cfg.features * cfg.width
    return 6.0 * params * cfg.length


def tokens_per_batch(batch: dict) -> int:
    return int(batch["x"].shape[0] * batch["x"].shape[1])


FAMILY = Family(
    name="toy",
    model_config=ToyConfig,
    build_model=build_model,
    loss=loss,
    flops_per_sample=flops_per_sample,
    tokens_per_batch=tokens_per_batch,
    embed=embed,
)
