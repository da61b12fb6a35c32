"""Embedding export: every sample of a shard set through a frozen model's `Family.embed`, into an
embeddings file (layout: foundation/embeddings.py).

No grad, batched, in the precision `foundation.device` chooses for training too (bf16 autocast on
a CUDA device that supports it; an explicit bf16 autocasts on the CPU as well); the family's
evaluation collate (`make_collate(..., train=False)`) runs in loader workers. Rows are written in
chunks to `<out>.partial`, which is renamed to `<out>` when complete.

Resume: an export of the same checkpoint weights, config, data set and selection continues an
interrupted `.partial` file; the rows already written are identified by object id and skipped
before the model sees them. A part (`part`, `parts`) exports a disjoint contiguous share of every
split (the loader's rank interval with drop_last=False: every sample exactly once over all parts).

    loaded = load_model("runs/astroclip")
    export_embeddings(loaded, "shards/", "embeddings.h5", ExportSettings(batch_size=128))

`start_export` is the same export one step at a time: iterate `job.batches()` and call
`job.finish()`, or stop early with `job.stop()` (the `.partial` file stays, to resume from).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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


def default_workers(device: Any) -> int:
    """Loader workers: none on CPU (the forward already uses every core; benchmarks/export.py
    measured workers slowing a CPU export down), a few per GPU to keep it fed."""
    import os

    if device.type != "cuda":
        return 0
    import torch

    return max(1, min(4, (os.cpu_count() or 2) // max(1, torch.cuda.device_count()) - 1))


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


def _split_dataset(data: Any, split: str, samples: int, part: int, parts: int, batch_size: int, collate: Any):
    """This part's share of one split (None when it has none)."""
    from foundation.data import ShardDataset

    if samples == 0:
        return None
    if samples < parts:  # too small to share: the first part takes it whole
        if part != 0:
            return None
        part, parts = 0, 1
    return ShardDataset.in_order(data, split, batch_size, collate, rank=part, world_size=parts)


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


# ----------------------------------------------------------------------------- the export


