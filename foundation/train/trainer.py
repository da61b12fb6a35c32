"""The family-agnostic training loop.

`train(cfg)` runs one process's share of a pretraining job: it joins the process group, builds
the family's model and loaders, resumes from the newest checkpoint of `run.dir` if there is one,
and runs optimiser steps until `train.steps`, a stop request, or a non-finite loss. The model is
only ever used through `family.loss(model, batch)`.

One optimiser step is `Trainer.train_step`: `train.grad_accum` micro-batches through
`forward_backward_step` (the family's loss under autocast, then backward), the global gradient
norm (clipped), then the optimiser and the schedule. The family's metrics are summed on the
device and read back only when a metrics record is written (every `train.log_every` steps); the
step itself reads the device once (loss, gradient norm, stop votes), because the non-finite guard
must see them before the update is applied.

Run directory (`run.dir`):
    config.yaml         the resolved config (rewritten at every start)
    dataset/            the shard set's manifest.json and extra files (tokenizer, ...): the model
                        can be rebuilt without the shards
    metrics.jsonl       metric records (see foundation.train.metrics)
    status.json         {"state": running|done|preempted|diverged|failed, "step": N, ...}
    .status.json.failed a ready-made "failed" record, swapped in for status.json when a full disk
                        leaves no room to write one (so a dead run never reads "running")
    checkpoints/step-N/ DCP checkpoints (see foundation.train.checkpoint)
    model.pt            final weights for inference (see foundation.train.pretrained)
    tensorboard/        TensorBoard events, when tensorboard is installed
    STOP                create it to stop the run cleanly (train.stop_file)
One `pretrain` writes a run directory at a time: rank 0 holds a `FolderLock` on it for the whole
run (a requeued job waits up to `RUN_LOCK_WAIT_S` for its earlier incarnation to let go). Every
check (config, world size, shard set, checkpoint integrity) is made before anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from foundation import atomic, attention, config, registry
from foundation.device import autocast, resolve_precision
from foundation.errors import ConfigError, DataError, FoundationError
from foundation.lock import STALE_AFTER_S, FolderLock, LockedError, command_line
from foundation.train import checkpoint as ckpt
from foundation.train.data import batch_samples, build_loader, to_device
from foundation.train.distributed import Distributed, all_reduce_sum, all_reduce_sum_tensor, init_distributed
from foundation.train.metrics import MetricsWriter, peak_flops, rss_mb
from foundation.train.optim import build_optimizer, build_schedule, decay_split
from foundation.train.preemption import StopRequest
from foundation.train.pretrained import dataset_fingerprint, export_model, snapshot_dataset

_log = logging.getLogger(__name__)

#: How long `pretrain` waits for another process's lock on its run directory (a requeued job whose
#: earlier incarnation is still saving its last checkpoint) before it gives up; the environment
#: variable FOUNDATION_RUN_LOCK_WAIT_S overrides it.
RUN_LOCK_WAIT_S = 60.0
FAILED_SPARE = ".status.json.failed"

#: Config keys that may change between a checkpoint and its resumption without `--force`: they
#: move files, change logging/checkpoint cadence or kernels, but not the optimisation itself.
#: (`train.steps` is not among them: the cosine schedule spans it.)
RESUME_SAFE_KEYS = frozenset(
    {
        "run.dir",
        "data.path",
        "data.val_split",
        "data.prefetch",
        "train.log_every",
        "train.val_every",
        "train.val_batches",
        "train.ckpt_every",
        "train.keep_last",
        "train.progress",
        "train.device",
        "train.attention",
        "train.tensorboard",
        "train.peak_tflops",
        "train.stop_file",
    }
)


class TrainingDiverged(FoundationError):
    """The loss or the gradient norm became non-finite; no state after the last checkpoint was kept."""


@dataclasses.dataclass
class TrainResult:
    status: str  # "done" or "preempted"
    step: int
    run_dir: Path
    last_loss: float | None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def resume_hash(cfg_dict: dict[str, Any]) -> str:
    """Hash of the config keys that must not change when resuming (all but RESUME_SAFE_KEYS)."""
    flat = {k: v for k, v in _flatten(cfg_dict).items() if k not in RESUME_SAFE_KEYS}
    return config.config_hash(flat)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every resume-relevant key that differs."""
    a, b = _flatten(old), _flatten(new)
    return [
        f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        for key in sorted(set(a) | set(b))
        if key not in RESUME_SAFE_KEYS and a.get(key) != b.get(key)
    ]


