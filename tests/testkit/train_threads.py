"""`python -m tests.testkit.train_threads CONFIG OUT`: train from CONFIG in this process, then
write the names of the threads still alive to OUT/rank-R.json — the threads a finished rank
would take into interpreter exit (Linux: read from /proc)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from foundation.config import load_pretrain_config
from foundation.train import train


def main() -> None:
    config, out = sys.argv[1], Path(sys.argv[2])
    train(load_pretrain_config(config))
    tasks = Path("/proc/self/task")
    names = sorted((task / "comm").read_text().strip() for task in tasks.iterdir())
    (out / f"rank-{os.environ['RANK']}.json").write_text(json.dumps(names))


if __name__ == "__main__":
    main()
