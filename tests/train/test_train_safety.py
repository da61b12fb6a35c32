"""Run folders as untrusted input and shared state: received checkpoints run no code, a refused
resume changes nothing, one `pretrain` per run folder, full disks, damaged checkpoints."""

from __future__ import annotations

import errno
import json
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from foundation import atomic
from foundation.cli import main as cli_main
from foundation.errors import ConfigError, DataError
from foundation.lock import lock_path_for
from foundation.train import checkpoint as ckpt
from foundation.train import load_pretrained, trainer
from foundation.train.metrics import MetricsWriter
from tests.testkit import child_env, toyfamily
from tests.testkit.configs import config_dict, write_config
from tests.testkit.runs import assert_bitwise_equal, final_weights
from tests.testkit.shards import write_toy_shards

MODEL = {"model": {"width": 16, "depth": 2, "dropout": 0.1}}


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory) -> Path:
    """A finished 12-step run (checkpoints at 8 and 12): tests copy it, never change it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    path = write_config(run_dir.parent / "cfg.yaml", config_dict(shards, run_dir, **MODEL))
    toyfamily._TRAIN_CALLS = 0
    assert cli_main(["pretrain", str(path)]) == 0
    return run_dir


def copy_run(finished: Path, shards: Path, tmp_path: Path, **sections) -> tuple[Path, Path]:
    """A copy of the finished run and a config pointing at it; (run dir, config path)."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    data = config_dict(shards, run_dir, **MODEL)
    for section, values in sections.items():
        data[section].update(values)
    return run_dir, write_config(tmp_path / "cfg.yaml", data)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


class WritesMarker:
    """Unpickling this creates the marker file: the payload a hostile checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# ---------------------------------------------------------------------- no code from a checkpoint


def test_crafted_dcp_metadata_runs_no_code_on_load_or_resume(finished, shards, tmp_path, capsys):
    run_dir, cfg_path = copy_run(finished, shards, tmp_path)
    marker = tmp_path / "marker"
    for _, path in ckpt.list_checkpoints(run_dir):
        (path / ".metadata").write_bytes(pickle.dumps(WritesMarker(marker)))
    (run_dir / "model.pt").unlink()  # so that the run dir is read through its checkpoints

    with pytest.raises(DataError, match="is not allowed in checkpoint metadata"):
        load_pretrained(run_dir / "checkpoints" / "step-12")
    with pytest.raises(DataError, match="not readable DCP metadata"):
        load_pretrained(run_dir)
    assert cli_main(["pretrain", str(cfg_path)]) == 2
    assert "every checkpoint" in one_line_error(capsys)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_crafted_non_tensor_entry_runs_no_code(tmp_path):
    marker = tmp_path / "marker"
    folder = tmp_path / "ckpt"
    dcp = torch.distributed.checkpoint
    dcp.save({"lr": WritesMarker(marker)}, checkpoint_id=str(folder), no_dist=True)
    assert not marker.exists()
    with pytest.raises((DataError, dcp.api.CheckpointException)):
        ckpt._dcp_load({"lr": 0.0}, folder, no_dist=True)
    assert not marker.exists()


def test_crafted_legacy_rank_state_runs_no_code(finished, shards, tmp_path, capsys):
    run_dir, cfg_path = copy_run(finished, shards, tmp_path)
    marker = tmp_path / "marker"
    for _, path in ckpt.list_checkpoints(run_dir):
        (path / "rank-0.json").unlink()
        torch.save({"schedule": {}, "rng": WritesMarker(marker)}, path / "rank-0.pt")
    assert cli_main(["pretrain", str(cfg_path)]) == 2
    assert "every checkpoint" in one_line_error(capsys)
    assert not marker.exists()


def test_a_family_module_named_by_a_received_file_is_not_imported(finished, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    (tmp_path / "shipped_family.py").write_text(f"open({str(marker)!r}, 'w')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    payload = torch.load(finished / "model.pt", weights_only=True)
    payload["config"]["family"] = "shipped_family:FAMILY"
    torch.save(payload, tmp_path / "model.pt")
    with pytest.raises(ConfigError, match="not an installed family"):
        load_pretrained(tmp_path / "model.pt")
    assert not marker.exists()


def test_older_checkpoints_with_a_pickled_rank_state_still_resume(finished, shards, tmp_path, monkeypatch):
    """Version 1 wrote rank-<r>.pt (numpy's RNG array inside): it resumes, exactly."""
    run_dir, cfg_path = copy_run(finished, shards, tmp_path)
    shutil.rmtree(run_dir / "checkpoints" / "step-12")
    step8 = run_dir / "checkpoints" / "step-8"
    state = ckpt.read_rank_state(step8, 0)
    torch.save(state, step8 / "rank-0.pt")
    (step8 / "rank-0.json").unlink()
    meta = json.loads((step8 / "meta.json").read_text())
    meta["version"] = 1
    del meta["files"]
    (step8 / "meta.json").write_text(json.dumps(meta))
    toyfamily._TRAIN_CALLS = 0
    assert cli_main(["pretrain", str(cfg_path)]) == 0
    assert_bitwise_equal(final_weights(run_dir), final_weights(finished))


def test_rank_state_round_trips_through_json():
    import numpy as np

    state = {
        "python": (3, tuple(range(5)), None),
        "numpy": ("MT19937", np.arange(4, dtype=np.uint32), 1, 0, 0.0),
        "torch": torch.arange(6, dtype=torch.uint8).reshape(2, 3),
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "ints": {1: "a", "__tuple__": 2},
        "odd": {"__tuple__": [1]},
        "inf": float("inf"),
    }
    back = ckpt.decode_state(json.loads(json.dumps(ckpt.encode_state(state), allow_nan=False)))
    assert back["python"] == state["python"] and back["ints"] == state["ints"] and back["odd"] == state["odd"]
    assert np.array_equal(back["numpy"][1], state["numpy"][1]) and back["numpy"][1].dtype == np.uint32
    assert torch.equal(back["torch"], state["torch"]) and torch.equal(back["bf16"], state["bf16"])
    assert back["inf"] == float("inf")
    with pytest.raises(ValueError, match="does not match"):
        ckpt.decode_state({"__tensor__": ["float32", [1000000], "AAAA"]})


# ---------------------------------------------------------------------- check first, write after


def test_resume_on_another_shard_set_is_refused_and_changes_nothing(finished, shards, tmp_path, capsys):
    other = write_toy_shards(tmp_path / "other", n_train=64)
    run_dir, cfg_path = copy_run(finished, shards, tmp_path, data={"path": str(other)})
    before = folder_bytes(run_dir)
    assert cli_main(["pretrain", str(cfg_path)]) == 2
    assert "another shard set" in one_line_error(capsys)
    assert folder_bytes(run_dir) == before


def test_resume_on_a_moved_copy_of_the_same_shard_set_is_accepted(finished, shards, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(shards, moved)
    run_dir, cfg_path = copy_run(finished, shards, tmp_path, data={"path": str(moved)})
    assert cli_main(["pretrain", str(cfg_path)]) == 0
    assert_bitwise_equal(final_weights(run_dir), final_weights(finished))


def test_run_dir_that_is_a_file_is_one_line(shards, tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    path = write_config(tmp_path / "cfg.yaml", config_dict(shards, tmp_path / "run"))
    assert cli_main(["pretrain", str(path)]) == 2
    assert "is a file, not a folder" in one_line_error(capsys)


# ---------------------------------------------------------------------- damaged checkpoints


def _zero_distcp(path: Path) -> None:
    for file in path.glob("*.distcp"):
        file.write_bytes(bytes(file.stat().st_size))


def _garble_meta(path: Path) -> None:
    (path / "meta.json").write_text('{"format": "foundation.checkpoint", "step": ')


def _truncate_distcp(path: Path) -> None:
    for file in path.glob("*.distcp"):
        file.write_bytes(file.read_bytes()[:100])


@pytest.mark.parametrize("damage", [_zero_distcp, _garble_meta, _truncate_distcp])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(finished, shards, tmp_path, caplog, damage):
    run_dir, cfg_path = copy_run(finished, shards, tmp_path)
    damage(run_dir / "checkpoints" / "step-12")
    toyfamily._TRAIN_CALLS = 0
    assert cli_main(["pretrain", str(cfg_path)]) == 0
    assert "step-12" in caplog.text and "trying the one before" in caplog.text
    assert toyfamily._TRAIN_CALLS == 4  # steps 9..12 again, from step-8
    assert_bitwise_equal(final_weights(run_dir), final_weights(finished))
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == [8, 12]
    assert len(list((run_dir / "checkpoints").glob("damaged-step-12-*"))) == 1


# ---------------------------------------------------------------------- full disk


def test_a_full_disk_marks_the_run_failed_and_exits_with_one_line(shards, tmp_path, monkeypatch, capsys):
    """Once the disk is full nothing can be written, not even status.json: the run must still
    not read "running" afterwards (a scheduler would wait for it forever)."""
    run_dir = tmp_path / "run"
    path = write_config(tmp_path / "cfg.yaml", config_dict(shards, run_dir))
    disk_full = OSError(errno.ENOSPC, "No space left on device", str(run_dir / "metrics.jsonl"))
    real_write = atomic.write_json
    full = []

    def write_json(path, data):
        if full:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, data)

    def write_record(self, record):
        full.append(True)
        raise disk_full

    monkeypatch.setattr(atomic, "write_json", write_json)
    monkeypatch.setattr(MetricsWriter, "write", write_record)
    toyfamily._TRAIN_CALLS = 0
    assert cli_main(["pretrain", str(path)]) == 2
    assert "the disk is full" in one_line_error(capsys)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed"


def test_a_full_disk_during_a_checkpoint_save_is_one_line(shards, tmp_path, monkeypatch, capsys):
    """DCP wraps the writer's OSError in its own CheckpointException (a BaseException)."""
    from torch.distributed.checkpoint import filesystem

    def no_space(self, plan, planner):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "x.distcp"))

    monkeypatch.setattr(filesystem.FileSystemWriter, "write_data", no_space)
    path = write_config(tmp_path / "cfg.yaml", config_dict(shards, tmp_path / "run"))
    toyfamily._TRAIN_CALLS = 0
    assert cli_main(["pretrain", str(path)]) == 2
    assert "the disk is full" in one_line_error(capsys)
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"


