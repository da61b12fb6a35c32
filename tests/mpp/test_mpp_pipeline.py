"""MPP end to end: collate, `foundation pretrain` on 1 and 2 processes, fine-tuning with vocabulary
expansion, and `foundation evaluate rollout`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders.mpp.collate import MPPCollate
from encoders.mpp.evaluate import evaluate, parse_windows
from encoders.mpp.family import FAMILY, build_model
from encoders.mpp.model import AViT, MPPConfig
from foundation.cli import main
from foundation.errors import DataError
from foundation.results import read_table
from tests.testkit.configs import tiny_model_config
from tests.testkit.same_shards import assert_same_shard_sets, members_by_key

ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "configs" / "mpp" / "tiny.yaml")
FINETUNE = str(ROOT / "configs" / "mpp" / "tiny_finetune.yaml")
FAST = [
    "model.patch_size=4",
    "model.history=2",
    "train.steps=6",
    "train.val_every=3",
    "train.ckpt_every=3",
    "optim.warmup_steps=2",
    "data.batch_size=3",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Pretraining shards (NS + SWE) and fine-tuning shards (diffusion–reaction: unseen fields)."""
    root = tmp_path_factory.mktemp("mpp")
    well = root / "well"
    assert (
        main(
            [
                "synth",
                "mpp",
                "--out",
                str(well),
                "--systems",
                "navier_stokes,shallow_water,diffusion_reaction",
                "--resolution",
                "16",
                "--steps",
                "10",
                "--trajectories",
                "2,1,1",
            ]
        )
        == 0
    )
    pre, ft = root / "pre", root / "ft"
    common = ["--history", "2", "--window", "6", "--stride", "2"]
    assert (
        main(
            [
                "prepare",
                "mpp",
                str(well / "navier_stokes"),
                str(well / "shallow_water"),
                "--out",
                str(pre),
                *common,
            ]
        )
        == 0
    )
    assert main(["prepare", "mpp", str(well / "diffusion_reaction"), "--out", str(ft), *common]) == 0
    return pre, ft


@pytest.fixture(scope="module")
def pretrained(shards, tmp_path_factory):
    """`foundation pretrain configs/mpp/tiny.yaml` on the NS + SWE shards (one process)."""
    pre, _ = shards
    run = tmp_path_factory.mktemp("runs") / "pre"
    assert main(["pretrain", TINY, f"data.path={pre}", f"run.dir={run}", *FAST]) == 0
    return run


def _sample(key, names, steps=5, n=8, bcs=(2, 2), seed=0):
    rng = np.random.default_rng(seed)
    return {
        "__key__": key,
        "fields": rng.standard_normal((steps, len(names), n, n)).astype(np.float32),
        "bcs": np.array(bcs),
        "meta": {"field_names": names, "dataset": key.split("-")[0]},
    }


def test_collate_pads_to_the_union_of_fields():
    collate = MPPCollate(["a", "b", "c", "d"], history=2, horizon=1, train=False, patch_size=4)
    s1, s2 = _sample("x-1", ["c", "a"]), _sample("y-2", ["b"], bcs=(0, 0), seed=1)
    batch = collate([s1, s2])
    assert batch["field_ids"].tolist() == [0, 1, 2]  # a, b, c in vocabulary order
    assert batch["field_mask"].tolist() == [[True, False, True], [False, True, False]]
    assert batch["x"].shape == (2, 2, 3, 8, 8) and batch["y"].shape == (2, 3, 8, 8)
    np.testing.assert_array_equal(batch["x"][0, :, 2].numpy(), s1["fields"][:2, 0])  # c
    np.testing.assert_array_equal(batch["y"][0, 0].numpy(), s1["fields"][2, 1])  # a, step 3
    assert batch["x"][0, :, 1].abs().sum() == 0  # absent b is zero
    assert batch["bcs"].tolist() == [[2, 2], [0, 0]] and batch["n_tokens"] == 2 * 2 * 2 * 2
    # Training draws a window offset from the loader's rng: reproducible for a given rng.
    train = MPPCollate(["a", "b", "c", "d"], history=2, horizon=1, train=True, patch_size=4)
    x1 = train([s1, s2], np.random.default_rng(5))["x"]
    x2 = train([s1, s2], np.random.default_rng(5))["x"]
    assert torch.equal(x1, x2)


