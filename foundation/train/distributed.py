"""Process-group set-up for plain `python`, `torchrun` and `srun` launches.

One process per device. The launcher is read from the environment:
- torchrun (and any launcher that sets them): `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
  `MASTER_PORT`;
- srun without torchrun: `SLURM_PROCID`, `SLURM_STEP_NUM_TASKS` (or `SLURM_NTASKS`), `SLURM_LOCALID`,
  with the master taken from the first host of `SLURM_STEP_NODELIST`/`SLURM_JOB_NODELIST` and a port
  derived from the job id (or `MASTER_ADDR`/`MASTER_PORT` when the batch script exports them);
- anything else: one process.
NCCL on CUDA, gloo on CPU. A one-process run still gets a (local, in-memory) process group so that
DDP/FSDP2 and distributed checkpointing take the same code path as a multi-process run.
"""

from __future__ import annotations

import datetime
import functools
import gc
import logging
import os
import re
import sys
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from foundation.device import resolve_device
from foundation.errors import ConfigError

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the job, as read from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    launcher: str  # "single", "torchrun" or "slurm"


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list (`node[01-03,07],gpu5`) as a list of host names."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?(?:,|$)", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if not prefix and not ranges:
            continue
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            for number in range(int(lo), int(hi) + 1):
                hosts.append(prefix + str(number).zfill(len(lo)))
    return hosts


def read_launch(env: Mapping[str, str] | None = None) -> Launch:
    """This process's rank, world size, local rank and rendezvous address, from `env`."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        port = env.get("MASTER_PORT")
        return Launch(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR"),
            master_port=int(port) if port else None,
            launcher="torchrun",
        )
    # Inside an srun step SLURM_STEP_NUM_TASKS is set; a batch script running plain python is one task.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        world = int(env["SLURM_STEP_NUM_TASKS"])
        if world > 1:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
            hosts = expand_nodelist(nodelist)
            addr = env.get("MASTER_ADDR") or (hosts[0] if hosts else None)
            if addr is None:
                raise ConfigError("srun launch: cannot find the master host (SLURM_JOB_NODELIST is empty)")
            port = env.get("MASTER_PORT")
            job = int(env.get("SLURM_JOB_ID", "0") or 0)
            return Launch(
                rank=int(env["SLURM_PROCID"]),
                world_size=world,
                local_rank=int(env.get("SLURM_LOCALID", "0")),
                master_addr=addr,
                master_port=int(port) if port else 20000 + job % 20000,
                launcher="slurm",
            )
    return Launch(0, 1, 0, None, None, "single")


@dataclass
class Distributed:
    """The initialised process group of this run (rank 0 logs and writes shared files)."""

    launch: Launch
    device: torch.device
    backend: str
    owns_group: bool
    previous_excepthook: object = None

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def is_main(self) -> bool:
        return self.launch.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            free_process_group()
        if self.previous_excepthook is not None:
            # init_process_group wraps sys.excepthook with a "[rankN]:" prefix; don't stack them.
            sys.excepthook = self.previous_excepthook


def free_process_group() -> None:
    """Destroy the default process group and see that it is freed, not only deregistered: a rank
    that takes gloo's threads into interpreter exit can abort there ("terminate called without
    an active exception") after a successful run. What else holds the group: DTensor's memoised
    plans (FSDP2 fills them; they hold the DeviceMesh, which holds the group; rebuilt on demand),
    emptied first, and garbage cycles (an FSDP2 model's), collected only if the group outlived
    `destroy_process_group` (a full collection takes ~0.3 s in a large process)."""
    group = weakref.ref(dist.group.WORLD)
    if "torch.distributed.tensor" in sys.modules:
        _clear_dtensor_plans()
    dist.destroy_process_group()
    if group() is not None:
        gc.collect()


def _clear_dtensor_plans() -> None:
    try:  # private helpers of torch; one it lacks is skipped
        from torch.distributed.tensor import _redistribute, debug
    except ImportError:
        _redistribute = debug = None
    for clear in (
        getattr(debug, "_clear_sharding_prop_cache", None),  # the Python and the C++ fast-path caches
        getattr(_redistribute, "clear_redistribute_planner_cache", None),
    ):
        if clear is not None:
            clear()
    # The memoised functions and methods of torch.distributed's modules, whatever torch names them.
    for name, module in list(sys.modules.items()):
        if not name.startswith("torch.distributed") or module is None:
            continue
        # Tested by `type(...)`, not isinstance or getattr: some objects warn of their deprecation
        # when an attribute of theirs (`__class__` too) is read.
        for value in list(vars(module).values()):
            members = list(vars(value).values()) if issubclass(type(value), type) else []
            for candidate in (value, *members):
                function = candidate.__func__ if type(candidate) in (staticmethod, classmethod) else candidate
                if type(function) is functools._lru_cache_wrapper:
                    function.cache_clear()


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> Distributed:
    """Join (or create) the process group for this launch and pick this process's device by
    `foundation.device.resolve_device` (`device` is the value of `train.device`; plain `cuda` is
    the GPU of this process's local rank)."""
    launch = read_launch()
    torch_device = resolve_device(device, launch.local_rank, option="train.device")
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
        backend = "nccl"
    else:
        backend = "gloo"
    if dist.is_initialized():  # an embedding application set it up already
        if dist.get_world_size() != launch.world_size and launch.launcher != "single":
            raise ConfigError("a process group exists whose world size differs from the launcher's")
        launch = Launch(
            dist.get_rank(), dist.get_world_size(), launch.local_rank, None, None, launch.launcher
        )
        return Distributed(launch, torch_device, dist.get_backend(), owns_group=False)
    timeout = datetime.timedelta(seconds=timeout_s)
    previous_excepthook = sys.excepthook
    if launch.world_size == 1:
        store = dist.HashStore()
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    else:
        if launch.master_addr is None or launch.master_port is None:
            raise ConfigError(
                f"{launch.launcher} launch with {launch.world_size} processes but MASTER_ADDR/MASTER_PORT "
                "are not set"
            )
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        dist.init_process_group(
            backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
        )
    _log.debug(
        "rank %d/%d on %s (%s, %s)", launch.rank, launch.world_size, torch_device, backend, launch.launcher
    )
    return Distributed(
        launch, torch_device, backend, owns_group=True, previous_excepthook=previous_excepthook
    )


def all_reduce_sum(values: list[float], dist_info: Distributed) -> list[float]:
    """Element-wise sum over ranks of a few floats (one small collective)."""
    if dist_info.world_size == 1:
        return list(values)
    device = dist_info.device if dist_info.backend == "nccl" else torch.device("cpu")
    return all_reduce_sum_tensor(torch.tensor(values, dtype=torch.float64, device=device), dist_info).tolist()


def all_reduce_sum_tensor(tensor: torch.Tensor, dist_info: Distributed) -> torch.Tensor:
    """`tensor` summed over ranks, left where the backend reduces it (the device under NCCL, the
    CPU under gloo) so that nothing waits for the GPU until the caller reads the result."""
    if dist_info.world_size == 1:
        return tensor
    if dist_info.backend != "nccl":
        tensor = tensor.cpu()
    dist.all_reduce(tensor)
    return tensor