def resolve_parallel(requested: str, world_size: int) -> str:
    if requested == "auto":
        return "ddp" if world_size > 1 else "none"
    if requested == "none" and world_size > 1:
        raise ConfigError(
            f"train.parallel is 'none' but {world_size} processes were launched; use ddp or fsdp"
        )
    return requested


def shard_model(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """FSDP2: `fully_shard` every element of every `nn.ModuleList` (the usual home of transformer
    blocks; deepest first), then the root, which holds whatever is left (embeddings, heads)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    depth = {module: name.count(".") for name, module in model.named_modules()}
    blocks = [
        child
        for module in model.modules()
        if isinstance(module, nn.ModuleList)
        for child in module
        if any(p.requires_grad for p in child.parameters())
    ]
    for block in sorted(blocks, key=lambda m: -depth[m]):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def wrap_model(model: nn.Module, parallel: str, dist_info: Distributed) -> nn.Module:
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
    if parallel == "fsdp":
        return shard_model(model, dist_info.device, dist_info.world_size)
    return model


def grad_sync(model: nn.Module, parallel: str, sync: bool):
    """No gradient all-reduce on the non-final micro-steps of an accumulated step."""
    if parallel == "ddp" and not sync:
        return model.no_sync()
    if parallel == "fsdp":
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def global_grad_norm(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Gradient norm over all ranks' shards (before clipping); clips to `max_norm` when given.
    `params`: the model's trainable parameters, listed once (walking the module tree every step
    costs as much as the norm itself on small models)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return norm


def _lock_wait_s() -> float:
    """FOUNDATION_RUN_LOCK_WAIT_S, else 60 s; a requeued SLURM job (SLURM_RESTART_COUNT > 0) waits
    until a lock from an earlier incarnation killed on another node would go stale (its heartbeat
    stops), so that the requeue takes the run over instead of failing."""
    text = os.environ.get("FOUNDATION_RUN_LOCK_WAIT_S")
    if text is None:
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0").strip()
        requeued = restarts.isdigit() and int(restarts) > 0
        return STALE_AFTER_S + RUN_LOCK_WAIT_S if requeued else RUN_LOCK_WAIT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= 7 * 86400:
        raise ConfigError(f"FOUNDATION_RUN_LOCK_WAIT_S={text!r} is not a number of seconds from 0 to a week")
    return seconds


def _one_line(exc: BaseException) -> str:
    failures = getattr(exc, "failures", None)  # DCP's CheckpointException: one entry per failed rank
    if failures:
        inner = next(iter(failures.values()))
        exc = inner[0] if isinstance(inner, tuple) else inner
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def _derived_seed(seed: int, *parts: int) -> int:
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0])


class Trainer:
    def __init__(
        self,
        cfg: config.PretrainConfig,
        dist_info: Distributed,
        *,
        force: bool = False,
        train_loader: Iterable | None = None,
    ) -> None:
        self.cfg = cfg
        self.dist = dist_info
        self.force = force
        self.family = registry.get(cfg.family)
        self.run_dir = Path(cfg.run.dir)
        self.cfg_dict = config.to_dict(cfg)
        self._custom_loader = train_loader
        self._step = 0  # last completed optimiser step (for status.json on a crash)
        self._damaged: list[Path] = []  # checkpoints skipped on resume
        self._window = _Window()

    # ------------------------------------------------------------------ set-up

    def _load_manifest(self):
        from foundation.data import Manifest

        try:
            return Manifest.load(self.cfg.data.path)
        except FoundationError:
            raise
        except FileNotFoundError as exc:
            raise DataError(f"data.path {self.cfg.data.path!r}: no shard set there ({exc})") from None

    def _check_resume(self, latest: tuple[int, Path]) -> dict[str, Any]:
        step, path = latest
        meta = ckpt.read_meta(path)
        if meta["world_size"] != self.dist.world_size:
            raise ConfigError(
                f"checkpoint {path} was written by {meta['world_size']} process(es) but this run has "
                f"{self.dist.world_size}; the data-loader position is per rank, so resume with "
                f"{meta['world_size']} process(es), or start a new run.dir"
            )
        saved_data = meta["config"].get("data")
        saved_workers = saved_data.get("num_workers") if isinstance(saved_data, dict) else None
        if saved_workers != self.cfg.data.num_workers and self._custom_loader is None:
            raise ConfigError(
                f"checkpoint {path} was written with data.num_workers={saved_workers}; the loader "
                f"position it holds is per worker, so resume with data.num_workers={saved_workers} "
                "(--force cannot change this one), or start a new run.dir"
            )
        if meta.get("resume_hash") != resume_hash(self.cfg_dict):
            changes = config_changes(meta["config"], self.cfg_dict)
            message = (
                f"the config differs from the one that wrote checkpoint {path} "
                f"({'; '.join(changes) or 'unknown change'}); pass --force to resume anyway, "
                "or use a new run.dir"
            )
            if not self.force:
                raise ConfigError(message)
            if self.dist.is_main:
                _log.warning("resuming despite config changes (--force): %s", "; ".join(changes))
        return meta

    def _write_status(self, state: str, step: int, **extra: Any) -> None:
        if not self.dist.is_main:
            return
        record = {"state": state, "step": step, "total_steps": self.cfg.train.steps, "time": time.time()}
        record.update(extra)
        if state == "running":
            # Written first, while there is room: what replaces "running" when the disk is full.
            spare = {**record, "state": "failed", "error": "the run stopped and could not record why"}
            atomic.write_json(self.run_dir / FAILED_SPARE, spare)
        atomic.write_json(self.run_dir / "status.json", record)
        if state != "running":
            (self.run_dir / FAILED_SPARE).unlink(missing_ok=True)

    def _record_failure(self, exc: BaseException) -> None:
        """status.json says failed, whatever the disk allows: the detailed record, else the spare
        written at the start (a rename needs no free space), else (read-only disk) a log line."""
        if not self.dist.is_main:
            return
        try:
            self._write_status("failed", self._step, error=f"{type(exc).__name__}: {exc}"[:2000])
            return
        except OSError as write_error:
            _log.error("cannot write status.json (%s); using the spare failed record", write_error)
        try:
            os.replace(self.run_dir / FAILED_SPARE, self.run_dir / "status.json")
        except OSError as rename_error:
            _log.error("cannot mark %s as failed either: %s", self.run_dir / "status.json", rename_error)

    def _seed(self, *parts: int) -> None:
        seed = _derived_seed(self.cfg.run.seed, *parts)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # ------------------------------------------------------------------ the run

    def run(self) -> TrainResult:
        # Installed first: a stop signal during set-up stops the run after its first step instead
        # of killing the process (SIGUSR1's default action).
        stop = StopRequest(self.run_dir / self.cfg.train.stop_file, poll_file=self.dist.is_main).install()
        try:
            with self._run_lock():
                return self._run(stop)
        finally:
            stop.close()

    @contextlib.contextmanager
    def _run_lock(self) -> Iterator[None]:
        """Rank 0 holds the run directory's lock; every rank learns whether it got it."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(
                f"run.dir {str(self.run_dir)!r} is a file, not a folder; set run.dir to a folder"
            )
        lock, error = None, None
        if self.dist.is_main:
            try:
                lock = FolderLock(self.run_dir, command_line(), wait_s=_lock_wait_s()).acquire()
            except FoundationError as exc:
                error = exc
        if all_reduce_sum([float(error is not None)], self.dist)[0] > 0:
            raise error or LockedError(f"rank 0 could not lock run.dir {str(self.run_dir)!r}")
        try:
            yield
        finally:
            if lock is not None:
                lock.release()

    def _check_dataset(self, resuming: bool) -> None:
        """A run resumed or re-run on another data.path must see the shard set it was trained on
        (same shards and files by content hash), or its dataset/ snapshot and model are wrong."""
        snapshot = self.run_dir / "dataset"
        if not (snapshot / "manifest.json").is_file():
            return
        if not resuming and not (self.run_dir / "model.pt").is_file():
            return  # nothing trained from the snapshot yet
        saved, given = dataset_fingerprint(snapshot), dataset_fingerprint(Path(self.cfg.data.path))
        if saved != given:
            raise ConfigError(
                f"data.path {self.cfg.data.path!r} holds another shard set than the one run.dir "
                f"{str(self.run_dir)!r} was trained on ({str(snapshot / 'manifest.json')!r}); point "
                "data.path at that shard set, or use a new run.dir"
            )

    def _intact_checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, newest first, that every rank found intact (meta.json, file sizes,
        DCP metadata, its own state); damaged ones are skipped with a warning."""
        found = list(reversed(ckpt.list_checkpoints(self.run_dir)))
        problems = []
        for _, path in found:
            try:
                ckpt.verify_checkpoint(path, self.dist.rank)
                problems.append(None)
            except DataError as exc:
                problems.append(str(exc))
        votes = all_reduce_sum([float(p is not None) for p in problems], self.dist) if found else []
        intact = []
        for (step, path), problem, vote in zip(found, problems, votes, strict=True):
            if vote == 0:
                intact.append((step, path))
                continue
            self._damaged.append(path)
            if self.dist.is_main:
                _log.warning(
                    "checkpoint %s is damaged, trying the one before: %s", path, problem or "(another rank)"
                )
        return intact

    def _resume_candidates(self) -> list[tuple[int, Path]]:
        """The intact checkpoints to resume from, newest first, once the config and the shard set
        are known to match the newest of them (checks only: nothing is written yet)."""
        candidates = self._intact_checkpoints()
        if self._damaged and not candidates:
            raise DataError(
                f"every checkpoint of {str(self.run_dir)!r} is damaged (see the warnings above); move "
                f"{str(ckpt.checkpoints_root(self.run_dir))!r} aside to start over, or restore it"
            )
        if candidates:
            self._check_resume(candidates[0])
        self._check_dataset(resuming=bool(candidates))
        return candidates

    def _prepare_run_dir(self) -> None:
        """Rank 0 writes the resolved config and the dataset snapshot, and removes a partial save."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial(self.run_dir)
            config.save(self.cfg, self.run_dir / "config.yaml")
            snapshot_dataset(self.cfg.data.path, self.run_dir / "dataset")
        self.dist.barrier()

    def _run(self, stop: StopRequest) -> TrainResult:
        manifest = self._load_manifest()
        candidates = self._resume_candidates()
        self._prepare_run_dir()
        s = self._build(manifest)
        step = self._restore(candidates, s)
        self._log_start(s, step)
        self._write_status("running", step)
        self._step = step
        writer = None
        try:
            writer = MetricsWriter(
                self.run_dir,
                enabled=self.dist.is_main,
                resume_step=step,
                total_steps=self.cfg.train.steps,
                progress=self.cfg.train.progress,
                tensorboard=self.cfg.train.tensorboard,
            )
            return self._train_loop(s, step, writer, stop)
        except TrainingDiverged:
            raise
        except BaseException as exc:
            # A scheduler script must not take a crash for a finished or a preempted run.
            self._record_failure(exc)
            raise
        finally:
            if writer is not None:
                writer.close()

    def _build(self, manifest: Any) -> _LoopState:
        """The model (wrapped for `train.parallel`), its optimiser and schedule, and the loaders."""
        cfg, dist_info = self.cfg, self.dist
        precision = resolve_precision(cfg.train.precision, dist_info.device, option="train.precision")
        parallel = resolve_parallel(cfg.train.parallel, dist_info.world_size)
        attention.set_backend(cfg.train.attention)

        # Same initial weights on every rank (FSDP2 shards each rank's copy; DDP checks they agree).
        self._seed(0)
        plain = self.family.build_model(cfg.model, manifest).to(dist_info.device)
        decay_names = decay_split(plain)
        model = wrap_model(plain, parallel, dist_info)
        optimizer = build_optimizer(model, cfg.optim, decay_names)
        schedule = build_schedule(optimizer, cfg.optim, cfg.train.steps)
        loader, val_loader = self._build_loaders(manifest)
        flops = self.family.flops_per_sample
        return _LoopState(
            model=model,
            optimizer=optimizer,
            schedule=schedule,
            loader=loader,
            val_loader=val_loader,
            precision=precision,
            parallel=parallel,
            trainable=[p for p in model.parameters() if p.requires_grad],
            n_params=sum(p.numel() for p in plain.parameters()),
            flops_per_sample=flops(cfg.model, manifest) if flops is not None else None,
            peak_flops=peak_flops(dist_info.device, precision, cfg.train.peak_tflops),
        )

    def _build_loaders(self, manifest: Any) -> tuple[Iterable, Iterable | None]:
        """The training loader (the caller's, when given) and the validation loader, if any."""
        cfg = self.cfg
        loader = self._custom_loader
        if loader is None:
            loader = build_loader(
                cfg, self.family, manifest, self.dist, split=cfg.data.train_split, train=True
            )
        if not (cfg.data.val_split and cfg.train.val_every > 0):
            return loader, None
        if cfg.data.val_split not in _splits(manifest):
            _log.warning("no %r split in %s: validation is off", cfg.data.val_split, cfg.data.path)
            return loader, None
        return loader, build_loader(
            cfg, self.family, manifest, self.dist, split=cfg.data.val_split, train=False
        )

    def _restore(self, candidates: list[tuple[int, Path]], s: _LoopState) -> int:
        """Load the newest loadable checkpoint into `s` (weights, optimiser, schedule, loader
        position, metrics window, RNG); the step to continue from (0 for a fresh run)."""
        if not candidates:
            # Dropout and other in-model randomness: a stream per rank.
            self._seed(1, self.dist.rank)
            return 0
        step, rank_state = self._load_newest_loadable(candidates, s.model, s.optimizer)
        try:
            s.schedule.load_state_dict(rank_state["schedule"])
            if hasattr(s.loader, "load_state_dict"):
                s.loader.load_state_dict(rank_state["loader"])
            self._window = _Window.from_state(rank_state.get("metrics_window"))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise DataError(
                f"the schedule/loader state of rank {self.dist.rank} in the checkpoint of step "
                f"{step} is malformed ({_one_line(exc)}); move that checkpoint aside to resume "
                "from the one before"
            ) from None
        ckpt.set_rng_state(rank_state["rng"])
        return step

    def _load_newest_loadable(self, candidates: list[tuple[int, Path]], model: nn.Module, optimizer: Any):
        """Load the newest checkpoint whose data loads (collective); (step, this rank's state)."""
        for step, path in candidates:
            if step != candidates[0][0]:
                self._check_resume((step, path))
            failure: BaseException | None = None
            try:
                rank_state = ckpt.load_checkpoint(path, model, optimizer, self.dist)
            except (DataError, dcp.api.CheckpointException) as exc:
                failure = exc  # DCP's own failures reach every rank; a bad rank state only this one
            if all_reduce_sum([float(failure is not None)], self.dist)[0] > 0:
                self._damaged.append(path)
                if self.dist.is_main:
                    reason = _one_line(failure) if failure is not None else "(another rank)"
                    _log.warning("checkpoint %s does not load, trying the one before: %s", path, reason)
                continue
            if self.dist.is_main:
                for damaged in self._damaged:
                    if damaged.exists() and int(damaged.name[5:]) > step:
                        ckpt.set_aside(damaged)
                _log.info("resumed from %s (step %d)", path, step)
            self.dist.barrier()
            return step, rank_state
        raise DataError(
            f"no checkpoint of {str(self.run_dir)!r} loads (see the warnings above); move "
            f"{str(ckpt.checkpoints_root(self.run_dir))!r} aside to start over, or restore it"
        )

    def _log_start(self, s: _LoopState, step: int) -> None:
        if self.dist.is_main:
            _log.info(
                "training %s (%.3g M parameters) on %d x %s, %s, %s, from step %d to %d",
                self.family.name,
                s.n_params / 1e6,
                self.dist.world_size,
                self.dist.device.type,
                s.parallel,
                s.precision,
                step,
                self.cfg.train.steps,
            )

    # ------------------------------------------------------------------ the loop

    def _train_loop(self, s: _LoopState, step: int, writer: MetricsWriter, stop: StopRequest) -> TrainResult:
        """Optimiser steps from `step` to `train.steps`, logging, validating and saving on their
        cadence; a stop request saves and leaves early ("preempted")."""
        cfg = self.cfg.train
        batches = _endless(s.loader)
        last_loss: float | None = None
        last_saved = step if ckpt.latest_checkpoint(self.run_dir) is not None else -1
        started = time.perf_counter()
        status = "done"
        while step < cfg.steps:
            self._step = step
            result = self.train_step(s, batches, step + 1, stop)
            step += 1
            last_loss = result.loss
            if step % cfg.log_every == 0 or step == cfg.steps:
                writer.write(self._train_record(step, s, started))
                self._window = _Window()
            writer.advance(step, result.loss)
            if s.val_loader is not None and (step % cfg.val_every == 0 or step == cfg.steps):
                writer.write(self._validate(step, s))
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps or result.stop:
                self._save(step, s)
                last_saved = step
            if result.stop and step < cfg.steps:
                status = "preempted"
                if self.dist.is_main:
                    _log.warning(
                        "stopping at step %d on %s; checkpoint saved, re-run to resume", step, stop.reason()
                    )
                break
        return self._finish(s, status, step, last_loss, last_saved, stop)

    def train_step(self, s: _LoopState, batches: Iterator[Any], step: int, stop: StopRequest) -> _StepResult:
        """Optimiser step number `step`: `train.grad_accum` micro-batches forward and backward, the
        global gradient norm (clipped to `train.grad_clip`), then the optimiser and the schedule.

        The family's metrics stay on the device (summed into the metrics window) until a record is
        written; the step's one host sync reads its loss and gradient norm, which the non-finite
        guard needs before the update is applied, together with the ranks' stop votes.
        """
        accum = self.cfg.train.grad_accum
        s.model.train()
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=self.dist.device, dtype=torch.float64)
        metric_sums: dict[str, float | torch.Tensor] = defaultdict(float)
        for micro in range(accum):
            batch = self._next_batch(batches)
            loss, metrics = self.forward_backward_step(s, batch, last_micro_batch=micro == accum - 1)
            loss_sum += loss.to(torch.float64)
            for key, value in metrics.items():
                metric_sums[key] += _on_device(value) / accum
        grad_norm = global_grad_norm(s.trainable, self.cfg.train.grad_clip)
        step_loss, norm, stop_votes = self._read_step(loss_sum / accum, grad_norm, stop)
        if not (math.isfinite(step_loss) and math.isfinite(norm)):
            s.optimizer.zero_grad(set_to_none=True)
            self._diverged(step, step_loss, norm)
        lr = s.optimizer.param_groups[0]["lr"]
        s.optimizer.step()
        s.schedule.step()
        s.optimizer.zero_grad(set_to_none=True)
        self._window.add_step(step_loss, norm, lr, metric_sums, time.perf_counter() - started)
        return _StepResult(loss=step_loss, stop=stop_votes > 0)

    def forward_backward_step(
        self, s: _LoopState, batch: Any, *, last_micro_batch: bool
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """One micro-batch: the family's loss under autocast, and its backward pass (scaled by the
        number of micro-batches); gradients are synchronised across ranks on the last one only.
        Returns the detached loss and the family's metrics, both as the family gave them."""
        batch = to_device(batch, self.dist.device)
        with grad_sync(s.model, s.parallel, last_micro_batch):
            with autocast(self.dist.device, s.precision):
                loss, metrics = self.family.loss(s.model, batch)
            (loss / self.cfg.train.grad_accum).backward()
        return loss.detach(), metrics

    def _read_step(
        self, local_loss: torch.Tensor, grad_norm: torch.Tensor, stop: StopRequest
    ) -> tuple[float, float, float]:
        """(loss averaged over ranks, gradient norm, number of ranks asked to stop): the step's one
        read from the device, after the ranks' losses and stop votes are summed where they are."""
        vote = torch.full((), float(stop.requested()), dtype=torch.float64, device=local_loss.device)
        summed = all_reduce_sum_tensor(torch.stack([local_loss, vote]), self.dist)
        loss, votes, norm = torch.cat([summed, grad_norm.reshape(1).to(summed)]).tolist()
        return loss / self.dist.world_size, norm, votes

    def _next_batch(self, batches: Iterator[Any]) -> Any:
        """The next training batch, counting the wait for it and its samples and tokens."""
        wait_start = time.perf_counter()
        batch = next(batches)
        self._window.data_wait += time.perf_counter() - wait_start
        self._window.samples += batch_samples(batch)
        if self.family.tokens_per_batch is not None:
            self._window.tokens += int(self.family.tokens_per_batch(batch))
        return batch

    def _finish(
        self,
        s: _LoopState,
        status: str,
        step: int,
        last_loss: float | None,
        last_saved: int,
        stop: StopRequest,
    ) -> TrainResult:
        """A finished run gets its last checkpoint and model.pt; every run gets its status."""
        if status == "done":
            if last_saved != step:
                self._save(step, s)
            export_model(self.run_dir / "model.pt", s.model, self.cfg, step, self.dist)
        stop.consume_stop_file()
        self._write_status(status, step, last_loss=last_loss)
        # Ranks leave together: torchrun / `srun --kill-on-bad-exit` kill the others as soon as one
        # exits with EXIT_PREEMPTED, which must not cut rank 0 off before status.json is written.
        self.dist.barrier()
        return TrainResult(status=status, step=step, run_dir=self.run_dir, last_loss=last_loss)

    def _diverged(self, step: int, loss: float, grad_norm: float) -> None:
        latest = ckpt.latest_checkpoint(self.run_dir)
        where = f"the last good checkpoint is {latest[1]}" if latest else "no checkpoint was written yet"
        message = (
            f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {step} "
            f"(loss {loss}, grad norm {grad_norm}); this step was not applied and nothing was saved; "
            f"{where}. Lower optim.lr, raise optim.warmup_steps, set train.grad_clip, or check the data"
        )
        self._write_status("diverged", step - 1, message=message)
        raise TrainingDiverged(message)

    def _save(self, step: int, s: _LoopState) -> None:
        rank_state = {
            "schedule": s.schedule.state_dict(),
            "loader": s.loader.state_dict() if hasattr(s.loader, "state_dict") else None,
            "rng": ckpt.rng_state(),
            "metrics_window": self._window.state_dict(),
        }
        meta = {
            "parallel": s.parallel,
            "family": self.cfg.family,
            "config_hash": config.config_hash(self.cfg_dict),
            "resume_hash": resume_hash(self.cfg_dict),
            "config": self.cfg_dict,
            "torch": torch.__version__,
            "time": time.time(),
        }
        ckpt.save_checkpoint(
            self.run_dir, step, s.model, s.optimizer, rank_state, meta, self.dist, self.cfg.train.keep_last
        )

    def _train_record(self, step: int, s: _LoopState, started: float) -> dict[str, Any]:
        """The training record of the metrics window, averaged over its steps and the ranks (the
        window's metric sums are read from the device here, once per record)."""
        window = self._window
        keys = sorted(window.metrics)
        local = [window.samples, window.tokens, window.data_wait, window.elapsed]
        summed = all_reduce_sum(local + _to_floats([window.metrics[k] for k in keys]), self.dist)
        world = self.dist.world_size
        samples, tokens, wait, elapsed = summed[0], summed[1], summed[2], summed[3] / world
        record: dict[str, Any] = {
            "step": step,
            "loss": window.loss / window.steps,
            **{k: v / (world * window.steps) for k, v in zip(keys, summed[4:], strict=True)},
            "lr": window.lr,
            "grad_norm": window.grad_norm,
            "samples_per_s": samples / elapsed if elapsed > 0 else None,
            "data_wait_pct": 100.0 * wait / (world * elapsed) if elapsed > 0 else None,
            "step_time_s": elapsed / max(window.timed_steps, 1),
            "rss_mb": round(rss_mb(), 1),
            "time": round(time.perf_counter() - started, 3),
        }
        if self.family.tokens_per_batch is not None and elapsed > 0:
            record["tokens_per_s"] = tokens / elapsed
        if self.dist.device.type == "cuda":
            record["cuda_max_alloc_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if s.flops_per_sample is not None and s.peak_flops is not None and elapsed > 0:
            record["mfu"] = s.flops_per_sample * samples / elapsed / (s.peak_flops * world)
        return record

    @torch.no_grad()
    def _validate(self, step: int, s: _LoopState) -> dict[str, Any]:
        """Loss and metrics over up to `train.val_batches` batches, weighted by samples; summed on
        the device and read once at the end."""
        s.model.eval()
        loss_total: float | torch.Tensor = 0.0
        count, batches = 0, 0
        metric_totals: dict[str, float | torch.Tensor] = defaultdict(float)
        for index, batch in enumerate(s.val_loader):
            if index >= self.cfg.train.val_batches:
                break
            n = batch_samples(batch)
            batch = to_device(batch, self.dist.device)
            with autocast(self.dist.device, s.precision):
                loss, metrics = self.family.loss(s.model, batch)
            loss_total += _on_device(loss) * n
            count += n
            batches += 1
            for key, value in metrics.items():
                metric_totals[key] += _on_device(value) * n
        keys = sorted(metric_totals)
        totals = _to_floats([loss_total] + [metric_totals[k] for k in keys])
        summed = all_reduce_sum([totals[0], count, batches] + totals[1:], self.dist)
        n = max(summed[1], 1.0)
        record = {"step": step, "val_loss": summed[0] / n, "val_batches": int(summed[2])}
        record.update({f"val_{k}": v / n for k, v in zip(keys, summed[3:], strict=True)})
        s.model.train()
        return record


@dataclasses.dataclass(kw_only=True)
class _LoopState:
    """What `_build` makes once and every step uses."""

    model: nn.Module
    """As wrapped for training (DDP / FSDP2 / plain)."""
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    loader: Iterable
    val_loader: Iterable | None
    precision: str
    """Resolved: fp32 or bf16 (autocast)."""
    parallel: str
    """Resolved: none, ddp or fsdp."""
    trainable: list[torch.Tensor]
    """The parameters that get gradients, listed once (for the gradient norm)."""
    n_params: int
    flops_per_sample: float | None
    peak_flops: float | None
    """Of one device, for MFU; None where unknown."""


class _StepResult(NamedTuple):
    loss: float
    """Mean over the micro-batches and the ranks."""
    stop: bool
    """Some rank was asked to stop (signal or stop file)."""


@dataclasses.dataclass
class _Window:
    """What the next training record averages: the steps since the last record.

    The family's metric sums stay where the family computed them (on the device: no host sync per
    step) until the record is written or the window is checkpointed. The loss and metric sums are
    checkpointed (a run resumed between two records writes the same record as an uninterrupted
    one); timings restart with the process.
    """

    steps: int = 0
    loss: float = 0.0
    metrics: dict[str, float | torch.Tensor] = dataclasses.field(default_factory=lambda: defaultdict(float))
    grad_norm: float = 0.0
    lr: float = 0.0
    timed_steps: int = 0
    samples: int = 0
    tokens: int = 0
    data_wait: float = 0.0
    elapsed: float = 0.0

    def add_step(
        self,
        loss: float,
        grad_norm: float,
        lr: float,
        metrics: dict[str, float | torch.Tensor],
        seconds: float,
    ) -> None:
        self.steps += 1
        self.timed_steps += 1
        self.loss += loss
        self.grad_norm = grad_norm
        self.lr = lr
        self.elapsed += seconds
        for key, value in metrics.items():
            self.metrics[key] += value

    def state_dict(self) -> dict[str, Any]:
        keys = sorted(self.metrics)
        metrics = dict(zip(keys, _to_floats([self.metrics[k] for k in keys]), strict=True))
        return {"steps": self.steps, "loss": self.loss, "metrics": metrics}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> _Window:
        window = cls()
        if state:
            window.steps, window.loss = state["steps"], state["loss"]
            window.metrics.update(state["metrics"])
        return window


def _on_device(value: float | torch.Tensor) -> float | torch.Tensor:
    """A metric value ready to be summed without a host sync: a tensor detached, in float64 (as
    exact as the Python float it replaces), on its device; a plain number as a float."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64)
    return float(value)


def _to_floats(values: list[float | torch.Tensor]) -> list[float]:
    """`values` as Python floats, with one device-to-host copy for all the tensors among them."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    device = tensors[0].device
    read = iter(torch.stack([t.to(device, torch.float64).reshape(()) for t in tensors]).tolist())
    return [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]


def _splits(manifest: Any) -> Iterable[str]:
    splits = getattr(manifest, "splits", None)
    return splits if splits is not None else ()


def _endless(loader: Iterable) -> Iterator[Any]:
    """Batches forever: a loader that ends (a finite epoch) is started again (the next epoch)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise DataError("the training split yielded no batches (is it empty, or smaller than one batch?)")


def train(
    cfg: config.PretrainConfig, *, force: bool = False, train_loader: Iterable | None = None
) -> TrainResult:
    """Run (or resume) the pretraining job described by `cfg` in this process.

    `train_loader` replaces the shard-set loader (tests, embedding applications): any iterable of
    batches; with `state_dict`/`load_state_dict` it is checkpointed like the built-in one.
    Raises `TrainingDiverged` on a non-finite loss, `ConfigError`/`DataError` on bad input.
    """
    dist_info = init_distributed(cfg.train.device)
    try:
        return Trainer(cfg, dist_info, force=force, train_loader=train_loader).run()
    finally:
        dist_info.close()
