"""Fuzz: every verb, fed seeded mutations of small valid inputs, either succeeds or exits 2 with one
`error: ...` line (or a verb's documented exit code), never with a traceback, a hang or a memory bomb.

Inputs are built once (a tiny xVal shard set from `synth xval`, a pretraining config, a run folder
with a checkpoint, an embeddings HDF5 file), then each case copies one, mutates it with its own
seed and runs one verb on it in a forked child (tests/core/fuzz_harness.py). A failing case is
reported with its verb, input, mutation, seed, argv and the tail of its stderr; its folder is kept.
`FOUNDATION_FUZZ_SEED` and `FOUNDATION_FUZZ_SCALE` (a case-count multiplier) widen a local run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.core import fuzz_harness as fz
from tests.testkit import child_env
from tests.testkit.configs import tiny_config_dict

BASE_SEED = int(os.environ.get("FOUNDATION_FUZZ_SEED", "0"))
SCALE = float(os.environ.get("FOUNDATION_FUZZ_SCALE", "1"))
TIMEOUT_S = 20.0
RSS_MARGIN = 1 << 30  # a case may grow 1 GiB beyond the (torch-importing) parent it forks from

BASE_CONFIG = tiny_config_dict(
    "xval",
    "SHARDS",
    "run",
    data={"batch_size": 4},
    model={"d_model": 16, "n_layers": 1, "n_heads": 2, "max_len": 64},
    optim={"warmup_steps": 1},
    train={
        "steps": 2,
        "log_every": 1,
        "val_every": 0,
        "ckpt_every": 0,
        "tensorboard": False,
        "progress": False,
        "device": "cpu",
    },
)


def _import_everything() -> None:
    """Import what the verbs import lazily, so that each forked case starts warm."""
    import faiss  # noqa: F401
    import h5py  # noqa: F401
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import sklearn.compose  # noqa: F401
    import sklearn.decomposition  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import sklearn.model_selection  # noqa: F401
    import sklearn.neighbors  # noqa: F401
    import sklearn.neural_network  # noqa: F401
    import sklearn.pipeline  # noqa: F401
    import sklearn.preprocessing  # noqa: F401
    import torch._dynamo  # noqa: F401 - imported lazily by the first optimiser (seconds)
    import torch.distributed.checkpoint  # noqa: F401

    import encoders.xval.family  # noqa: F401
    import foundation.embeddings  # noqa: F401
    import foundation.train  # noqa: F401
    from foundation import cli, registry

    cli.discover_commands()
    registry.get("xval")
    _warm_matplotlib()
    for name in ("evaluate_common", "evaluate_retrieval", "evaluate_zeroshot", "export", "search", "xval"):
        __import__(f"pipelines.{name}")


def _warm_matplotlib() -> None:
    """Render one figure so that font loading is done once, not in every plotting case."""
    import io

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_title("warm-up")
    fig.tight_layout()
    fig.savefig(io.BytesIO(), format="png")
    plt.close(fig)


def build_inputs(base: Path) -> dict:
    """The valid inputs every case starts from (built by forked children: the parent stays torch-idle)."""
    base.mkdir(parents=True, exist_ok=True)
    _import_everything()
    limit = fz.current_rss() + RSS_MARGIN
    synth = fz.run_one(
        [
            "synth",
            "xval",
            "--out",
            "xv",
            "--task",
            "arithmetic",
            "--samples",
            "60",
            "--samples-per-shard",
            "16",
            "--vocab-size",
            "300",
            "--min-field-count",
            "1",
        ],
        base,
        rss_limit=limit,
    )
    assert synth.kind == "ok", synth.report(20)
    shards = base / "xv" / "shards"
    config = json.loads(json.dumps(BASE_CONFIG))
    config["data"]["path"] = str(shards)
    (base / "config.yaml").write_text(yaml.safe_dump(config))
    pretrain = fz.run_one(["pretrain", "config.yaml"], base, rss_limit=limit)
    assert pretrain.kind == "ok", pretrain.report(20)
    _write_embeddings(base / "emb.h5")
    return {"base": base, "shards": shards, "config": config, "run": base / "run", "emb": base / "emb.h5"}


def _write_embeddings(path: Path, n: int = 120, dim: int = 8) -> None:
    import numpy as np

    from foundation.embeddings import EmbeddingsWriter

    rng = np.random.default_rng(0)
    latent = rng.normal(size=(n, dim))
    writer = EmbeddingsWriter(path, attrs={"checkpoint": "fuzz", "family": "test"}, chunk_rows=64)
    writer.append(
        [f"obj-{i:04d}" for i in range(n)],
        {
            "image": (latent + 0.1 * rng.normal(size=(n, dim))).astype(np.float32),
            "spectrum": (latent + 0.1 * rng.normal(size=(n, dim))).astype(np.float32),
        },
        {"redshift": latent[:, 0], "mass": latent[:, 1] + 10},
        split=["test" if i % 4 == 0 else "train" for i in range(n)],
    )
    writer.finish()


# ----------------------------------------------------------------------------- input mutations


def _update_manifest_checksum(shards: Path, tar: Path) -> None:
    """Make the manifest agree with a mutated shard, so readers get past the checksum to the bytes."""
    manifest_path = shards / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    data = tar.read_bytes()
    for split in manifest.get("splits", {}).values():
        for shard in split.get("shards", []):
            if shard.get("name") == tar.name:
                shard["sha256"] = hashlib.sha256(data).hexdigest()
                shard["bytes"] = len(data)
                split["bytes"] = sum(s.get("bytes", 0) for s in split["shards"])
    manifest_path.write_text(json.dumps(manifest))


def mutate_shard_set(shards: Path, rng: random.Random) -> str:
    """One mutation of a copied shard set: a tar (checksum fixed or not), the manifest or the tokenizer."""
    roll = rng.random()
    if roll < 0.75:
        tar = rng.choice(sorted(shards.glob("*.tar")))
        data = tar.read_bytes()
        data, what = fz.mutate_tar(data, rng) if rng.random() < 0.8 else fz.mutate_bytes(data, rng)
        tar.write_bytes(data)
        if rng.random() < 0.7:
            _update_manifest_checksum(shards, tar)
            what += " (manifest checksum updated)"
        return f"{tar.name}: {what}"
    target = shards / ("manifest.json" if roll < 0.92 else "tokenizer.json")
    return f"{target.name}: {mutate_json_file(target, rng)}"


def mutate_json_file(path: Path, rng: random.Random) -> str:
    if rng.random() < 0.75:
        tree = json.loads(path.read_text())
        what = fz.mutate_tree(tree, rng)
        path.write_text(fz.dump_json(tree))
        return what
    data, what = fz.mutate_bytes(path.read_bytes(), rng)
    path.write_bytes(data)
    return what


#: Kept as they are by config mutations, so that a run that validates stays tiny and in its folder
#: (override cases mutate these).
CONFIG_FROZEN = [("model",), ("run", "dir"), ("train", "steps")]


def mutate_config(path: Path, config: dict, rng: random.Random) -> str:
    """A mutated pretraining config: one value changed, or a file that is not a config at all."""
    roll = rng.random()
    if roll < 0.08:
        path.write_bytes(fz.PNG_BYTES)
        return "a PNG image"
    if roll < 0.14:
        text = rng.choice(
            ["- a\n- b\n", "just text", "42", "[" * 50_000 + "]" * 50_000, "{a: [b: {c", "\x00\xff"]
        )
        path.write_text(text, errors="surrogateescape")
        return f"not a mapping: {text[:20]!r}"
    tree = json.loads(json.dumps(config))
    what = fz.mutate_tree(tree, rng, CONFIG_FROZEN, [("model",)])
    if rng.random() < 0.3:
        what += "; " + fz.mutate_tree(tree, rng, CONFIG_FROZEN, [("model",)])
    path.write_text(fz.dump_yaml(tree))
    return what


def mutate_embeddings(path: Path, rng: random.Random) -> str:
    """Structural (h5py) or byte-level damage to a copied embeddings file."""
    if rng.random() < 0.4:
        data, what = fz.mutate_bytes(path.read_bytes(), rng)
        path.write_bytes(data)
        return what
    import h5py
    import numpy as np

    with h5py.File(path, "r+") as f:
        name = rng.choice(["image", "spectrum", "object_id", "targets/redshift", "split"])
        old = f[name]
        dtype, shape = old.dtype, old.shape
        choice = rng.randrange(6)
        del f[name]
        if choice == 0:  # a tiny sparse file that declares 2**31 rows
            rows = rng.choice([2**31, 2**40])
            f.create_dataset(name, shape=(rows, *shape[1:]), dtype=dtype, chunks=(1, *shape[1:]))
            return f"{name}: declares {rows} rows (sparse)"
        if choice == 1:
            f.create_dataset(name, shape=(0, *shape[1:]), dtype=dtype)
            return f"{name}: 0 rows"
        if choice == 2 and dtype.kind == "f":
            f.create_dataset(name, data=np.full(shape, rng.choice([np.nan, np.inf, 1e38]), dtype=dtype))
            return f"{name}: all non-finite/huge"
        if choice == 3:
            f.create_dataset(name, data=np.zeros((shape[0] if shape else 1, 3, 2), dtype=np.float32))
            return f"{name}: 3-D float"
        if choice == 4:
            f.create_dataset(name, data=np.array([b"x"] * (shape[0] if shape else 1)))
            return f"{name}: byte strings"
        f.create_dataset(name, shape=(max(1, (shape[0] if shape else 1) // 2), *shape[1:]), dtype=dtype)
        return f"{name}: half the rows"


def mutate_run(run: Path, rng: random.Random) -> str:
    """Damage one file of a copied run folder (checkpoint, metadata, exported model, resolved config)."""
    files = sorted(p for p in run.rglob("*") if p.is_file() and p.suffix != ".lock")
    target = rng.choice(files)
    rel = target.relative_to(run)
    if target.suffix in (".json", ".yaml") and rng.random() < 0.7:
        if target.suffix == ".json":
            return f"{rel}: {mutate_json_file(target, rng)}"
        tree = yaml.safe_load(target.read_text())
        what = fz.mutate_tree(tree, rng) if isinstance(tree, dict) else "unchanged"
        target.write_text(fz.dump_yaml(tree))
        return f"{rel}: {what}"
    data, what = fz.mutate_bytes(target.read_bytes(), rng)
    target.write_bytes(data)
    return f"{rel}: {what}"


# ----------------------------------------------------------------------------- cases


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.lock"))
    else:
        shutil.copy2(src, dst)
    return dst


def shard_cases(inputs: dict, cases_dir: Path, rng: random.Random, count: int) -> list[fz.Case]:
    verbs = [
        ("shards info", lambda d: ["shards", "info", str(d)]),
        ("shards verify", lambda d: ["shards", "verify", "--all", str(d)]),
        ("shards index", lambda d: ["shards", "index", "--overwrite", str(d)]),
    ]
    cases = []
    for i in range(count):
        verb, argv = verbs[i % len(verbs)]
        workdir = cases_dir / f"shards-{i}"
        copy = workdir / "shards"
        cases.append(
            fz.Case(
                verb,
                argv(copy),
                workdir,
                "xval shard set",
                rng.randrange(2**32),
                prepare=lambda r, src=inputs["shards"], dst=copy: mutate_shard_set(_copy(src, dst), r),
            )
        )
    return cases


def shard_training_cases(inputs: dict, cases_dir: Path, rng: random.Random, count: int) -> list[fz.Case]:
    """The loader and xVal evaluation reading mutated shards."""
    cases = []
    for i in range(count):
        workdir = cases_dir / f"train-shards-{i}"
        copy = workdir / "shards"
        if i % 2 == 0:
            verb, argv = "pretrain", ["pretrain", str(workdir / "config.yaml")]
        else:
            verb = "evaluate xval"
            argv = [
                "evaluate",
                "xval",
                "--checkpoint",
                str(inputs["run"]),
                "--data",
                str(copy),
                "--out",
                str(workdir / "eval"),
                "--split",
                "train",
                "--max-batches",
                "2",
                "--device",
                "cpu",
            ]

        def prepare(r, src=inputs["shards"], dst=copy, workdir=workdir):
            config = json.loads(json.dumps(inputs["config"]))
            config["data"]["path"] = str(dst)
            (workdir / "config.yaml").write_text(yaml.safe_dump(config))
            return mutate_shard_set(_copy(src, dst), r)

        cases.append(fz.Case(verb, argv, workdir, "xval shard set", rng.randrange(2**32), prepare=prepare))
    return cases


def config_cases(inputs: dict, cases_dir: Path, rng: random.Random, count: int) -> list[fz.Case]:
    cases = []
    for i in range(count):
        workdir = cases_dir / f"config-{i}"
        path = workdir / "config.yaml"
        cases.append(
            fz.Case(
                "pretrain",
                ["pretrain", str(path), "train.steps=2"],  # a `train:` mutated to {} must not run 1000 steps
                workdir,
                "pretrain config",
                rng.randrange(2**32),
                prepare=lambda r, path=path: mutate_config(path, inputs["config"], r),
            )
        )
    return cases


OVERRIDE_KEYS = [
    "train.steps",
    "train.grad_accum",
    "train.grad_clip",
    "train.keep_last",
    "train.log_every",
    "train.peak_tflops",
    "train.stop_file",
    "train.device",
    "data.batch_size",
    "data.num_workers",
    "data.prefetch",
    "data.path",
    "optim.lr",
    "optim.eps",
    "optim.betas",
    "optim.warmup_steps",
    "optim.min_lr_ratio",
    "run.seed",
    "run.dir",
    "model.d_model",
    "model.n_heads",
    "model.max_len",
    "model.mask_prob",
    "model.dropout",
    "model.mlp_ratio",
    "model.text_vocab_size",
    "family",
    "model",
    "train",
    "nosuch.key",
    "train.nosuch",
    "a..b",
    ".x",
    "model.d_model.x",
]
OVERRIDE_VALUES = [
    "-1",
    "0",
    "nan",
    ".nan",
    ".inf",
    "-.inf",
    "1e999",
    "1e308",
    "9" * 30,
    "9" * 5000,
    "2e9",
    "1000000000",
    "[1, 2]",
    "{a: 1}",
    "",
    "x",
    "'../escape'",
    "/dev/null",
    "config.yaml",
    "[[[[[[[[",
    "0.5",
    "true",
    "null",
]


LONG_RUN_VALUES = ("2e9", "1000000000")


def override_cases(inputs: dict, cases_dir: Path, rng: random.Random, count: int) -> list[fz.Case]:
    cases = []
    config = inputs["base"] / "config.yaml"
    for i in range(count):
        workdir = cases_dir / f"override-{i}"
        key, value = rng.choice(OVERRIDE_KEYS), rng.choice(OVERRIDE_VALUES)
        if key == "train.steps" and value in LONG_RUN_VALUES:  # valid, only slow: not what is tested
            value = "-1"
        argv = ["pretrain", str(config), f"run.dir={workdir / 'run'}", f"{key}={value}"]
        cases.append(fz.Case("pretrain", argv, workdir, "config override", i, mutation=f"{key}={value[:30]}"))
    return cases


def embeddings_cases(inputs: dict, cases_dir: Path, rng: random.Random, count: int) -> list[fz.Case]:
    verbs = [
        (
            "search build",
            lambda w, e: [
                "search",
                "build",
                "--embeddings",
                str(e),
                "--modality",
                "image",
                "--out",
                str(w / "index"),
                "--tune-sample",
                "20",
            ],
        ),
        (
            "evaluate retrieval",
            lambda w, e: ["evaluate", "retrieval", "--embeddings", str(e), "--out", str(w / "retrieval")],
        ),
        (
            "evaluate zero-shot",
            lambda w, e: [
                "evaluate",
                "zero-shot",
                "--embeddings",
                str(e),
                "--out",
                str(w / "zeroshot"),
                "--no-mlp",
                "--no-supervised",
                "--k",
                "4",
            ],
        ),
    ]
    cases = []
    for i in range(count):
        verb, argv = verbs[min(i % 9 // 4, 2)]  # zero-shot (seconds of plotting) gets 1 case in 9
        workdir = cases_dir / f"emb-{i}"
        copy = workdir / "emb.h5"
        cases.append(
            fz.Case(
                verb,
                argv(workdir, copy),
                workdir,
                "embeddings HDF5",
                rng.randrange(2**32),
                prepare=lambda r, dst=copy: mutate_embeddings(_copy(inputs["emb"], dst), r),
            )
        )
    return cases


def run_cases_for_checkpoints(inputs: dict, cases_dir: Path, rng: random.Random, count: int) -> list[fz.Case]:
    cases = []
    for i in range(count):
        workdir = cases_dir / f"run-{i}"
        run = workdir / "run"
        kind = i % 3
        if kind == 0:
            verb = "evaluate xval"
            argv = [
                "evaluate",
                "xval",
                "--checkpoint",
                str(run),
                "--data",
                str(inputs["shards"]),
                "--out",
                str(workdir / "eval"),
                "--max-batches",
                "1",
                "--device",
                "cpu",
            ]
        elif kind == 1:
            verb = "export"
            argv = [
                "export",
                "--checkpoint",
                str(run),
                "--data",
                str(inputs["shards"]),
                "--out",
                str(workdir / "emb.h5"),
                "--device",
                "cpu",
                "--splits",
                "test",
            ]
        else:
            verb = "pretrain"
            argv = ["pretrain", str(inputs["base"] / "config.yaml"), f"run.dir={run}", "train.steps=3"]
        cases.append(
            fz.Case(
                verb,
                argv,
                workdir,
                "run folder",
                rng.randrange(2**32),
                prepare=lambda r, dst=run: mutate_run(_copy(inputs["run"], dst), r),
            )
        )
    return cases


def argv_cases(inputs: dict, cases_dir: Path) -> list[fz.Case]:
    """Command-line mistakes: bad devices, zero counts, files of the wrong kind."""
    png = cases_dir / "image.png"
    emb, shards, run = str(inputs["emb"]), str(inputs["shards"]), str(inputs["run"])
    commands = [
        ["export", "--checkpoint", run, "--data", shards, "--out", "{w}/e.h5", "--device", "bogus"],
        ["export", "--checkpoint", run, "--data", shards, "--out", "{w}/e.h5", "--device", "cuda:7"],
        ["export", "--checkpoint", run, "--data", shards, "--out", "{w}/e.h5", "--chunk-rows", "0"],
        ["export", "--checkpoint", run, "--data", shards, "--out", "{w}/e.h5", "--precision", "fp8"],
        ["export", "--checkpoint", run, "--data", shards, "--out", "{w}/e.h5", "--splits", "nope"],
        ["export", "--checkpoint", run, "--data", shards, "--out", "{w}/e.h5", "--part", "3", "--parts", "2"],
        ["export", "--checkpoint", str(png), "--data", shards, "--out", "{w}/e.h5"],
        ["export", "--checkpoint", run, "--data", str(png), "--out", "{w}/e.h5"],
        ["export", "--checkpoint", run, "--data", shards, "--out", str(png)],
        ["evaluate", "xval", "--checkpoint", run, "--data", shards, "--out", "{w}/o", "--device", "cuda:7"],
        ["evaluate", "xval", "--checkpoint", run, "--data", shards, "--out", "{w}/o", "--split", "nope"],
        ["evaluate", "retrieval", "--embeddings", str(png)],
        ["evaluate", "retrieval", "--embeddings", shards],
        ["evaluate", "zero-shot", "--embeddings", emb, "--out", "{w}/z", "--targets", "nope"],
        ["evaluate", "zero-shot", "--embeddings", emb, "--out", "{w}/z", "--test-fraction", "1.5"],
        ["search", "build", "--embeddings", emb, "--modality", "nope", "--out", "{w}/i"],
        [
            "search",
            "build",
            "--embeddings",
            emb,
            "--modality",
            "image",
            "--out",
            "{w}/i",
            "--param",
            "nlist=-3",
        ],
        ["search", "query", "--index", str(png), "--query-modality", "image", "--id", "obj-0001"],
        ["shards", "info", str(png)],
        ["shards", "verify", emb],
        ["shards", "index", "{w}"],
        ["pretrain", str(png)],
        ["pretrain", shards],
        ["pretrain", str(inputs["base"] / "config.yaml"), "run.dir={w}/file", "train.steps=1"],
        [
            "synth",
            "xval",
            "--out",
            "{w}/s",
            "--task",
            "arithmetic",
            "--samples",
            "5",
            "--vocab-size",
            "1000000000",
        ],
        ["config", "describe", "nosuchfamily"],
        ["config", "describe", ":x"],
        ["config", "describe", "os:system"],
        ["runs", "plot", str(png)],
    ]
    cases = []
    for i, command in enumerate(commands):
        workdir = cases_dir / f"argv-{i}"
        argv = [part.replace("{w}", str(workdir)) for part in command]
        if "run.dir={w}/file" in command:
            workdir.mkdir(parents=True)
            (workdir / "file").write_text("not a directory")
        verb = " ".join(p for p in argv[:2] if not p.startswith(("-", "/")))
        cases.append(fz.Case(verb, argv, workdir, "command line", i, mutation=" ".join(command[-2:])))
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(fz.PNG_BYTES)
    return cases


def run_fuzz(base: Path, seed: int, scale: float) -> tuple[list[fz.Outcome], Path]:
    """Build the inputs under `base`, run every case, return the outcomes and the failure report."""
    inputs = build_inputs(base / "inputs")
    cases_dir = base / "cases"
    rng = random.Random(seed)
    count = lambda n: max(1, round(n * scale))  # noqa: E731
    cases = [
        *argv_cases(inputs, cases_dir),
        *shard_cases(inputs, cases_dir, rng, count(120)),
        *config_cases(inputs, cases_dir, rng, count(40)),
        *override_cases(inputs, cases_dir, rng, count(25)),
        *embeddings_cases(inputs, cases_dir, rng, count(36)),
        *shard_training_cases(inputs, cases_dir, rng, count(8)),
        *run_cases_for_checkpoints(inputs, cases_dir, rng, count(9)),
    ]

    def tidy(outcome: fz.Outcome) -> None:
        if outcome.kind != "failure":
            shutil.rmtree(outcome.case.workdir, ignore_errors=True)

    limit = fz.current_rss() + RSS_MARGIN
    outcomes = fz.run_cases(cases, jobs=2, timeout_s=TIMEOUT_S, rss_limit=limit, on_outcome=tidy)
    report = base / "fuzz-failures.txt"
    report.write_text("\n\n".join(o.report(12) for o in outcomes if o.kind == "failure"))
    return outcomes, report


def main(argv: list[str]) -> int:
    """`python tests/core/test_core_fuzz.py DIR [SEED [SCALE]]`: run the fuzz cases, print a summary.

    The test runs this in a fresh interpreter, so that no thread of an earlier test (torch, loader
    or logging threads) is alive when the cases are forked."""
    base = Path(argv[0])
    seed = int(argv[1]) if len(argv) > 1 else BASE_SEED
    scale = float(argv[2]) if len(argv) > 2 else SCALE
    outcomes, report = run_fuzz(base, seed, scale)
    failures = [o for o in outcomes if o.kind == "failure"]
    kinds = Counter(o.kind for o in outcomes)
    summary = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
    print(f"{len(failures)} of {len(outcomes)} fuzz cases failed ({summary}; all in {report})")
    for outcome in failures[:40]:
        print("\n" + outcome.report())
    return 1 if failures else 0


@pytest.mark.slow
def test_every_verb_fails_cleanly_on_mutated_inputs(tmp_path):
    env = child_env(MPLBACKEND="Agg")  # PYTHONPATH: this file imports tests.core.fuzz_harness
    result = subprocess.run(
        [sys.executable, __file__, str(tmp_path), str(BASE_SEED), str(SCALE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]


def _misbehaving_commands():
    """Verbs that fail in each way the harness must tell apart (forked children inherit them)."""
    from foundation.cli import Command
    from foundation.errors import DataError

    def clean(args):
        raise DataError("the input is bad")

    def bug(args):
        raise KeyError("a bug")

    def hang(args):
        import time

        while True:
            time.sleep(0.05)

    def bomb(args):
        blocks = []
        while True:
            blocks.append(bytearray(64 << 20))  # touched pages: resident memory grows

    def two_lines(args):
        print("error: one", file=sys.stderr)
        print("error: two", file=sys.stderr)
        return 2

    noop = lambda parser: None  # noqa: E731
    runs = {"ok": lambda args: 0, "clean": clean, "bug": bug, "hang": hang, "bomb": bomb, "two": two_lines}
    return [Command((name,), name, noop, run) for name, run in runs.items()]


@pytest.mark.slow
def test_harness_tells_success_clean_errors_tracebacks_hangs_and_memory_bombs_apart(monkeypatch, tmp_path):
    from foundation import cli

    monkeypatch.setattr(cli, "discover_commands", _misbehaving_commands)
    names = ["ok", "clean", "bug", "hang", "bomb", "two"]
    cases = [fz.Case(name, [name], tmp_path / name, "-", 0) for name in names]
    outcomes = fz.run_cases(cases, jobs=2, timeout_s=2, rss_limit=fz.current_rss() + (256 << 20))
    got = {o.case.verb: (o.kind, o.reason.split(":")[0].split(" (")[0]) for o in outcomes}
    assert got == {
        "ok": ("ok", "exit 0"),
        "clean": ("clean", "exit 2"),
        "bug": ("failure", "traceback"),
        "hang": ("failure", "hang"),
        "bomb": ("failure", "memory"),
        "two": ("failure", "exit 2 with 2 'error"),
    }
    assert "error: the input is bad" in next(o for o in outcomes if o.case.verb == "clean").stderr


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
