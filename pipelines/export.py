"""`foundation export`: embed a shard set with a frozen pretrained model into an embeddings file.

    foundation export --checkpoint RUN --data SHARDS --out embeddings.h5 [--modalities image,spectrum]
    foundation export ... --part I --parts N        # one output part per array task / rank
    foundation export merge --out embeddings.h5     # concatenate the parts into embeddings.h5

Every sample of the chosen splits goes once through `Family.embed(model, batch)` — no grad, batched,
bf16 autocast on CUDA, fp32 on CPU — with the family's evaluation collate (`make_collate(...,
train=False)`) running in loader workers. Rows are written in chunks to `<out>.partial` and renamed
to `<out>` when complete (layout: foundation/embeddings.py, docs/embeddings.md).

Resume: re-running the same command continues an interrupted export; the rows already written are
identified by object id and skipped before the model sees them, and the checkpoint's weights hash,
config hash, data set and selection must match the interrupted run's.

Parts: `--part I --parts N` (or, under torchrun/srun, RANK and WORLD_SIZE) exports a disjoint
contiguous share of every split (the loader's rank interval with drop_last=False: every sample
exactly once over all parts) into `<stem>.part-0000I-of-0000N.h5`. Under torchrun the ranks meet at
a barrier and rank 0 merges; array jobs run `foundation export merge --out OUT` afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from foundation.cli import Command, add_progress_argument, progress_enabled
from foundation.errors import ConfigError, DataError

_log = logging.getLogger(__name__)
DEFAULT_CHUNK_ROWS = 1024
REPORT_EVERY_S = 60.0


# ----------------------------------------------------------------------------- loader side


def stack_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Default collate for families without one: arrays and numbers stacked into tensors."""
    import torch

    batch: dict[str, Any] = {}
    for field in samples[0]:
        values = [s.get(field) for s in samples]
        if all(isinstance(v, np.ndarray) for v in values) and len({v.shape for v in values}) == 1:
            batch[field] = torch.from_numpy(np.stack(values))
        elif all(isinstance(v, bool | int | float) and not isinstance(v, bool) for v in values):
            batch[field] = torch.tensor(values)
        else:
            batch[field] = values
    return batch


def target_value(sample: dict[str, Any], name: str) -> float:
    """A sample's value of target `name`: a scalar field, or a key of a JSON (dict) field."""
    value = sample.get(name)
    if value is None:
        for field_value in sample.values():
            if isinstance(field_value, dict) and name in field_value:
                value = field_value[name]
                break
    try:
        value = float(np.asarray(value).reshape(-1)[0]) if value is not None else np.nan
    except (TypeError, ValueError, IndexError):
        return np.nan
    return value


class ExportCollate:
    """Runs in loader workers: drops samples already exported, keeps ids/targets beside the batch."""

    def __init__(
        self,
        inner: Callable[..., Any] | None,
        done: frozenset[str],
        targets: Sequence[str],
        split: str,
    ) -> None:
        self.inner = inner
        self.inner_takes_rng = inner is not None and "rng" in _parameters(inner)
        self.done = done
        self.targets = tuple(targets)
        self.split = split

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        keep = [s for s in samples if s["__key__"] not in self.done] if self.done else samples
        meta = {
            "ids": [s["__key__"] for s in keep],
            "targets": {
                t: np.asarray([target_value(s, t) for s in keep], dtype=np.float64) for t in self.targets
            },
            "split": self.split,
            "skipped": len(samples) - len(keep),
        }
        if not keep:
            return {"meta": meta, "batch": None}
        if self.inner is None:
            batch = stack_samples(keep)
        elif self.inner_takes_rng:  # evaluation collates are deterministic; give a fixed generator
            batch = self.inner(keep, rng=np.random.default_rng(0))
        else:
            batch = self.inner(keep)
        return {"meta": meta, "batch": batch}


