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


from jaxlm.config import ConfigError
from jaxlm.data.tokenizers.base import SubwordTokenizer
from jaxlm.data.tokenizers.specials import find_special_ids, symbol_pattern


def _token_text(value) -> Optional[str]:
    """A tokenizer_config.json token entry: a string, or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(SubwordTokenizer):
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
        # the added tokens, which the tokenizers package matches wherever they appear in text
        self._set_specials(find_special_ids(self._id, **controls),
                           symbol_pattern(t.content for t in self._tok.get_added_tokens_decoder().values()))

    def _id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self._tok.token_to_id(token)

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _encode_many(self, texts: list[str], num_threads: int) -> list[list[int]]:
        del num_threads  # the tokenizers package parallelises on its own
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))
