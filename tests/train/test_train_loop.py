"""The trainer in one process (called in-process): run directory, metrics, resume, stops, guards."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from foundation import attention, config, registry
from foundation.cli import main as cli_main
from foundation.config import load_pretrain_config
from foundation.device import resolve_precision
from foundation.errors import ConfigError
from foundation.train import EXIT_DIVERGED, EXIT_PREEMPTED, TrainingDiverged, load_pretrained, train
from foundation.train import checkpoint as ckpt
from foundation.train.trainer import Trainer
from tests.testkit import child_env, toyfamily
from tests.testkit.configs import config_dict, write_config
from tests.testkit.runs import assert_bitwise_equal, final_weights
from tests.testkit.shards import write_toy_shards

# Not the per-test seeded `random` (tests/conftest.py): every run tries other steps; the step is in
# the assertion messages.
UNSEEDED = random.SystemRandom()


def make_cfg(shards, run_dir, **sections):
    data = config_dict(shards, run_dir, **sections)
    return load_pretrain_config(write_config(run_dir.parent / f"{run_dir.name}.yaml", data))


def run(cfg, monkeypatch, action=None, **kwargs):
    """Train in this process; `action` = TOY_ACTION (fire a signal / create a file at a loss call)."""
    toyfamily._TRAIN_CALLS = 0
    if action is None:
        monkeypatch.delenv("TOY_ACTION", raising=False)
    else:
        monkeypatch.setenv("TOY_ACTION", action)
    try:
        return train(cfg, **kwargs)
    finally:
        monkeypatch.delenv("TOY_ACTION", raising=False)


def records(run_dir, key="loss"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


# Dropout on: the resume tests also check that the per-rank RNG state is restored.
REFERENCE = {"model": {"width": 16, "depth": 2, "dropout": 0.1}}


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """An uninterrupted 12-step run (the loader stream does not depend on num_workers)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    cfg = load_pretrain_config(
        write_config(run_dir.parent / "ref.yaml", config_dict(shards, run_dir, **REFERENCE))
    )
    toyfamily._TRAIN_CALLS = 0
    result = train(cfg)
    assert result.status == "done" and result.step == 12
    return run_dir


def test_a_run_writes_the_documented_run_directory(reference, shards, tmp_path, monkeypatch):
    run_dir = reference
    for name in ("config.yaml", "metrics.jsonl", "status.json", "model.pt", "dataset/manifest.json"):
        assert (run_dir / name).is_file(), name
    # keep_last=2 of the checkpoints at 4, 8, 12
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == [8, 12]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["steps"] == 12 and saved["model"]["dropout"] == 0.1

    train_records = records(run_dir)
    assert [r["step"] for r in train_records] == [2, 4, 6, 8, 10, 12]
    for key in ("loss", "mae", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "data_wait_pct", "rss_mb"):
        assert all(isinstance(r[key], float) for r in train_records), key
    assert all(r["samples_per_s"] > 0 and 0 <= r["data_wait_pct"] <= 100 for r in train_records)
    assert "mfu" not in train_records[0]  # CPU: no peak FLOP/s unless train.peak_tflops is set
    val = records(run_dir, "val_loss")
    assert [r["step"] for r in val] == [6, 12] and all(r["val_batches"] == 2 for r in val)
    assert val[1]["val_loss"] < val[0]["val_loss"]  # it learns (seeded, so not flaky)

    # Same config -> same losses, bit for bit.
    again = make_cfg(shards, tmp_path / "again", **REFERENCE)
    run(again, monkeypatch)
    assert [r["loss"] for r in records(tmp_path / "again")] == [r["loss"] for r in train_records]

    # Re-running a finished run does no more steps.
    result = run(again, monkeypatch)
    assert result.status == "done" and result.step == 12
    assert len(records(tmp_path / "again")) == len(train_records)


def tensor_metrics_loss(model, batch):
    """The toy loss as the Family contract asks it: metrics as detached 0-d tensors, plus a count
    the host knows as a plain float."""
    loss, metrics = toyfamily.loss(model, batch)
    tensors = {key: torch.tensor(value, dtype=torch.float32) for key, value in metrics.items()}
    return loss, {**tensors, "rows": float(batch["x"].shape[0])}