# ---------------------------------------------------------------------- one pretrain per run folder


@pytest.mark.slow
def test_a_second_pretrain_on_a_busy_run_dir_is_refused_and_harms_nothing(shards, tmp_path):
    run_dir = tmp_path / "run"
    path = write_config(tmp_path / "cfg.yaml", config_dict(shards, run_dir, **MODEL))
    command = [sys.executable, "-m", "foundation.cli", "pretrain", str(path)]
    hold = tmp_path / "hold"  # the first run waits in its first step while this file exists
    hold.touch()
    first = subprocess.Popen(
        command,
        env=child_env(TOY_HOLD=str(hold)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "status.json").exists():  # it holds the lock and has started writing
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
            time.sleep(0.05)
        second = subprocess.run(
            command,
            env=child_env(FOUNDATION_RUN_LOCK_WAIT_S="0.5"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert first.poll() is None
        hold.unlink()
        out, _ = first.communicate(timeout=120)
    finally:
        first.kill()
    assert second.returncode == 2, second.stderr[-3000:]
    assert "is in use by pid" in second.stderr and "Traceback" not in second.stderr
    assert first.returncode == 0, out[-3000:]
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert steps == [2, 4, 6, 6, 8, 10, 12, 12]  # training and validation records, none lost
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == [8, 12]
    assert not lock_path_for(run_dir).exists()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["dir"] == str(run_dir)


def test_runs_plot_skips_lines_that_are_not_records(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = [b"5", b"[1]", b'{"step": "x", "loss": 1}', b"[" * 100000, b"\x89PNG\r\n\x1a\n\xff"]
    lines += [json.dumps({"step": s, "loss": 1.0 / s, "lr": 0.1}).encode() for s in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert cli_main(["runs", "plot", str(run_dir)]) == 0
    assert (run_dir / "metrics.png").is_file()


def test_a_model_file_cannot_write_outside_its_temporary_dataset_folder(finished, tmp_path):
    payload = torch.load(finished / "model.pt", weights_only=True)
    escape = tmp_path / "escaped.txt"
    payload["dataset"][f"../../../../../../../..{escape}"] = torch.frombuffer(
        bytearray(b"x"), dtype=torch.uint8
    )
    alone = tmp_path / "alone"
    alone.mkdir()
    torch.save(payload, alone / "model.pt")
    with pytest.raises(DataError, match="not a plain name"):
        load_pretrained(alone / "model.pt")
    assert not escape.exists()


def _mutate(data: bytes, rng) -> bytes:
    how = rng.integers(3)
    if how == 0 and data:  # flip a few bytes
        data = bytearray(data)
        for at in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
            data[at] = int(rng.integers(256))
        return bytes(data)
    if how == 1:  # cut short
        return data[: int(rng.integers(0, len(data) + 1))]
    at = int(rng.integers(0, len(data) + 1))  # insert garbage
    return data[:at] + rng.bytes(int(rng.integers(1, 64))) + data[at:]


def test_randomly_damaged_checkpoints_load_or_fail_with_a_foundation_error(finished, tmp_path):
    """Seeded mutations of every checkpoint file: loading either works or raises a FoundationError
    (one line in the CLI), never another exception, and never runs anything."""
    import numpy as np

    from foundation.errors import FoundationError

    rng = np.random.default_rng(1234)
    source = finished / "checkpoints" / "step-12"
    names = [".metadata", "meta.json", "rank-0.json", "__0_0.distcp"]
    outcomes = {"ok": 0, "refused": 0}
    for case in range(120):
        folder = tmp_path / f"c{case}" / "checkpoints" / "step-12"
        shutil.copytree(source, folder)
        shutil.copytree(finished / "dataset", folder.parent.parent / "dataset")
        file = folder / names[case % len(names)]
        file.write_bytes(_mutate(file.read_bytes(), rng))
        try:
            ckpt.verify_checkpoint(folder, 0)
            load_pretrained(folder)
            outcomes["ok"] += 1
        except FoundationError:
            outcomes["refused"] += 1
        shutil.rmtree(folder.parent.parent)
    assert outcomes["refused"] > 60, outcomes


def test_crafted_metadata_cannot_change_the_classes_it_names(finished, tmp_path):
    """A pickle may BUILD onto a class it names: that must not outlive the refused load."""
    import pathlib

    from torch.distributed.checkpoint import metadata as dcp_metadata

    folder = tmp_path / "step-12"
    shutil.copytree(finished / "checkpoints" / "step-12", folder)
    for module, name, cls in [
        ("torch.distributed.checkpoint.metadata", "Metadata", dcp_metadata.Metadata),
        ("pathlib", "PosixPath", pathlib.PurePosixPath),
    ]:
        # GLOBAL module.name; (None, {"injected": 1}); BUILD -> setattr(cls, "injected", 1)
        raw = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"N}X\x08\x00\x00\x00injectedK\x01s\x86b."
        (folder / ".metadata").write_bytes(raw)
        with pytest.raises(DataError, match="changes"):
            ckpt.read_dcp_metadata(folder)
        assert not hasattr(cls, "injected")


def test_sparse_giant_checkpoint_files_are_refused_without_reading_them(finished, tmp_path):
    import os
    import resource

    folder = tmp_path / "step-12"
    shutil.copytree(finished / "checkpoints" / "step-12", folder)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    metadata, rank_state = (lambda: ckpt.read_dcp_metadata(folder)), (lambda: ckpt.read_rank_state(folder, 0))
    cases = [(".metadata", 400 * 2**20, metadata), (".metadata", 4 * 2**30, metadata)]
    cases += [("rank-0.json", 15 * 2**20, rank_state), ("rank-0.json", 2**30, rank_state)]
    for name, size, read in cases:  # below and above the size bounds
        original = (folder / name).read_bytes()
        os.truncate(folder / name, 0)
        os.truncate(folder / name, size)  # all zeros, sparse: costs no disk
        with pytest.raises(DataError):
            read()
        (folder / name).write_bytes(original)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100, f"peak RSS grew by {grown_mb:.0f} MB"


def test_an_extra_file_changed_since_prepare_is_refused_before_training(tmp_path):
    """A tokenizer (or other extra file) that is not the one the manifest records stops the run at
    its start; an extra file that was empty when prepared travels into model.pt as it is."""
    import numpy as np

    from foundation.data import ShardSetWriter
    from foundation.train.pretrained import _dataset_payload, snapshot_dataset

    extra, empty = tmp_path / "tokenizer.json", tmp_path / "empty.txt"
    extra.write_text('{"vocab": {"a": 0}}')
    empty.write_bytes(b"")
    shards = tmp_path / "shards"
    with ShardSetWriter(shards, {"train": 1.0}, files=[extra, empty], field_stats=False) as writer:
        writer.write({"__key__": "k0", "x": np.arange(3, dtype=np.float32)})
    run = tmp_path / "run"
    snapshot_dataset(shards, run / "dataset")
    payload = _dataset_payload(run)
    assert payload["empty.txt"].numel() == 0
    assert bytes(payload["tokenizer.json"].numpy()) == extra.read_bytes()
    (shards / "tokenizer.json").write_text('{"vocab": {"b": 0}}')
    with pytest.raises(DataError, match="differs from the file the shard set's manifest records"):
        snapshot_dataset(shards, tmp_path / "other" / "dataset")


def test_a_requeued_slurm_job_waits_until_a_dead_incarnations_lock_goes_stale(monkeypatch):
    from foundation.lock import STALE_AFTER_S

    monkeypatch.delenv("FOUNDATION_RUN_LOCK_WAIT_S", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert trainer._lock_wait_s() == trainer.RUN_LOCK_WAIT_S
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert trainer._lock_wait_s() == trainer.RUN_LOCK_WAIT_S
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert trainer._lock_wait_s() > STALE_AFTER_S
    monkeypatch.setenv("FOUNDATION_RUN_LOCK_WAIT_S", "5")
    assert trainer._lock_wait_s() == 5
