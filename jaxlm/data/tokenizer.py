"""Tokenizers by name. `byte`: UTF-8 bytes shifted past three special ids, with jaxlm's other
special symbols after them; no training, no file. A path ending in `.model`: a SentencePiece
model (`jaxlm.data.spm`). A path ending in `.json`: a Hugging Face tokenizer.json, through the
`tokenizers` package (`jaxlm.interop.tokenizer`)."""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import ClassVar

import numpy as np

from jaxlm.config import ConfigError

TOKENIZERS = ("byte", "PATH.model (SentencePiece)", "PATH.json (Hugging Face tokenizer.json)")


@functools.cache
def _byte_specials():
    from jaxlm.data import spm

    symbols = spm.user_symbols()
    ids = {sym: ByteTokenizer.offset + 256 + i for i, sym in enumerate(symbols)}
    pattern = re.compile("(" + "|".join(re.escape(sym) for sym in symbols) + ")")
    return ids, pattern


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """Byte b -> id b + 3; ids 0, 1, 2 are pad, bos, eos. Lossless on any text that is valid UTF-8.

    jaxlm's user-defined symbols (FIM, UL2 modes, 100 span sentinels, chat roles; the order of
    `spm.user_symbols()`) follow the bytes from id 259. As in a jaxlm SentencePiece model,
    a symbol written in text (e.g. "<|user|>") encodes to its one id.
    """

    name: ClassVar[str] = "byte"
    pad_id: ClassVar[int] = 0
    bos_id: ClassVar[int] = 1
    eos_id: ClassVar[int] = 2
    offset: ClassVar[int] = 3  # id of byte 0
    vocab_size: ClassVar[int] = 3 + 256 + 110  # 110 = len(spm.user_symbols())

    def _encode_bytes(self, text: str) -> np.ndarray:
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return raw.astype(np.int32) + self.offset

    def encode(self, text: str) -> np.ndarray:
        """`text` -> int32 ids [n]; adds no bos/eos. Special symbols in the text map to their ids."""
        if "<|" not in text:
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
    def special_ids(self):
        """pad, bos, eos, and the FIM, UL2, sentinel and role ids after the bytes (no unk)."""
        from jaxlm.data import spm

        ids, _ = _byte_specials()
        return spm.SpecialIds(
            pad=self.pad_id, bos=self.bos_id, eos=self.eos_id,
            fim_prefix=ids[spm.FIM_TOKENS[0]], fim_middle=ids[spm.FIM_TOKENS[1]],
            fim_suffix=ids[spm.FIM_TOKENS[2]],
            ul2={k: ids[v] for k, v in spm.UL2_TOKENS.items()},
            sentinels=tuple(ids[spm.sentinel_token(i)] for i in range(spm.DEFAULT_N_SENTINELS)),
            roles={k: ids[v] for k, v in spm.ROLE_TOKENS.items()})


def load_tokenizer(name: str):
    """The tokenizer named by `data.tokenizer`: "byte", the path of a SentencePiece `.model`,
    or of a Hugging Face `tokenizer.json`."""
    if name == "byte":
        return ByteTokenizer()
    if str(name).endswith(".model"):
        from jaxlm.data.spm import SentencePieceTokenizer

        return SentencePieceTokenizer(name)
    if str(name).endswith(".json"):
        from jaxlm.interop.tokenizer import HFTokenizer

        return HFTokenizer(name)
    raise ConfigError(f"data.tokenizer={name!r} is not a tokenizer; choose one of: {', '.join(TOKENIZERS)}")
