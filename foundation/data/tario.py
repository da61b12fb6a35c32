"""Tar at the byte level: reproducible member headers for writing, a fast header walk for reading.

Why by hand: Python's `tarfile` spends most of a WebDataset loader's time parsing headers
(see benchmarks/RESULTS.md); random access into a shard only needs name, size and data offset per member.
Headers are written in GNU format (never PAX), with mtime 0 and a fixed owner, so the same
samples always give byte-identical shards.

Each member's CRC-32 is kept in the header's devmajor/devminor fields (high and low 16 bits),
which tar tools ignore for regular files; `verify` uses it to name the member a flipped byte is in.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from foundation.errors import DataError

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
_ZERO_BLOCK = b"\0" * BLOCK


def _header_block(name: bytes, size: int, typeflag: bytes, crc32: int) -> bytes:
    if size < 8**11:
        size_field = b"%011o\0" % size
    else:  # GNU base-256 for members of 8 GiB and more
        size_field = bytes([0x80]) + size.to_bytes(11, "big")
    block = b"".join(
        (
            name.ljust(100, b"\0"),
            b"0000644\0" if typeflag == b"0" else b"0000000\0",  # mode
            b"0000000\0",  # uid
            b"0000000\0",  # gid
            size_field,
            b"00000000000\0",  # mtime 0
            b" " * 8,  # checksum, counted as spaces
            typeflag,
            b"\0" * 100,  # linkname
            b"ustar  \0",  # GNU magic + version
            b"\0" * 64,  # uname, gname
            b"%07o\0" % (crc32 >> 16),  # devmajor
            b"%07o\0" % (crc32 & 0xFFFF),  # devminor
            b"\0" * 167,  # GNU atime/ctime/... and padding
        )
    )
    return block[:148] + b"%06o\0 " % sum(block) + block[156:]


def member_header(name: str, size: int, crc32: int = 0) -> bytes:
    """Header block(s) for one regular file: GNU format (a ././@LongLink record for names over
    100 bytes, never PAX), mtime 0, root-owned, mode 0644, the data's CRC-32 in devmajor/devminor."""
    encoded = name.encode("utf-8")
    if len(encoded) < 100:
        return _header_block(encoded, size, b"0", crc32)
    long_name = encoded + b"\0"
    return (
        _header_block(b"././@LongLink", len(long_name), b"L", 0)
        + long_name
        + padding(len(long_name))
        + _header_block(encoded[:100], size, b"0", crc32)
    )


def padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


@dataclass(slots=True)
class Member:
    name: str
    offset: int
    """Offset of the member's data in the file."""
    size: int
    header: int
    """Offset of the member's (first) header block, for messages."""
    crc32: int | None = None
    """CRC-32 stored by our writer (devmajor/devminor), when the walk was asked for it."""
    head: bytes | None = None
    """The first bytes of the data, when the walk was asked to peek."""


MAX_METADATA_BYTES = 1 << 20
"""Largest GNU long name / PAX extended header read: real ones are a few hundred bytes."""


def _octal(field: bytes, what: str, where: str) -> int:
    """A numeric header field: NUL/space-terminated octal digits, or GNU base-256 (0x80 first)."""
    if field and field[0] & 0x80:
        if field[0] != 0x80:  # 0xFF: base-256 negative; no size, id or checksum is
            raise DataError(
                f"{where}: tar header has a negative or malformed {what} field; re-create the shard"
            )
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if not text.isdigit():  # int() would also take signs, spaces and underscores
        raise DataError(f"{where}: tar header has a malformed {what} field {field!r}; re-create the shard")
    try:
        return int(text, 8)
    except ValueError:
        raise DataError(
            f"{where}: tar header has a malformed {what} field {field!r}; re-create the shard"
        ) from None


def _pax_records(data: bytes, where: str) -> dict[str, str]:
    """`<length> <key>=<value>\\n` records; each record must fit the header and end in a newline."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            if not data[pos:].strip(b"\0"):  # zero padding after the last record
                break
            raise DataError(
                f"{where}: malformed PAX extended header (bad record length); re-create the shard"
            )
        end = pos + int(digits)
        if end > len(data) or end <= space or data[end - 1] != 10:
            raise DataError(
                f"{where}: malformed PAX extended header (a record overruns it); re-create the shard"
            )
        key, sep, value = data[space + 1 : end - 1].partition(b"=")
        if not sep:
            raise DataError(
                f"{where}: malformed PAX extended header (a record has no '='); re-create the shard"
            )
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos = end
    return records


def _pax_size(pax: dict[str, str], where: str) -> int:
    text = pax["size"]
    if not (text.isascii() and text.isdigit()):
        raise DataError(
            f"{where}: PAX size record {text[:40]!r} is not a non-negative integer; re-create the shard"
        )
    return int(text)


def _metadata(pread, size: int, data: int, where: str) -> bytes:
    """The data of a long-name or PAX header, refused when implausibly large."""
    if size > MAX_METADATA_BYTES:
        raise DataError(
            f"{where}: an extended tar header of {size} bytes (more than {MAX_METADATA_BYTES}); "
            "the shard is corrupted or hostile; re-create it"
        )
    return pread(size, data)


def _bad_member(hdr: bytes, pos: int, shard: str, problem: str) -> DataError:
    """The error for a header whose size or type cannot be right: a checksum failure if the header
    is damaged (the clearer diagnosis), else `problem`."""
    block = np.frombuffer(hdr, dtype=np.uint8)
    computed = int(block.sum(dtype=np.int64) - block[148:156].sum(dtype=np.int64)) + 8 * 32
    signed = block.view(np.int8)
    signed_sum = int(signed.sum(dtype=np.int64) - signed[148:156].sum(dtype=np.int64)) + 8 * 32
    try:
        stored = _octal(hdr[148:156], "checksum", f"{shard}: tar header at byte {pos}")
    except DataError:
        stored = None
    if stored not in (computed, signed_sum):
        return DataError(
            f"{shard}: tar header at byte {pos} fails its checksum: the shard is corrupted; re-create it "
            "(run `foundation shards verify` to list every damaged shard)"
        )
    return DataError(f"{shard}: tar header at byte {pos}: {problem}")


@dataclass(slots=True)
class MemberColumns:
    """The regular-file members of a tar as parallel lists (what `scan` returns): a shard's index
    costs a few lists, not one object per member (which would also wake the garbage collector)."""

    names: list[str]
    offsets: list[int]
    """Offsets of the members' data in the file."""
    sizes: list[int]
    headers: list[int]
    """Offsets of the members' (first) header blocks, for messages."""
    crc32: list[int] | None
    """CRC-32s stored by our writer (devmajor/devminor), when the scan was asked for them."""
    heads: list[bytes] | None
    """The first `peek` bytes of each member's data, when the scan was asked to peek."""

    def __len__(self) -> int:
        return len(self.names)

    def members(self) -> list[Member]:
        crcs = self.crc32 if self.crc32 is not None else [None] * len(self.names)
        heads = self.heads if self.heads is not None else [None] * len(self.names)
        return [
            Member(*fields)
            for fields in zip(self.names, self.offsets, self.sizes, self.headers, crcs, heads, strict=True)
        ]


def walk(
    source, shard: str, check_checksums: bool = True, with_crc: bool = False, peek: int = 0
) -> list[Member]:
    """Every regular-file member of a tar, in order, as `Member`s (see `scan`)."""
    return scan(source, shard, check_checksums, with_crc, peek).members()


def scan(
    source, shard: str, check_checksums: bool = True, with_crc: bool = False, peek: int = 0
) -> MemberColumns:
    """Every regular-file member of a tar, in order. `source` is the archive in memory (bytes,
    mmap) or an open file descriptor (int), read with pread: only headers are touched.

    Understands ustar, GNU (long names via ././@LongLink, base-256 sizes) and PAX (`path`, `size`
    records, as written by Python's tarfile and webdataset's TarWriter). Raises DataError naming
    the shard and offset on a truncated archive, a malformed header or (optionally) a header
    checksum mismatch. The file is hostile until checked: every size is checked against the file
    before it is used (to read, or to move on), and every step moves forward by a block at least.
    With `peek` > 0 each member keeps its first `peek` data bytes in `heads` (fetched with
    the header in the same read: small members need no further read at all).
    """
    if isinstance(source, int):
        total = os.fstat(source).st_size
        pread = functools.partial(os.pread, source)  # pread(n, pos)
    else:
        total = len(source)

        def pread(n: int, pos: int) -> bytes:
            return bytes(source[pos : pos + n])

    # (the loop runs once per member of every shard a loader opens: locals and bound methods)
    names: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    headers: list[int] = []
    crcs: list[int] | None = [] if with_crc else None
    heads: list[bytes] | None = [] if peek else None
    add_name, add_offset, add_size, add_header = names.append, offsets.append, sizes.append, headers.append
    add_head = heads.append if heads is not None else None
    blocks: list[bytes] = []  # every header block and its offset, for the checksum check
    block_offsets: list[int] = []
    add_block, add_block_offset = blocks.append, block_offsets.append
    want = BLOCK + peek
    pos = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    global_pax: dict[str, str] = {}
    while True:
        chunk = pread(want, pos) if pos + BLOCK <= total else b""
        hdr = chunk[:BLOCK] if peek else chunk
        if len(hdr) < BLOCK:
            raise DataError(
                f"{shard}: truncated tar archive (ends inside a header at byte {pos} of {total}); "
                "re-create the shard"
            )
        if hdr[0] == 0 and hdr == _ZERO_BLOCK:
            break  # end of archive
        add_block(hdr)
        add_block_offset(pos)
        try:
            size = int(hdr[124:135], 8)  # fast path: 11 octal digits (+ NUL), as tar writers do
        except ValueError:
            size = _octal(hdr[124:136], "size", f"{shard}: tar header at byte {pos}")
        typeflag = hdr[156]
        data = pos + BLOCK
        end = data + size
        if size < 0 or end > total:
            problem = (
                f"malformed size field {hdr[124:136]!r}"
                if size < 0
                else f"the member needs {size} bytes but the file ends at byte {total}"
            )
            raise _bad_member(hdr, pos, shard, f"{problem} (truncated or damaged); re-create the shard")
        if typeflag in _REGULAR:
            if long_name is not None:
                name = long_name
            elif pax or global_pax:
                name = pax.get("path") or global_pax.get("path") or _plain_name(hdr)
            elif hdr[257:263] == b"ustar\0":  # POSIX ustar: there may be a name prefix
                name = _plain_name(hdr)
            else:  # GNU (our writer) and old tar: the name field alone
                nul = hdr.find(0, 0, 100)
                name = hdr[: nul if nul >= 0 else 100].decode("utf-8", "replace")
            if "size" in pax:
                size = _pax_size(pax, f"{shard}: tar header at byte {pos}")
                end = data + size
                if end > total:
                    raise DataError(
                        f"{shard}: tar header at byte {pos}: member {name!r} needs {size} bytes (PAX size "
                        f"record) but the file ends at byte {total}; re-create the shard"
                    )
            if crcs is not None:
                where = f"{shard}: tar header at byte {pos}"
                crcs.append(
                    (_octal(hdr[329:337], "devmajor", where) << 16) | _octal(hdr[337:345], "devminor", where)
                )
            if add_head is not None:
                add_head(chunk[BLOCK : BLOCK + size] if size < peek else chunk[BLOCK:])
            add_name(name)
            add_offset(data)
            add_size(size)
            add_header(pos)
            long_name = None
            if pax:
                pax = {}
        elif typeflag == 76:  # "L": GNU long name of the next member
            raw = _metadata(pread, size, data, f"{shard}: tar header at byte {pos}")
            long_name = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif typeflag == 120:  # "x": PAX header of the next member
            where = f"{shard}: tar header at byte {pos}"
            pax = _pax_records(_metadata(pread, size, data, where), where)
        elif typeflag == 103:  # "g": global PAX header
            where = f"{shard}: tar header at byte {pos}"
            global_pax.update(_pax_records(_metadata(pread, size, data, where), where))
        elif typeflag != 75:  # directories, links...: no sample members ("K", a long link name: skipped)
            long_name = None
            pax = {}
        pos = end + (-size % BLOCK)
    if check_checksums and blocks:
        check_header_checksums(blocks, block_offsets, shard)
    return MemberColumns(names, offsets, sizes, headers, crcs, heads)