def test_family_metrics_may_be_tensors_or_floats_and_stay_on_the_device_between_records(
    reference, shards, tmp_path, monkeypatch
):
    family = dataclasses.replace(toyfamily.FAMILY, name="toy-tensor-metrics", loss=tensor_metrics_loss)
    monkeypatch.setitem(registry._REGISTERED, family.name, family)
    kept = []  # what the metrics window holds after each step: summed, not yet read back

    def train_step(self, *args, **kwargs):
        result = real_train_step(self, *args, **kwargs)
        kept.append((type(self._window.metrics["mae"]), type(self._window.metrics["rows"])))
        return result

    real_train_step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", train_step)
    run_dir = tmp_path / "run"
    run(make_cfg(shards, run_dir, family=family.name, **REFERENCE), monkeypatch)
    assert kept == [(torch.Tensor, float)] * 12
    for key in ("loss", "val_loss"):
        ours, floats = records(run_dir, key), records(reference, key)
        assert [r["step"] for r in ours] == [r["step"] for r in floats]
        for a, b in zip(ours, floats, strict=True):
            prefix = "val_" if key == "val_loss" else ""
            assert a[key] == b[key] and a[prefix + "mae"] == b[prefix + "mae"], a["step"]
            assert isinstance(a[prefix + "mae"], float) and a[prefix + "rows"] == 4.0


def test_load_pretrained_gives_the_same_model_from_run_dir_checkpoint_and_model_pt(reference):
    x = torch.randn(3, 4, 4)
    outputs = []
    for path in (reference, reference / "checkpoints" / "step-12", reference / "model.pt"):
        model, cfg, family = load_pretrained(path)
        assert family.name == "toy" and not model.training
        assert cfg.train.steps == 12 and cfg.model.dropout == 0.1
        assert all(p.dtype == torch.float32 for p in model.parameters())
        outputs.append(model(x))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[1], outputs[2])
    payload = torch.load(reference / "model.pt", weights_only=True)
    assert payload["format"] == "foundation.model" and payload["step"] == 12
    with pytest.raises(ConfigError, match="neither model.pt nor"):
        load_pretrained(reference / "dataset")


def test_load_pretrained_does_not_need_the_shards(reference, shards, tmp_path):
    toyfamily.MANIFESTS_SEEN.clear()
    alone = tmp_path / "model.pt"  # no dataset/ folder beside it: the manifest embedded in the file is used
    shutil.copyfile(reference / "model.pt", alone)
    model, _, family = load_pretrained(alone)
    assert_bitwise_equal(model.state_dict(), final_weights(reference))
    load_pretrained(reference / "checkpoints" / "step-12")  # uses <run>/dataset/
    assert len(toyfamily.MANIFESTS_SEEN) == 2
    for manifest in toyfamily.MANIFESTS_SEEN:
        assert manifest.path != shards and manifest.splits["train"].samples == 96


@pytest.mark.parametrize(
    ("workers", "how"),
    [(0, "SIGUSR1"), (2, "SIGTERM"), (0, "STOP")],
    ids=["usr1-w0", "term-w2", "stopfile-w0"],
)
def test_stop_at_a_random_step_then_resume_equals_uninterrupted(
    reference, shards, tmp_path, monkeypatch, workers, how
):
    stop_call = UNSEEDED.randint(2, 11)  # the step whose loss call receives the signal
    run_dir = tmp_path / "run"
    cfg = make_cfg(shards, run_dir, data={"num_workers": workers}, **REFERENCE)
    action = f"{stop_call}:{how}" if how != "STOP" else f"{stop_call}:{run_dir / 'STOP'}"
    first = run(cfg, monkeypatch, action=action)
    assert (first.status, first.step) == ("preempted", stop_call), f"stop requested during step {stop_call}"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and status["step"] == stop_call
    assert ckpt.latest_checkpoint(run_dir)[0] == stop_call
    assert not (run_dir / "STOP").exists()  # consumed, so the re-run trains

    second = run(cfg, monkeypatch)
    assert (second.status, second.step) == ("done", 12)
    assert_bitwise_equal(final_weights(run_dir), final_weights(reference))
    assert [r["loss"] for r in records(run_dir)] == [r["loss"] for r in records(reference)]
    assert [r["step"] for r in records(run_dir)] == [2, 4, 6, 8, 10, 12]


def test_cli_exit_code_on_stop_is_75(shards, tmp_path, monkeypatch):
    data = config_dict(shards, tmp_path / "run")
    path = write_config(tmp_path / "cfg.yaml", data)
    monkeypatch.setenv("TOY_ACTION", "3:SIGUSR1")
    toyfamily._TRAIN_CALLS = 0
    assert cli_main(["pretrain", str(path)]) == EXIT_PREEMPTED == 75
    monkeypatch.delenv("TOY_ACTION")
    assert cli_main(["pretrain", str(path)]) == 0


