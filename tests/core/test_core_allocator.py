"""The allocator settings `foundation` applies at start-up: freed memory stays for the next step."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from foundation.allocator import SETTINGS, tune_allocator

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")

# 64 blocks of 1 MiB, allocated and freed four times after a first round has grown the heap: the
# page faults of the last four rounds. glibc's defaults give the freed heap back each round (the
# next round faults all of it in again); with SETTINGS it stays.
REUSE = textwrap.dedent(
    """
    import resource, sys
    if sys.argv[1:] == ["tune"]:
        from foundation.allocator import tune_allocator
        tune_allocator()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [bytearray(1 << 20) for _ in range(64)]
    del blocks
    before = faults()
    for _ in range(4):
        blocks = [bytearray(1 << 20) for _ in range(64)]
        del blocks
    print(faults() - before)
    """
)


def _faults(env: dict[str, str], *args: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", REUSE, *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def _plain_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in SETTINGS and k != "LD_PRELOAD"}


def test_children_inherit_the_settings_and_reuse_freed_memory():
    env = _plain_env()
    assert sorted(tune_allocator(env)) == sorted(SETTINGS)
    assert {name: env[name] for name in SETTINGS} == {n: str(v) for n, (_, v) in SETTINGS.items()}
    assert _faults(env) < 1000
    assert _faults(_plain_env()) > 3 * 64 * 256  # glibc's defaults: 256 pages a block, every round


def test_mallopt_tunes_the_running_process():
    assert _faults(_plain_env(), "tune") < 1000


def test_a_users_own_settings_and_allocator_are_left_alone():
    env = {"MALLOC_TRIM_THRESHOLD_": "0"}
    assert "MALLOC_TRIM_THRESHOLD_" not in tune_allocator(env)
    assert env["MALLOC_TRIM_THRESHOLD_"] == "0"
    preloaded = {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}
    assert tune_allocator(preloaded) == []
    assert preloaded == {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}
