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
import queue
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foundation.atomic import write_json
from foundation.errors import FoundationError
from foundation.signals import sigterm_as_interrupt

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
    alone: bool = False
    """Run with no other stage beside it, every core to itself (a long stage on the critical path
    that gains more from all the threads than the others would from sharing)."""
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


@dataclass
class _Finished:
    """What a stage's run reports back to the scheduler."""

    stage: Stage
    command: str = ""
    wall: float = 0.0
    cpu: float = 0.0
    error: BaseException | None = None


class _Children:
    """The child processes of the stages now running, so that a failure can stop the others."""

    def __init__(self) -> None:
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self.stopping = False

    def add(self, name: str, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs[name] = proc
            if self.stopping:
                proc.terminate()

    def remove(self, name: str) -> None:
        with self._lock:
            self._procs.pop(name, None)

    def stop_all(self) -> None:
        with self._lock:
            self.stopping = True
            for proc in self._procs.values():
                if proc.poll() is None:
                    proc.terminate()


def _execute(
    stage: Stage, log_path: Path, echo: Callable[[str], None], run: _RunOptions
) -> tuple[str, float]:
    """Run the stage; returns the command line its marker records and its CPU seconds."""
    if stage.argv is not None:
        command = "foundation " + shlex.join(stage.argv)
        echo(f"    $ {command}")
        if run.in_process:
            cpu_start = _cpu_seconds()
            _run_in_process(stage.argv, log_path)
            return command, _cpu_seconds() - cpu_start
        return command, _run_command(stage.argv, log_path, echo, name=stage.name, run=run)
    assert stage.func is not None
    cpu_start = time.process_time()
    stage.func()
    return f"(in-process) {stage.key}", time.process_time() - cpu_start


@dataclass
class _RunOptions:
    """How the stages' commands run: in this interpreter (tests) or as child processes, and with
    how many compute threads each (None: the libraries' default)."""

    in_process: bool = False
    children: _Children = field(default_factory=_Children)
    threads: dict[str, int] = field(default_factory=dict)


def _run_one(stage: Stage, log_path: Path, echo: Callable[[str], None], run: _RunOptions) -> _Finished:
    """Run a stage and check its outputs; an error is returned, not raised (it runs in a thread)."""
    start = time.perf_counter()
    try:
        command, cpu = _execute(stage, log_path, echo, run)
        absent = [str(p) for p in stage.outputs if not Path(p).exists()]
        if absent:
            raise StageFailed(
                f"stage {stage.name} finished but did not produce {', '.join(absent)}; see {log_path}"
            )
    except BaseException as exc:  # noqa: BLE001 - handed to the scheduler, which re-raises it
        return _Finished(stage, error=exc)
    return _Finished(stage, command, time.perf_counter() - start, cpu)


def run_stages(
    stages: Sequence[Stage],
    out: Path,
    echo: Callable[[str], None] = print,
    *,
    in_process: bool = False,
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Run (or skip) every stage, each once the stages it comes `after` are done; returns the
    markers of all stages, in the order given.

    `jobs` > 1 runs up to that many independent stages side by side; while more than one runs, each
    command gets an equal share of the CPU cores as its thread count (OMP_NUM_THREADS, unless the
    environment sets it), since two one-thread processes use two cores better than one process of
    two threads. A failing stage stops the others (terminated, no marker, so they resume on the next
    run) and its error is raised. `in_process` runs the `foundation` commands in this interpreter
    instead of child processes (saves each one's start-up; for tests - a child process is the
    isolation users get); it runs one stage at a time."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, not {jobs}")
    names = [stage.name for stage in stages]
    for i, stage in enumerate(stages):
        missing_deps = [d for d in stage.after if d not in names[:i]]
        if missing_deps:
            raise ValueError(f"stage {stage.name} depends on {missing_deps}, which do not come before it")
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    scheduler = _Scheduler(stages, out, echo, _RunOptions(in_process=in_process), 1 if in_process else jobs)
    with sigterm_as_interrupt():
        return scheduler.run()


class _Scheduler:
    """Starts each stage when the stages it depends on are done, up to `jobs` at once."""

    def __init__(
        self, stages: Sequence[Stage], out: Path, echo: Callable[[str], None], run: _RunOptions, jobs: int
    ) -> None:
        self.stages, self.out, self.echo, self.run_options, self.jobs = list(stages), out, echo, run, jobs
        self.by_name = {stage.name: stage for stage in stages}
        self.runs: dict[str, str] = {}  # stage name -> run id of its result
        self.markers: dict[str, dict[str, Any]] = {}
        self.pending = list(range(len(stages)))
        self.running: dict[str, threading.Thread] = {}
        self.finished: queue.Queue[_Finished] = queue.Queue()
        self.lock = threading.Lock()

    def say(self, line: str) -> None:
        with self.lock:
            self.echo(line)

    def run(self) -> list[dict[str, Any]]:
        try:
            while self.pending or self.running:
                self._start_ready()
                if self.running:
                    self._collect(self.finished.get())
        except BaseException:
            self._stop_running()
            raise
        return [self.markers[stage.name] for stage in self.stages]

    def _ready(self) -> list[int]:
        return [i for i in self.pending if all(d in self.runs for d in self.stages[i].after)]

    def _start_ready(self) -> None:
        """Skip the ready stages that are done already; start the others, in the order given, while
        a slot is free (a stage that runs `alone` waits for an empty machine and keeps it)."""
        while len(self.running) < self.jobs and not any(self.by_name[n].alone for n in self.running):
            ready = self._ready()
            if not ready:
                return
            number = ready[0]
            stage = self.stages[number]
            if self._skip_if_done(number, stage):
                self.pending.remove(number)
                continue
            if stage.alone and self.running:
                return
            self.pending.remove(number)
            self._start(number, stage, 1 if stage.alone else min(self.jobs, len(self.running) + len(ready)))

    def _head(self, number: int, stage: Stage) -> str:
        return f"[{number + 1}/{len(self.stages)}] {stage.name}"

    def _fingerprint(self, stage: Stage) -> str:
        return _fingerprint(stage, [self.runs[d] for d in stage.after])

    def _skip_if_done(self, number: int, stage: Stage) -> bool:
        marker = read_json(self.out / MARKERS / f"{stage.name}.json")
        if not _is_done(stage, marker, self._fingerprint(stage)):
            return False
        assert marker is not None
        when = f"{marker['finished']}, {marker['wall_seconds']:.0f} s"
        self.say(f"{self._head(number, stage)}: done already ({when}) - skipped")
        self.runs[stage.name] = marker["run_id"]
        self.markers[stage.name] = marker
        return True

    def _start(self, number: int, stage: Stage, concurrent: int) -> None:
        threads = _thread_share(concurrent)
        note = f" (beside other stages, {threads} thread{'s' * (threads > 1)})" if threads else ""
        self.say(f"{self._head(number, stage)}: {stage.description}{note}")
        marker_path = self.out / MARKERS / f"{stage.name}.json"
        marker = read_json(marker_path)
        if marker is not None:
            _forget(stage, marker, marker_path, self.say)
        if threads:
            self.run_options.threads[stage.name] = threads
        log_path = self.out / "logs" / f"{stage.name}.log"
        echo = self.say if self.jobs == 1 else (lambda line: self.say(f"    [{stage.name}] {line.lstrip()}"))
        worker = threading.Thread(
            target=lambda: self.finished.put(_run_one(stage, log_path, echo, self.run_options)),
            name=f"stage-{stage.name}",
            daemon=True,
        )
        self.running[stage.name] = worker
        worker.start()

    def _collect(self, result: _Finished) -> None:
        stage = result.stage
        self.running.pop(stage.name).join()
        if result.error is not None:
            raise result.error
        marker = {
            "stage": stage.name,
            "command": result.command,
            "fingerprint": self._fingerprint(stage),
            "run_id": uuid.uuid4().hex,
            "upstream": {d: self.runs[d] for d in stage.after},
            "outputs": [str(p) for p in stage.outputs],
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "wall_seconds": round(result.wall, 1),
            "cpu_seconds": round(result.cpu, 1),
            "foundation_version": _version(),
            "log": str(self.out / "logs" / f"{stage.name}.log") if stage.argv is not None else None,
        }
        write_json(self.out / MARKERS / f"{stage.name}.json", marker, indent=2)
        self.runs[stage.name] = marker["run_id"]
        self.markers[stage.name] = marker
        self.say(f"    {stage.name} done in {result.wall:.0f} s (CPU {result.cpu:.0f} s)")

    def _stop_running(self) -> None:
        """Terminate the other running stages and wait for them (they leave no marker)."""
        if not self.running:
            return
        self.say(f"    stopping {', '.join(self.running)} (no marker: a re-run resumes them)")
        self.run_options.children.stop_all()
        for worker in self.running.values():
            worker.join()
        self.running.clear()


def _version() -> str:
    from foundation import __version__

    return __version__


def _thread_share(concurrent: int) -> int | None:
    """Compute threads for a command that runs beside `concurrent` - 1 others: an equal share of
    the cores, or None (the libraries' default) when it runs alone or the environment decides."""
    if concurrent <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // concurrent)


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
    argv: list[str], log_path: Path, echo: Callable[[str], None], *, name: str, run: _RunOptions
) -> float:
    """`python -m foundation.cli ARGV`, its output streamed to the log and (indented) to the screen;
    returns the CPU seconds of the command (and of the processes it waited for)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if name in run.threads:
        env["OMP_NUM_THREADS"] = str(run.threads[name])
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ foundation {shlex.join(argv)}\n")
        proc = subprocess.Popen(
            _command_line(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            bufsize=1,
        )
        run.children.add(name, proc)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                echo("    | " + line.rstrip())
            code, cpu = _wait(proc)
        finally:
            if proc.returncode is None:
                proc.terminate()
                proc.wait()
            run.children.remove(name)
    if code != 0:
        stopped = " (stopped because another stage failed)" if run.children.stopping else ""
        raise StageFailed(
            f"`foundation {shlex.join(argv)}` failed (exit {code}){stopped}; its output is in {log_path}. "
            "Fix the cause and run it again: finished stages are kept"
        )
    return cpu


def _command_line(argv: list[str]) -> list[str]:
    """The child process that runs `foundation ARGV`."""
    return [sys.executable, "-m", "foundation.cli", *argv]


def _wait(proc: subprocess.Popen) -> tuple[int, float]:
    """Exit code and CPU seconds of a finished child (its own rusage, so that stages running side
    by side are not counted in each other's time)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime
