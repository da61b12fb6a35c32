"""The one toy model family of the tests, loaded by spawned ranks, SLURM jobs and exports as
`tests.testkit.toyfamily:FAMILY` (`tests.testkit.configs.TOY_FAMILY`; see `tests.testkit.child_env`).

Token samples: `x` (L, D) float32 tokens and `y` a float32 target
(`tests.testkit.shards.write_toy_shards`). The model embeds the tokens, runs a few pre-LN attention
blocks through `foundation.attention` (so the backend choice is exercised), pools, and regresses
`y`. It has biases, norms, an embedding table and >=2-D weights, so the weight-decay split has
something to split. Its pooled hidden state is what `foundation export` writes for it (`hidden`).

Galaxy samples (`tests.testkit.shards.write_galaxy_shards`): with `image_size` and `spectrum_size`
set, the model also has an image and a spectrum tower (one linear map each, to `width`), which
`foundation export` writes as the modalities `image` and `spectrum`; `write_checkpoint` makes such a
model without training it. `KEYS_SEEN` records every key `embed` saw, so that a test can check that
a resumed export does not embed rows that are in its file already.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from foundation.attention import attention
from foundation.config import option
from foundation.registry import Family

GALAXY_IMAGE_SHAPE = (3, 4, 4)  # (bands, height, width) of a galaxy sample's image
GALAXY_SPECTRUM_LENGTH = 20


@dataclasses.dataclass
class ToyConfig:
    features: int = option(4, "Features per input token.")
    width: int = option(16, "Hidden width (and the towers' embedding width).")
    heads: int = option(2, "Attention heads.")
    depth: int = option(2, "Blocks.")
    length: int = option(4, "Tokens per sample.")
    dropout: float = option(0.0, "Dropout after attention (exercises the per-rank RNG).")
    image_size: int = option(0, "Flattened image length of the image tower (0: no image tower).")
    spectrum_size: int = option(0, "Spectrum length of the spectrum tower (0: no spectrum tower).")
    collate: bool = option(False, "Use the family's own collate (else the loaders' default).")

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
        # Only when asked: a tower no loss reaches would leave DDP with unused parameters.
        self.image = nn.Linear(cfg.image_size, cfg.width) if cfg.image_size else None
        self.spectrum = nn.Linear(cfg.spectrum_size, cfg.width) if cfg.spectrum_size else None

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, width): the normalised hidden state averaged over tokens."""
        h = self.proj(x) + self.position.weight[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.norm(h).mean(dim=1)

    def towers(self, image: torch.Tensor, spectrum: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"image", "spectrum"}: (B, width) embeddings of a galaxy batch."""
        if self.image is None or self.spectrum is None:
            raise ValueError("this toy model has no towers: set model.image_size and model.spectrum_size")
        return {"image": self.image(image.flatten(1)), "spectrum": self.spectrum(spectrum)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(x)).sum(-1)  # (B,); not a view (FSDP2 warns on views)


MANIFESTS_SEEN: list = []  # every manifest build_model was given (tests check where it came from)
KEYS_SEEN: list[str] = []  # every sample key embed was given (tests check what an export re-embeds)


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


class Collate:
    """The family's own collate (`model.collate: true`), so that tests cover the path of families
    that have one: the model's inputs present in the samples stacked into tensors, the keys kept."""

    INPUTS = ("x", "y", "image", "spectrum")

    def __call__(self, samples: list[dict]) -> dict:
        batch: dict = {
            field: torch.as_tensor(np.stack([s[field] for s in samples]))
            for field in self.INPUTS
            if field in samples[0]
        }
        batch["__key__"] = [s["__key__"] for s in samples]
        return batch


def make_collate(cfg: ToyConfig, manifest, train: bool) -> Collate | None:
    return Collate() if cfg.collate else None


def embed(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """What `foundation export` writes: the pooled hidden state of token batches (`hidden`), the
    towers' embeddings of galaxy batches (`image`, `spectrum`)."""
    KEYS_SEEN.extend(batch.get("__key__", []))
    if "x" in batch:
        return {"hidden": model.pooled(batch["x"].float())}
    return model.towers(batch["image"], batch["spectrum"])


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
    make_collate=make_collate,
    flops_per_sample=flops_per_sample,
    tokens_per_batch=tokens_per_batch,
    embed=embed,
)


def write_checkpoint(path: Path, data_path: Path, *, seed: int = 0, collate: bool = False) -> nn.Module:
    """A `model.pt` of a small toy model with galaxy towers (width 8, one head, one block) in the
    trainer's inference format, without running the trainer (an export needs weights only)."""
    from foundation import config
    from tests.testkit.configs import TOY_FAMILY

    cfg = config.PretrainConfig(
        family=TOY_FAMILY,
        data=config.DataSection(path=str(data_path)),
        model=ToyConfig(
            width=8,
            heads=1,
            depth=1,
            image_size=int(np.prod(GALAXY_IMAGE_SHAPE)),
            spectrum_size=GALAXY_SPECTRUM_LENGTH,
            collate=collate,
        ),
    )
    cfg.run.seed = seed
    torch.manual_seed(seed)
    model = build_model(cfg.model, None)
    payload = {
        "format": "foundation.model",
        "version": 1,
        "family": TOY_FAMILY,
        "step": 1,
        "config": config.to_dict(cfg),
        "dataset": None,
        "state_dict": model.state_dict(),
    }
    torch.save(payload, path)
    return model
