"""Samples -> model batches, inside loader workers: normalise values, write numbers in the chosen
encoding, cut to max_len, and pad or pack.

A shard sample holds `tokens` (int32 text-token ids with `[NUM]` where each number stands),
`values` (float64 raw numbers) and `fields` (int16 field ids of the normaliser). A batch holds
(B, L) tensors:

* `ids`, `num` (the [NUM] multiplier: normalised value at xVal numbers, 1 elsewhere), `pos`,
  `pad` (True = padding), and `seg` (sample index inside a packed row, -1 on padding) when packed;
* `slot` (True on every token that writes a number: one for xVal, k for a baseline), `start`
  (the first of them), `unit` (the position whose coin decides masking, so a baseline number is
  masked as a whole), `target` (normalised value) and `field` (id) on slots, `raw` (float64
  value) on starts, `sample` (row of the sample in `__key__`, -1 on padding);
* `mlm_mask` (B, L) when the collate masks (MLM, and the loader passes a seeded `rng`);
* `n_clipped`, `n_truncated` (scalars) and `__key__` (list of str).

Packing (training, `pack: true`) fills the fewest rows of max_len first-fit-decreasing (then
narrows the rows as far as that row count allows), with positions restarting at each sample and
a block-diagonal attention mask, so almost no compute is spent on padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from encoders.xval.encodings import NumberEncoding
from encoders.xval.normalizer import Normalizer
from encoders.xval.tokenizer import NUM_ID, PAD_ID
from foundation.errors import DataError


class XValCollate:
    """Picklable list-of-samples -> batch function (see the module docstring)."""

    def __init__(
        self,
        normalizer: Normalizer,
        encoding: NumberEncoding,
        text_vocab_size: int,
        max_len: int,
        pack: bool,
        mask_prob: float | None = None,
        mask_fields: Sequence[int] = (),
    ) -> None:
        self.normalizer = normalizer
        self.encoding = encoding
        self.text_vocab_size = text_vocab_size
        self.max_len = max_len
        self.pack = pack
        self.mask_prob = mask_prob
        self.mask_fields = np.asarray(mask_fields, dtype=np.int64)

    # ------------------------------------------------------------------ one sample

    def encode_sample(self, sample: dict[str, Any]) -> tuple[dict[str, np.ndarray], int, bool]:
        """(per-token arrays, values clipped, whether the sample was cut) for one sample."""
        tokens = np.asarray(sample["tokens"], dtype=np.int64).reshape(-1)
        values = np.asarray(sample["values"], dtype=np.float64).reshape(-1)
        fields = np.asarray(sample["fields"], dtype=np.int64).reshape(-1)
        where = np.flatnonzero(tokens == NUM_ID)
        if len(where) != len(values) or len(fields) != len(values):
            raise DataError(
                f"sample {sample.get('__key__', '?')!r}: {len(where)} [NUM] tokens, {len(values)} values "
                f"and {len(fields)} field ids; the shard is inconsistent (re-run `prepare xval`)"
            )
        if len(tokens) == 0:
            raise DataError(f"sample {sample.get('__key__', '?')!r} has no tokens")
        if fields.size and (fields.min() < 0 or fields.max() >= len(self.normalizer.fields)):
            raise DataError(
                f"sample {sample.get('__key__', '?')!r} has field ids outside the manifest's list"
            )
        z, clipped = self.normalizer.transform(values, fields)
        k = self.encoding.tokens_per_number
        n = len(tokens) + (k - 1) * len(where)
        starts = where + (k - 1) * np.arange(len(where))
        ids = np.repeat(tokens, np.where(tokens == NUM_ID, k, 1))
        slot = np.zeros(n, dtype=bool)
        start = np.zeros(n, dtype=bool)
        unit = np.arange(n)
        target = np.zeros(n, dtype=np.float32)
        field = np.full(n, -1, dtype=np.int64)
        raw = np.full(n, np.nan, dtype=np.float64)
        num = np.ones(n, dtype=np.float32)
        start[starts] = True
        raw[starts] = values
        if self.encoding.is_xval:
            num[starts] = z
            clipped_tokens = 0
        else:
            local, clipped_tokens = self.encoding.encode(z)
        for s in range(k):
            at = starts + s
            slot[at] = True
            unit[at] = starts
            target[at] = z
            field[at] = fields
            if not self.encoding.is_xval:
                ids[at] = self.text_vocab_size + local[:, s]
        arrays = dict(
            ids=ids, num=num, slot=slot, start=start, unit=unit, target=target, field=field, raw=raw
        )
        cut = n > self.max_len
        if cut:
            end = self.max_len
            # Never split a baseline number: cut before the number the limit falls into.
            if slot[end] and not start[end]:
                end = int(unit[end])
            arrays = {key: value[:end] for key, value in arrays.items()}
        return arrays, clipped + clipped_tokens, cut

    # ------------------------------------------------------------------ batch

    def draw_mask(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """MLM mask from the loader's per-batch generator (reproducible and resumable): each unit
        (text token or whole number) with probability mask_prob, every number of `mask_fields`,
        at least one per batch."""
        coins = rng.random(batch["ids"].shape)
        unit = batch["unit"]
        mask = (np.take_along_axis(coins, unit, axis=1) < self.mask_prob) & ~batch["pad"]
        mask |= batch["slot"] & np.isin(batch["field"], self.mask_fields)
        if not mask.any():
            row, col = np.argwhere(~batch["pad"])[0]
            mask = (unit[row] == unit[row, col])[None, :] & (np.arange(len(unit))[:, None] == row)
        return mask

    def rows(self, lengths: Sequence[int]) -> list[list[int]]:
        """Sample indices per row: one per row, or packed first-fit-decreasing.

        Packing first finds the fewest rows of max_len, then the narrowest row width that still
        packs into that many rows (binary search), so rows end with as little padding as possible.
        """
        if not self.pack:
            return [[i] for i in range(len(lengths))]
        rows = _first_fit_decreasing(lengths, self.max_len)
        lo, hi = max(max(lengths), -(-sum(lengths) // len(rows))), self.max_len
        while lo < hi:
            mid = (lo + hi) // 2
            candidate = _first_fit_decreasing(lengths, mid)
            if len(candidate) <= len(rows):
                rows, hi = candidate, mid
            else:
                lo = mid + 1
        return rows

    def __call__(
        self, samples: list[dict[str, Any]], rng: np.random.Generator | None = None
    ) -> dict[str, Any]:
        if not samples:
            raise DataError("empty batch")
        encoded, clipped, truncated = [], 0, 0
        for sample in samples:
            arrays, c, cut = self.encode_sample(sample)
            encoded.append(arrays)
            clipped += c
            truncated += int(cut)
        rows = self.rows([len(e["ids"]) for e in encoded])
        width = max(sum(len(encoded[i]["ids"]) for i in row) for row in rows)
        b = len(rows)
        batch = {
            "ids": np.full((b, width), PAD_ID, dtype=np.int64),
            "num": np.ones((b, width), dtype=np.float32),
            "pos": np.zeros((b, width), dtype=np.int64),
            "pad": np.ones((b, width), dtype=bool),
            "seg": np.full((b, width), -1, dtype=np.int64),
            "slot": np.zeros((b, width), dtype=bool),
            "start": np.zeros((b, width), dtype=bool),
            "unit": np.tile(np.arange(width), (b, 1)),
            "target": np.zeros((b, width), dtype=np.float32),
            "field": np.full((b, width), -1, dtype=np.int64),
            "raw": np.full((b, width), np.nan, dtype=np.float64),
            "sample": np.full((b, width), -1, dtype=np.int64),
        }
        for r, row in enumerate(rows):
            offset = 0
            for s, i in enumerate(row):
                e = encoded[i]
                n = len(e["ids"])
                span = slice(offset, offset + n)
                for key in ("ids", "num", "slot", "start", "target", "field", "raw"):
                    batch[key][r, span] = e[key]
                batch["unit"][r, span] = e["unit"] + offset
                batch["pos"][r, span] = np.arange(n)
                batch["pad"][r, span] = False
                batch["seg"][r, span] = s
                batch["sample"][r, span] = i
                offset += n
        if self.mask_prob is not None and rng is not None:
            batch["mlm_mask"] = self.draw_mask(batch, rng)
        out: dict[str, Any] = {key: torch.from_numpy(value) for key, value in batch.items()}
        if not self.pack:
            del out["seg"]
        out["n_clipped"] = torch.tensor(clipped)
        out["n_truncated"] = torch.tensor(truncated)
        out["__key__"] = [str(sample.get("__key__", i)) for i, sample in enumerate(samples)]
        return out


def _first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return sorted(sorted(row) for row in rows)
