"""`foundation demo`: stage markers, skipping, re-running what changed, failures, the controls."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from encoders.astroclip.prepare import shuffle_pairs
from foundation.data import Manifest
from foundation.data.raw_inputs import iter_samples
from foundation.errors import ConfigError
from foundation.stages import Stage, StageFailed, run_stages
from pipelines.demo import DemoSettings, plan


def _writer(path: Path, calls: list[str], name: str):
    def write() -> None:
        calls.append(name)
        path.write_text(f"{name} {len(calls)}\n")

    return write


def _stages(tmp_path: Path, calls: list[str], embeddings: Path, key_b: str = "b1") -> list[Stage]:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    return [
        Stage("a", "first", [a], func=_writer(a, calls, "a"), key="a1"),
        Stage("b", "second, after a", [b], func=_writer(b, calls, "b"), key=key_b, after=["a"]),
        Stage(
            "retrieval",
            "a real foundation command",
            [tmp_path / "ret" / "report.json"],
            argv=["evaluate", "retrieval", "--embeddings", str(embeddings), "--out", str(tmp_path / "ret")],
            after=["b"],
        ),
    ]


@pytest.mark.slow
def test_stages_run_once_then_skip_and_redo_what_changed(tmp_path, make_embeddings):
    embeddings, _ = make_embeddings(n=60, dim=4)
    out = tmp_path / "demo"
    calls: list[str] = []
    lines: list[str] = []
    markers = run_stages(_stages(tmp_path, calls, embeddings), out, echo=lines.append)
    assert calls == ["a", "b"] and (tmp_path / "ret" / "report.json").exists()
    assert "$ foundation evaluate retrieval" in "\n".join(lines)
    marker = json.loads((out / ".stages" / "retrieval.json").read_text())
    assert marker["command"].startswith("foundation evaluate retrieval --embeddings")
    assert marker["upstream"] == {"b": markers[1]["run_id"]} and marker["cpu_seconds"] >= 0
    assert "top-1" in (out / "logs" / "retrieval.log").read_text()

    # Everything done: nothing runs again.
    lines.clear()
    run_stages(_stages(tmp_path, calls, embeddings), out, echo=lines.append)
    assert calls == ["a", "b"] and sum("skipped" in line for line in lines) == 3

    # A changed stage runs again, and so does everything after it (but not what came before).
    lines.clear()
    run_stages(_stages(tmp_path, calls, embeddings, key_b="b2"), out, echo=lines.append)
    assert calls == ["a", "b", "b"]
    assert "[1/3] a: done already" in lines[0] and not any("skipped" in line for line in lines[1:])

    # A lost output is made again; its dependants follow.
    (tmp_path / "a.txt").unlink()
    run_stages(_stages(tmp_path, calls, embeddings, key_b="b2"), out, echo=lines.append)
    assert calls == ["a", "b", "b", "a", "b"]


def test_a_failing_stage_stops_with_its_log_and_leaves_no_marker(tmp_path):
    out = tmp_path / "demo"
    bad = Stage(
        "bad",
        "fails",
        [tmp_path / "never"],
        argv=["evaluate", "retrieval", "--embeddings", str(tmp_path / "no.h5")],
    )
    with pytest.raises(StageFailed, match="bad.log"):
        run_stages([bad], out, echo=lambda _: None)
    assert not (out / ".stages" / "bad.json").exists()
    assert "does not exist" in (out / "logs" / "bad.log").read_text()
    silent = Stage("silent", "claims success", [tmp_path / "missing.txt"], func=lambda: None, key="x")
    with pytest.raises(StageFailed, match="did not produce"):
        run_stages([silent], out, echo=lambda _: None)


def test_plan_wires_controls_into_the_reports(tmp_path):
    settings = DemoSettings(n=100, spectrum_steps=3, align_steps=4)
    names = [s.name for s in plan(tmp_path, settings)]
    assert names[:7] == [
        "synth",
        "prepare",
        "pretrain-spectrum",
        "pretrain-align",
        "baselines",
        "export",
        "export-random-init",
    ]
    assert "pretrain-align-shuffled" not in names
    # The spectrum tower alone (the paper's SpecFormer row): exported after its own pretraining,
    # regressed, not searched across modalities (it has no image).
    stages = {s.name: s for s in plan(tmp_path, settings)}
    tower = f"specformer={tmp_path / 'embeddings' / 'specformer.h5'}"
    assert stages["export-spectrum-tower"].after == ["prepare", "pretrain-spectrum"]
    assert stages["export-spectrum-tower"].argv[2] == str(tmp_path / "runs" / "spectrum")
    assert tower in stages["zero-shot"].argv and "export-spectrum-tower" in stages["zero-shot"].after
    assert tower not in stages["retrieval"].argv
    stages = {s.name: s for s in plan(tmp_path, DemoSettings(n=100, controls=True))}
    assert {"shuffle-pairs", "pretrain-align-shuffled", "export-shuffled"} <= set(stages)
    zero_shot = stages["zero-shot"].argv
    assert f"shuffled-pairs={tmp_path / 'embeddings' / 'shuffled.h5'}" in zero_shot
    assert "--raw-data" in zero_shot and set(stages["zero-shot"].after) >= {"export", "export-shuffled"}
    assert {"--paper-table", "--baselines-from"} <= set(zero_shot) and "--paper-table" in stages[
        "retrieval"
    ].argv
    # The baselines need only the shards (so they train beside the pretraining); zero-shot reads them.
    baselines = stages["baselines"]
    assert baselines.after == ["prepare"] and "baselines" in stages["zero-shot"].after
    assert zero_shot[zero_shot.index("--baselines-from") + 1] == str(baselines.outputs[0])
    # The shuffled model is evaluated on the true pairs, and both alignments start from one tower.
    assert stages["export-shuffled"].argv[stages["export-shuffled"].argv.index("--data") + 1] == str(
        tmp_path / "shards"
    )
    assert f"model.spectrum_init={tmp_path / 'runs' / 'spectrum'}" in stages["pretrain-align-shuffled"].argv


def test_shuffle_pairs_permutes_spectra_of_the_training_split_only(tmp_path, tiny_shards):
    out = tmp_path / "shuffled"
    shuffle_pairs(tiny_shards, out, seed=3)
    before = {key: (split, s) for split, key, s in iter_samples(tiny_shards)}
    after = {key: (split, s) for split, key, s in iter_samples(out)}
    assert before.keys() == after.keys()
    moved = 0
    train_spectra_before, train_spectra_after = [], []
    for key, (split, old) in before.items():
        new_split, new = after[key]
        assert new_split == split
        np.testing.assert_array_equal(new["image"], old["image"])
        assert new["redshift"] == old["redshift"]
        if split == "train":
            moved += not np.array_equal(new["spectrum"], old["spectrum"])
            train_spectra_before.append(old["spectrum"].tobytes())
            train_spectra_after.append(new["spectrum"].tobytes())
        else:
            np.testing.assert_array_equal(new["spectrum"], old["spectrum"])
    assert sorted(train_spectra_before) == sorted(train_spectra_after)  # a permutation
    assert moved > 0.8 * len(train_spectra_before)
    assert Manifest.load(out).extra["shuffled_pairs"]["fields"] == ["spectrum"]


@pytest.mark.slow
def test_tiny_demo_end_to_end_then_everything_is_skipped(tmp_path):
    """The real pipeline (synth → ... → reports) at toy size, with the shuffled-pair control."""
    from foundation.results import read_table
    from pipelines.demo import summary

    settings = DemoSettings(
        n=120,
        spectrum_steps=2,
        align_steps=2,
        controls=True,
        extra_pretrain=("data.batch_size=16", "data.num_workers=0", "train.val_every=0"),
    )
    out = tmp_path / "demo"
    lines: list[str] = []
    markers = run_stages(plan(out, settings), out, echo=lines.append, in_process=True)
    assert len(markers) == len(plan(out, settings))
    zero_shot = json.loads((out / "reports" / "zero-shot" / "report.json").read_text())
    sources = {r["source"] for r in zero_shot["results"]}
    assert sources == {"astroclip", "random-init", "shuffled-pairs", "specformer", "raw input"}
    assert {r["target"] for r in zero_shot["results"]} == {"redshift", "stellar_mass"}
    retrieval = json.loads((out / "reports" / "retrieval" / "report.json").read_text())
    assert {r["label"] for r in retrieval["results"]} == {"astroclip", "random-init", "shuffled-pairs"}
    queries = json.loads((out / "search" / "query.json").read_text())
    assert len(queries) == 3 and all(len(q["neighbours"]) == 5 for q in queries)
    assert (out / "search" / "query.png").stat().st_size > 10_000
    for table in ("zero-shot/astroclip-properties", "retrieval/astroclip-retrieval"):
        assert read_table(out / "reports" / f"{table}.table.json").figures
    properties = read_table(out / "reports" / "zero-shot" / "astroclip-properties.table.json")
    assert "specformer spectrum · zero-shot k-NN, reference (k=64)" in [row.label for row in properties.rows]
    text = summary(out, markers)
    assert "| astroclip | image | k-NN |" in text and "image → spectrum" in text
    assert (out / "report" / "index.html").is_file() and "result tables" in text
    _browse_demo(out, queries[0]["query"])
    # A second run finds every stage done.
    lines.clear()
    run_stages(plan(out, settings), out, echo=lines.append, in_process=True)
    assert all("skipped" in line for line in lines) and len(lines) == len(markers)


def test_edited_inputs_redo_a_stage_after_removing_its_stale_results(tmp_path):
    out = tmp_path / "demo"
    config = tmp_path / "config.yaml"
    config.write_text("steps: 1\n")
    workdir = tmp_path / "run"
    calls: list[str] = []

    def train() -> None:
        calls.append("train")
        workdir.mkdir(exist_ok=True)
        (workdir / f"checkpoint-{len(calls)}").write_text("x")
        (workdir / "model.pt").write_text(config.read_text())

    def stages() -> list[Stage]:
        return [
            Stage("train", "t", [workdir / "model.pt"], func=train, key="k", inputs=[config], clean=[workdir])
        ]

    run_stages(stages(), out, echo=lambda _: None)
    run_stages(stages(), out, echo=lambda _: None)
    assert calls == ["train"]
    # An interrupted stage (no marker) keeps its work directory, to resume from it.
    (out / ".stages" / "train.json").unlink()
    run_stages(stages(), out, echo=lambda _: None)
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoint-1", "checkpoint-2", "model.pt"]
    # Editing the config (same path, same command) redoes it from a clean directory.
    config.write_text("steps: 2\n")
    lines: list[str] = []
    run_stages(stages(), out, echo=lines.append)
    assert calls == ["train"] * 3 and "removed" in "\n".join(lines)
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoint-3", "model.pt"]


@pytest.mark.parametrize("amx, expected", [(True, "bf16"), (False, "auto")])
def test_demo_trains_in_bf16_only_where_the_cpu_has_amx(tmp_path, monkeypatch, amx, expected):
    from foundation import device

    monkeypatch.setattr(device, "cpu_bf16_is_fast", lambda: amx)
    stages = {s.name: s for s in plan(tmp_path, DemoSettings(n=100, controls=True))}
    for name in ("pretrain-spectrum", "pretrain-align", "pretrain-align-shuffled"):
        assert f"train.precision={expected}" in stages[name].argv
    forced = {s.name: s for s in plan(tmp_path, DemoSettings(n=100, precision="fp32"))}
    assert "train.precision=fp32" in forced["pretrain-align"].argv
    with pytest.raises(ConfigError, match="--precision takes"):
        plan(tmp_path, DemoSettings(precision="fp16"))


def _browse_demo(out, oid: str) -> None:
    """The command the demo prints opens its results: `foundation search serve` over the real export."""
    pytest.importorskip("flask", reason="flask is not installed (the serve extra)")
    from foundation.search.serve import SearchBrowser, create_app
    from pipelines.demo import browse_command

    words = shlex.split(browse_command(out))
    assert words[:3] == ["foundation", "search", "serve"]
    browser = SearchBrowser([words[3]], embeddings=words[words.index("--embeddings") + 1], data=words[-1])
    try:
        client = create_app(browser).test_client()
        result = client.get(f"/query?object_id={oid}&modality=image&k=4").get_json()
        assert len(result["neighbours"]) == 4 and set(result["query_targets"]) >= {"redshift", "stellar_mass"}
        assert client.get(f"/image?object_id={oid}").mimetype == "image/png"
        assert "Å" in client.get(f"/spectrum?object_id={oid}").get_json()["x_label"]
    finally:
        browser.close()


# ----------------------------------------------------------------------------- stages side by side


def _meeting_stages(tmp_path: Path, met: dict[str, bool], wait: float = 5.0) -> list[Stage]:
    """a and b each wait (bounded) for the other to start: they meet only when run side by side;
    c comes after both."""
    import threading

    started = {"a": threading.Event(), "b": threading.Event()}

    def work(name: str, other: str):
        def run() -> None:
            started[name].set()
            met[name] = started[other].wait(timeout=wait)
            (tmp_path / f"{name}.txt").write_text(name)

        return run

    c = tmp_path / "c.txt"
    return [
        Stage("a", "first", [tmp_path / "a.txt"], func=work("a", "b"), key="a"),
        Stage("b", "independent of a", [tmp_path / "b.txt"], func=work("b", "a"), key="b"),
        Stage("c", "after both", [c], func=lambda: c.write_text("c"), key="c", after=["a", "b"]),
    ]


def test_independent_stages_run_side_by_side_and_resume_like_a_sequential_run(tmp_path):
    met: dict[str, bool] = {}
    out = tmp_path / "demo"
    markers = run_stages(_meeting_stages(tmp_path, met), out, echo=lambda _: None, jobs=2)
    assert met == {"a": True, "b": True}
    assert [m["stage"] for m in markers] == ["a", "b", "c"]
    assert markers[2]["upstream"] == {"a": markers[0]["run_id"], "b": markers[1]["run_id"]}
    # The same fingerprints as one at a time (so either run resumes the other), and a re-run skips all.
    alone: dict[str, bool] = {}
    sequential = run_stages(
        _meeting_stages(tmp_path, alone, wait=0.05), tmp_path / "seq", echo=lambda _: None
    )
    assert alone == {"a": False, "b": True}  # one at a time, a waits in vain
    assert [m["fingerprint"] for m in sequential[:2]] == [m["fingerprint"] for m in markers[:2]]
    lines: list[str] = []
    run_stages(_meeting_stages(tmp_path, met), out, echo=lines.append, jobs=2)
    assert len(lines) == 3 and all("skipped" in line for line in lines)
    with pytest.raises(ValueError, match="jobs"):
        run_stages([], out, jobs=0)


def test_a_stage_that_runs_alone_has_no_stage_beside_it(tmp_path):
    met: dict[str, bool] = {}
    stages = _meeting_stages(tmp_path, met, wait=0.2)
    stages[0].alone = True
    run_stages(stages, tmp_path / "demo", echo=lambda _: None, jobs=2)
    assert met == {"a": False, "b": True}  # b started only after a finished
    # The demo's spectrum pretraining runs alone; the baselines then run beside the alignment.
    plan_ = {s.name: s for s in plan(tmp_path, DemoSettings(n=100))}
    assert plan_["pretrain-spectrum"].alone and not plan_["baselines"].alone


def _fake_commands(monkeypatch, tmp_path: Path) -> None:
    """Stage commands become small Python programs: `sleep` (records its pid, then sleeps long),
    `fail` (exits 3 once `sleep` has recorded its pid), `threads` (prints its OMP_NUM_THREADS)."""
    import sys

    from foundation import stages

    programs = {
        "sleep": f"import os, time; open({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid())); "
        "time.sleep(600)",
        # fails once `sleep` is up (bounded), so that there is a running stage to stop
        "fail": f"import os, sys, time\npid = {str(tmp_path / 'pid')!r}\nfor _ in range(400):\n"
        "    if os.path.exists(pid) and os.path.getsize(pid):\n        break\n"
        "    time.sleep(0.05)\nsys.exit(3)",
        "threads": "import os; print('threads', os.environ.get('OMP_NUM_THREADS'))",
    }
    monkeypatch.setattr(stages, "_command_line", lambda argv: [sys.executable, "-c", programs[argv[0]]])


def test_a_failing_stage_stops_the_one_beside_it(tmp_path, monkeypatch):
    import os
    import threading

    _fake_commands(monkeypatch, tmp_path)
    out = tmp_path / "demo"
    plan_ = [
        Stage("long", "runs long", [tmp_path / "never-long"], argv=["sleep"]),
        Stage("bad", "fails", [tmp_path / "never-bad"], argv=["fail"]),
        Stage("later", "after both", [tmp_path / "never-later"], argv=["threads"], after=["long", "bad"]),
    ]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            run_stages(plan_, out, echo=lambda _: None, jobs=2)
        except StageFailed as exc:
            errors.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(timeout=60)
    assert not runner.is_alive(), "the failure did not stop the other stage"
    assert len(errors) == 1 and "exit 3" in str(errors[0]) and "bad.log" in str(errors[0])
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not (out / ".stages").exists() or not list((out / ".stages").iterdir())
    assert not (out / "logs" / "later.log").exists()


def test_stages_side_by_side_share_the_cores_and_one_alone_keeps_the_default(tmp_path, monkeypatch):
    import os

    _fake_commands(monkeypatch, tmp_path)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)

    def stage(name: str, after: list[str] | None = None) -> Stage:
        marker = tmp_path / f"{name}.out"
        return Stage(
            name, name, [tmp_path], argv=["threads", name], after=after or [], inputs=[], key=str(marker)
        )

    out = tmp_path / "demo"
    run_stages([stage("x"), stage("y"), stage("alone", ["x", "y"])], out, echo=lambda _: None, jobs=2)
    assert "threads 1" in (out / "logs" / "x.log").read_text()
    assert "threads 1" in (out / "logs" / "y.log").read_text()
    assert "threads None" in (out / "logs" / "alone.log").read_text()
    # A thread count the user set is left alone.
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    run_stages([stage("p"), stage("q")], tmp_path / "again", echo=lambda _: None, jobs=2)
    assert "threads 3" in (tmp_path / "again" / "logs" / "p.log").read_text()


def test_terminating_the_demo_stops_the_stage_it_runs(tmp_path):
    """`kill PID` of the process running the stages takes their commands down with it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "pid"
    script = f"""
import sys
from pathlib import Path
from foundation import stages
sleeper = "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
stages._command_line = lambda argv: [sys.executable, "-c", sleeper]
plan = [stages.Stage("long", "sleeps", [Path("never")], argv=["x"])]
stages.run_stages(plan, Path({str(tmp_path / "out")!r}))
"""
    runner = subprocess.Popen([sys.executable, "-c", script])
    for _ in range(300):  # the sleeper is up once it wrote its pid
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=60) != 0
    sleeper = int(pid_file.read_text())
    for _ in range(100):
        try:
            os.kill(sleeper, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(sleeper, signal.SIGKILL)
        pytest.fail("the stage's command outlived the demo")
