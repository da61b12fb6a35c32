"""N ranks of a `foundation` command (the env vars torchrun sets, or torchrun itself) or of a
Python function in a gloo process group, on CPU."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from typing import Any

from tests.testkit import child_env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(args: list[str], nproc: int = 2) -> list[str]:
    """`torchrun --standalone --nproc-per-node NPROC -m foundation.cli ARGS` with this Python."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "foundation.cli",
        *args,
    ]


def torchrun(
    args: list[str], nproc: int = 2, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `foundation ARGS` under the real torchrun launcher with `nproc` CPU ranks (gloo)."""
    return subprocess.run(
        torchrun_command(args, nproc),
        env=child_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_ranks(
    args: list[str], nproc: int = 2, env: dict[str, str] | None = None, timeout: float = 240
) -> list[subprocess.CompletedProcess]:
    """Run `foundation ARGS` as `nproc` processes given the env vars torchrun sets (one process
    without them); each rank's CompletedProcess, stdout and stderr together."""
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        rank_env = child_env(**(env or {}))
        if nproc > 1:
            rank_env.update(
                RANK=str(rank),
                WORLD_SIZE=str(nproc),
                LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "foundation.cli", *args],
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, None))
    return results


class RankFailed(AssertionError):
    """A spawned rank raised; the message is its traceback."""


def _rank_main(fn: Callable, rank: int, world: int, port: int, args: tuple, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, fn(rank, world, *args)))
    except BaseException:
        queue.put((rank, RankFailed(f"rank {rank}:\n{traceback.format_exc()}")))
        raise
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn: Callable, *args: Any, nproc: int = 2, timeout: float = 120) -> list:
    """`fn(rank, world_size, *args)` in `nproc` spawned processes joined in one gloo process group;
    the values they returned, by rank. `fn` must be importable by name (module level)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, nproc, port, args, queue)) for r in range(nproc)]
    for proc in procs:
        proc.start()
    try:
        results = dict(queue.get(timeout=timeout) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.exitcode is None:
                proc.kill()
    for rank in range(nproc):
        if isinstance(results[rank], RankFailed):
            raise results[rank]
    assert [proc.exitcode for proc in procs] == [0] * nproc, [proc.exitcode for proc in procs]
    return [results[rank] for rank in range(nproc)]
