"""The subword tokenizer for the text around numbers: byte-level BPE from HF `tokenizers`.

Byte-level means every byte of every string has a token, so no character is ever dropped or
mapped to `[UNK]` (the reference code silently dropped unknown characters and stripped spaces);
`decode(encode(s)) == s` for every string. Special tokens have fixed ids (`[PAD]` 0, `[UNK]` 1,
`[MASK]` 2, `[NUM]` 3) and are never produced from input text: a text that spells `[MASK]` is
encoded as the characters `[`, `M`, ... (numbers are inserted as `[NUM]` ids by `encode_parsed`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from encoders.xval.numbers import ParsedText
from foundation.atomic import write_text
from foundation.errors import ConfigError, DataError

TOKENIZER_FILE = "tokenizer.json"
"""Name of the tokenizer file inside an xVal shard set."""
PAD, UNK, MASK, NUM = "[PAD]", "[UNK]", "[MASK]", "[NUM]"
SPECIAL_TOKENS = (PAD, UNK, MASK, NUM)
PAD_ID, UNK_ID, MASK_ID, NUM_ID = range(4)
MAX_VOCAB_SIZE = 1 << 20
"""Largest BPE vocabulary `train` builds (4x the largest in use): the trainer allocates ~70 bytes
per requested token up front, so 10**9 would abort the process from inside the Rust library."""


def check_vocab_size(vocab_size: int) -> None:
    """Refuse a BPE vocabulary size outside [1, MAX_VOCAB_SIZE] (call it before reading any data)."""
    if (
        isinstance(vocab_size, bool)
        or not isinstance(vocab_size, int)
        or not 1 <= vocab_size <= MAX_VOCAB_SIZE
    ):
        raise ConfigError(
            f"the vocabulary size (--vocab-size) must lie in [1, {MAX_VOCAB_SIZE}], got {vocab_size!r}"
        )


class TextTokenizer:
    """Byte-level BPE around numbers; pickles (for loader workers) and saves as tokenizer.json."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        for expected, token in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(token) != expected:
                raise DataError(
                    f"tokenizer has {token} at id {tokenizer.token_to_id(token)}, expected {expected}; "
                    "it was not written by foundation's xVal `prepare`"
                )
        tokenizer.encode_special_tokens = True  # text that spells a special token stays text
        self._tok = tokenizer

    # ------------------------------------------------------------------ building and files

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> TextTokenizer:
        """Train on `texts` (templates: each piece between `[NUM]` markers is encoded on its own,
        so training sees the same pieces). Sizes beyond `MAX_VOCAB_SIZE` are refused."""
        check_vocab_size(vocab_size)
        if min_frequency < 0:
            raise ConfigError(f"the minimum pair frequency must be >= 0, got {min_frequency}")
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=max(vocab_size, len(SPECIAL_TOKENS) + 256),
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator((piece for t in texts for piece in t.split(NUM) if piece), trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file {str(path)!r} does not exist (it is written by `prepare xval`)")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:  # noqa: BLE001 - the Rust library raises plain Exceptions
            raise DataError(f"cannot read tokenizer {str(path)!r}: {exc}") from None

    @classmethod
    def from_str(cls, text: str) -> TextTokenizer:
        return cls(Tokenizer.from_str(text))

    def to_str(self) -> str:
        return self._tok.to_str()

    def save(self, path: str | Path) -> None:
        write_text(path, self.to_str())

    def __getstate__(self) -> dict:
        return {"json": self.to_str()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(Tokenizer.from_str(state["json"]))

    # ------------------------------------------------------------------ encoding

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text (no special tokens are ever produced)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_parsed(self, parsed: ParsedText) -> np.ndarray:
        """Token ids of a parsed text, `NUM_ID` where each number stands (int32)."""
        segments = parsed.segments
        encoded = self._tok.encode_batch(segments, add_special_tokens=False)
        ids: list[int] = []
        for i, enc in enumerate(encoded):
            if i:
                ids.append(NUM_ID)
            ids.extend(enc.ids)
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids that contain no special tokens."""
        return self._tok.decode(list(map(int, ids)), skip_special_tokens=False)

    def segments(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """The text between the `[NUM]` ids of a token sequence (`count(NUM) + 1` strings)."""
        ids = np.asarray(ids)
        cuts = np.flatnonzero(ids == NUM_ID)
        bounds = [0, *(cuts + 1).tolist()]
        ends = [*cuts.tolist(), len(ids)]
        return [self.decode(ids[a:b]) for a, b in zip(bounds, ends, strict=True)]

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))
