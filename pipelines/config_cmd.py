"""`foundation config describe [FAMILY]`: every pretraining config key with its type, default and meaning."""

from __future__ import annotations

import argparse

from foundation.cli import Command


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("family", nargs="?", help="Also list this family's `model:` keys.")


def _run(args: argparse.Namespace) -> int:
    from foundation import config, registry

    for line in config.describe(config.PretrainConfig):
        if not line.startswith("model ("):
            print(line)
    if args.family:
        family = registry.get(args.family)
        print(f"model: {family.name} model config")
        for line in config.describe(family.model_config, "model."):
            print(line)
    else:
        print(f"model: family-specific; families: {', '.join(registry.available())}")
    return 0


COMMANDS = [
    Command(("config", "describe"), "List config keys with types, defaults and docs.", _add_arguments, _run)
]
