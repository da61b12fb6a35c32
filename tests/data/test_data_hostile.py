"""Hostile shards: hand-built tars and `.npy` members that once looped forever, ate memory or
crashed with a traceback. Every reader (tar walk, shard reader, loader, `shards verify`,
`shards index`) must answer with a DataError naming the shard (and, for the tar structure, the
byte offset) — in bounded time and memory. The readers run in a child process (this file run as
a script) with an address-space limit and a timeout, so a regression fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import yaml

from foundation.data import Manifest, ShardWriter, codec, tario
from foundation.errors import DataError
from tests.testkit import child_env
from tests.testkit.configs import config_dict
from tests.testkit.shards import write_toy_shards

SHARD = "train-000000.tar"
HEADROOM = 1 << 30
"""Address space a child may add after its imports: the hostile files are a few KiB."""

# ---------------------------------------------------------------------------- tar by hand


def block(
    name: bytes = b"",
    size: int = 0,
    typeflag: bytes = b"0",
    *,
    size_field: bytes | None = None,
    checksum: int | None = None,
) -> bytes:
    """One ustar header block; `size_field` (12 bytes) and `checksum` override the honest ones."""
    size_field = b"%011o\0" % size if size_field is None else size_field
    assert len(size_field) == 12
    head = b"".join(
        (
            name.ljust(100, b"\0"),
            b"0000644\0",
            b"0000000\0",
            b"0000000\0",
            size_field,
            b"00000000000\0",
            b" " * 8,
            typeflag,
            b"\0" * 100,
            b"ustar\x0000",
        )
    ).ljust(tario.BLOCK, b"\0")
    checksum = sum(head) if checksum is None else checksum
    return head[:148] + b"%06o\0 " % checksum + head[156:]


def member(name: bytes, data: bytes, typeflag: bytes = b"0", **kwargs) -> bytes:
    return block(name, len(data), typeflag, **kwargs) + data + tario.padding(len(data))


def pax(records: bytes) -> bytes:
    return member(b"././@PaxHeader", records, b"x")


def pax_record(key: bytes, value: bytes) -> bytes:
    """`<length> <key>=<value>\\n`, the length counting its own digits."""
    body = b" %s=%s\n" % (key, value)
    length = len(body) + 1
    while len(b"%d" % length) + len(body) != length:
        length += 1
    return b"%d%s" % (length, body)


def npy(header: str, data: bytes = b"", version: int = 1) -> bytes:
    """A `.npy` member with a literal header text (padded as numpy pads it)."""
    text = header.encode("latin1")
    prefix = 10 if version == 1 else 12
    text += b" " * (-(prefix + len(text) + 1) % 64) + b"\n"
    length = len(text).to_bytes(2 if version == 1 else 4, "little")
    return codec.NPY_MAGIC + bytes([version, 0]) + length + text + data


def npy_dict(descr: str = "'<f4'", fortran: str = "False", shape: str = "(3,)") -> str:
    return f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, }}"


GOOD_X = npy(npy_dict(), np.arange(3, dtype="<f4").tobytes())
END = b"\0" * (2 * tario.BLOCK)


def sample(key: bytes, x: bytes = GOOD_X) -> bytes:
    return member(key + b".x.npy", x) + member(key + b".y.json", b"7")


TAR_STRUCTURE = r"train-000000\.tar: tar header at byte \d+"
OPEN_ONLY = {"scan", "reader"}  # readers that open a shard without decoding its members


def tar_cases() -> dict[str, tuple[bytes, str, set[str]]]:
    """name -> (shard bytes, regex every failing reader's message matches, readers that succeed)."""
    good = sample(b"k0")
    cases = {
        # a PAX size of minus the offset once sent the walk back to byte 0, forever, lists growing
        "pax-negative-size": (
            pax(pax_record(b"size", b"-1536")) + good + END,
            TAR_STRUCTURE + r": PAX size",
            set(),
        ),
        "octal-negative-size": (
            block(b"k0.x.npy", size_field=b"-0000001000\0") + GOOD_X + END,
            TAR_STRUCTURE + ": malformed size",
            set(),
        ),
        "base256-negative-size": (
            block(b"k0.x.npy", size_field=b"\xff" * 11 + b"\x00") + END,
            TAR_STRUCTURE + ": .*negative",
            set(),
        ),
        "base256-huge-size": (
            block(b"k0.x.npy", size_field=b"\x80" + b"\x7f" * 11) + END,
            TAR_STRUCTURE + ": the member needs",
            set(),
        ),
        "size-past-eof": (
            block(b"k0.x.npy", 1 << 30) + GOOD_X + END,
            TAR_STRUCTURE + ": the member needs",
            set(),
        ),
        "pax-size-past-eof": (
            pax(pax_record(b"size", b"1073741824")) + good + END,
            TAR_STRUCTURE + ": .*needs 1073741824",
            set(),
        ),
        "pax-size-not-a-number": (
            pax(pax_record(b"size", b"0x10")) + good + END,
            TAR_STRUCTURE + ": PAX size",
            set(),
        ),
        "pax-record-overruns": (
            pax(b"99999999 path=x\n") + good + END,
            TAR_STRUCTURE + ": malformed PAX",
            set(),
        ),
        "pax-record-length-zero": (pax(b"0 path=x\n") + good + END, TAR_STRUCTURE + ": malformed PAX", set()),
        "pax-record-negative-length": (
            pax(b"-9 path=x\n") + good + END,
            TAR_STRUCTURE + ": malformed PAX",
            set(),
        ),
        "pax-header-huge": (
            pax(b"%d comment=" % (2 << 20) + b"a" * ((2 << 20) - 20) + b"\n") + good + END,
            TAR_STRUCTURE + ": an extended tar header of",
            set(),
        ),
        "gnu-long-name-huge": (
            member(b"././@LongLink", b"a" * (2 << 20), b"L") + good + END,
            TAR_STRUCTURE + ": an extended tar header of",
            set(),
        ),
        "gnu-long-name-past-eof": (block(b"././@LongLink", 1 << 32, b"L") + good + END, TAR_STRUCTURE, set()),
        "truncated-header": (
            (good + END)[: len(good) + 300],
            r"train-000000\.tar: truncated tar .* byte \d+",
            set(),
        ),
        "truncated-member": (good[:600], TAR_STRUCTURE + ": the member needs", set()),
        "checksum-mismatch": (
            member(b"k0.x.npy", GOOD_X, checksum=1234) + member(b"k0.y.json", b"7") + END,
            r"train-000000\.tar: tar header .*byte 0.* fails its checksum",
            set(),
        ),
        "damaged-size-field": (
            (lambda b: b[:124] + b"77777777777\0" + b[136:])(block(b"k0.x.npy", len(GOOD_X)))
            + GOOD_X
            + tario.padding(len(GOOD_X))
            + END,
            r"train-000000\.tar: tar header at byte 0 fails its checksum",
            set(),
        ),
        "empty-file": (
            b"",
            r"train-000000\.tar.*(is empty|ends inside a header at byte 0|file's 0 bytes)",
            set(),
        ),
        "only-end-marker": (END, r"train-000000\.tar.*(0 samples|no members)", {"scan", "reader"}),
        # keys the docs forbid, and a key that comes back: the tar is fine, the shard is not
        "key-dotdot": (
            sample(b"../evil") + END,
            r"train-000000\.tar.*key '\.\./evil'|train-000000\.tar.*'\.'",
            {"scan"},
        ),
        "key-absolute": (sample(b"/abs") + END, r"train-000000\.tar.*key '/abs'", {"scan"}),
        "key-whitespace": (sample(b"a b") + END, r"train-000000\.tar.*key 'a b'", {"scan"}),
        "key-bidi-override": (  # U+202E makes a key display as another
            sample("a\u202eb".encode()) + END,
            r"train-000000\.tar.*key 'a\\u202eb'",
            {"scan"},
        ),
        "key-empty": (
            sample(b"") + END,
            r"train-000000\.tar: sample key must be a non-empty string",
            {"scan"},
        ),
        "key-twice": (
            sample(b"k0") + sample(b"k1") + sample(b"k0") + END,
            r"train-000000\.tar.*'k0' appears twice",
            {"scan"},
        ),
        "field-twice": (
            sample(b"k0") + member(b"k0.y.json", b"8") + END,
            r"train-000000\.tar.*field 'y' twice",
            {"scan"},
        ),
    }
    npy_cases = {
        "npy-dim-beyond-int64": npy_dict(shape="(18446744073709551616,)"),
        "npy-negative-dim": npy_dict(shape="(-3,)"),
        "npy-huge-product": npy_dict(shape="(1099511627776, 1099511627776)"),
        "npy-zero-size-huge-dims": npy_dict(shape="(0, 4611686018427387904, 4)"),
        "npy-payload-mismatch": npy_dict(shape="(1000,)"),
        "npy-object-dtype": npy_dict(descr="'|O'"),
        "npy-structured-dtype": npy_dict(descr="[('a', '<f4')]"),
        "npy-bool-dims": npy_dict(shape="(True, 3)"),
        "npy-fortran-not-bool": npy_dict(fortran="'yes'"),
        "npy-too-many-dims": npy_dict(shape="(" + "1, " * 65 + ")"),
        "npy-nested-literal": npy_dict(shape="(" * 500 + ")" * 500),
        "npy-unhashable-key": "{[1]: 2}",
    }
    data = np.arange(3, dtype="<f4").tobytes()
    for name, header in npy_cases.items():
        cases[name] = (
            sample(b"k0", npy(header, data)) + END,
            r"train-000000\.tar.*'k0\.x\.npy'|train-000000\.tar sample 'k0' field 'x'",
            OPEN_ONLY,
        )
    huge_header = codec.NPY_MAGIC + b"\x02\x00" + (1 << 31).to_bytes(4, "little") + b"{" * 600
    cases["npy-header-length-huge"] = (
        sample(b"k0", huge_header) + END,
        r"train-000000\.tar.*header of 2147483648 bytes",
        OPEN_ONLY,
    )
    cases["npy-bad-magic"] = (
        sample(b"k0", b"\x93NUMPX" + GOOD_X[6:]) + END,
        r"train-000000\.tar.*bad magic",
        OPEN_ONLY,
    )
    cases["json-nested-deep"] = (
        member(b"k0.x.npy", GOOD_X) + member(b"k0.y.json", b"[" * 100000) + END,
        r"train-000000\.tar.*(field 'y'|'k0\.y\.json').*cannot decode",
        OPEN_ONLY,
    )
    return cases


# ---------------------------------------------------------------------------- shard sets


def template_set(directory: Path) -> Path:
    """A valid one-shard set (x: float32 [3], y: int64) whose manifest the cases reuse."""
    with ShardWriter(directory, split="train", samples_per_shard=4) as writer:
        writer.write({"__key__": "k0", "x": np.arange(3, dtype=np.float32), "y": 7})
    return directory


def shard_set(directory: Path, template: Path, shard: bytes) -> Path:
    """`shard` as the only shard of a set whose manifest records its true size and sha256."""
    import hashlib

    directory.mkdir(parents=True)
    (directory / SHARD).write_bytes(shard)
    manifest = json.loads((template / "manifest.json").read_text())
    split = manifest["splits"]["train"]
    split["bytes"] = split["shards"][0]["bytes"] = len(shard)
    split["shards"][0]["sha256"] = hashlib.sha256(shard).hexdigest()
    manifest["format"]["member_crc32"] = False  # hand-built headers carry no CRC-32
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


# ---------------------------------------------------------------------------- the child


def _outcome(action) -> str:
    try:
        action()
    except DataError as exc:
        return f"DataError: {exc}"
    except BaseException:  # noqa: BLE001 (anything else is the failure being looked for)
        return "crash: " + traceback.format_exc()[-3000:]
    return "ok"


def _cli(*argv: str) -> str:
    from foundation.cli import main

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(list(argv))
    except BaseException:  # noqa: BLE001
        return "crash: " + traceback.format_exc()[-3000:]
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    if code == 0:
        return "ok"
    one_error = code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    one_problem = code == 1 and len(lines) == 2 and lines[0].startswith("problem: ")  # + "FAILED: ..."
    if one_error or one_problem:
        return "DataError: " + lines[0].split(": ", 1)[1]
    return f"crash: exit {code}: " + "\n".join(lines)[-3000:]


def _read_everything(directory: Path) -> dict[str, str]:
    """Every reader over one shard set: outcome per reader ("ok", "DataError: ...", "crash: ...")."""
    from foundation.data import ShardDataset
    from foundation.data.reader import ShardReader

    shard = directory / SHARD

    def scan():
        fd = os.open(shard, os.O_RDONLY)
        try:
            tario.scan(fd, SHARD, with_crc=True, peek=256)
        finally:
            os.close(fd)

    def reader():
        ShardReader(shard, Manifest.load(directory).schema).close()

    def loader():
        for _ in ShardDataset(directory, "train", batch_size=1, shuffle=False, drop_last=False):
            pass

    results = {"scan": _outcome(scan), "reader": _outcome(reader), "loader": _outcome(loader)}
    results["verify"] = _cli("shards", "verify", str(directory), "--all")
    (directory / "manifest.json").unlink()
    results["index"] = _cli("shards", "index", str(directory))
    return results


def _limit_memory() -> None:
    """Address space: what the imports took plus HEADROOM (a reader that grows without bound
    then fails with MemoryError instead of taking the machine)."""
    with open("/proc/self/status") as status:
        vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + HEADROOM, vm + HEADROOM))