_REGULAR = (ord("0"), 0, ord("7"))


def _plain_name(hdr: bytes) -> str:
    name = hdr[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if hdr[257:263] == b"ustar\0":  # POSIX ustar: a name prefix may hold the leading part
        prefix = hdr[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix.decode("utf-8", "replace") + "/" + name
    return name


_OCTAL_SHIFTS = np.array([15, 12, 9, 6, 3, 0], dtype=np.int64)


def check_header_checksums(blocks: list[bytes], offsets: list[int], shard: str) -> None:
    """Vectorised tar header checksum check (unsigned sum, checksum field counted as spaces).

    The stored field is compared with the usual "%06o\\0 " rendering of the computed sum in bulk;
    only headers written differently are parsed one by one (also accepting old signed sums).
    """
    for lo in range(0, len(blocks), 4096):  # bounded temporaries
        chunk = np.frombuffer(b"".join(blocks[lo : lo + 4096]), dtype=np.uint8).reshape(-1, BLOCK)
        field = chunk[:, 148:156]
        sums = chunk.sum(axis=1, dtype=np.int64) - field.sum(axis=1, dtype=np.int64) + 8 * 32
        digits = ((sums[:, None] >> _OCTAL_SHIFTS) & 7) + 48
        usual = (field[:, :6] == digits).all(axis=1) & (field[:, 6] == 0) & (field[:, 7] == 32)
        for row in np.nonzero(~usual)[0]:
            where = offsets[lo + row]
            stored = _octal(bytes(field[row]), "checksum", f"{shard}: tar header at byte {where}")
            signed = chunk[row].view(np.int8)
            signed_sum = int(signed.sum(dtype=np.int64) - signed[148:156].sum(dtype=np.int64) + 8 * 32)
            if stored not in (int(sums[row]), signed_sum):
                name = bytes(chunk[row, :100]).split(b"\0", 1)[0].decode("utf-8", "replace")
                raise DataError(
                    f"{shard}: tar header of member {name!r} (byte {where}) fails its checksum: the shard is "
                    "corrupted; re-create it (run `foundation shards verify` to list every damaged shard)"
                )


def split_name(name: str) -> tuple[str, str, str]:
    """(key, field, ext) of a member name `<key>.<field>.<ext>` (webdataset grouping rules).

    The key runs to the first dot of the base name; a single suffix (`key.npy`) gives the
    field name equal to the extension, as webdataset does.
    """
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, "", ""
    key, rest = name[:dot], name[dot + 1 :]
    field, sep, ext = rest.rpartition(".")
    if not sep:
        return key, rest, rest
    return key, field, ext
