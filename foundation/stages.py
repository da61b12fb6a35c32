"""A resumable sequence of stages: each a `foundation` command (or a small in-process function),
skipped on a re-run when it is done already with the same inputs.

Each command stage runs as a child process (`python -m foundation.cli ARGV`, printed so that it can
be re-run by hand) with its output in `OUT/logs/<stage>.log`. When a stage succeeds a marker
`OUT/.stages/<stage>.json` records the command, what it produced, its wall and CPU seconds and a
fingerprint of the command, its input files and the runs of the stages it depends on. A re-run
skips every stage whose marker matches and whose outputs exist; a stage that changed (other
options, an edited config) or whose inputs were redone runs again, and so does everything after
it. An interrupted stage has no marker and keeps its outputs, so that its command can resume them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foundation.atomic import write_json
from foundation.errors import FoundationError

MARKERS = ".stages"


class StageFailed(FoundationError):
    """A stage exited with an error (its log says why)."""


@dataclass
class Stage:
    """One step: a `foundation` command, or an in-process function for glue steps."""

    name: str
    description: str
    outputs: list[Path]
    argv: list[str] | None = None
    """Arguments of `foundation` (run as `python -m foundation.cli ARGV`)."""
    func: Callable[[], None] | None = None
    key: str = ""
    """For `func` stages: what determines their result (part of the fingerprint)."""
    after: list[str] = field(default_factory=list)
    """Stages whose results this one reads: redoing them redoes this."""
    inputs: list[Path] = field(default_factory=list)
    """Files (configs) whose content is part of the fingerprint: editing one redoes the stage."""
    clean: list[Path] = field(default_factory=list)
    """What to delete before redoing a stage whose earlier result is stale (a run directory that
    holds checkpoints of another config, an export of other weights); an interrupted stage (no
    marker) keeps them, so that it resumes."""


def _fingerprint(stage: Stage, upstream: Sequence[str]) -> str:
    contents = {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in stage.inputs}
    blob = json.dumps(
        {"argv": stage.argv, "key": stage.key, "upstream": list(upstream), "inputs": contents}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def read_json(path: Path) -> dict[str, Any] | None:
    """A marker's (or report's) content, or None where it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the stages' commands)."""
    total = 0.0
    for who in (resource.RUSAGE_CHILDREN, resource.RUSAGE_SELF):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _is_done(stage: Stage, marker: dict[str, Any] | None, fingerprint: str) -> bool:
    return (
        marker is not None
        and marker.get("fingerprint") == fingerprint
        and all(Path(p).exists() for p in stage.outputs)
    )


def _forget(stage: Stage, marker: dict[str, Any], marker_path: Path, echo: Callable[[str], None]) -> None:
    """A stage done before with other inputs: its old results must not be resumed."""
    stale = [p for p in stage.clean if p.exists()]
    for path in stale:
        _remove(path)
    if stale:
        echo(f"    (inputs changed since {marker['finished']}; removed {', '.join(map(str, stale))})")
    marker_path.unlink()


def _execute(stage: Stage, log_path: Path, echo: Callable[[str], None], in_process: bool) -> str:
    """Run the stage; returns the command line its marker records."""
    if stage.argv is not None:
        command = "foundation " + shlex.join(stage.argv)
        echo(f"    $ {command}")
        _run_command(stage.argv, log_path, echo, in_process=in_process)
        return command
    assert stage.func is not None
    stage.func()
    return f"(in-process) {stage.key}"


def run_stages(
    stages: Sequence[Stage], out: Path, echo: Callable[[str], None] = print, *, in_process: bool = False
) -> list[dict[str, Any]]:
    """Run (or skip) every stage in order; returns the markers of all stages.

    `in_process` runs the `foundation` commands in this interpreter instead of child processes
    (saves each one's start-up; for tests - a child process is the isolation users get)."""
    from foundation import __version__

    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    runs: dict[str, str] = {}  # stage name -> run id of its result
    markers = []
    for number, stage in enumerate(stages, 1):
        missing_deps = [d for d in stage.after if d not in runs]
        if missing_deps:
            raise ValueError(f"stage {stage.name} depends on {missing_deps}, which do not come before it")
        fingerprint = _fingerprint(stage, [runs[d] for d in stage.after])
        marker_path = out / MARKERS / f"{stage.name}.json"
        marker = read_json(marker_path)
        head = f"[{number}/{len(stages)}] {stage.name}"
        if _is_done(stage, marker, fingerprint):
            assert marker is not None
            echo(f"{head}: done already ({marker['finished']}, {marker['wall_seconds']:.0f} s) - skipped")
            runs[stage.name] = marker["run_id"]
            markers.append(marker)
            continue
        echo(f"{head}: {stage.description}")
        if marker is not None:
            _forget(stage, marker, marker_path, echo)
        log_path = logs / f"{stage.name}.log"
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        command = _execute(stage, log_path, echo, in_process)
        absent = [str(p) for p in stage.outputs if not Path(p).exists()]
        if absent:
            raise StageFailed(
                f"stage {stage.name} finished but did not produce {', '.join(absent)}; see {log_path}"
            )
        wall = time.perf_counter() - start
        marker = {
            "stage": stage.name,
            "command": command,
            "fingerprint": fingerprint,
            "run_id": uuid.uuid4().hex,
            "upstream": {d: runs[d] for d in stage.after},
            "outputs": [str(p) for p in stage.outputs],
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "wall_seconds": round(wall, 1),
            "cpu_seconds": round(_cpu_seconds() - cpu_start, 1),
            "foundation_version": __version__,
            "log": str(log_path) if stage.argv is not None else None,
        }
        write_json(marker_path, marker, indent=2)
        runs[stage.name] = marker["run_id"]
        markers.append(marker)
        echo(f"    done in {wall:.0f} s (CPU {marker['cpu_seconds']:.0f} s)")
    return markers


def _run_in_process(argv: list[str], log_path: Path) -> None:
    """`foundation ARGV` in this interpreter, its output appended to the log."""
    from foundation.cli import main

    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ foundation {shlex.join(argv)}\n")
        log.flush()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse errors
                code = exc.code if isinstance(exc.code, int) else 2
    if code != 0:
        raise StageFailed(
            f"`foundation {shlex.join(argv)}` failed (exit {code}); its output is in {log_path}"
        )


def _run_command(
    argv: list[str], log_path: Path, echo: Callable[[str], None], *, in_process: bool = False
) -> None:
    """`python -m foundation.cli ARGV`, its output streamed to the log and (indented) to the screen."""
    if in_process:
        _run_in_process(argv, log_path)
        return
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ foundation {shlex.join(argv)}\n")
        proc = subprocess.Popen(
            [sys.executable, "-m", "foundation.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            bufsize=1,
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                echo("    | " + line.rstrip())
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        code = proc.wait()
    if code != 0:
        raise StageFailed(
            f"`foundation {shlex.join(argv)}` failed (exit {code}); its output is in {log_path}. "
            "Fix the cause and run it again: finished stages are kept"
        )