# SGD (momentum): its update is linear in the gradient, so equal gradients give equal weights up to
# rounding. Adam would turn the rounding noise of gradients that are zero in exact arithmetic (the
# attention key bias) into full-size steps of random sign.
SGD = {"name": "sgd", "lr": 0.05, "warmup_steps": 0}


def test_gradient_accumulation_matches_the_full_batch(shards, tmp_path, monkeypatch):
    full = make_cfg(shards, tmp_path / "full", data={"batch_size": 8}, train={"grad_accum": 1}, optim=SGD)
    accumulated = make_cfg(
        shards, tmp_path / "accum", data={"batch_size": 4}, train={"grad_accum": 2}, optim=SGD
    )
    run(full, monkeypatch)
    run(accumulated, monkeypatch)
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "accum")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    losses_full = [r["loss"] for r in records(tmp_path / "full")]
    losses_accum = [r["loss"] for r in records(tmp_path / "accum")]
    assert losses_full == pytest.approx(losses_accum, rel=1e-5)
    assert not all(torch.equal(a[k], b[k]) for k in a)  # really two different computations


@pytest.mark.slow
def test_non_finite_loss_stops_without_saving_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    poisoned = write_toy_shards(tmp_path / "poisoned", nan_at=40)
    data = config_dict(poisoned, tmp_path / "run", train={"ckpt_every": 1, "keep_last": 3, "steps": 30})
    path = write_config(tmp_path / "cfg.yaml", data)
    toyfamily._TRAIN_CALLS = 0
    assert cli_main(["pretrain", str(path)]) == EXIT_DIVERGED == 3
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "last good checkpoint" in err
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    bad_step = status["step"] + 1
    assert status["state"] == "diverged" and bad_step < 30
    steps = [step for step, _ in ckpt.list_checkpoints(tmp_path / "run")]
    assert steps and max(steps) == bad_step - 1  # nothing saved at or after the bad step
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
    model, _, _ = load_pretrained(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Resuming hits the same sample again: still a clear stop, still nothing written.
    with pytest.raises(TrainingDiverged, match=f"step {bad_step}"):
        train(load_pretrain_config(path))
    assert max(step for step, _ in ckpt.list_checkpoints(tmp_path / "run")) == bad_step - 1


KILL_DURING_SAVE = """
import os, signal, sys
from foundation.train import checkpoint
real_publish = checkpoint._publish
def publish(tmp, final):
    if final.name == "step-8":
        os.kill(os.getpid(), signal.SIGKILL)  # all files written, not yet renamed
    real_publish(tmp, final)
checkpoint._publish = publish
from foundation.cli import main
sys.exit(main(["pretrain", sys.argv[1]]))
"""


@pytest.mark.slow
def test_kill_during_save_leaves_the_previous_checkpoint_loadable(reference, shards, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    path = write_config(tmp_path / "cfg.yaml", config_dict(shards, run_dir, **REFERENCE))
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, str(path)], env=child_env(), capture_output=True, text=True
    )
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert (run_dir / "checkpoints" / ".tmp-step-8" / ckpt.COMPLETE).is_file()  # written, never published
    assert [step for step, _ in ckpt.list_checkpoints(run_dir)] == [4]
    # What the kill left loads as the run's step-4 model: the weights of a run stopped there.
    stopped = tmp_path / "stopped"
    assert run(make_cfg(shards, stopped, **REFERENCE), monkeypatch, action="4:SIGUSR1").step == 4
    model, _, _ = load_pretrained(run_dir / "checkpoints" / "step-4")
    expected, _, _ = load_pretrained(stopped / "checkpoints" / "step-4")
    assert not model.training
    assert_bitwise_equal(model.state_dict(), expected.state_dict())

    result = run(load_pretrain_config(path), monkeypatch)  # resumes from step 4, removes the partial save
    assert (result.status, result.step) == ("done", 12)
    assert not (run_dir / "checkpoints" / ".tmp-step-8").exists()
    assert_bitwise_equal(final_weights(run_dir), final_weights(reference))