def _parameters(fn: Callable[..., Any]) -> Sequence[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


# ----------------------------------------------------------------------------- model side


def weights_digest(model: Any) -> str:
    """sha256 of the model's parameters and buffers: what a resumed export must match."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def choose_device(name: str, local_rank: int = 0) -> Any:
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    kind, colon, index = name.partition(":")
    if kind == "cuda" and (not colon or index.isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} but torch sees no CUDA device; use --device auto or cpu")
        count = torch.cuda.device_count()
        if not colon:
            return torch.device("cuda", local_rank % count)
        if int(index) >= count:
            raise ConfigError(
                f"--device {name} but torch sees {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
            )
        return torch.device("cuda", int(index))
    if name != "cpu":
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return torch.device("cpu")


def default_workers(device: Any) -> int:
    """Loader workers: none on CPU (the forward already uses every core; benchmarks/export.py
    measured workers slowing a CPU export down), a few per GPU to keep it fed."""
    import os

    if device.type != "cuda":
        return 0
    import torch

    return max(1, min(4, (os.cpu_count() or 2) // max(1, torch.cuda.device_count()) - 1))


def autocast_for(device: Any, precision: str) -> tuple[Any, str]:
    """(context manager, precision used): bf16 autocast on CUDA, fp32 elsewhere (CPU fallback)."""
    import contextlib

    import torch

    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16":
        if device.type != "cuda":
            _log.warning("bf16 export requested on %s: using fp32 (bf16 autocast is a GPU path)", device)
            return contextlib.nullcontext(), "fp32"
        return torch.autocast("cuda", dtype=torch.bfloat16), "bf16"
    if precision != "fp32":
        raise ConfigError(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    return contextlib.nullcontext(), "fp32"


@dataclass
class LoadedModel:
    model: Any
    config: Any
    family: Any
    source: str
    """What the vectors come from: the checkpoint path, or `random-init:<path>`."""
    manifest: Any = None


def load_model(
    checkpoint: str | Path,
    *,
    random_init: bool = False,
    seed: int | None = None,
    overrides: Sequence[str] = (),
) -> LoadedModel:
    """The frozen model of a run / step folder / model.pt, or the same architecture freshly initialised.

    `overrides` (`model.key=value`, only with `random_init`) change the config the fresh model is
    built from, e.g. `model.spectrum_init=null` so that no tower is loaded from an earlier run.
    """
    import torch

    from foundation import config
    from foundation.train import load_pretrained

    checkpoint = Path(checkpoint)
    try:
        model, cfg, family = load_pretrained(checkpoint)
    except ConfigError as exc:  # torch's reasons span many lines; the CLI promises one
        raise ConfigError(" ".join(str(exc).split())[:600]) from None
    source = str(checkpoint.resolve())
    if overrides and not random_init:
        raise ConfigError("--override only applies with --random-init (a trained model keeps its config)")
    if random_init:
        from foundation.data import Manifest

        if overrides:
            data = config.apply_overrides(config.to_dict(cfg), overrides)
            cfg = config.from_dict(config.PretrainConfig, {k: v for k, v in data.items() if k != "model"})
            cfg.model = config.from_dict(family.model_config, data.get("model") or {}, "model")

        manifest = None
        for candidate in (checkpoint / "dataset", checkpoint.parent / "dataset", Path(cfg.data.path)):
            if (candidate / "manifest.json").is_file():
                manifest = Manifest.load(candidate)
                break
        torch.manual_seed(cfg.run.seed if seed is None else seed)
        model = family.build_model(cfg.model, manifest).eval()
        source = f"random-init:{source}" + (f" ({' '.join(overrides)})" if overrides else "")
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, cfg, family, source, training_manifest(checkpoint, cfg))


def training_manifest(checkpoint: Path, cfg: Any) -> Any:
    """The manifest of the shard set the model was trained on: the run's snapshot first (it is
    what the run really read), then `data.path` of its config; None when neither is there."""
    from foundation.data import Manifest

    if checkpoint.is_file():
        run_dir = checkpoint.parent
    elif checkpoint.name.startswith("step-"):
        run_dir = checkpoint.parent.parent
    else:
        run_dir = checkpoint
    for folder in (run_dir / "dataset", Path(cfg.data.path)):
        if (folder / "manifest.json").is_file():
            return Manifest.load(folder)
    return None


def check_same_data_files(trained_on: Any, data: Any) -> None:
    """The shard set to embed must carry the training data's extra files (an xVal tokenizer) with the
    same content: ids from another tokenizer embed as garbage without any error."""
    if trained_on is None:
        if data.files:
            _log.warning(
                "cannot find the model's training shard set; assuming %s uses the same %s",
                data.path,
                ", ".join(sorted(data.files)),
            )
        return
    for name, info in sorted(trained_on.files.items()):
        theirs = data.files.get(name)
        if theirs is None or theirs.sha256 != info.sha256:
            found = "has none" if theirs is None else f"has sha256 {theirs.sha256[:12]}"
            raise DataError(
                f"{data.path} was prepared with another {name} than the model's training data "
                f"({trained_on.path}: sha256 {info.sha256[:12]}; {data.path} {found}); prepare it with the "
                f"training set's {name} (for xVal: `foundation prepare xval ... --vocab-from "
                f"{trained_on.path}`)"
            )


# ----------------------------------------------------------------------------- the export


@dataclass
class ExportResult:
    path: Path
    rows: int
    new_rows: int
    seconds: float
    modalities: list[str]
    complete_already: bool = False
    """The output existed, finished, from this very checkpoint, data and selection: nothing done."""

    @property
    def samples_per_s(self) -> float:
        return self.new_rows / self.seconds if self.seconds > 0 else float("nan")


def default_targets(manifest: Any) -> list[str]:
    """Targets the manifest names (`extra.targets`), else every float scalar field of the schema."""
    named = manifest.extra.get("targets") if isinstance(manifest.extra, dict) else None
    if isinstance(named, dict):
        return list(named)
    if isinstance(named, list | tuple):
        return [str(t) if not isinstance(t, dict) else str(t.get("name")) for t in named]
    return [n for n, spec in manifest.schema.items() if spec.kind == "scalar" and spec.dtype == "float64"]


def _split_dataset(
    data: Path, split: str, samples: int, part: int, parts: int, batch_size: int, collate: Any
):
    """This part's share of one split (None when it has none)."""
    from foundation.data import ShardDataset

    if samples == 0:
        return None
    if samples < parts:  # too small to share: the first part takes it whole
        if part != 0:
            return None
        part, parts = 0, 1
    return ShardDataset(
        data,
        split=split,
        batch_size=batch_size,
        seed=0,
        shuffle=False,
        epochs=1,
        rank=part,
        world_size=parts,
        collate_fn=collate,
        drop_last=False,
    )


