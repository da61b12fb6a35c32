"""`foundation synth xval`, `foundation prepare xval`, `foundation evaluate xval`.

synth writes a built-in corpus as JSONL (the native format) and prepares it into shards;
prepare turns JSONL / text files into an xVal shard set (tokenizer + normaliser fitted on the
training split); evaluate masks every number field of a held-out split in turn, predicts it
with a pretrained checkpoint and reports per-field MSE / R² (original units), the share of
unparseable predictions, and a predicted-vs-true plot. `evaluate xval-tasks` runs one of the
paper's tasks end to end — synth, one training per number encoding with the same config and
budget, evaluate, score — and writes the task's result table and figure.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from encoders.xval.synth import TASKS
from foundation.cli import Command, add_part_argument, add_shard_output_arguments, add_workers_argument

log = logging.getLogger(__name__)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _add_prepare_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("tokenisation and normalisation")
    g.add_argument(
        "--thousands",
        choices=("auto", "always", "never"),
        default="auto",
        help="Thousands separators: auto = 1,234 is one number in prose, never in JSON/CSV lists "
        "(docs/xval.md).",
    )
    g.add_argument(
        "--vocab-size", type=int, default=4096, help="BPE vocabulary size for the text around numbers."
    )
    g.add_argument(
        "--normalizer",
        choices=("affine", "signlog"),
        default="affine",
        help="Per-field map into [-clip, clip]: affine z-score, or sign-log for wide dynamic range.",
    )
    g.add_argument(
        "--global-normalizer", action="store_true", help="One map for all numbers instead of one per field."
    )
    g.add_argument(
        "--min-field-count",
        type=int,
        default=20,
        help="Fields seen fewer times in training share the global map.",
    )
    g.add_argument(
        "--clip", type=float, default=5.0, help="Normalised values are clipped (and counted) to +-this."
    )
    g.add_argument(
        "--spread",
        type=_positive_float,
        default=1.0,
        help="Standard deviation of the normalised training values (1: z-scores; smaller keeps "
        "xVal's embedding in its linear range).",
    )
    g.add_argument(
        "--vocab-from",
        metavar="SHARDS",
        help="Reuse the tokenizer and normaliser of this shard set (evaluation data for a trained model).",
    )
    add_shard_output_arguments(
        parser.add_argument_group("output"),
        split_default="train=0.9,valid=0.05,test=0.05",
        split_help="Split fractions by key hash.",
        samples_per_shard=1000,
        seed_help="Salts the split hash and the normaliser's sampling.",
    )
    add_workers_argument(parser)


def _options(args: argparse.Namespace, **overrides):
    from encoders.xval.prepare import PrepareOptions

    values = dict(
        text_field=getattr(args, "text_field", "text"),
        whole_record=getattr(args, "whole_record", False),
        key_field=getattr(args, "key_field", None),
        split_field=getattr(args, "split_field", None),
        thousands=args.thousands,
        vocab_size=args.vocab_size,
        normalizer=args.normalizer,
        per_field=not args.global_normalizer,
        min_field_count=args.min_field_count,
        clip=args.clip,
        spread=args.spread,
        split_fractions=args.split_fractions,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        vocab_from=args.vocab_from,
        overwrite=args.overwrite,
        allow_degenerate=getattr(args, "allow_degenerate", False),
        skip_invalid=getattr(args, "skip_invalid", False),
        workers=getattr(args, "workers", 1),
        part=getattr(args, "part", None),
    )
    values.update(overrides)
    return PrepareOptions(**values)


def _summary(manifest) -> str:
    splits = ", ".join(f"{name} {info.samples}" for name, info in sorted(manifest.splits.items()))
    norm = manifest.stats["normalizer"]
    as_text = manifest.provenance.get("numbers_left_as_text") or 0
    note = f"; {as_text} number-like spelling(s) (nan/inf, |x| > 1e100) left as text" if as_text else ""
    return (
        f"wrote {manifest.path}: {splits} samples; "
        f"text vocabulary {manifest.extra['xval']['text_vocab_size']}; {len(norm['fields'])} normaliser "
        f"field(s); {manifest.stats['clipped_train_values']} training value(s) clipped{note}"
    )


# ----------------------------------------------------------------------------- prepare


def _add_prepare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="JSONL (.jsonl) or text (.txt, one record per line) files."
    )
    parser.add_argument("--out", required=True, help="Shard set directory to write.")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text).")
    parser.add_argument(
        "--whole-record",
        action="store_true",
        help="Use each JSONL object itself, as compact JSON, as the text.",
    )
    parser.add_argument(
        "--key-field", help="JSONL field with a unique record id (default: file name + line)."
    )
    parser.add_argument(
        "--split-field", help="JSONL field naming each record's split (default: hash of the key)."
    )
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="Leave out records that contain the reserved marker [NUM] instead of failing.",
    )
    _add_prepare_options(parser)
    add_part_argument(parser)


def _run_prepare(args: argparse.Namespace) -> int:
    from encoders.xval.prepare import prepare
    from foundation.data.summary import format_field_summary

    manifest = prepare(args.inputs, args.out, _options(args))
    print(format_field_summary(manifest))
    print(_summary(manifest))
    return 0


# ----------------------------------------------------------------------------- synth


def _add_synth(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="Directory: <task>.jsonl and shards/ are written there.")
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument(
        "--samples",
        type=int,
        default=10000,
        help="Records (interpolation: gapped train+valid records; the test grid comes on top).",
    )
    parser.add_argument(
        "--train-values",
        type=lambda s: [float(v) for v in s.split(",")],
        default=None,
        help="interpolation: the few values the target takes in training (default 0.2,0.3,0.5,0.8).",
    )
    parser.add_argument("--grid", type=int, default=21, help="interpolation: test grid points.")
    parser.add_argument(
        "--per-grid", type=int, default=10, help="interpolation: test records per grid point."
    )
    parser.add_argument("--no-prepare", action="store_true", help="Only write the JSONL file.")
    _add_prepare_options(parser)
    parser.set_defaults(vocab_size=512)


def _run_synth(args: argparse.Namespace) -> int:
    from encoders.xval.prepare import prepare
    from encoders.xval.synth import record_fields, write_corpus
    from foundation.data.summary import format_field_summary

    out = Path(args.out)
    kwargs = {}
    if args.task == "interpolation":
        kwargs = {"grid": args.grid, "per_grid": args.per_grid}
        if args.train_values:
            kwargs["train_values"] = args.train_values
    source = out / f"{args.task}.jsonl"
    n = write_corpus(args.task, args.samples, args.seed, source, overwrite=args.overwrite, **kwargs)
    print(f"wrote {n} records to {source}")
    if args.no_prepare:
        return 0
    manifest = prepare([source], out / "shards", _options(args, **record_fields(args.task)))
    print(format_field_summary(manifest))
    print(_summary(manifest))
    return 0


# ----------------------------------------------------------------------------- evaluate


def _add_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="Run directory, step-N checkpoint folder or model.pt."
    )
    parser.add_argument(
        "--data", required=True, help="xVal shard set (same tokenizer/normaliser as training)."
    )
    parser.add_argument("--out", required=True, help="Directory for report.json, predictions.csv and plots.")
    parser.add_argument("--split", default="test", help="Split to evaluate (default: test).")
    parser.add_argument("--fields", help="Comma-separated fields to evaluate (default: every field).")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-batches", type=int, default=None, help="Stop after this many batches.")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda.")


def _run_evaluate(args: argparse.Namespace) -> int:
    from encoders.xval.evaluate import evaluate

    fields = [f.strip() for f in args.fields.split(",") if f.strip()] if args.fields else None
    report = evaluate(
        args.checkpoint,
        args.data,
        args.out,
        split=args.split,
        fields=fields,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        device=args.device,
    )
    overall = report["overall"]
    print(
        f"{report['n_numbers']} numbers in {report['n_samples']} samples: MSE {overall['mse']:.4g}, "
        f"unparseable {100 * overall['unparseable_fraction']:.2f}% -> {Path(args.out) / 'report.json'}"
    )
    for name, entry in report["fields"].items():
        print(f"  {name}: n {entry['n']}, MSE {entry['mse']:.4g}, R² {entry['r2']:.4f}")
    return 0


# ----------------------------------------------------------------------------- evaluate xval-tasks

TASKS_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "xval" / "tasks.yaml"


def _add_tasks(parser: argparse.ArgumentParser) -> None:
    from encoders.xval.encodings import ENCODINGS
    from encoders.xval.tasks import TASKS as PAPER_TASKS

    parser.add_argument("--task", choices=tuple(PAPER_TASKS), required=True)
    parser.add_argument(
        "--out", required=True, help="Work folder: data/, runs/, eval-*/ and the table and figure."
    )
    parser.add_argument("--tables", help="Also write the table and figure here (default: only into --out).")
    parser.add_argument(
        "--encodings", default=",".join(ENCODINGS), help="Comma-separated encodings (default: all five)."
    )
    parser.add_argument("--samples", type=int, default=6000, help="Training + validation records.")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="Training steps, the same for every encoding (default: the task's own).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Data and training seed.")
    parser.add_argument(
        "--config", default=str(TASKS_CONFIG), help="Training config (default: configs/xval/tasks.yaml)."
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="Config override for every training."
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda.")


def _synth_task(task: str, samples: int, seed: int, out: Path) -> tuple[Path, Path]:
    """(corpus JSONL, shards) of a task, written once and reused by a rerun."""
    from encoders.xval.prepare import PrepareOptions, prepare
    from encoders.xval.synth import record_fields, write_corpus

    source, shards = out / f"{task}.jsonl", out / "shards"
    if not source.exists():
        write_corpus(task, samples, seed, source)
    if not (shards / "manifest.json").exists():
        prepare(
            [source], shards, PrepareOptions(vocab_size=512, seed=seed, progress=False, **record_fields(task))
        )
    return source, shards


def _train_and_predict(args: argparse.Namespace, task, shards: Path, encoding: str, out: Path) -> Path:
    """Train (or finish training) one encoding's model and evaluate it; its predictions.csv."""
    from encoders.xval.evaluate import evaluate
    from foundation.config import load_pretrain_config
    from foundation.train import train

    run = out / "runs" / encoding
    overrides = [
        f"data.path={shards}",
        f"run.dir={run}",
        f"model.encoding={encoding}",
        f"model.max_len={task.max_len}",
        f"train.steps={args.steps}",
        f"run.seed={args.seed}",
        *task.settings,
        *args.set,
    ]
    train(load_pretrain_config(args.config, overrides))
    evaluated = out / f"eval-{encoding}"
    evaluate(run, shards, evaluated, fields=list(task.fields), device=args.device)
    return evaluated / "predictions.csv"


