"""Regenerate tests/golden/astroclip/: small AstroCLIP models run by the reference code itself.

    git clone https://github.com/PolymathicAI/AstroCLIP REF_ASTROCLIP
    git -C REF_ASTROCLIP checkout 9d8506970773fbbf4f0d445d2b52def77bd60f56
    git clone https://github.com/facebookresearch/dinov2 REF_DINOV2
    git -C REF_DINOV2 checkout 2302b6bf46953431b969155307b9bed152754069   # AstroCLIP's requirements.txt
    python benchmarks/golden/make_astroclip_golden.py REF_ASTROCLIP REF_DINOV2 [--out tests/golden/astroclip]

The reference classes, at small sizes with seeded random weights (every parameter perturbed,
LayerScale gains near 0.5 so that every block shapes the output): DINOv2's ViT built with the
arguments `dinov2.models.build_model` passes for AstroCLIP's astrodino/config.yaml (LayerScale,
MLP, qkv/proj/ffn biases, block chunks), SpecFormer, and `AstroClipModel` with its `ImageHead` and
`SpectrumHead` (their backbones set directly: the constructors would load released files). Images
go through the reference's own `AstroClipCollator` (ToRGB, its `permute`, the centre crop),
spectra through SpecFormer's `preprocess`, as `embed_astroclip.py` runs them. Written:

- `astroclip.ckpt`: the Lightning layout (`state_dict`, `hyper_parameters` holding the encoder
  modules as Lightning pickles them, optimizer/loop/callback state, the datamodule's
  hyper-parameters with its collator object);
- `astrodino.ckpt`: DINOv2's teacher layout `{"teacher": {"backbone.…", "dino_head.…"}}`;
- `specformer.ckpt`: the Lightning layout with plain hyper-parameters;
- `cases.pt`: the inputs and the reference embeddings (see README.md there).

Packages the reference imports but these forward passes do not use are replaced by stand-ins
(lightning's LightningModule/save_hyperparameters, torchvision's transforms, skimage, datasets,
dinov2.eval.setup); xFormers is disabled (DINOv2 then runs its plain attention). Needs torch, numpy.
The test suite reads only the files written here, never the reference code.
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

ASTROCLIP_REPO, ASTROCLIP_COMMIT = "PolymathicAI/AstroCLIP", "9d8506970773fbbf4f0d445d2b52def77bd60f56"
DINOV2_REPO, DINOV2_COMMIT = "facebookresearch/dinov2", "2302b6bf46953431b969155307b9bed152754069"
OBJECTS = 3
CUTOUT, CROP = 40, 36  # released: 152-pixel cutouts, 144-pixel crops
PIXELS = 7781  # the DESI grid 3600–9824 Å at 0.8 Å, as released
VIT = dict(img_size=CROP, patch_size=12, embed_dim=32, depth=4, num_heads=2, block_chunks=2)
SPECFORMER = dict(input_dim=22, embed_dim=24, num_layers=2, num_heads=2, max_len=800, dropout=0.0)
HEAD = dict(embed_dim=32, n_head=2)  # image width 32 = 32: one in_proj_weight; spectrum 24: three


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def _package(name: str, path: Path) -> None:
    """A package whose __init__ is skipped (the reference's pull in training-only imports)."""
    _module(name, __path__=[str(path)])


class _AttributeDict(dict):
    def __getattr__(self, key):
        return self[key]


class _LightningModule(nn.Module):
    """lightning.LightningModule as far as these classes use it: save_hyperparameters/hparams."""

    def save_hyperparameters(self) -> None:
        frame = inspect.currentframe().f_back
        names = list(inspect.signature(type(self).__init__).parameters)[1:]
        self._hparams = _AttributeDict({n: frame.f_locals[n] for n in names})

    @property
    def hparams(self) -> _AttributeDict:
        return self._hparams


class _CenterCrop:
    """torchvision.transforms.CenterCrop's arithmetic on (..., H, W) tensors."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        top, left = int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0))
        return x[..., top : top + self.size, left : left + self.size]


def _stub_imports(astroclip: Path) -> None:
    os.environ["XFORMERS_DISABLED"] = "1"
    sys.modules.setdefault("xformers", None)  # type: ignore[arg-type]
    _AttributeDict.__module__ = "lightning.fabric.utilities.data"
    _AttributeDict.__qualname__ = _AttributeDict.__name__ = "AttributeDict"
    _module("lightning", LightningModule=_LightningModule, LightningDataModule=object)
    _module("lightning.fabric")
    _module("lightning.fabric.utilities")
    _module("lightning.fabric.utilities.data", AttributeDict=_AttributeDict)
    _CenterCrop.__module__, _CenterCrop.__qualname__ = "torchvision.transforms.transforms", "CenterCrop"
    _CenterCrop.__name__ = "CenterCrop"

    class _Unused:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("a torchvision stand-in that these forward passes do not use")

    transforms = _module("torchvision.transforms", CenterCrop=_CenterCrop)

    def unused(name: str) -> type:  # RandomApply, Compose … as base classes only
        if name.startswith("__"):
            raise AttributeError(name)
        return _Unused

    transforms.__getattr__ = unused
    _module("torchvision.transforms.transforms", CenterCrop=_CenterCrop)
    _module("torchvision", transforms=transforms)
    for name in ("skimage", "skimage.filters", "skimage.transform", "datasets"):
        _module(name)
    _module("dinov2.eval", __path__=[])
    _module("dinov2.eval.setup", setup_and_build_model=None)
    for name in (
        "astroclip",
        "astroclip/models",
        "astroclip/data",
        "astroclip/astrodino",
        "astroclip/astrodino/data",
    ):
        _package(name.replace("/", "."), astroclip / name)


def _commit(repo: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def _perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "gamma" in name:
                param.uniform_(0.3, 0.7)
            elif param.ndim == 1:
                param.add_(0.2 * torch.randn_like(param))
            else:
                param.add_(0.05 * torch.randn_like(param) + 0.02 * torch.randn_like(param).sign())


def build_reference():
    """(AstroClipModel, DINOv2 ViT, DINOHead, SpecFormer), seeded, in eval mode."""
    from astroclip.models.astroclip import AstroClipModel, ImageHead, SpectrumHead
    from astroclip.models.specformer import SpecFormer
    from astroclip.modules import MLP, CrossAttentionHead
    from dinov2.layers import DINOHead, MemEffAttention
    from dinov2.layers import NestedTensorBlock as Block
    from dinov2.models.vision_transformer import DinoVisionTransformer

    torch.manual_seed(0)
    vit = DinoVisionTransformer(
        **VIT,
        mlp_ratio=4,
        block_fn=partial(Block, attn_class=MemEffAttention),
        init_values=1.0e-5,
        ffn_layer="mlp",
        qkv_bias=True,
        proj_bias=True,
        ffn_bias=True,
        num_register_tokens=0,
        interpolate_offset=0.1,
        interpolate_antialias=False,
    )
    dino_head = DINOHead(in_dim=VIT["embed_dim"], out_dim=64, hidden_dim=32, bottleneck_dim=16, nlayers=2)
    specformer = SpecFormer(**SPECFORMER)
    for model in (vit, dino_head, specformer):
        _perturb(model)

    def head(cls, backbone: nn.Module, width: int) -> nn.Module:
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.backbone, module.freeze_backbone = backbone, True
        module.cross_attention = CrossAttentionHead(model_embed_dim=width, dropout=0.1, **HEAD)
        module.mlp = MLP(in_features=HEAD["embed_dim"], hidden_features=4 * HEAD["embed_dim"], dropout=0.1)
        _perturb(module.cross_attention)
        _perturb(module.mlp)
        return module

    image_head = head(ImageHead, vit, VIT["embed_dim"])
    spectrum_head = head(SpectrumHead, specformer, SPECFORMER["embed_dim"])
    astroclip = AstroClipModel(image_encoder=image_head, spectrum_encoder=spectrum_head)
    return astroclip.eval(), vit.eval(), dino_head.eval(), specformer.eval()


def make_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """(N, S, S, 3) g/r/z cutouts in nanomaggies (sky noise + a galaxy) as rows of the reference data
    set, (column, row, band): the survey cutout transposed; (N, 7781) DESI-like spectra."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[:CUTOUT, :CUTOUT] - (CUTOUT - 1) / 2
    images = []
    for _ in range(OBJECTS):
        size = rng.uniform(2, 6)
        galaxy = np.exp(-(x**2 / size**2 + (y / rng.uniform(0.5, 1)) ** 2 / size**2) / 2)
        colours = rng.uniform(0.1, 2.0, size=3)
        noise = rng.normal(0, 0.02, size=(CUTOUT, CUTOUT, 3))
        images.append(galaxy[..., None] * colours + noise)
    wave = np.linspace(3600, 9824, PIXELS)
    spectra = []
    for _ in range(OBJECTS):
        continuum = rng.uniform(0.5, 5) * (wave / 6000) ** rng.uniform(-2, 1)
        line = rng.uniform(2, 20) * np.exp(-((wave - rng.uniform(4000, 9000)) ** 2) / 8)
        spectra.append(continuum + line + rng.normal(0, 0.3, size=PIXELS))
    return torch.tensor(np.array(images), dtype=torch.float32), torch.tensor(
        np.array(spectra), dtype=torch.float32
    )


def _optimizer_state(params: list[nn.Parameter]) -> dict:
    opt = torch.optim.AdamW(params, lr=1e-4)
    for param in params:
        param.grad = torch.randn_like(param)
    opt.step()
    state = opt.state_dict()
    opt.zero_grad(set_to_none=True)
    return state


def lightning_checkpoint(model: nn.Module, state: dict, optimizer_states: list, extra: dict) -> dict:
    return {
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "2.1.0",
        "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
        "callbacks": {"LearningRateMonitor": {}},
        "optimizer_states": optimizer_states,
        "lr_schedulers": [{"last_epoch": 1200, "base_lrs": [1e-4], "_step_count": 1201}],
        "hparams_name": "kwargs",
        "hyper_parameters": dict(model.hparams),
        **extra,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("astroclip", type=Path, help="checkout of " + ASTROCLIP_REPO)
    parser.add_argument("dinov2", type=Path, help="checkout of " + DINOV2_REPO)
    parser.add_argument("--out", type=Path, default=Path("tests/golden/astroclip"))
    args = parser.parse_args(argv)
    for repo, want in ((args.astroclip, ASTROCLIP_COMMIT), (args.dinov2, DINOV2_COMMIT)):
        if (commit := _commit(repo)) not in (None, want):
            print(f"warning: {repo} is at {commit}, the golden files name {want}")
    _stub_imports(args.astroclip)
    sys.path.insert(0, str(args.dinov2))
    from astroclip.data.datamodule import AstroClipCollator

    astroclip, vit, dino_head, specformer = build_reference()
    images, spectra = make_inputs()
    collate = AstroClipCollator(center_crop=CROP)
    with torch.no_grad():
        samples = [{"image": im, "spectrum": sp[:, None]} for im, sp in zip(images, spectra, strict=True)]
        batch = collate(samples)
        cases = {
            "images": images,
            "spectra": spectra,
            "astroclip_image": astroclip(batch["image"], input_type="image"),
            "astroclip_spectrum": astroclip(batch["spectrum"], input_type="spectrum"),
            "astrodino": vit(batch["image"]),
            "specformer": specformer(batch["spectrum"])["embedding"].mean(dim=1),
        }

    args.out.mkdir(parents=True, exist_ok=True)
    heads = [p for n, p in astroclip.named_parameters() if "backbone" not in n]
    weights = {k: v.clone() for k, v in astroclip.state_dict().items()}
    optimizer_state = _optimizer_state(heads)
    astroclip.load_state_dict(weights)  # undo the optimiser step: the saved weights are the ones run
    datamodule = {
        "datamodule_hparams_name": "kwargs",
        "datamodule_hyper_parameters": {"path": "astroclip_file/", "batch_size": 256, "collate_fn": collate},
    }
    torch.save(
        lightning_checkpoint(astroclip, astroclip.state_dict(), [optimizer_state], datamodule),
        args.out / "astroclip.ckpt",
    )
    teacher = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    teacher |= {f"dino_head.{k}": v for k, v in dino_head.state_dict().items()}
    torch.save({"teacher": teacher}, args.out / "astrodino.ckpt")
    torch.save(
        lightning_checkpoint(specformer, specformer.state_dict(), [], {}), args.out / "specformer.ckpt"
    )
    torch.save({k: v.contiguous() for k, v in cases.items()}, args.out / "cases.pt")
    refs = f"{ASTROCLIP_REPO}@{ASTROCLIP_COMMIT}, {DINOV2_REPO}@{DINOV2_COMMIT}"
    print(f"wrote {args.out} ({OBJECTS} objects; {refs})")


if __name__ == "__main__":
    main()