#: What makes two exports the same: an existing output or partial file must agree on all of them.
IDENTITY_KEYS = (
    "checkpoint",
    "weights_sha256",
    "config_hash",
    "family",
    "data",
    "data_manifest_sha256",
    "selection",
)


def check_output_path(out: Path) -> None:
    """`--out` must be (or become) an HDF5 file: a directory or another kind of file is refused,
    even with --overwrite, rather than trusted or replaced."""
    import h5py

    for path in (out, partial_path_of(out)):
        if path.is_dir():
            raise ConfigError(
                f"--out {path} is a directory; give the embeddings file to write, e.g. {path}/embeddings.h5"
            )
        if path.exists() and not h5py.is_hdf5(path):
            raise DataError(
                f"--out {path} exists and is not an HDF5 file; refusing to replace it (choose another --out)"
            )


def partial_path_of(out: Path) -> Path:
    from foundation.embeddings import partial_path

    return partial_path(out)


def existing_export(out: Path, attrs: dict[str, Any]) -> ExportResult:
    """The finished `out` as this export's result, if it was made from the same checkpoint, config,
    data and selection; else a DataError naming every attribute that differs."""
    from foundation.embeddings import _jsonable, open_embeddings

    with open_embeddings(out) as emb:
        differ = []
        for key in IDENTITY_KEYS:
            old, new = emb.recorded(key), str(_jsonable(attrs[key]))
            if old != new:
                was = "not recorded" if old is None else repr(old[:80])
                differ.append(f"{key} {was} (now {new[:80]!r})")
        if differ:
            raise DataError(
                f"{out} exists but is not this export: it differs in {'; '.join(differ)}; choose another "
                "--out, or pass --overwrite to replace it"
            )
        return ExportResult(out, emb.rows, 0, 0.0, list(emb.modalities), complete_already=True)


