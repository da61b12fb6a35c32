"""`python -m tests.testkit.train_threads CONFIG`: train from CONFIG in this process, then print
`threads {"rank": R, "names": [...]}` — the threads a finished rank would take into interpreter
exit (Linux: read from /proc)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from foundation.config import load_pretrain_config
from foundation.train import train


def main() -> None:
    train(load_pretrain_config(sys.argv[1]))
    tasks = Path("/proc/self/task")
    names = sorted((task / "comm").read_text().strip() for task in tasks.iterdir())
    print("threads " + json.dumps({"rank": int(os.environ["RANK"]), "names": names}), flush=True)


if __name__ == "__main__":
    main()
