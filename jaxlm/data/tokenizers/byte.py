"""The byte tokenizer: UTF-8 bytes shifted past three special ids, with jaxlm's other special
symbols after them; no training, no file."""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import ClassVar

import numpy as np

from jaxlm.data.tokenizers.specials import SpecialIds, find_special_ids, user_symbols


@functools.cache
def _byte_specials():
    symbols = user_symbols()
    ids = {sym: ByteTokenizer.offset + 256 + i for i, sym in enumerate(symbols)}
    pattern = re.compile("(" + "|".join(re.escape(sym) for sym in symbols) + ")")
    return ids, pattern


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """Byte b -> id b + 3; ids 0, 1, 2 are pad, bos, eos. Lossless on any text that is valid UTF-8.

    jaxlm's user-defined symbols (FIM, UL2 modes, 100 span sentinels, chat roles; the order of
    `specials.user_symbols()`) follow the bytes from id 259.
    """

    name: ClassVar[str] = "byte"
    pad_id: ClassVar[int] = 0
    bos_id: ClassVar[int] = 1
    eos_id: ClassVar[int] = 2
    offset: ClassVar[int] = 3  # id of byte 0
    vocab_size: ClassVar[int] = 3 + 256 + 110  # 110 = len(specials.user_symbols())

    def _encode_bytes(self, text: str) -> np.ndarray:
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return raw.astype(np.int32) + self.offset

    def encode(self, text: str, specials: bool = False) -> np.ndarray:
        """`text` -> int32 ids [n], its UTF-8 bytes; adds no bos/eos. specials=True: jaxlm's symbols
        written in the text ("<|user|>") become their ids (`specials` module docstring)."""
        if not specials or "<|" not in text:
            return self._encode_bytes(text)
        ids, pattern = _byte_specials()
        parts = [np.array([ids[p]], np.int32) if i % 2 else self._encode_bytes(p)
                 for i, p in enumerate(pattern.split(text)) if p]
        return np.concatenate(parts) if parts else np.zeros((0,), np.int32)

    def decode(self, ids) -> str:
        """ids -> text; drops specials and out-of-range ids, replaces invalid UTF-8 with U+FFFD."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        ids = ids[(ids >= self.offset) & (ids < self.offset + 256)]
        return (ids - self.offset).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    @property
    def special_ids(self) -> SpecialIds:
        """pad, bos, eos, and the FIM, UL2, sentinel and role ids after the bytes (no unk)."""
        return _byte_special_ids()


@functools.cache
def _byte_special_ids() -> SpecialIds:
    return find_special_ids(_byte_specials()[0].get, pad=ByteTokenizer.pad_id, bos=ByteTokenizer.bos_id,
                            eos=ByteTokenizer.eos_id)
