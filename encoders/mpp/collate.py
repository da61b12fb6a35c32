"""Shard samples -> MPP batches, inside loader workers.

Batching: **mixed batches padded to the union of fields.** A batch may hold windows of different
systems; the collate function lays them out over the union of their fields (in vocabulary
order), zero-filled where a sample lacks a field, with a (B, C) presence mask and per-sample
boundary codes. The field embedding is exactly "full linear on the zero-padded input × a
per-sample rescale", RevIN maps absent fields to zero and the loss skips them, so a sample's
prediction does not depend on what else is in its batch (tested). All samples of a batch must
share one spatial size (`prepare mpp --resolution` makes mixed sources agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from foundation.errors import DataError


@dataclass
class MPPCollate:
    """List of shard samples → one mixed batch over the union of their fields.

    Samples hold `fields` (W, C, X, Y) float32 windows, `bcs` (2,) and `meta` with `field_names`.
    Training batches take `history + horizon` consecutive steps at a random offset inside the
    window (from the loader's per-batch rng, so batches are reproducible); evaluation takes them
    from the start. Batch: x (B, history, C, X, Y), y (B, C, X, Y) = the next step,
    future (B, horizon, C, X, Y), field_ids (C,), field_mask (B, C), bcs (B, 2).
    """

    fields: list[str]
    history: int
    horizon: int = 1
    train: bool = True
    loss: str = "nmse"
    patch_size: int = 16

    def __call__(
        self, samples: list[dict[str, Any]], rng: np.random.Generator | None = None
    ) -> dict[str, Any]:
        if not samples:
            raise DataError("empty batch")
        index = {name: i for i, name in enumerate(self.fields)}
        need = self.history + self.horizon
        names_per_sample = []
        for s in samples:
            names = list(s["meta"]["field_names"])
            unknown = [n for n in names if n not in index]
            if unknown:
                raise DataError(
                    f"sample {s['__key__']!r} has fields {unknown} that are not in the model's field "
                    f"vocabulary {self.fields}; fine-tune with model.init_from to add them"
                )
            if s["fields"].ndim != 4 or s["fields"].shape[1] != len(names):
                raise DataError(
                    f"sample {s['__key__']!r}: 'fields' has shape {s['fields'].shape}, expected "
                    f"(steps, {len(names)}, X, Y)"
                )
            if s["fields"].shape[0] < need:
                raise DataError(
                    f"sample {s['__key__']!r} holds {s['fields'].shape[0]} steps but "
                    f"{self.history} history + "
                    f"{self.horizon} target step(s) are needed; re-run `prepare mpp` with --window >= {need}"
                )
            names_per_sample.append(names)
        spatial = {tuple(s["fields"].shape[2:]) for s in samples}
        if len(spatial) > 1:
            raise DataError(
                f"one batch mixes spatial sizes {sorted(spatial)}; prepare all sources at one size "
                "(`foundation prepare mpp --resolution N`)"
            )
        union = sorted({index[n] for names in names_per_sample for n in names})
        column = {vocab_id: j for j, vocab_id in enumerate(union)}
        b, (nx, ny) = len(samples), next(iter(spatial))
        window = np.zeros((b, need, len(union), nx, ny), dtype=np.float32)
        mask = np.zeros((b, len(union)), dtype=bool)
        bcs = np.zeros((b, 2), dtype=np.int64)
        for i, (s, names) in enumerate(zip(samples, names_per_sample, strict=True)):
            steps = s["fields"].shape[0]
            start = int(rng.integers(0, steps - need + 1)) if (self.train and rng is not None) else 0
            cols = [column[index[n]] for n in names]
            window[i][:, cols] = s["fields"][start : start + need]
            mask[i, cols] = True
            bcs[i] = np.asarray(s["bcs"], dtype=np.int64)
        window_t = torch.from_numpy(window)
        return {
            "__key__": [s["__key__"] for s in samples],
            "x": window_t[:, : self.history],
            "y": window_t[:, self.history],
            "future": window_t[:, self.history :],
            "field_ids": torch.tensor(union, dtype=torch.long),
            "field_mask": torch.from_numpy(mask),
            "bcs": torch.from_numpy(bcs),
            "dataset": [str(s["meta"].get("dataset", "")) for s in samples],
            "loss": self.loss,
            "n_tokens": b * self.history * (nx // self.patch_size) * (ny // self.patch_size),
        }
