"""The jobs users run. Each module declares its CLI verbs in `COMMANDS` (see foundation.cli)."""
