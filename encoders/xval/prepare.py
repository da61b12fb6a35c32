"""Native text -> xVal shards: read JSONL / plain text, fit the tokenizer and the normaliser on
the training split, write the shard set.

Records: a `.jsonl` file holds one JSON object per line, whose `text_field` (default `text`) is
the text (or, with `whole_record`, the record itself as compact JSON); a `.txt` file holds one
record per non-empty line. Keys come from `key_field` or from the file name and line number;
the split from `split_field` or from a hash of the key. Three streaming passes: statistics,
tokenizer training (train split only), writing — memory does not grow with the corpus.
With `workers` > 1, worker processes parse and tokenize chunks of records
(`foundation.data.parallel.ordered_map`) and this process fits and writes from their results in
input order, so the tokenizer, the normaliser and the shards are the same for any number of workers.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import tempfile
from collections import defaultdict, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encoders.xval.normalizer import Kind, Normalizer
from encoders.xval.numbers import MAX_MAGNITUDE, ThousandsPolicy, extract_numbers
from encoders.xval.tokenizer import TOKENIZER_FILE, TextTokenizer, check_vocab_size
from foundation.errors import DataError

log = logging.getLogger(__name__)

GRAMMAR_VERSION = 1
SCHEMA = {
    "tokens": {
        "kind": "npy",
        "dtype": "int32",
        "shape": [None],
        "description": "text-token ids (tokenizer.json), [NUM] (id 3) where each number stands",
    },
    "values": {
        "kind": "npy",
        "dtype": "float64",
        "shape": [None],
        "description": "the numbers, raw, in order",
    },
    "fields": {
        "kind": "npy",
        "dtype": "int16",
        "shape": [None],
        "description": "field id of each number (index into stats.normalizer.fields)",
    },
    "text": {"kind": "str", "description": "the source text (render_numbers of the above)"},
}
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]")
_RESERVOIR = 200_000
#: Records per unit of work handed to a worker process.
CHUNK_RECORDS = 256


@dataclass
class PrepareOptions:
    text_field: str = "text"
    whole_record: bool = False
    key_field: str | None = None
    split_field: str | None = None
    thousands: ThousandsPolicy = "auto"
    vocab_size: int = 4096
    normalizer: Kind = "affine"
    per_field: bool = True
    min_field_count: int = 20
    clip: float = 5.0
    spread: float = 1.0
    split_fractions: dict[str, float] = field(
        default_factory=lambda: {"train": 0.9, "valid": 0.05, "test": 0.05}
    )
    samples_per_shard: int = 1000
    seed: int = 0
    vocab_from: str | None = None
    overwrite: bool = False
    allow_degenerate: bool = False
    skip_invalid: bool = False
    progress: bool | None = None
    workers: int = 1
    part: tuple[int, int] | None = None  # (I, N): only part I of N of the input files


@dataclass
class Record:
    key: str
    split: str | None
    text: str
    where: str


def _key_stem(path: Path) -> str:
    return _KEY_BAD.sub("_", path.name.split(".")[0]) or "record"


def read_records(paths: Sequence[str | Path], opts: PrepareOptions) -> Iterator[Record]:
    """Records of JSONL / text files, with clear errors naming file and line."""
    for path in map(Path, paths):
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "does not exist"
            raise DataError(f"input file {str(path)!r} {what}")
        suffix = "".join(path.suffixes[-1:]).lower()
        if suffix not in (".jsonl", ".ndjson", ".txt"):
            raise DataError(
                f"{path}: unsupported input type {suffix!r}; give JSON Lines (.jsonl: one JSON object per "
                "line) or plain text (.txt: one record per line)"
            )
        stem = _key_stem(path)
        with path.open(encoding="utf-8", newline="") as handle:
            for lineno, line in enumerate(_lines(handle, path), start=1):
                where = f"{path}:{lineno}"
                if suffix == ".txt":
                    text = line[:-1] if line.endswith("\n") else line
                    if text.endswith("\r"):
                        text = text[:-1]
                    if text.strip():
                        yield Record(f"{stem}-{lineno:09d}", None, text, where)
                    continue
                if not line.strip():
                    continue
                yield _json_record(line, where, f"{stem}-{lineno:09d}", opts)


def _lines(handle, path: Path) -> Iterator[str]:
    try:
        yield from handle
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc}); convert the file to UTF-8") from None


def _json_record(line: str, where: str, default_key: str, opts: PrepareOptions) -> Record:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: a JSONL record must be an object, got {type(record).__name__}")
    if opts.whole_record:
        body = {k: v for k, v in record.items() if k not in (opts.key_field, opts.split_field)}
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    else:
        if opts.text_field not in record:
            raise DataError(
                f"{where}: no field {opts.text_field!r} (fields: {', '.join(map(str, record)) or 'none'}); "
                "choose one with --text-field, or use --whole-record to read the whole object as text"
            )
        text = record[opts.text_field]
        if not isinstance(text, str):
            raise DataError(
                f"{where}: field {opts.text_field!r} is a {type(text).__name__}, not a string "
                "(use --whole-record to read structured records as compact JSON text)"
            )
    key = default_key
    if opts.key_field is not None:
        if opts.key_field not in record:
            raise DataError(f"{where}: no key field {opts.key_field!r}")
        key = _KEY_BAD.sub("_", str(record[opts.key_field]))
    split = None
    if opts.split_field is not None:
        if opts.split_field not in record:
            raise DataError(f"{where}: no split field {opts.split_field!r}")
        split = str(record[opts.split_field])
    return Record(key, split, text, where)


def _parse(record: Record, opts: PrepareOptions):
    try:
        return extract_numbers(record.text, thousands=opts.thousands)
    except DataError as exc:
        if opts.skip_invalid:
            return None
        raise DataError(f"{record.where}: {exc} (or pass --skip-invalid to leave such records out)") from None


@dataclass
class _Encoded:
    """A record as it is written: token ids, numbers, their field ids, and counts for the stats."""

    tokens: np.ndarray
    values: np.ndarray
    field_ids: np.ndarray
    numbers: int
    not_numbers: int
    clipped: int


@dataclass
class _Encoder:
    """What a worker needs to encode records (the tokenizer and normaliser once they are fitted)."""

    opts: PrepareOptions
    tokenizer: TextTokenizer | None = None
    normalizer: Normalizer | None = None


def _chunks(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _parse_chunk(encoder: _Encoder, records: list[Record]) -> list[Any]:
    """The parsed text of each record, None for those left out (runs in a worker)."""
    return [_parse(record, encoder.opts) for record in records]


def _encode_chunk(encoder: _Encoder, records: list[Record]) -> list[_Encoded | None]:
    """Each record tokenized with its numbers' field ids, None for those left out (runs in a worker)."""
    out: list[_Encoded | None] = []
    for record in records:
        parsed = _parse(record, encoder.opts)
        if parsed is None:
            out.append(None)
            continue
        field_ids = encoder.normalizer.field_ids(parsed.fields)
        clipped = encoder.normalizer.transform(parsed.values, field_ids)[1]
        tokens = encoder.tokenizer.encode_parsed(parsed)
        out.append(_Encoded(tokens, parsed.values, field_ids, len(parsed), parsed.not_numbers, clipped))
    return out