def _child_cases(root: Path) -> None:
    import foundation.cli  # noqa: F401  (imports before the limit)
    from foundation.data import ShardDataset  # noqa: F401

    _limit_memory()
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        print(json.dumps({"case": directory.name, **_read_everything(directory)}), flush=True)


def run_child(mode: str, root: Path, timeout: float) -> tuple[list[dict], str]:
    """Run this file as a child in `mode`; its JSON lines (as many as it wrote) and its stderr."""
    env = child_env()
    try:
        proc = subprocess.run(
            [sys.executable, __file__, mode, str(root)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        out, err = proc.stdout, proc.stderr + f"\n(exit {proc.returncode})"
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = f"(killed after {timeout} s: hangs)\n" + (exc.stderr.decode() if exc.stderr else "")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


# ---------------------------------------------------------------------------- the tests

CASES = tar_cases()
READERS = ("scan", "reader", "loader", "verify", "index")


@pytest.fixture(scope="module")
def hostile_results(tmp_path_factory) -> tuple[dict[str, dict], str]:
    root = tmp_path_factory.mktemp("hostile")
    template = template_set(root / "_template" / "set")
    for name, (shard, _, _) in CASES.items():
        shard_set(root / name, template, shard)
    shutil.rmtree(root / "_template")
    lines, err = run_child("cases", root, timeout=120)
    return {line.pop("case"): line for line in lines}, err


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_reader_refuses_a_hostile_shard_in_one_line(hostile_results, case):
    results, err = hostile_results
    assert case in results, f"the child never finished this case (hung or ran out of memory):\n{err[-3000:]}"
    _, pattern, succeed = CASES[case]
    for reader in READERS:
        outcome = results[case][reader]
        if reader in succeed:
            assert outcome == "ok", f"{reader}: {outcome}"
        else:
            assert outcome.startswith("DataError: "), f"{reader}: {outcome}"
            assert re.search(pattern, outcome), f"{reader}: {outcome}"
            assert "\n" not in outcome


def _two_shards_one_key(directory: Path) -> Path:
    """Two shards of a split both holding sample "k0" (the second shard copied over the first's
    bytes, its manifest entry updated to match)."""
    import hashlib

    with ShardWriter(directory, split="train", samples_per_shard=1) as writer:
        for key in ("k0", "k1"):
            writer.write({"__key__": key, "x": np.arange(3, dtype=np.float32), "y": 7})
    raw = (directory / SHARD).read_bytes()
    (directory / "train-000001.tar").write_bytes(raw)
    manifest = json.loads((directory / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][1]
    entry["bytes"], entry["sha256"] = len(raw), hashlib.sha256(raw).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_a_key_in_two_shards_of_a_split_is_refused_by_verify_and_index(tmp_path):
    from foundation.data.index import index_shards
    from foundation.data.verify import verify_shard_set

    directory = _two_shards_one_key(tmp_path / "set")
    report = verify_shard_set(directory, all_problems=True, progress=False)
    assert report.problems == [
        "split 'train': sample key 'k0' appears in both train-000000.tar and train-000001.tar"
    ]
    (directory / "manifest.json").unlink()
    with pytest.raises(
        DataError, match="sample key 'k0' appears in both train-000000.tar and train-000001.tar"
    ):
        index_shards(directory)
    assert not (directory / "manifest.json").exists()


def test_a_manifest_claiming_more_samples_than_a_shard_can_hold_is_refused_before_planning(tmp_path):
    """The epoch plan sizes its shuffle buffers from the manifest's counts: 2**40 samples claimed
    for a 2 KiB shard would be an 8 TB permutation. (Iterating is left out: no bomb here either
    way, the refusal must come from the constructor.)"""
    from foundation.data import ShardDataset

    directory = template_set(tmp_path / "set")
    manifest = json.loads((directory / "manifest.json").read_text())
    split = manifest["splits"]["train"]
    split["samples"] = split["shards"][0]["samples"] = 1 << 40
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        DataError, match=r"shard train-000000\.tar: the manifest records 1099511627776 samples"
    ):
        ShardDataset(directory, "train", batch_size=4)


def test_gnu_long_names_long_links_and_base256_sizes_are_read():
    """The formats hostile files imitate still work when they are honest."""
    long_key = b"k" * 150
    shard = (
        member(b"././@LongLink", b"target" * 30 + b"\0", b"K")  # a long link name is skipped...
        + member(b"././@LongLink", long_key + b".x.npy\0", b"L")  # ...and does not drop the long name
        + member(b"ignored", GOOD_X)
        + member(b"k2.y.json", b"7", size_field=b"\x80" + (1).to_bytes(11, "big"))
        + pax(pax_record(b"path", b"k3.y.json"))
        + member(b"whatever", b"8")
        + END
    )
    columns = tario.scan(shard, SHARD)
    assert columns.names == [long_key.decode() + ".x.npy", "k2.y.json", "k3.y.json"]
    assert columns.sizes == [len(GOOD_X), 1, 1]


def test_fortran_order_and_big_endian_arrays_decode_like_numpy():
    value = np.arange(12, dtype=">f8").reshape(3, 4, order="F")
    stream = io.BytesIO()
    np.lib.format.write_array(stream, np.asfortranarray(value), version=(1, 0))
    raw = stream.getvalue()
    header = codec.npy_header(raw, 0, len(raw))
    assert header.fortran and not header.native
    np.testing.assert_array_equal(codec.npy_view(raw, 0, header), np.load(io.BytesIO(raw)))


# ---------------------------------------------------------------------------- mutation fuzz


def _fuzz_base(directory: Path) -> Path:
    """A small valid set with every field kind, written by our writer (GNU headers, CRCs)."""
    with ShardWriter(directory, split="train", samples_per_shard=3) as writer:
        for i in range(3):
            writer.write(
                {
                    "__key__": f"obj-{i}",
                    "x": np.full((2, 3), i, np.float32),
                    "y": i,
                    "z": i / 3,
                    "name": "é" * i,
                    "meta": {"i": [i]},
                }
            )
    return directory


def _fuzz_base_webdataset(directory: Path) -> Path:
    """The same kinds of fields written by webdataset's TarWriter (PAX headers), then indexed."""
    import webdataset as wds

    from foundation.data.index import index_shards

    directory.mkdir(parents=True)
    with wds.TarWriter(str(directory / SHARD)) as sink:
        for i in range(3):
            sink.write(
                {
                    "__key__": f"obj-{i}",
                    "x.npy": np.full((2, 3), i, np.float32),
                    "cls": i,
                    "name.txt": "é" * i,
                    "meta.json": {"i": [i]},
                }
            )
    index_shards(directory)
    return directory


def _mutate(raw: bytes, rng: random.Random) -> bytes:
    """One random damage: flipped bytes (mostly in headers), a truncation, a header block spliced
    in or over, a hostile size field or PAX header inserted before a member."""
    data = bytearray(raw)
    blocks = len(data) // tario.BLOCK
    kind = rng.randrange(6)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            pos = (
                rng.randrange(len(data))
                if rng.random() < 0.4
                else rng.randrange(blocks) * 512 + rng.randrange(160)
            )
            data[pos % len(data)] = rng.randrange(256)
    elif kind == 1:
        del data[rng.randrange(len(data)) :]
    elif kind == 2:
        src, dst = rng.randrange(blocks) * 512, rng.randrange(blocks) * 512
        piece = bytes(data[src : src + 512])
        if rng.random() < 0.5:
            data[dst : dst + 512] = piece
        else:
            data[dst:dst] = piece
    elif kind == 3:
        at = rng.randrange(blocks) * 512
        field = rng.choice(
            [
                b"-0000000001\0",
                b"77777777777\0",
                b"\xff" * 12,
                b"\x80" + b"\xff" * 11,
                b"0_0000001000",
                b"           \0",
                b"%011o\0" % rng.randrange(1 << 33),
            ]
        )
        data[at + 124 : at + 136] = field
    elif kind == 4:
        key, value = rng.choice(
            [
                (b"size", b"-%d" % rng.randrange(1 << 20)),
                (b"size", b"%d" % rng.randrange(1 << 40)),
                (b"path", b"../x.y.json"),
                (b"path", b""),
                (b"size", b"abc"),
            ]
        )
        at = rng.randrange(blocks) * 512
        data[at:at] = pax(pax_record(key, value))
    else:
        cut = rng.randrange(blocks) * 512
        data[cut:cut] = bytes(data[: rng.randrange(1, 4) * 512])
    return bytes(data)


def _child_fuzz(root: Path) -> None:
    """The mutants through every reader; prints one line per mutant that did something else
    than succeed or raise DataError (and a last line with the counts)."""
    import foundation.data.index  # noqa: F401  (imports before the limit)
    import foundation.data.verify  # noqa: F401

    bases = [root / "base", root / "wds"]
    manifests = [Manifest.load(base) for base in bases]
    raws = [(base / SHARD).read_bytes() for base in bases]
    rng = random.Random(1234)
    work = root / "work"
    counts = {"ok": 0, "DataError": 0}
    _limit_memory()
    for trial in range(300):
        base, manifest, raw = bases[trial % 2], manifests[trial % 2], raws[trial % 2]
        mutant = _mutate(raw, rng)
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(base, work)
        (work / SHARD).write_bytes(mutant)
        for name, check in _fuzz_checks(work, SHARD, mutant, manifest.schema).items():
            outcome = _outcome(check)
            kind = outcome.split(":", 1)[0]
            if kind in counts:
                counts[kind] += 1
            else:
                print(json.dumps({"trial": trial, "check": name, "outcome": outcome}), flush=True)
    print(json.dumps({"counts": counts}), flush=True)


def _fuzz_checks(work: Path, shard: str, mutant: bytes, schema) -> dict:
    """Each reader over the mutant `work/shard`, as a function of no arguments."""
    from foundation.data import ShardDataset
    from foundation.data.index import index_shards
    from foundation.data.reader import ShardReader
    from foundation.data.verify import verify_shard_set

    def decode_all():
        reader = ShardReader(work / shard, schema, keep_members=True)
        for i in range(len(reader)):
            reader.sample(i)
        for member_ in reader.members:
            if member_.name.endswith(".npy"):
                codec.npy_header(mutant, member_.offset, member_.size)

    def loader():
        for _ in ShardDataset(work, "train", batch_size=2, shuffle=False, drop_last=False):
            pass

    def index():
        (work / "manifest.json").unlink()
        index_shards(work)

    return {
        "scan": lambda: tario.scan(mutant, shard, with_crc=True, peek=64),
        "decode": decode_all,
        "loader": loader,
        "verify": lambda: verify_shard_set(work, all_problems=True, progress=False),
        "index": index,
    }


@pytest.mark.slow
def test_random_mutations_of_valid_shards_succeed_or_raise_data_error(tmp_path):
    _fuzz_base(tmp_path / "base")
    _fuzz_base_webdataset(tmp_path / "wds")
    lines, err = run_child("fuzz", tmp_path, timeout=120)
    failures = [line for line in lines if "trial" in line]
    assert not failures, "\n\n".join(f"trial {f['trial']} {f['check']}: {f['outcome']}" for f in failures[:5])
    assert lines and "counts" in lines[-1], (
        f"the child did not finish (hung or out of memory):\n{err[-3000:]}"
    )
    counts = lines[-1]["counts"]
    assert counts["DataError"] > 300 and counts["ok"] > 100  # the mutations hit both ways


# ---------------------------------------------------------------------------- loader workers


@pytest.mark.slow
def test_pretrain_exits_promptly_when_a_loader_worker_raises(tmp_path):
    """A DataError raised in a loader worker: one line, exit 2, status failed — and the process
    ends (workers that ignored their loader's SIGTERM kept it waiting forever)."""
    shards = write_toy_shards(tmp_path / "shards", 32, 8, samples_per_shard=8, seed=0)
    for path in shards.glob("train-*.tar"):  # every x member now claims int32: the schema says float32
        path.write_bytes(path.read_bytes().replace(b"'descr': '<f4'", b"'descr': '<i4'"))
    config = config_dict(
        shards,
        tmp_path / "run",
        data={"num_workers": 2},
        model={"depth": 1},
        train={"steps": 4, "log_every": 2, "val_every": 100, "ckpt_every": 100},
    )
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, "-m", "foundation.cli", "pretrain", str(tmp_path / "cfg.yaml")],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert errors == [errors[0]] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.match(
        r"error: shard train-\d+\.tar sample '.*' field 'x': dtype int32, schema says float32$", errors[0]
    )
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"


def _child_workers(root: Path) -> None:
    """A loader with the trainer's worker init: print the workers' pids after the first batches,
    wait for a line on stdin (the parent signals the workers meanwhile), then count the rest."""
    from torch.utils.data import DataLoader

    from foundation.data import ShardDataset
    from foundation.train.data import loader_worker_init

    dataset = ShardDataset(root, "train", batch_size=1, shuffle=False, drop_last=False)
    iterator = iter(DataLoader(dataset, batch_size=None, num_workers=2, worker_init_fn=loader_worker_init))
    received = [next(iterator), next(iterator)]  # one from each worker: both have run their init
    print(json.dumps({"pids": [w.pid for w in iterator._workers]}), flush=True)
    sys.stdin.readline()
    received.extend(iterator)
    print(json.dumps({"batches": len(received)}), flush=True)


@pytest.mark.slow
def test_loader_workers_ignore_a_sigterm_that_is_not_their_loaders(tmp_path):
    """SLURM's job-wide SIGTERM reaches the workers too: they must survive it (the trainer stops
    cleanly and saves), only their own loader's SIGTERM ends them."""
    write_toy_shards(tmp_path / "set", 32, 8, samples_per_shard=8, seed=0)
    env = child_env()
    proc = subprocess.Popen(
        [sys.executable, __file__, "workers", str(tmp_path / "set")],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pids = json.loads(proc.stdout.readline())["pids"]
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out.splitlines()[-1]) == {"batches": 32}


if __name__ == "__main__":
    {"cases": _child_cases, "fuzz": _child_fuzz, "workers": _child_workers}[sys.argv[1]](Path(sys.argv[2]))