def test_collate_errors_are_specific():
    collate = MPPCollate(["a", "b"], history=2, horizon=3, train=False)
    with pytest.raises(DataError, match=r"\['zeta'\].*init_from"):
        collate([_sample("k-1", ["a", "zeta"], steps=6)])
    with pytest.raises(DataError, match="--window >= 5"):
        collate([_sample("k-1", ["a"], steps=4)])
    with pytest.raises(DataError, match="spatial sizes"):
        collate([_sample("k-1", ["a"], steps=6), _sample("k-2", ["b"], steps=6, n=16)])


def test_untrained_model_rollout_equals_persistence():
    model = AViT(tiny_model_config("mpp", embed_dim=16, depth=1, patch_size=4), ["a", "b"]).eval()
    collate = MPPCollate(["a", "b"], history=2, horizon=3, train=False, patch_size=4)
    batch = collate([_sample("s-1", ["a", "b"]), _sample("t-2", ["b"], seed=3)])
    report, example = evaluate(model, [batch], steps=3, windows=parse_windows(None, 3))
    for metric in ("vrmse", "nrmse"):
        np.testing.assert_allclose(
            report["rollout"][metric]["per_step"], report["persistence"][metric]["per_step"], rtol=1e-4
        )
    assert report["samples"] == 2 and example["fields"] == ["a", "b"]
    assert set(report["rollout"]["vrmse"]["per_dataset"]) == {"s", "t"}
    assert parse_windows(None, 12) == [(1, 1), (2, 5), (6, 10), (11, 12)]
    assert parse_windows("1,2-3", 3) == [(1, 1), (2, 3)]


def test_finetune_optimizer_holds_every_trainable_parameter(shards, pretrained):
    from foundation.config import OptimSection
    from foundation.data import Manifest
    from foundation.train.optim import build_optimizer

    _, ft = shards
    run = pretrained
    for preset in ("none", "middle", "processor"):
        cfg = MPPConfig(init_from=str(run), freeze=preset, history=2)
        model = build_model(cfg, Manifest.load(ft))
        assert model.fields[-2:] == ["activator", "inhibitor"] and cfg.fields == model.fields
        assert cfg.embed_dim == 32 and cfg.patch_size == 4  # architecture from the checkpoint
        optimizer = build_optimizer(model, OptimSection())
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert in_optimizer == trainable
        assert id(model.embed.weight) in in_optimizer and id(model.destem.out_weight) in in_optimizer


@pytest.mark.slow
def test_pretrain_finetune_and_rollout_evaluation(shards, pretrained, tmp_path):
    _, ft = shards
    run = pretrained
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("vrmse" in r for r in records) and any("val_loss" in r for r in records)
    pretrained = torch.load(run / "model.pt", weights_only=True)
    assert pretrained["config"]["model"]["fields"] == ["height", "tracer", "velocity_x", "velocity_y"]

    ft_run = tmp_path / "ft"
    assert (
        main(
            [
                "pretrain",
                FINETUNE,
                f"data.path={ft}",
                f"run.dir={ft_run}",
                f"model.init_from={run}",
                "model.freeze=middle",
                *FAST,
            ]
        )
        == 0
    )
    tuned = torch.load(ft_run / "model.pt", weights_only=True)
    assert tuned["config"]["model"]["fields"] == [
        "height",
        "tracer",
        "velocity_x",
        "velocity_y",
        "activator",
        "inhibitor",
    ]
    old, new = pretrained["state_dict"], tuned["state_dict"]
    for name, value in old.items():
        if name.startswith("blocks.") or name.startswith("stem."):
            assert torch.equal(new[name], value), name  # frozen by the preset
    assert new["destem.out_weight"][4:].abs().sum() > 0  # new fields' head rows were trained
    assert torch.equal(new["embed.reference_size"], old["embed.reference_size"])

    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "rollout",
                "--checkpoint",
                str(ft_run),
                "--data",
                str(ft),
                "--steps",
                "4",
                "--out",
                str(out),
                "--split",
                "test",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    report = json.loads((out / "rollout.json").read_text())
    assert report["steps"] == 4 and report["samples"] > 0
    for mode in ("one_step", "rollout", "persistence"):
        v = report[mode]["vrmse"]
        assert set(v["per_field"]) == {"activator", "inhibitor"} and len(v["per_step"]) == 4
        assert set(v["windows"]) == {"1", "2-4"} and np.isfinite(v["mean"])
    assert report["one_step"]["vrmse"]["per_step"][0] == report["rollout"]["vrmse"]["per_step"][0]
    assert (out / "frames.png").stat().st_size > 0 and (out / "error_vs_step.png").stat().st_size > 0
    # Several labelled runs on the same data: one report each, and the papers' tables over them.
    compare, tables_dir = tmp_path / "compare", tmp_path / "tables"
    argv = ["evaluate", "rollout", "--checkpoint", f"finetuned={ft_run}", f"again={ft_run / 'model.pt'}"]
    argv += ["--data", str(ft), "--steps", "4", "--out", str(compare), "--tables", str(tables_dir)]
    assert main([*argv, "--batch-size", "2"]) == 0
    assert (compare / "finetuned" / "rollout.json").is_file() and (
        compare / "again" / "rollout.json"
    ).is_file()
    mpp = read_table(tables_dir / "mpp_one_step_nrmse.table.json")
    rows = {row.label: row.values for row in mpp.rows}
    assert rows["finetuned"] == rows["again"]  # the same weights, the same numbers
    diff_re = mpp.columns.index("DiffRe2D (diffusion_reaction)")
    assert 0 < rows["finetuned"][diff_re] < 10
    assert "--tables" in mpp.provenance["command"] and set(mpp.provenance["config_hash"]) == {
        "finetuned",
        "again",
    }
    # Steps beyond the stored windows get a clear error.
    assert (
        main(
            [
                "evaluate",
                "rollout",
                "--checkpoint",
                str(ft_run),
                "--data",
                str(ft),
                "--steps",
                "9",
                "--out",
                str(out),
            ]
        )
        == 2
    )


