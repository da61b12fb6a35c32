"""Helpers shared by every test folder, one of each.

- `toyfamily`: the one toy family (`tests.testkit.toyfamily:FAMILY`): train, resume, export; its
  image and spectrum towers and `write_checkpoint` serve the embedding-export tests.
- `shards`: `write_toy_shards` (token samples), `write_galaxy_shards` (galaxies in miniature, for
  the toy family's towers).
- `configs`: tiny configs, one form each: the toy family's (`config_dict`), the real families'
  shipped tiny configs with a test's sizes over them (`tiny_model_config`, `tiny_config_dict`,
  `ASTROCLIP_SMALL`, `model_overrides` for the command line), and `write_config`.
- `runs`: what a finished run left (`final_weights`) and `assert_bitwise_equal`.
- `ranks`: `free_port`, N ranks of a `foundation` command (`run_ranks`, `torchrun`) or of a
  function in a gloo group (`spawn_ranks`).
- `bounded`: a `foundation` command in a child under a wall-clock and a memory bound.
- `embeddings`: synthetic embeddings files for the search/evaluation tests.
- `train_threads`: `python -m tests.testkit.train_threads CONFIG OUT` trains, then lists the
  threads left alive (the process-group teardown test).

Import them as `tests.testkit.<module>`: pytest puts the repository root on sys.path (pyproject's
`pythonpath`), and child processes get it through `child_env()`, so the module:ATTRIBUTE family
names above load in spawned ranks and SLURM jobs too. Only the repository root goes on the path,
never a test folder: `tests/pipelines` on sys.path would shadow the `pipelines` package.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child `foundation` process: the repository root on
    PYTHONPATH (for `tests.testkit`), one thread per process, no leftover `TOY_*` test hooks."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TOY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env
