"""Number inference: predicted values at chosen numbers, and autoregressive generation.

xVal: the token head decides *whether* a number comes (it must predict `[NUM]`); the value
comes from the number head. Baselines: the argmax tokens of a number's slots are decoded; a
sequence that does not spell a number is "unparseable" (NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from encoders.xval.collate import XValCollate
from encoders.xval.loss import Batch, masked_inputs, next_token_select
from encoders.xval.normalizer import Normalizer
from encoders.xval.numbers import extract_numbers, field_at_end, format_value
from encoders.xval.tokenizer import NUM_ID, SPECIAL_TOKENS, TextTokenizer


@dataclass
class Predictions:
    """One entry per predicted number (normalised and original units)."""

    sample: np.ndarray
    field: np.ndarray
    true: np.ndarray
    """Raw value from the data (float64)."""
    pred_norm: np.ndarray
    """Prediction in normalised units; NaN where a baseline's tokens do not spell a number."""
    is_number: np.ndarray
    """xVal: the token head predicted [NUM]; baselines: the tokens spell a number."""


def _decode(model: nn.Module, out: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(normalised values, is-number flags), one per number, from head outputs at its slots."""
    enc = model.encoding
    top = out["logits"].argmax(-1).cpu().numpy()
    if enc.is_xval:
        return out["number"].float().cpu().numpy().astype(np.float64), top == NUM_ID
    values = enc.decode((top - model.text_vocab_size).reshape(-1, enc.tokens_per_number))
    return values, np.isfinite(values)


@torch.no_grad()
def predict_batch(model: nn.Module, batch: Batch, fields: list[int] | None = None) -> Predictions:
    """Predictions for every number of the batch (or those of `fields`).

    MLM: for each field, all numbers of that field are masked at once and predicted from the
    rest. Causal: teacher-forced next-token prediction at every number (for baselines the later
    digits of a number see the true earlier ones, which flatters them slightly).
    """
    model.eval()
    kwargs = {"pos": batch["pos"], "pad": batch["pad"], "seg": batch.get("seg")}
    parts = []
    wanted = batch["slot"]
    if fields is not None:
        wanted = wanted & torch.isin(batch["field"], torch.tensor(fields, device=wanted.device))
    if model.cfg.mode == "mlm":
        for f in torch.unique(batch["field"][wanted]).tolist():
            mask = wanted & (batch["field"] == f)
            ids, num = masked_inputs(batch, mask)
            out = model(ids, num, select=mask, **kwargs)
            values, ok = _decode(model, out)
            parts.append((mask, batch["start"][mask], values, ok))
    else:
        # A number can be predicted only if its first token has a predecessor in its sample.
        wanted = wanted & (batch["pos"].gather(1, batch["unit"]) > 0)
        select = next_token_select(batch)
        before = wanted.roll(-1, dims=1) & select
        out = model(batch["ids"], batch["num"], select=before, **kwargs)
        mask = before.roll(1, dims=1)  # the slots those positions predict
        values, ok = _decode(model, out)
        parts.append((mask, batch["start"][mask], values, ok))
    sample, field, true, pred, is_number = [], [], [], [], []
    for mask, starts, values, ok in parts:
        sample.append(batch["sample"][mask][starts].cpu().numpy())
        field.append(batch["field"][mask][starts].cpu().numpy())
        true.append(batch["raw"][mask][starts].cpu().numpy())
        pred.append(values)
        is_number.append(ok)
    if not parts:
        empty = np.zeros(0)
        return Predictions(empty.astype(np.int64), empty.astype(np.int64), empty, empty, empty.astype(bool))
    return Predictions(*(np.concatenate(x) for x in (sample, field, true, pred, is_number)))


# ----------------------------------------------------------------------------- generation


@dataclass
class Generated:
    text: str
    values: np.ndarray
    """The generated numbers in original units."""
    ids: list[int]


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: TextTokenizer,
    normalizer: Normalizer,
    prompt: str,
    max_new_tokens: int = 64,
    stop: str | None = None,
    digits: int = 6,
) -> Generated:
    """Greedy continuation of `prompt` by a causal model, decoding text and numbers.

    A generated `[NUM]` takes the number head's value (clipped like the data), which becomes the
    token's multiplier for the following steps; its field (for de-normalisation) is read from the
    text before it. Baseline numbers are decoded from their tokens; malformed ones render as `?`.
    """
    if model.cfg.mode != "causal":
        raise ValueError("generation needs a causal model (model.mode: causal)")
    model.eval()
    enc = model.encoding
    parsed = extract_numbers(prompt)
    collate = XValCollate(normalizer, enc, model.text_vocab_size, model.cfg.max_len, pack=False)
    fields = normalizer.field_ids(parsed.fields)
    batch = collate([{"tokens": tokenizer.encode_parsed(parsed), "values": parsed.values, "fields": fields}])
    device = next(model.parameters()).device
    ids = batch["ids"].to(device)
    num = batch["num"].to(device)
    pieces: list[str] = [prompt]
    segment: list[int] = []  # text token ids since the last number (decoded together: byte-level)
    new_ids: list[int] = []
    values: list[float] = []
    pending: list[int] = []  # baseline number tokens not yet complete

    def text_so_far() -> str:
        return "".join(pieces) + tokenizer.decode(segment)

    def add_number(z: float) -> None:
        nonlocal segment
        pieces.append(tokenizer.decode(segment))
        segment = []
        fid = normalizer.field_ids([field_at_end("".join(pieces))])
        z = float(np.clip(z, -normalizer.clip, normalizer.clip))  # NaN stays NaN
        value = float(normalizer.inverse(np.array([z]), fid)[0]) if np.isfinite(z) else float("nan")
        values.append(value)
        pieces.append(format_value(value, digits) if np.isfinite(value) else "?")

    for _ in range(max_new_tokens):
        if ids.shape[1] >= model.cfg.max_len:
            break
        out = model(ids, num)
        token = int(out["logits"][0, -1].argmax())
        multiplier = 1.0
        if enc.is_xval and token == NUM_ID:
            multiplier = float(np.clip(float(out["number"][0, -1]), -normalizer.clip, normalizer.clip))
            add_number(multiplier)
        elif not enc.is_xval and token >= model.text_vocab_size:
            pending.append(token - model.text_vocab_size)
            if len(pending) == enc.tokens_per_number:
                add_number(float(enc.decode(np.array([pending]))[0]))
                pending = []
        else:
            if pending:  # a baseline number cut short by a text token
                add_number(float("nan"))
                pending = []
            if token >= len(SPECIAL_TOKENS):
                segment.append(token)
        new_ids.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
        num = torch.cat([num, torch.tensor([[multiplier]], device=device, dtype=num.dtype)], dim=1)
        if stop is not None and text_so_far().endswith(stop):
            break
    if pending:  # the token budget ran out inside a baseline number
        add_number(float("nan"))
    return Generated(text_so_far(), np.asarray(values, dtype=np.float64), new_ids)
