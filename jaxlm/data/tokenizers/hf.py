"""A Hugging Face `tokenizer.json` as a jaxlm tokenizer, through the `tokenizers` package.

`data.tokenizer: PATH/tokenizer.json` selects it. The bos/eos/pad tokens come from the
`tokenizer_config.json` beside it when there is one; jaxlm's own special symbols (FIM, UL2,
sentinels, chat roles) have ids only if the vocabulary holds them, as in any SentencePiece
model jaxlm did not train.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from jaxlm.config import ConfigError
from jaxlm.data.tokenizers.specials import encode_literally, find_special_ids, symbol_pattern


def _token_text(value) -> Optional[str]:
    """A tokenizer_config.json token entry: a string, or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """encode/decode with a tokenizer.json; adds no bos/eos when encoding (as jaxlm's tokenizers)."""

    def __init__(self, path: str | Path):
        try:
            import tokenizers
        except ImportError:
            raise ConfigError(f"data.tokenizer={str(path)!r} needs the `tokenizers` package "
                              "(pip install tokenizers)") from None
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {str(path)!r} does not exist")
        self.path, self.name = path, str(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust parser's errors are plain Exceptions
            raise ConfigError(f"data.tokenizer={str(path)!r} is not a tokenizer.json: {e}".splitlines()[0]) from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        settings = {}
        if (path.parent / "tokenizer_config.json").is_file():
            settings = json.loads((path.parent / "tokenizer_config.json").read_text())
        controls = {k: self._id(_token_text(settings.get(f"{k}_token"))) for k in ("pad", "bos", "eos", "unk")}
        self.special_ids = find_special_ids(self._id, **controls)
        # the added tokens, which the tokenizers package matches wherever they appear in text
        self._symbols = symbol_pattern(t.content for t in self._tok.get_added_tokens_decoder().values())
        self.pad_id, self.bos_id, self.eos_id = self.special_ids.pad, self.special_ids.bos, self.special_ids.eos
        self._dropped = np.array([i for i in (self.pad_id, self.bos_id, self.eos_id) if i is not None], np.int64)

    def _id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self._tok.token_to_id(token)

    def _ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, specials: bool = False) -> np.ndarray:
        """`text` -> int32 ids [n]; adds no bos/eos. An added token (a special symbol) written in the
        text is encoded as its characters; specials=True: as its id."""
        if specials:
            return np.asarray(self._ids(text), dtype=np.int32)
        return encode_literally(self._ids, text, self._symbols)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        """`encode` of each text (the tokenizers package parallelises on its own)."""
        del num_threads
        texts = list(texts)
        out = [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        if self._symbols is not None:
            out = [self.encode(t) if self._symbols.search(t) else ids for t, ids in zip(texts, out)]
        return out

    def decode(self, ids) -> str:
        """ids -> text; drops pad/bos/eos and out-of-range ids."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        ids = ids[(ids >= 0) & (ids < self.vocab_size) & ~np.isin(ids, self._dropped)]
        return self._tok.decode(ids.tolist(), skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))
