"""Tokenizers by name (`data.tokenizer`), each with jaxlm's special ids (`specials.SpecialIds`).

`byte`: UTF-8 bytes and jaxlm's specials, no file (`byte`). A path ending in `.model`: a
SentencePiece model, which `jaxlm data tokenizer` trains with the specials reserved (`spm`). A
path ending in `.json`: a Hugging Face tokenizer.json, through the `tokenizers` package (`hf`).
"""
import hashlib
from pathlib import Path

from jaxlm.config import ConfigError
from jaxlm.data.tokenizers.byte import ByteTokenizer
from jaxlm.data.tokenizers.specials import SpecialIds

TOKENIZERS = ("byte", "PATH.model (SentencePiece)", "PATH.json (Hugging Face tokenizer.json)")

__all__ = ["ByteTokenizer", "SpecialIds", "TOKENIZERS", "file_sha256", "load_tokenizer"]


def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes: a tokenizer file's identity (shards and runs record it)."""
    h = hashlib.sha256()
    with open(Path(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_tokenizer(name: str):
    """The tokenizer named by `data.tokenizer`: "byte", the path of a SentencePiece `.model`,
    or of a Hugging Face `tokenizer.json`."""
    if name == "byte":
        return ByteTokenizer()
    if str(name).endswith(".model"):
        from jaxlm.data.tokenizers.spm import SentencePieceTokenizer

        return SentencePieceTokenizer(name)
    if str(name).endswith(".json"):
        from jaxlm.data.tokenizers.hf import HFTokenizer

        return HFTokenizer(name)
    raise ConfigError(f"data.tokenizer={name!r} is not a tokenizer; choose one of: {', '.join(TOKENIZERS)}")