def test_resume_refuses_a_changed_config_unless_forced_or_harmless(shards, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run(make_cfg(shards, run_dir), monkeypatch, action="5:SIGUSR1")
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.01 -> 0\.02.*--force"):
        run(make_cfg(shards, run_dir, optim={"lr": 0.02}), monkeypatch)
    harmless = make_cfg(shards, run_dir, train={"log_every": 3, "keep_last": 5}, data={"num_workers": 0})
    result = run(harmless, monkeypatch, action="2:SIGUSR1")  # resumes at 5, stops again at 7
    assert (result.status, result.step) == ("preempted", 7)
    with pytest.raises(ConfigError, match=r"data\.num_workers=0; .* resume with data\.num_workers=0"):
        run(make_cfg(shards, run_dir, data={"num_workers": 2}), monkeypatch, force=True)
    result = run(make_cfg(shards, run_dir, optim={"lr": 0.02}), monkeypatch, force=True)
    assert (result.status, result.step) == ("done", 12)


def test_resume_refuses_a_different_world_size(shards, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run(make_cfg(shards, run_dir), monkeypatch, action="5:SIGUSR1")
    meta_file = run_dir / "checkpoints" / "step-5" / ckpt.META
    meta = json.loads(meta_file.read_text())
    meta["world_size"] = 2
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\) but this run has 1"):
        run(make_cfg(shards, run_dir), monkeypatch)


def test_bf16_on_cpu_uses_autocast_and_keeps_fp32_weights(shards, tmp_path, monkeypatch):
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    steps = {"steps": 4, "val_every": 0}
    run(make_cfg(shards, tmp_path / "fp32", train=steps), monkeypatch)
    run(make_cfg(shards, tmp_path / "bf16", train={**steps, "precision": "bf16"}), monkeypatch)
    w16 = final_weights(tmp_path / "bf16")
    assert all(v.dtype == torch.float32 for v in w16.values())
    l32, l16 = (
        [r["loss"] for r in records(tmp_path / "fp32")],
        [r["loss"] for r in records(tmp_path / "bf16")],
    )
    assert l16 != l32 and l16 == pytest.approx(l32, rel=0.05)  # bf16 matmuls: close, not equal


def test_xformers_request_falls_back_to_sdpa_on_cpu(shards, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(attention, "_warned", False)
    steps = {"steps": 2, "val_every": 0}
    try:
        run(make_cfg(shards, tmp_path / "x", train={**steps, "attention": "xformers"}), monkeypatch)
        assert attention.resolved_backend("cpu") == "sdpa"
    finally:
        attention.set_backend("auto")
    assert "xformers attention requested but unavailable" in caplog.text
    run(make_cfg(shards, tmp_path / "s", train={**steps, "attention": "sdpa"}), monkeypatch)
    assert_bitwise_equal(final_weights(tmp_path / "x"), final_weights(tmp_path / "s"))


def test_resolved_config_round_trips(reference):
    saved = config.read_yaml(reference / "config.yaml")
    again = load_pretrain_config(reference / "config.yaml")
    assert config.to_dict(again) == saved


def test_runs_plot_writes_a_png(reference, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert cli_main(["runs", "plot", str(reference), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert cli_main(["runs", "plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_tensorboard_and_mfu_when_configured(shards, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run(
        make_cfg(
            shards, run_dir, train={"steps": 2, "val_every": 0, "tensorboard": True, "peak_tflops": 0.5}
        ),
        monkeypatch,
    )
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    record = records(run_dir)[-1]
    flops = toyfamily.flops_per_sample(toyfamily.ToyConfig(), None)
    assert record["mfu"] == pytest.approx(flops * record["samples_per_s"] / 0.5e12, rel=1e-6)


def test_a_crash_is_recorded_as_failed_not_as_preempted(shards, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="toy failure"):
        run(make_cfg(shards, run_dir), monkeypatch, action="6:RAISE")
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["step"]) == ("failed", 5) and "toy failure" in status["error"]


@pytest.mark.slow
def test_sigusr1_to_the_whole_process_group_spares_the_loader_workers(
    reference, shards, tmp_path, monkeypatch
):
    """SLURM signals every process of a job step, loader workers included: they must not die."""
    run_dir = tmp_path / "run"
    path = write_config(
        tmp_path / "cfg.yaml", config_dict(shards, run_dir, data={"num_workers": 2}, **REFERENCE)
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "foundation.cli", "pretrain", str(path)],
        env=child_env(TOY_SLEEP="0.3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, like a job step
    )
    try:
        deadline = time.monotonic() + 120
        while not list((run_dir / "checkpoints").glob("step-4")):  # workers are up by then
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and 4 <= status["step"] < 12
    result = run(load_pretrain_config(path), monkeypatch)
    assert (result.status, result.step) == ("done", 12)
    assert_bitwise_equal(final_weights(run_dir), final_weights(reference))