def _run_tasks(args: argparse.Namespace) -> int:
    from encoders.xval.encodings import ENCODINGS
    from encoders.xval.tasks import build_table, get_task, plot_task, read_predictions, read_records
    from foundation.config import config_hash, read_yaml
    from foundation.errors import ConfigError
    from foundation.results import write_table

    task = get_task(args.task)
    if args.steps is None:
        args.steps = task.steps
    encodings = [e.strip() for e in args.encodings.split(",") if e.strip()]
    unknown = [e for e in encodings if e not in ENCODINGS]
    if unknown or not encodings:
        raise ConfigError(
            f"--encodings: unknown {unknown or 'none given'}; choose from {', '.join(ENCODINGS)}"
        )
    out = Path(args.out)
    source, shards = _synth_task(task.name, args.samples, args.seed, out / "data")
    results = {}
    for encoding in encodings:
        results[encoding] = read_predictions(_train_and_predict(args, task, shards, encoding, out))
        log.info("%s: %s trained and evaluated", task.name, encoding)
    figure = f"xval-{task.name}.png"
    provenance = {
        "command": _command_line(args),
        "config_hash": config_hash(
            {"config": read_yaml(args.config), "set": [*task.settings, *args.set], "steps": args.steps}
        ),
        "data": f"synth xval --task {task.name} --samples {args.samples} --seed {args.seed}",
    }
    settings = ", ".join(task.settings)
    notes = [
        f"Every encoding: {args.steps} steps of configs/xval/tasks.yaml"
        + (f" with {settings}" if settings else "")
        + " (same model, data and budget)."
    ]
    table = build_table(
        task, results, read_records(source), notes=notes, figures=[figure], provenance=provenance
    )
    for folder in {out, Path(args.tables or out)}:
        plot_task(folder / figure, task, results)
        path = write_table(folder, table)
        print(f"wrote {path}")
    _print_table(table)
    return 0


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces the table, with every option that shapes it spelled out."""
    import shlex

    words = ["foundation", "evaluate", "xval-tasks", "--task", args.task, "--out", args.out]
    words += ["--encodings", args.encodings, "--samples", str(args.samples), "--steps", str(args.steps)]
    words += ["--seed", str(args.seed)]
    if Path(args.config).resolve() != TASKS_CONFIG:
        words += ["--config", args.config]
    for item in args.set:
        words += ["--set", item]
    return shlex.join(words)


def _print_table(table) -> None:
    from pipelines.evaluate_common import markdown_table

    rows = [[row.label, *(_format(v) for v in row.values)] for row in table.rows]
    print(f"{table.title} ({table.metric})")
    print(markdown_table(["encoding", *table.columns], rows))


def _format(value) -> str:
    return "—" if value is None or (isinstance(value, float) and value != value) else f"{value:.5g}"


COMMANDS = [
    Command(
        ("prepare", "xval"), "Convert JSONL / text with numbers into xVal shards.", _add_prepare, _run_prepare
    ),
    Command(
        ("synth", "xval"),
        "Write a built-in xVal corpus (arithmetic, orbits, interpolation) and its shards.",
        _add_synth,
        _run_synth,
    ),
    Command(
        ("evaluate", "xval"),
        "Per-field number prediction metrics of an xVal checkpoint.",
        _add_evaluate,
        _run_evaluate,
    ),
    Command(
        ("evaluate", "xval-tasks"),
        "Run one of the xVal paper's tasks for every number encoding and write its result table.",
        _add_tasks,
        _run_tasks,
    ),
]
