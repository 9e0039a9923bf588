"""What the SentencePiece and tokenizer.json tokenizers share: encoding with special symbols kept
literal, batches, and decoding without the control ids."""
from __future__ import annotations

import abc

import numpy as np

from jaxlm.data.tokenizers.specials import SpecialIds, encode_literally


class SubwordTokenizer(abc.ABC):
    """encode / encode_batch / decode over a library's three calls, `_encode(text) -> ids`,
    `_encode_many(texts, num_threads) -> [ids]` and `_decode(ids) -> text`; adds no bos/eos.

    A subclass sets `vocab_size` and calls `_set_specials` with its special ids and the pattern of
    the symbols its library matches anywhere in text (`specials.symbol_pattern`).
    """

    vocab_size: int

    def _set_specials(self, special_ids: SpecialIds, symbols) -> None:
        self.special_ids, self._symbols = special_ids, symbols
        self.pad_id, self.bos_id, self.eos_id = special_ids.pad, special_ids.bos, special_ids.eos
        self._dropped = np.array([i for i in (self.pad_id, self.bos_id, self.eos_id) if i is not None], np.int64)

    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]:
        """The library's ids of `text`, its special symbols matched as it matches them."""

    @abc.abstractmethod
    def _encode_many(self, texts: list[str], num_threads: int) -> list[list[int]]:
        """`_encode` of each text, batched by the library."""

    @abc.abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """The library's text of ids (control ids already dropped)."""

    def encode(self, text: str, specials: bool = False) -> np.ndarray:
        """`text` -> int32 ids [n]; adds no bos/eos. A special symbol written in the text is encoded
        as its characters; specials=True: as its id (`specials` module docstring)."""
        if specials:
            return np.asarray(self._encode(text), dtype=np.int32)
        return encode_literally(self._encode, text, self._symbols)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        """`encode` of each text, the library batching them (over `num_threads` where it takes one)."""
        texts = list(texts)
        out = [np.asarray(ids, dtype=np.int32) for ids in self._encode_many(texts, num_threads)]
        if self._symbols is not None:
            out = [self.encode(t) if self._symbols.search(t) else ids for t, ids in zip(texts, out)]
        return out

    def decode(self, ids) -> str:
        """ids -> text; drops pad/bos/eos and out-of-range ids."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        ids = ids[(ids >= 0) & (ids < self.vocab_size) & ~np.isin(ids, self._dropped)]
        return self._decode(ids.tolist())