def test_family_hooks(shards):
    from foundation.data import Manifest

    pre, _ = shards
    cfg = tiny_model_config("mpp", embed_dim=16, depth=1, patch_size=4, history=2)
    manifest = Manifest.load(pre)
    model = FAMILY.build_model(cfg, manifest)
    collate = FAMILY.make_collate(cfg, manifest, False)
    samples = [
        _sample("a-1", ["tracer", "velocity_x", "velocity_y"], n=16),
        _sample("b-2", ["height", "velocity_x", "velocity_y"], n=16, bcs=(0, 0)),
    ]
    batch = collate(samples)
    loss, metrics = FAMILY.loss(model, batch)
    assert torch.isfinite(loss) and set(metrics) == {"vrmse", "nrmse"}
    assert FAMILY.tokens_per_batch(batch) == 2 * 2 * 4 * 4
    assert FAMILY.flops_per_sample(cfg, manifest) > 0
    assert FAMILY.embed(model, batch)["fields"].shape == (2, 16)
    # A saved fine-tuned model records its fields: it rebuilds without the pretrained run.
    saved = tiny_model_config(
        "mpp", embed_dim=16, depth=1, patch_size=4, init_from="/gone/run", fields=["q", "r"]
    )
    assert build_model(saved, manifest).fields == ["q", "r"]
    with pytest.raises(Exception, match="gone"):
        build_model(MPPConfig(init_from="/gone/run"), manifest)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_pretrain_on_two_processes(shards, tmp_path, parallel, torchrun):
    pre, _ = shards
    run = tmp_path / parallel
    proc = torchrun(
        ["pretrain", TINY, f"data.path={pre}", f"run.dir={run}", f"train.parallel={parallel}", *FAST]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "done" and status["step"] == 6
    assert (run / "model.pt").is_file()


# ----------------------------------------------------------------------------- prepare --workers


def _toy_well_file(path: Path, n_traj: int = 3, steps: int = 9, seed: int = 0, nan_at=None) -> Path:
    from encoders.mpp.solvers import Simulation
    from encoders.mpp.well import write_simulation

    rng = np.random.default_rng(seed)
    tracer = rng.standard_normal((n_traj, steps, 8, 8)).astype(np.float32)
    if nan_at is not None:
        tracer[nan_at] = np.nan
    sim = Simulation(
        name="toy",
        t0_fields={"tracer": tracer},
        t1_fields={"velocity": rng.standard_normal((n_traj, steps, 8, 8, 2)).astype(np.float32)},
        time=np.arange(steps, dtype=np.float32),
        x=np.linspace(0, 1, 8, dtype=np.float32),
        y=np.linspace(0, 1, 8, dtype=np.float32),
        boundary={"x": "PERIODIC", "y": "WALL"},
        parameters={"nu": rng.random(n_traj).astype(np.float32)},
    )
    return write_simulation(sim, path)


def test_prepare_writes_the_same_shards_with_one_or_two_workers(tmp_path, monkeypatch):
    from encoders.mpp import prepare as mpp_prepare

    for i in range(2):
        _toy_well_file(tmp_path / "toy" / f"toy{i}.hdf5", seed=i)
    # Units of two windows each, so that a trajectory spans several units.
    monkeypatch.setattr(mpp_prepare, "UNIT_BYTES", 2 * 3 * 3 * 8 * 8 * 4)
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        args = ["--history", "2", "--stride", "1", "--samples-per-shard", "5", "--workers", str(workers)]
        assert main(["prepare", "mpp", str(tmp_path / "toy"), "--out", str(out), *args]) == 0
        outs.append(out)
    assert_same_shard_sets(*outs)


def test_prepare_with_workers_names_the_file_of_a_bad_window_in_one_line(tmp_path, capsys):
    _toy_well_file(tmp_path / "toy" / "good.hdf5")
    bad = _toy_well_file(tmp_path / "toy" / "nan.hdf5", nan_at=(1, 5, 2, 2))
    errors = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        args = ["--history", "2", "--workers", str(workers)]
        assert main(["prepare", "mpp", str(tmp_path / "toy"), "--out", str(out), *args]) == 2
        errors.append(capsys.readouterr().err)
        assert not out.exists() or not any(out.iterdir())
    assert errors[0] == errors[1]
    assert errors[0].count("\n") == 1 and str(bad) in errors[0] and "non-finite" in errors[0]


@pytest.mark.slow
def test_sigterm_stops_prepare_with_workers_and_publishes_nothing(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.testkit import REPO, child_env

    for i in range(4):
        _toy_well_file(tmp_path / "toy" / f"toy{i}.hdf5", n_traj=4, steps=41, seed=i)
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "foundation.cli",
        "prepare",
        "mpp",
        str(tmp_path / "toy"),
        "--out",
        str(out),
    ]
    command += ["--history", "1", "--stride", "1", "--samples-per-shard", "4", "--workers", "2"]
    env = child_env(PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(out.glob(".*.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is not None or time.monotonic() >= deadline:
        proc.kill()
        pytest.fail(f"prepare was not writing when it was to be interrupted: {proc.communicate()[1][-2000:]}")
    descendants = _descendants(str(proc.pid))
    assert len(descendants) >= 2  # the workers (and their fork server)
    os.kill(proc.pid, signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler prints where each thread hangs
        pytest.fail(f"prepare did not stop on SIGTERM: {proc.communicate()[1][-4000:]}")
    assert proc.returncode == 130 and "interrupted" in err, err[-2000:]
    assert (
        not (out / "manifest.json").exists() and not list(out.glob("*.tar*")) and not list(out.glob(".*tmp*"))
    )
    time.sleep(0.5)
    assert not [pid for pid in descendants if _state(pid) not in ("gone", "Z")]


def _descendants(pid: str) -> list[str]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += [child, *_descendants(child)]
    return out


def _state(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


# ----------------------------------------------------------------------------- prepare --part, shards merge


def _assert_same_set_as_one_run(merged: Path, whole: Path) -> None:
    """Same keys, splits and sample bytes; `stats.fields` to rounding (relative 1e-9: the sums are
    recovered from stored means and rms, one multiplication and one division each way), the rest
    of `stats` and `extra` exactly."""
    import math

    from foundation.data import Manifest

    a, b = Manifest.load(merged), Manifest.load(whole)
    assert set(a.splits) == set(b.splits)
    for split in b.splits:
        assert members_by_key(merged, split) == members_by_key(whole, split), split
        assert a.field_stats(split).keys() == b.field_stats(split).keys()
    assert a.extra == b.extra
    assert a.stats.keys() == b.stats.keys() and a.stats["fields"].keys() == b.stats["fields"].keys()
    for name, entry in b.stats["fields"].items():
        assert a.stats["fields"][name]["count"] == entry["count"]
        for key in ("mean", "std", "rms"):
            assert math.isclose(a.stats["fields"][name][key], entry[key], rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.slow
def test_parts_of_the_input_files_merge_to_the_one_run_set(tmp_path):
    """`prepare mpp --part I/3` over three files, then `shards merge`: what one prepare writes."""
    from foundation.data import Manifest

    for i in range(4):
        _toy_well_file(tmp_path / "toy" / f"toy{i}.hdf5", seed=i, n_traj=4)
    args = [
        "--history",
        "2",
        "--stride",
        "2",
        "--samples-per-shard",
        "4",
        "--split-fractions",
        "train=0.6,valid=0.2,test=0.2",
    ]
    assert main(["prepare", "mpp", str(tmp_path / "toy"), "--out", str(tmp_path / "whole"), *args]) == 0
    parts = []
    for i in range(3):
        parts.append(tmp_path / "parts" / f"part-{i}")
        assert (
            main(
                ["prepare", "mpp", str(tmp_path / "toy"), "--out", str(parts[-1]), "--part", f"{i}/3", *args]
            )
            == 0
        )
    provenance = [Manifest.load(p).provenance for p in parts]
    assert [len(p["sources"]) for p in provenance] == [2, 1, 1]  # toy0, toy3 | toy1 | toy2
    assert provenance[0]["part"] == {
        "index": 0,
        "count": 3,
        "rule": provenance[0]["part"]["rule"],
        "files": 2,
    }
    assert main(["shards", "merge", *map(str, parts), "--out", str(tmp_path / "merged")]) == 0
    _assert_same_set_as_one_run(tmp_path / "merged", tmp_path / "whole")


def test_part_option_errors_are_one_line(tmp_path, capsys):
    _toy_well_file(tmp_path / "toy" / "toy0.hdf5")
    out = str(tmp_path / "out")
    assert main(["prepare", "mpp", str(tmp_path / "toy"), "--out", out, "--part", "3/3"]) == 2
    assert "expected I/N with 0 <= I < N" in capsys.readouterr().err
    assert main(["prepare", "mpp", str(tmp_path / "toy"), "--out", out, "--part", "1/2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only 1 input file(s), so part 1 has none" in err


def _fake_part(label: str, datasets: dict, skipped: dict | None = None):
    from types import SimpleNamespace

    extra = {"mpp": {"fields": ["u"], "history": 2, "window": 3, "resolution": [8, 8], "datasets": datasets}}
    extra["mpp"].update(skipped=skipped or {}, short_files=[])
    fields = {"u": {"mean": 1.0, "std": 0.0, "rms": 1.0, "count": 4}}
    return SimpleNamespace(label=label, manifest=SimpleNamespace(stats={"fields": fields}, extra=extra))


def _dataset(**changes) -> dict:
    info = {"fields": ["u"], "bc": [2, 2], "bc_ends": [[2, 2], [2, 2]], "grid_type": "cartesian"}
    info.update(shape=[8, 8], samples={"train": 1}, sources=["/d/a.hdf5"])
    return {**info, **changes}


def test_mpp_merge_refuses_parts_that_one_run_would_not_have_written():
    from encoders.mpp.prepare import merge_stats

    left_out = _fake_part("part-1", {}, skipped={"toy": "grid 9x9 cannot be block-averaged"})
    with pytest.raises(
        DataError, match=r"part part-0: data set 'toy' is prepared here but another part left it out"
    ):
        merge_stats([_fake_part("part-0", {"toy": _dataset()}), left_out])
    other = _fake_part("part-1", {"toy": _dataset(bc=[0, 0], sources=["/d/b.hdf5"])})
    with pytest.raises(
        DataError, match=r"part part-1: extra\.mpp\.datasets\.toy\.bc is \[0, 0\] but \[2, 2\]"
    ):
        merge_stats([_fake_part("part-0", {"toy": _dataset()}), other])
    stats, extra = merge_stats(
        [
            _fake_part("part-0", {"toy": _dataset()}),
            _fake_part("part-1", {"toy": _dataset(sources=["/d/0.hdf5"])}),
        ]
    )
    assert stats["fields"]["u"] == {"mean": 1.0, "std": 0.0, "rms": 1.0, "count": 8}
    assert extra["mpp"]["datasets"]["toy"]["samples"] == {"train": 2}
    assert extra["mpp"]["datasets"]["toy"]["sources"] == ["/d/0.hdf5", "/d/a.hdf5"]