def _parsed_records(
    paths: Sequence[str | Path], opts: PrepareOptions, desc: str | None = None
) -> Iterator[tuple[Record, Any]]:
    """(record, parsed text or None) for every record, in input order, parsed by the workers."""
    records = read_records(paths, opts)
    if desc is not None:
        records = _progress(records, opts, desc)
    yield from _in_order(records, _parse_chunk, _Encoder(opts), opts.workers)


def _in_order(
    records: Iterator[Record], fn: Any, encoder: _Encoder, workers: int
) -> Iterator[tuple[Record, Any]]:
    """(record, fn's result for it), in input order, fn running on chunks in `workers` processes."""
    from foundation.data.parallel import ordered_map

    chunks = _chunks(records, CHUNK_RECORDS)
    pending: deque[list[Record]] = deque()

    def remembered() -> Iterator[list[Record]]:
        for chunk in chunks:
            pending.append(chunk)
            yield chunk

    for results in ordered_map(fn, remembered(), workers, context=encoder):
        yield from zip(pending.popleft(), results, strict=True)


class _Reservoir:
    """A deterministic uniform sample of up to `size` values per field (for the normaliser fit)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.rng = np.random.default_rng([seed, 7])
        self.values: dict[str, list[float]] = defaultdict(list)
        self.seen: dict[str, int] = defaultdict(int)

    def add(self, name: str, value: float) -> None:
        self.seen[name] += 1
        bucket = self.values[name]
        if len(bucket) < self.size:
            bucket.append(value)
        else:
            j = int(self.rng.integers(0, self.seen[name]))
            if j < self.size:
                bucket[j] = value

    def arrays(self) -> tuple[np.ndarray, list[str]]:
        names = [name for name, bucket in self.values.items() for _ in bucket]
        values = np.asarray([v for bucket in self.values.values() for v in bucket], dtype=np.float64)
        return values, names


def _progress(iterable, opts: PrepareOptions, desc: str):
    from tqdm import tqdm

    enabled = sys.stderr.isatty() if opts.progress is None else opts.progress
    return tqdm(iterable, desc=desc, unit=" records", disable=not enabled)


def prepare(paths: Sequence[str | Path], out: str | Path, opts: PrepareOptions | None = None) -> Any:
    """Write the xVal shard set for `paths` into `out`; returns its Manifest."""
    from foundation.data import ShardSetWriter, split_for_key
    from foundation.data.remote import load_manifest

    opts = opts or PrepareOptions()
    part_record = None
    if opts.part is not None:
        from foundation.data.merge import files_of_part, part_provenance

        paths = files_of_part(list(paths), *opts.part, path=lambda p: Path(p).resolve())
        part_record = part_provenance(*opts.part, len(paths))
    if not opts.vocab_from:
        check_vocab_size(opts.vocab_size)  # before two passes over the data, not after
    fractions = dict(opts.split_fractions)

    def split_of(record: Record) -> str:
        if record.split is not None:
            return record.split
        return split_for_key(record.key, fractions, str(opts.seed))

    # Pass 1: normaliser statistics and lengths on the training split.
    reused = load_manifest(opts.vocab_from) if opts.vocab_from else None
    reservoir = _Reservoir(_RESERVOIR, opts.seed)
    train_records = skipped = 0
    for record, parsed in _parsed_records(paths, opts, "scanning"):
        if parsed is None:
            skipped += 1
            continue
        if split_of(record) != "train":
            continue
        train_records += 1
        for name, value in zip(parsed.fields, parsed.values.tolist(), strict=True):
            reservoir.add(name, value)
    if reused is not None:
        from encoders.xval.family import normalizer_from, tokenizer_from

        normalizer = normalizer_from(reused)
        tokenizer = tokenizer_from(reused)
    else:
        if train_records == 0:
            raise DataError(
                "no record fell into the training split; the tokenizer and normaliser are fitted on it "
                "(check the split fractions / split field, or reuse them with --vocab-from SHARDS)"
            )
        values, names = reservoir.arrays()
        normalizer = Normalizer.fit(
            values,
            names,
            kind=opts.normalizer,
            per_field=opts.per_field,
            min_count=opts.min_field_count,
            clip=opts.clip,
            spread=opts.spread,
        )

        # Pass 2: the tokenizer, on the training split's text around numbers.
        def train_templates() -> Iterator[str]:
            for record, parsed in _parsed_records(paths, opts):
                if parsed is not None and split_of(record) == "train":
                    yield parsed.template

        tokenizer = TextTokenizer.train(train_templates(), vocab_size=opts.vocab_size)

    # Pass 3: write.
    lengths = {"text_tokens": 0.0, "numbers": 0.0, "max_tokens": 0, "records": 0}
    clipped = left_as_text = 0
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Path(tmp) / TOKENIZER_FILE
        tokenizer.save(tok_path)
        writer = ShardSetWriter(
            out,
            fractions,
            samples_per_shard=opts.samples_per_shard,
            family="xval",
            schema=SCHEMA,
            files={TOKENIZER_FILE: tok_path},
            provenance={"sources": [str(p) for p in paths], "skipped_invalid": 0},
            seed=opts.seed,
            split_salt=str(opts.seed),
            overwrite=opts.overwrite,
            allow_degenerate=opts.allow_degenerate,
        )
        with writer:
            records = _progress(read_records(paths, opts), opts, "writing")
            encoder = _Encoder(opts, tokenizer, normalizer)
            for record, encoded in _in_order(records, _encode_chunk, encoder, opts.workers):
                if encoded is None:
                    continue
                left_as_text += encoded.not_numbers
                split = writer.write(
                    {
                        "__key__": record.key,
                        "tokens": encoded.tokens,
                        "values": encoded.values,
                        "fields": encoded.field_ids,
                        "text": record.text,
                    },
                    split=record.split,
                    source=record.where.rsplit(":", 1)[0],
                )
                if split == "train":
                    lengths["records"] += 1
                    lengths["text_tokens"] += len(encoded.tokens) - encoded.numbers
                    lengths["numbers"] += encoded.numbers
                    lengths["max_tokens"] = max(lengths["max_tokens"], len(encoded.tokens))
                    clipped += encoded.clipped
            n = max(lengths["records"], 1)
            writer.stats["normalizer"] = normalizer.to_dict()
            writer.stats["lengths"] = {
                "text_tokens": lengths["text_tokens"] / n,
                "numbers": lengths["numbers"] / n,
                "max_tokens_xval": lengths["max_tokens"],
                "train_records": lengths["records"],
            }
            writer.stats["clipped_train_values"] = clipped
            writer.extra["xval"] = {
                "text_vocab_size": tokenizer.vocab_size,
                "grammar_version": GRAMMAR_VERSION,
                "thousands": opts.thousands,
                "text_field": None if opts.whole_record else opts.text_field,
                "tokenizer_from": str(opts.vocab_from) if opts.vocab_from else None,
            }
            writer.provenance["skipped_invalid"] = skipped
            writer.provenance["numbers_left_as_text"] = left_as_text
            if part_record is not None:
                writer.provenance["part"] = part_record
    if left_as_text:
        log.warning(
            "%d number-like spelling(s) were left as text, not numbers: nan/inf, or beyond +-%g "
            "(docs/xval.md)",
            left_as_text,
            MAX_MAGNITUDE,
        )
    if skipped:
        log.warning("left out %d record(s) that contain the reserved marker [NUM]", skipped)
    return load_manifest(out)


def merge_stats(parts: Sequence[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`shards merge` of xVal parts: the normaliser, tokenizer and `extra.xval` must be the same
    in every part (fitted once, then reused with --vocab-from); the training lengths and clip
    counts combine exactly."""
    from foundation.data.merge import NOT_COMBINABLE, refuse_difference

    why = (
        "the xVal normaliser is fitted on each part's own training split, so parts prepared "
        "separately differ; fit it once and prepare every part with --vocab-from SHARDS"
    )
    refuse_difference(parts, lambda m: m.stats.get("normalizer"), "stats.normalizer", why)
    refuse_difference(parts, lambda m: m.extra, "extra", why)
    combined = ("lengths", "clipped_train_values")
    refuse_difference(
        parts, lambda m: {k: v for k, v in m.stats.items() if k not in combined}, "stats", NOT_COMBINABLE
    )
    stats = dict(parts[0].manifest.stats)
    lengths = [p.manifest.stats.get("lengths") for p in parts]
    if all(isinstance(x, Mapping) for x in lengths):
        stats["lengths"] = _merge_lengths(lengths)
    clipped = [p.manifest.stats.get("clipped_train_values") for p in parts]
    if all(isinstance(x, int) for x in clipped):
        stats["clipped_train_values"] = sum(clipped)
    return stats, dict(parts[0].manifest.extra)


def _merge_lengths(lengths: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-record means weighted by each part's training records; the maximum of the maxima."""
    records = [int(x.get("train_records", 0)) for x in lengths]
    n = max(sum(records), 1)  # as prepare divides
    weighted = [(x, max(r, 1)) for x, r in zip(lengths, records, strict=True)]
    return {
        "text_tokens": sum(x["text_tokens"] * r for x, r in weighted) / n,
        "numbers": sum(x["numbers"] * r for x, r in weighted) / n,
        "max_tokens_xval": max(x["max_tokens_xval"] for x in lengths),
        "train_records": sum(records),
    }