@dataclass
class ExportSettings:
    """What to export and how; the defaults are those of `foundation export`."""

    modalities: Sequence[str] | None = None
    """Modalities to keep (default: every one the family embeds)."""
    splits: Sequence[str] | None = None
    """Splits to embed (default: all splits of the shard set)."""
    targets: Sequence[str] | None = None
    """Target fields to store (default: the manifest's targets, else its float scalars)."""
    batch_size: int = 64
    num_workers: int | None = None
    """Loader workers (default: `default_workers` of the device)."""
    part: int = 0
    parts: int = 1
    device: str = "auto"
    local_rank: int = 0
    precision: str = "auto"
    normalize: bool = False
    overwrite: bool = False
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    progress: bool | None = None
    """Progress bar (default: when stderr is a terminal); without one, a log line a minute."""

    def check(self) -> None:
        """Refuse counts that cannot work (the CLI's parser refuses them too; library callers may not)."""
        if not 0 <= self.part < self.parts:
            raise ConfigError(f"--part must be in [0, --parts={self.parts}), got {self.part}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.chunk_rows < 1:
            raise ConfigError(f"--chunk-rows must be >= 1, got {self.chunk_rows}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0, got {self.num_workers}")


@dataclass
class ExportSource:
    """What an export reads: the model on its device, the shard set and the selection from it, and
    the attributes that identify the export (a resumed or existing output must match them)."""

    loaded: LoadedModel
    model: Any
    device: Any
    precision: str
    data: Any
    """The shard-set folder (a Path), or a `RemoteShardSet` for a URL."""
    manifest: Any
    splits: list[str]
    targets: list[str]
    attrs: dict[str, Any]


def _select(loaded: LoadedModel, data: Any, settings: ExportSettings) -> tuple[Any, list[str], list[str]]:
    """(manifest, splits, target names) of `data`, checked against the model and the settings."""
    from foundation.data import Manifest

    manifest = data.manifest if _is_remote(data) else Manifest.load(data)
    if not loaded.source.startswith("random-init:"):
        check_same_data_files(loaded.manifest, manifest)
    splits = list(settings.splits or sorted(manifest.splits))
    for s in splits:
        manifest.split(s)  # DataError naming the available splits
    targets = settings.targets
    target_names = list(targets) if targets is not None else default_targets(manifest)
    has_json = any(spec.kind == "json" for spec in manifest.schema.values())  # targets may sit in metadata
    unknown = [t for t in target_names if t not in manifest.schema]
    if unknown and targets is not None and not has_json:
        raise DataError(f"targets {unknown} are not fields of {data} (fields: {', '.join(manifest.schema)})")
    return manifest, splits, target_names


def open_model(loaded: LoadedModel, settings: ExportSettings) -> tuple[Any, Any, str]:
    """(model in eval mode on its device, the device, the precision used): the rule of
    foundation.device, the same as training's."""
    from foundation.device import resolve_device, resolve_precision

    device = resolve_device(settings.device, settings.local_rank)
    precision = resolve_precision(settings.precision, device, option="--precision")
    return loaded.model.to(device).eval(), device, precision


def _identity(
    loaded: LoadedModel,
    model: Any,
    precision: str,
    data: Any,
    splits: list[str],
    targets: list[str],
    settings: ExportSettings,
) -> dict[str, Any]:
    """The file attributes of this export: IDENTITY_KEYS and what else a reader should know."""
    import torch

    from foundation import __version__, config

    selection = {
        "modalities": sorted(settings.modalities) if settings.modalities else None,
        "splits": splits,
        "targets": targets,
        "part": settings.part,
        "parts": settings.parts,
        "normalize": settings.normalize,
    }
    return {
        "checkpoint": loaded.source,
        "weights_sha256": weights_digest(model),
        "family": loaded.family.name,
        "config": config.to_dict(loaded.config),
        "config_hash": config.config_hash(loaded.config),
        "data": data.url if _is_remote(data) else str(data.resolve()),
        "data_manifest_sha256": hashlib.sha256((_local(data) / "manifest.json").read_bytes()).hexdigest(),
        "selection": json.dumps(selection, sort_keys=True),
        "part": settings.part,
        "parts": settings.parts,
        "precision": precision,
        "foundation_version": __version__,
        "torch_version": torch.__version__,
        "command": " ".join(sys.argv),
    }


def _open_shards(data: str | Path) -> Any:
    """A local shard-set folder as a Path; a URL (s3://, https://, ...) as a `RemoteShardSet`,
    read through the shard cache."""
    from foundation.data.remote import RemoteShardSet, is_url

    return RemoteShardSet(str(data)) if is_url(data) else Path(data)


def _is_remote(data: Any) -> bool:
    return not isinstance(data, Path)


def _local(data: Any) -> Path:
    """The folder holding the manifest as read: the shard cache's copy for a URL."""
    return data.local if _is_remote(data) else data


def open_source(loaded: LoadedModel, data: str | Path, settings: ExportSettings) -> ExportSource:
    """Everything an export reads, checked, with the model on its device. `data` is a shard-set
    folder or URL."""
    data = _open_shards(data)
    manifest, splits, targets = _select(loaded, data, settings)
    model, device, precision = open_model(loaded, settings)
    attrs = _identity(loaded, model, precision, data, splits, targets, settings)
    return ExportSource(loaded, model, device, precision, data, manifest, splits, targets, attrs)


class ExportJob:
    """One export under way into a `.partial` file: `batches()` embeds, `finish()` completes it,
    `stop()` leaves it to resume from, `abandon()` cleans up after a failure."""

    def __init__(self, source: ExportSource, out: Path, settings: ExportSettings) -> None:
        from tqdm import tqdm

        from foundation.embeddings import EmbeddingsWriter

        self.source, self.settings = source, settings
        self.num_workers = (
            default_workers(source.device) if settings.num_workers is None else settings.num_workers
        )
        self.writer = EmbeddingsWriter(
            out,
            attrs=source.attrs,
            overwrite=settings.overwrite,
            chunk_rows=settings.chunk_rows,
            resume_keys=IDENTITY_KEYS,
        )
        self.plan = self._plan()
        self.total = sum(ds.samples_per_epoch for _, ds in self.plan)
        self.progress = sys.stderr.isatty() if settings.progress is None else settings.progress
        self.bar = tqdm(
            total=self.total,
            initial=0,
            unit="obj",
            desc=f"export {Path(out).name}",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        self.chosen: list[str] | None = list(settings.modalities) if settings.modalities else None
        self.pending: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.pending_rows = 0
        self.new_rows = 0
        self.start = self.last_report = time.perf_counter()

    def _plan(self) -> list[tuple[str, Any]]:
        """(split, this part's dataset of it) for every split with a share for this part."""
        src, s = self.source, self.settings
        family = src.loaded.family
        inner = (
            family.make_collate(src.loaded.config.model, src.manifest, False) if family.make_collate else None
        )
        done = frozenset(self.writer.done_ids)
        plan = []
        for split in src.splits:
            samples = src.manifest.split(split).samples
            collate = ExportCollate(inner, done, src.targets, split)
            ds = _split_dataset(src.data, split, samples, s.part, s.parts, s.batch_size, collate)
            if ds is not None:
                plan.append((split, ds))
        return plan

    def batches(self) -> Iterator[int]:
        """Embed one batch per step, yielding its row count; a chunk is written whenever
        `chunk_rows` rows are buffered (they stay on the device until then: no host sync per batch)."""
        import torch
        from torch.utils.data import DataLoader

        from foundation.train.data import worker_context

        for _split, ds in self.plan:
            loader = DataLoader(
                ds,
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=self.source.device.type == "cuda",
                prefetch_factor=4 if self.num_workers > 0 else None,
                # never a fork of this process (its progress bar's and torch's threads), as in training
                multiprocessing_context=worker_context(ds.collate_fn.inner) if self.num_workers > 0 else None,
            )
            for item in loader:
                meta, batch = item["meta"], item["batch"]
                self.bar.update(meta["skipped"])
                if batch is None:
                    continue
                with torch.inference_mode():
                    self.pending.append((meta, self._embed(batch, len(meta["ids"]))))
                self.pending_rows += len(meta["ids"])
                self.bar.update(len(meta["ids"]))
                if self.pending_rows >= self.settings.chunk_rows:
                    self._write_pending()
                self._report()
                yield len(meta["ids"])
        self._write_pending()

    def _embed(self, batch: Any, n: int) -> dict[str, Any]:
        """The chosen modalities' (n, D) vectors of one batch, checked."""
        from foundation.device import autocast
        from foundation.train.data import to_device

        src = self.source
        with autocast(src.device, src.precision):
            vectors = src.loaded.family.embed(src.model, to_device(batch, src.device))
        if self.chosen is None:
            self.chosen = sorted(vectors)
        missing = [m for m in self.chosen if m not in vectors]
        if missing:
            raise ConfigError(
                f"{src.loaded.family.name} embeds {sorted(vectors)}; no modality {missing} (fix --modalities)"
            )
        for m in self.chosen:
            v = vectors[m]
            if v.ndim != 2 or v.shape[0] != n:
                raise RuntimeError(f"Family.embed returned {m} of shape {tuple(v.shape)} for {n} samples")
        return {m: vectors[m].detach() for m in self.chosen}

    def _write_pending(self) -> None:
        """Append the buffered rows (vectors, targets, splits) to the file as one chunk."""
        import torch

        if not self.pending:
            return
        ids = [i for meta, _ in self.pending for i in meta["ids"]]
        vectors = {}
        with torch.inference_mode():
            for m in self.chosen or []:
                block = torch.cat([emb[m] for _, emb in self.pending]).float()
                if self.settings.normalize:
                    block = torch.nn.functional.normalize(block, dim=1)
                vectors[m] = block.cpu().numpy()
        targets = {
            t: np.concatenate([meta["targets"][t] for meta, _ in self.pending]) for t in self.source.targets
        }
        split = [meta["split"] for meta, _ in self.pending for _ in meta["ids"]]
        self.writer.append(ids, vectors, targets, split=split)
        self.new_rows += len(ids)
        self.pending, self.pending_rows = [], 0

    def _report(self) -> None:
        """Without a progress bar (batch jobs' logs), a line a minute."""
        if self.progress or time.perf_counter() - self.last_report < REPORT_EVERY_S:
            return
        self.last_report = time.perf_counter()
        rate = (self.pending_rows + self.new_rows) / max(self.last_report - self.start, 1e-9)
        done_now = self.pending_rows + self.new_rows + self.writer.resumed_rows
        _log.info("exported %d / %d objects (%.1f samples/s)", done_now, self.total, rate)

    def stop(self) -> ExportResult:
        """Write what is buffered and close the `.partial` file unfinished (a later export resumes it)."""
        self._write_pending()
        self.bar.close()
        seconds = time.perf_counter() - self.start
        rows = self.writer.rows
        self.writer.close()
        return ExportResult(self.writer.partial, rows, self.new_rows, seconds, self.chosen or [])

    def finish(self) -> ExportResult:
        """Rename the complete file into place (after `batches()` ran out)."""
        self.bar.close()
        seconds = time.perf_counter() - self.start
        if self.writer.rows == 0:
            self.writer.discard_if_empty()
            s = self.settings
            raise DataError(
                f"no samples to export from {self.source.data} (splits {self.source.splits}, "
                f"part {s.part} of {s.parts})"
            )
        rows = self.writer.rows
        for name in self.writer.targets_without_values():
            _log.warning(
                "target %r has no value in any of the %d exported samples (NaN throughout); "
                "check --targets against the fields of %s",
                name,
                rows,
                self.source.data,
            )
        return ExportResult(self.writer.finish(), rows, self.new_rows, seconds, self.chosen or [])

    def abandon(self) -> None:
        """After a failure: a file that got no chunk yet is removed; one that did stays, to resume."""
        self.bar.close()
        self.writer.discard_if_empty()

    def run(self) -> ExportResult:
        """Every batch, then `finish()`."""
        try:
            for _ in self.batches():
                pass
        except BaseException:
            self.abandon()
            raise
        return self.finish()


def start_export(
    loaded: LoadedModel, data: str | Path, out: str | Path, settings: ExportSettings
) -> ExportJob | ExportResult:
    """An export of `data` with `loaded` into `out` (this part's share), resuming a `.partial` file;
    or, when `out` is complete already from this same checkpoint, data and selection, its result."""
    if loaded.family.embed is None:
        raise ConfigError(f"model family {loaded.family.name!r} defines no `embed`; it cannot be exported")
    settings.check()
    out = Path(out)
    check_output_path(out)
    source = open_source(loaded, data, settings)
    if out.exists() and not settings.overwrite:
        return existing_export(out, source.attrs)
    return ExportJob(source, out, settings)


def export_embeddings(
    loaded: LoadedModel, data: str | Path, out: str | Path, settings: ExportSettings | None = None
) -> ExportResult:
    """Embed `data` with `loaded.model` into `out` (see the module docstring)."""
    job = start_export(loaded, data, out, settings or ExportSettings())
    return job if isinstance(job, ExportResult) else job.run()
