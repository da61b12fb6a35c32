"""synth / prepare / collate from real shards / pretrain / evaluate, on tiny data."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders.xval import extract_numbers, render_numbers
from encoders.xval.family import FAMILY, normalizer_from, tokenizer_from
from encoders.xval.numbers import ParsedText
from foundation.cli import main
from foundation.data import Manifest, ShardDataset
from foundation.registry import get

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "xval" / "tiny.yaml"


@pytest.fixture(scope="module")
def orbits(tmp_path_factory):
    out = tmp_path_factory.mktemp("orbits")
    assert main(["synth", "xval", "--task", "orbits", "--samples", "300", "--out", str(out)]) == 0
    return out


def test_family_is_registered():
    assert get("xval") is FAMILY


def test_synth_writes_jsonl_and_shards(orbits):
    manifest = Manifest.load(orbits / "shards")
    assert manifest.family == "xval"
    assert sum(s.samples for s in manifest.splits.values()) == 300
    assert "tokenizer.json" in manifest.files
    assert normalizer_from(manifest).fields == ["_", "a", "dt", "e", "m", "x", "y"]
    assert manifest.stats["lengths"]["numbers"] == 20
    assert (orbits / "orbits.jsonl").read_text().count("\n") == 300


def test_shards_reproduce_every_source_text(orbits):
    manifest = Manifest.load(orbits / "shards")
    tokenizer = tokenizer_from(manifest)
    ds = ShardDataset(
        orbits / "shards", split="train", batch_size=50, shuffle=False, collate_fn=list, drop_last=False
    )
    n = 0
    for samples in ds:
        for s in samples:
            parsed = extract_numbers(s["text"])
            assert tokenizer.segments(s["tokens"]) == parsed.segments  # text around numbers, exact
            assert s["values"].dtype == np.float64 and np.array_equal(s["values"], parsed.values)
            rebuilt = ParsedText(
                "[NUM]".join(tokenizer.segments(s["tokens"])), s["values"], parsed.literals, ()
            )
            assert render_numbers(rebuilt) == s["text"]
            n += 1
    assert n == manifest.splits["train"].samples


def test_loader_masks_are_seeded(orbits):
    manifest = Manifest.load(orbits / "shards")
    cfg = FAMILY.model_config(d_model=16, n_layers=1, n_heads=2, max_len=128)
    collate = FAMILY.make_collate(cfg, manifest, True)

    def first(seed):
        ds = ShardDataset(orbits / "shards", batch_size=8, seed=seed, collate_fn=collate, epochs=None)
        return next(iter(ds))

    a, b, c = first(0), first(0), first(1)
    assert torch.equal(a["mlm_mask"], b["mlm_mask"]) and torch.equal(a["ids"], b["ids"])
    assert not torch.equal(a["ids"], c["ids"]) or not torch.equal(a["mlm_mask"], c["mlm_mask"])
    assert a["ids"].shape[0] < 8  # packed: 8 samples in fewer rows
    assert FAMILY.tokens_per_batch(a) == int((~a["pad"]).sum())


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prepare_jsonl_and_text(tmp_path, capsys):
    src = _write_jsonl(
        tmp_path / "in.jsonl", [{"body": f"t={i * 0.5} and x=-{i}e-3", "id": f"r.{i}"} for i in range(60)]
    )
    txt = tmp_path / "notes.txt"
    txt.write_text("first 1,000 lines\r\n\nsecond 2.5\nthird [NUM] line\n")
    code = main(
        [
            "prepare",
            "xval",
            str(src),
            "--out",
            str(tmp_path / "s"),
            "--text-field",
            "body",
            "--key-field",
            "id",
            "--splits",
            "train=1.0",
            "--min-field-count",
            "5",
        ]
    )
    assert code == 0
    manifest = Manifest.load(tmp_path / "s")
    assert manifest.splits["train"].samples == 60
    assert normalizer_from(manifest).fields == ["_", "t", "x"]
    # [NUM] in the input is an error naming file and line, unless --skip-invalid
    assert main(["prepare", "xval", str(txt), "--out", str(tmp_path / "t"), "--splits", "train=1.0"]) == 2
    assert "notes.txt:4" in capsys.readouterr().err
    assert (
        main(
            [
                "prepare",
                "xval",
                str(txt),
                "--out",
                str(tmp_path / "t"),
                "--splits",
                "train=1.0",
                "--skip-invalid",
            ]
        )
        == 0
    )
    manifest = Manifest.load(tmp_path / "t")
    assert manifest.splits["train"].samples == 2 and manifest.provenance["skipped_invalid"] == 1
    texts = sorted(
        s["text"] for batch in ShardDataset(tmp_path / "t", batch_size=2, collate_fn=list) for s in batch
    )
    assert texts == ["first 1,000 lines", "second 2.5"]


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ('{"text": "a 1"}\n{oops\n', [], "in.jsonl:2: not valid JSON"),
        ('{"body": "a 1"}\n', [], "no field 'text' (fields: body)"),
        ('{"text": {"a": 1}}\n', [], "is a dict, not a string"),
        ('{"text": "a 1"}\n', ["--splits", "test=1.0"], "no record fell into the training split"),
    ],
)
def test_prepare_errors_are_one_clear_line(tmp_path, capsys, content, args, message):
    (tmp_path / "in.jsonl").write_text(content)
    assert main(["prepare", "xval", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "s"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_prepare_takes_either_split_fractions_spelling(tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", [{"text": f"x={i}", "id": str(i)} for i in range(40)])
    for spelling in ("--split-fractions", "--splits"):
        out = tmp_path / spelling
        assert main(["prepare", "xval", str(src), "--out", str(out), spelling, "train=0.5,test=0.5"]) == 0
        assert sorted(Manifest.load(out).splits) == ["test", "train"]


def test_synth_replaces_a_corpus_only_with_overwrite(tmp_path):
    from encoders.xval.synth import write_corpus
    from foundation.errors import DataError

    path = tmp_path / "a.jsonl"
    assert write_corpus("arithmetic", 3, 0, path) == 3
    before = path.read_bytes()
    with pytest.raises(DataError, match="exists; pass --overwrite"):
        write_corpus("arithmetic", 5, 1, path)
    assert path.read_bytes() == before
    assert write_corpus("arithmetic", 5, 1, path, overwrite=True) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]  # no temporary left behind


def test_prepare_refuses_to_overwrite(tmp_path, orbits, capsys):
    src = orbits / "orbits.jsonl"
    assert main(["prepare", "xval", str(src), "--out", str(tmp_path / "s"), "--key-field", "id"]) == 0
    assert main(["prepare", "xval", str(src), "--out", str(tmp_path / "s"), "--key-field", "id"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_vocab_from_reuses_tokenizer_and_normaliser(tmp_path, orbits):
    src = orbits / "orbits.jsonl"
    args = [
        "prepare",
        "xval",
        str(src),
        "--out",
        str(tmp_path / "s"),
        "--key-field",
        "id",
        "--splits",
        "test=1.0",
        "--vocab-from",
        str(orbits / "shards"),
    ]
    assert main(args) == 0
    mine, base = Manifest.load(tmp_path / "s"), Manifest.load(orbits / "shards")
    assert mine.files["tokenizer.json"].sha256 == base.files["tokenizer.json"].sha256
    assert mine.stats["normalizer"] == base.stats["normalizer"]


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["xval", "p10"])
def test_pretrain_then_evaluate(tmp_path, orbits, encoding):
    run = tmp_path / "run"
    overrides = [
        f"data.path={orbits / 'shards'}",
        f"run.dir={run}",
        "train.steps=6",
        "train.val_every=3",
        "train.ckpt_every=3",
        "train.log_every=3",
        f"model.encoding={encoding}",
        "train.tensorboard=false",
        "model.max_len=256",
    ]  # P10 spells 20 numbers with 100 tokens
    assert main(["pretrain", str(TINY), *overrides]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("tokens_per_s" in r for r in records)
    assert (run / "model.pt").is_file()
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "xval",
                "--checkpoint",
                str(run),
                "--data",
                str(orbits / "shards"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["encoding"] == encoding and set(report["fields"]) == {"a", "dt", "e", "m", "x", "y"}
    assert report["n_numbers"] == 20 * report["n_samples"] and report["n_truncated_samples"] == 0
    for entry in report["fields"].values():
        assert 0.0 <= entry["unparseable_fraction"] <= 1.0
    assert (out / "predicted_vs_true.png").stat().st_size > 1000
    lines = (out / "predictions.csv").read_text().splitlines()
    assert lines[0] == "key,field,true,predicted,is_number" and len(lines) == report["n_numbers"] + 1
    # from a step-N checkpoint as well, restricted to one field
    out2 = tmp_path / "eval2"
    step = run / "checkpoints" / "step-6"
    assert (
        main(
            [
                "evaluate",
                "xval",
                "--checkpoint",
                str(step),
                "--data",
                str(orbits / "shards"),
                "--out",
                str(out2),
                "--fields",
                "m",
            ]
        )
        == 0
    )
    assert set(json.loads((out2 / "report.json").read_text())["fields"]) == {"m"}


def test_evaluate_refuses_foreign_tokenizer(tmp_path, orbits, capsys):
    other = tmp_path / "other"
    assert main(["synth", "xval", "--task", "arithmetic", "--samples", "100", "--out", str(other)]) == 0
    run = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                str(TINY),
                f"data.path={orbits / 'shards'}",
                f"run.dir={run}",
                "train.steps=1",
                "train.val_every=0",
                "train.tensorboard=false",
            ]
        )
        == 0
    )
    capsys.readouterr()
    code = main(
        [
            "evaluate",
            "xval",
            "--checkpoint",
            str(run),
            "--data",
            str(other / "shards"),
            "--out",
            str(tmp_path / "e"),
        ]
    )
    assert code == 2
    assert "--vocab-from" in capsys.readouterr().err


@pytest.mark.slow
def test_pretrain_on_two_processes(tmp_path, orbits, torchrun):
    result = torchrun(
        [
            "pretrain",
            str(TINY),
            f"data.path={orbits / 'shards'}",
            f"run.dir={tmp_path / 'run'}",
            "train.steps=4",
            "train.val_every=0",
            "train.tensorboard=false",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 x cpu, ddp" in result.stderr
    payload = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert payload["step"] == 4 and np.isfinite(
        sum(float(v.float().sum()) for v in payload["state_dict"].values())
    )


def test_prepare_writes_the_same_shards_with_one_or_two_workers(tmp_path, orbits, monkeypatch):
    from encoders.xval import prepare as xval_prepare
    from tests.testkit.same_shards import assert_same_shard_sets

    monkeypatch.setattr(xval_prepare, "CHUNK_RECORDS", 16)  # many units of work
    src = str(orbits / "orbits.jsonl")
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        args = [
            "--out",
            str(out),
            "--vocab-size",
            "300",
            "--samples-per-shard",
            "64",
            "--workers",
            str(workers),
        ]
        assert main(["prepare", "xval", src, *args]) == 0
        outs.append(out)
    assert_same_shard_sets(*outs)


def test_prepare_with_workers_reports_a_bad_record_in_the_same_one_line(tmp_path, capsys, monkeypatch):
    from encoders.xval import prepare as xval_prepare

    monkeypatch.setattr(xval_prepare, "CHUNK_RECORDS", 8)
    lines = [f'{{"text": "x {i} y {i / 3}"}}' for i in range(60)]
    lines[41] = '{"text": "marker [NUM] 7"}'
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    errors = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert (
            main(
                ["prepare", "xval", str(tmp_path / "in.jsonl"), "--out", str(out), "--workers", str(workers)]
            )
            == 2
        )
        errors.append(capsys.readouterr().err)
        assert not (out / "manifest.json").exists()
    assert errors[0] == errors[1]
    assert "in.jsonl:42:" in errors[0] and errors[0].count("\n") == 1