def export_embeddings(
    loaded: LoadedModel,
    data: str | Path,
    out: str | Path,
    *,
    modalities: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    targets: Sequence[str] | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    part: int = 0,
    parts: int = 1,
    device: str = "auto",
    local_rank: int = 0,
    precision: str = "auto",
    normalize: bool = False,
    overwrite: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: bool | None = None,
    max_batches: int | None = None,
) -> ExportResult:
    """Embed `data` with `loaded.model` into `out` (this part's share); resumes a `.partial` file.

    `max_batches` stops early without finishing (the `.partial` file stays): for tests of resume.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from foundation import __version__, config
    from foundation.data import Manifest
    from foundation.embeddings import EmbeddingsWriter
    from foundation.train.data import to_device

    if loaded.family.embed is None:
        raise ConfigError(f"model family {loaded.family.name!r} defines no `embed`; it cannot be exported")
    if not 0 <= part < parts:
        raise ConfigError(f"--part must be in [0, --parts={parts}), got {part}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if chunk_rows < 1:
        raise ConfigError(f"--chunk-rows must be >= 1, got {chunk_rows}")
    if num_workers is not None and num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {num_workers}")
    out = Path(out)
    check_output_path(out)
    data = Path(data)
    manifest = Manifest.load(data)
    if not loaded.source.startswith("random-init:"):
        check_same_data_files(loaded.manifest, manifest)
    splits = list(splits or sorted(manifest.splits))
    for s in splits:
        manifest.split(s)  # DataError naming the available splits
    target_names = list(targets) if targets is not None else default_targets(manifest)
    has_json = any(spec.kind == "json" for spec in manifest.schema.values())  # targets may sit in metadata
    unknown = [t for t in target_names if t not in manifest.schema]
    if unknown and targets is not None and not has_json:
        raise DataError(f"targets {unknown} are not fields of {data} (fields: {', '.join(manifest.schema)})")
    torch_device = choose_device(device, local_rank)
    autocast, used_precision = autocast_for(torch_device, precision)
    if num_workers is None:
        num_workers = default_workers(torch_device)
    model = loaded.model.to(torch_device).eval()
    cfg = loaded.config
    selection = {
        "modalities": sorted(modalities) if modalities else None,
        "splits": splits,
        "targets": target_names,
        "part": part,
        "parts": parts,
        "normalize": normalize,
    }
    attrs = {
        "checkpoint": loaded.source,
        "weights_sha256": weights_digest(model),
        "family": loaded.family.name,
        "config": config.to_dict(cfg),
        "config_hash": config.config_hash(cfg),
        "data": str(data.resolve()),
        "data_manifest_sha256": hashlib.sha256((data / "manifest.json").read_bytes()).hexdigest(),
        "selection": json.dumps(selection, sort_keys=True),
        "part": part,
        "parts": parts,
        "precision": used_precision,
        "foundation_version": __version__,
        "torch_version": torch.__version__,
        "command": " ".join(sys.argv),
    }
    if out.exists() and not overwrite:
        return existing_export(out, attrs)
    writer = EmbeddingsWriter(
        out, attrs=attrs, overwrite=overwrite, chunk_rows=chunk_rows, resume_keys=IDENTITY_KEYS
    )
    inner = loaded.family.make_collate(cfg.model, manifest, False) if loaded.family.make_collate else None
    done = frozenset(writer.done_ids)
    plan = []
    for split in splits:
        samples = manifest.split(split).samples
        ds = _split_dataset(
            data, split, samples, part, parts, batch_size, ExportCollate(inner, done, target_names, split)
        )
        if ds is not None:
            plan.append((split, ds))
    total = sum(ds.samples_per_epoch for _, ds in plan)
    if progress is None:
        progress = sys.stderr.isatty()
    bar = tqdm(
        total=total,
        initial=0,
        unit="obj",
        desc=f"export {Path(out).name}",
        disable=not progress,
        dynamic_ncols=True,
    )
    pending: list[tuple[dict[str, Any], dict[str, Any]]] = []
    pending_rows = 0
    new_rows = 0
    chosen: list[str] | None = list(modalities) if modalities else None
    start = time.perf_counter()
    last_report = start
    batches = 0

    def flush() -> None:
        nonlocal pending, pending_rows, new_rows
        if not pending:
            return
        ids = [i for meta, _ in pending for i in meta["ids"]]
        vectors = {}
        for m in chosen or []:
            block = torch.cat([emb[m] for _, emb in pending]).float()
            if normalize:
                block = torch.nn.functional.normalize(block, dim=1)
            vectors[m] = block.cpu().numpy()
        tvals = {t: np.concatenate([meta["targets"][t] for meta, _ in pending]) for t in target_names}
        split = [meta["split"] for meta, _ in pending for _ in meta["ids"]]
        writer.append(ids, vectors, tvals, split=split)
        new_rows += len(ids)
        pending, pending_rows = [], 0

    finished = False
    try:
        with torch.inference_mode(), autocast:
            for _split, ds in plan:
                loader = DataLoader(
                    ds,
                    batch_size=None,
                    num_workers=num_workers,
                    pin_memory=torch_device.type == "cuda",
                    prefetch_factor=4 if num_workers > 0 else None,
                )
                for item in loader:
                    meta, batch = item["meta"], item["batch"]
                    bar.update(meta["skipped"])
                    if batch is None:
                        continue
                    batch = to_device(batch, torch_device)
                    out_vectors = loaded.family.embed(model, batch)
                    if chosen is None:
                        chosen = sorted(out_vectors)
                    missing = [m for m in chosen if m not in out_vectors]
                    if missing:
                        raise ConfigError(
                            f"{loaded.family.name} embeds {sorted(out_vectors)}; no modality {missing} "
                            "(fix --modalities)"
                        )
                    n = len(meta["ids"])
                    for m in chosen:
                        v = out_vectors[m]
                        if v.ndim != 2 or v.shape[0] != n:
                            raise RuntimeError(
                                f"Family.embed returned {m} of shape {tuple(v.shape)} for {n} samples"
                            )
                    # Kept on the device until a chunk is full: no host sync per batch.
                    pending.append((meta, {m: out_vectors[m].detach() for m in chosen}))
                    pending_rows += n
                    bar.update(n)
                    if pending_rows >= chunk_rows:
                        flush()
                    batches += 1
                    if not progress and time.perf_counter() - last_report >= REPORT_EVERY_S:
                        last_report = time.perf_counter()  # batch jobs' logs get a line a minute
                        rate = (pending_rows + new_rows) / max(last_report - start, 1e-9)
                        done_now = pending_rows + new_rows + writer.resumed_rows
                        _log.info("exported %d / %d objects (%.1f samples/s)", done_now, total, rate)
                    if max_batches is not None and batches >= max_batches:
                        flush()
                        raise _Stopped
            flush()
        finished = True
    except _Stopped:
        pass
    except BaseException:
        writer.discard_if_empty()  # a run that failed before its first chunk leaves nothing behind
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    if not finished:
        rows = writer.rows
        writer.close()
        return ExportResult(writer.partial, rows, new_rows, seconds, chosen or [])
    if writer.rows == 0:
        writer.discard_if_empty()
        raise DataError(f"no samples to export from {data} (splits {splits}, part {part} of {parts})")
    rows = writer.rows
    for name in writer.targets_without_values():
        _log.warning(
            "target %r has no value in any of the %d exported samples (NaN throughout); "
            "check --targets against the fields of %s",
            name,
            rows,
            data,
        )
    path = writer.finish()
    return ExportResult(path, rows, new_rows, seconds, chosen or [])


class _Stopped(Exception):
    """`max_batches` reached (tests of interrupted exports)."""


# ----------------------------------------------------------------------------- CLI


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", help="Run directory, checkpoints/step-N folder or model.pt (required)."
    )
    parser.add_argument("--data", help="Shard set to embed (directory with manifest.json) (required).")
    parser.add_argument("--out", help="Embeddings HDF5 file to write, e.g. embeddings.h5 (required).")
    parser.add_argument(
        "--modalities", help="Comma-separated modalities to keep (default: all the family embeds)."
    )
    parser.add_argument("--splits", help="Comma-separated splits (default: all splits of the shard set).")
    parser.add_argument(
        "--targets",
        help="Comma-separated target fields to store (default: the manifest's targets, else float scalars).",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="Samples per forward pass (default 64).")
    parser.add_argument(
        "--num-workers", type=int, help="Loader worker processes (default: 0 on CPU, up to 4 per GPU)."
    )
    parser.add_argument(
        "--part", type=int, help="This part's index (0-based); default: RANK under torchrun/srun, else 0."
    )
    parser.add_argument(
        "--parts", type=int, help="Number of parts; default: WORLD_SIZE under torchrun/srun, else 1."
    )
    parser.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available), cuda or cpu.")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32.")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise the vectors before writing.")
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="Embed with a freshly initialised model of the checkpoint's architecture (a control).",
    )
    parser.add_argument("--seed", type=int, help="Seed of --random-init (default: the run's seed).")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="With --random-init: a config change for the fresh model (e.g. model.spectrum_init=null).",
    )
    parser.add_argument(
        "--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="Rows per HDF5 write (default 1024)."
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace an existing output (and any partial one)."
    )
    parser.add_argument("--no-merge", action="store_true", help="Under torchrun, leave the parts unmerged.")
    add_progress_argument(parser)


def _run(args: argparse.Namespace) -> int:
    from foundation.embeddings import find_parts, merge_embeddings, part_path
    from foundation.lock import FolderLock, command_line
    from foundation.train.distributed import read_launch

    missing = [f"--{name}" for name in ("checkpoint", "data", "out") if not getattr(args, name)]
    if missing:
        raise ConfigError(f"foundation export needs {', '.join(missing)} (see `foundation export --help`)")
    launch = read_launch()
    part = args.part if args.part is not None else (launch.rank if args.parts is None else 0)
    parts = args.parts if args.parts is not None else (launch.world_size if args.part is None else 1)
    if parts < 1 or not 0 <= part < parts:
        raise ConfigError(f"--part {part} is not in [0, --parts {parts})")
    out = Path(args.out)
    target = part_path(out, part, parts) if parts > 1 else out
    check_output_path(target)
    with FolderLock(target, command_line()):
        loaded = load_model(
            args.checkpoint, random_init=args.random_init, seed=args.seed, overrides=args.override
        )
        result = export_embeddings(
            loaded,
            args.data,
            target,
            modalities=_csv(args.modalities),
            splits=_csv(args.splits),
            targets=_csv(args.targets),
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            part=part,
            parts=parts,
            device=args.device,
            local_rank=launch.local_rank,
            precision=args.precision,
            normalize=args.normalize,
            overwrite=args.overwrite,
            chunk_rows=args.chunk_rows,
            progress=progress_enabled(args.progress),
        )
    if result.complete_already:
        print(
            f"{target} is complete already, from this checkpoint, data and selection "
            "(pass --overwrite to export again)"
        )
    else:
        print(
            f"exported {result.rows} objects ({result.new_rows} new, {', '.join(result.modalities)}) "
            f"-> {result.path} "
            f"[{result.samples_per_s:.1f} samples/s]"
        )
    if parts > 1 and launch.world_size > 1 and launch.master_addr and not args.no_merge:
        _barrier_then_merge(launch, out, args.overwrite, find_parts, merge_embeddings)
    return 0


def _barrier_then_merge(launch: Any, out: Path, overwrite: bool, find_parts: Any, merge: Any) -> None:
    """torchrun/srun: wait for every rank's part (gloo barrier), then rank 0 merges them."""
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():  # gloo is enough for a barrier; srun sets no env:// variables
        tcp = f"tcp://{launch.master_addr}:{launch.master_port}"
        dist.init_process_group(
            "gloo",
            init_method="env://" if launch.launcher == "torchrun" else tcp,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(hours=24),
        )
    try:
        dist.barrier()
        if launch.rank == 0:
            if out.exists() and not overwrite:
                print(f"{out} exists already; not merging again")
            else:
                merged = merge(find_parts(out), out, overwrite=overwrite)
                print(f"merged {launch.world_size} parts -> {merged}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, help="The merged file; its parts are <stem>.part-*-of-*.h5 beside it."
    )
    parser.add_argument(
        "parts", nargs="*", help="Part files to merge in this order (default: find them next to --out)."
    )
    parser.add_argument("--parts-expected", type=int, help="Fail unless exactly this many parts are found.")
    parser.add_argument(
        "--delete-parts", action="store_true", help="Delete the part files after a successful merge."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing merged file.")


def _run_merge(args: argparse.Namespace) -> int:
    from foundation.embeddings import find_parts, merge_embeddings, open_embeddings
    from foundation.lock import FolderLock, command_line

    out = Path(args.out)
    parts = [Path(p) for p in args.parts] if args.parts else find_parts(out)
    if args.parts_expected is not None and len(parts) != args.parts_expected:
        raise DataError(f"found {len(parts)} parts of {out}, expected {args.parts_expected}")
    check_output_path(out)
    with FolderLock(out, command_line()):
        merged = merge_embeddings(parts, out, overwrite=args.overwrite)
    with open_embeddings(merged) as emb:
        print(f"merged {len(parts)} parts -> {merged} ({emb.rows} objects, {', '.join(emb.modalities)})")
    if args.delete_parts:
        for p in parts:
            p.unlink()
    return 0


def _csv(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


COMMANDS = [
    Command(
        ("export",),
        "Embed a shard set with a frozen pretrained model into an embeddings HDF5 file (resumable).",
        _add_arguments,
        _run,
    ),
    Command(
        ("export", "merge"),
        "Merge the part files of a multi-part export into one file.",
        _add_merge_arguments,
        _run_merge,
    ),
]
