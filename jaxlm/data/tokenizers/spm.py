"""SentencePiece: train a model with jaxlm's reserved special symbols, and tokenize with it.

Every model jaxlm trains has the same special ids, whatever the corpus (the table in
`jaxlm.data.tokenizers.specials`), then, with byte fallback, the 256 byte pieces
<0x00>..<0xFF>, then the learned pieces.
pad/bos/eos/unk are control symbols: text can never produce them (a literal "</s>" in a
document is ordinary characters). The others are user-defined symbols, which SentencePiece
would match wherever they appear in text; `encode` keeps text literal (a symbol written in a
document is encoded as its characters) unless asked with `specials=True`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional

import sentencepiece

from jaxlm.data.tokenizers.base import SubwordTokenizer
from jaxlm.data.tokenizers.specials import (
    DEFAULT_N_SENTINELS,
    SpecialIds,
    find_special_ids,
    special_tokens,
    symbol_pattern,
    user_symbols,
)

N_BYTE_PIECES = 256


def min_vocab_size(n_sentinels: int = DEFAULT_N_SENTINELS, byte_fallback: bool = True) -> int:
    """Specials plus byte pieces: the floor under `vocab_size` before any character is learned."""
    return len(special_tokens(n_sentinels)) + (N_BYTE_PIECES if byte_fallback else 0)


def _chunks(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Each text cut at line ends into pieces of at most ~max_bytes UTF-8 bytes.

    SentencePiece skips any sentence longer than `max_sentence_length`; whole source files
    often are. Cuts fall after a newline, so no learned piece is lost except one spanning a cut.
    """
    for text in texts:
        if len(text) * 4 <= max_bytes or len(text.encode("utf-8")) <= max_bytes:
            if text:
                yield text
            continue
        chunk, size = [], 0
        for line in text.splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if chunk and size + n > max_bytes:
                yield "".join(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += n
        if chunk:
            yield "".join(chunk)


def train_sentencepiece(texts: Iterable[str], model_prefix: str | Path, vocab_size: int,
                        model_type: str = "bpe", byte_fallback: bool = True,
                        split_digits: bool = True, n_sentinels: int = DEFAULT_N_SENTINELS,
                        input_sentence_size: int = 2_000_000, character_coverage: float = 0.9995,
                        num_threads: int | None = None, max_sentence_bytes: int = 16_384) -> Path:
    """Train a SentencePiece model on `texts` in-process; returns the path `model_prefix.model`.

    Also writes `model_prefix.vocab` (piece and score per line). Texts are consumed lazily;
    SentencePiece keeps a uniform sample of at most `input_sentence_size` chunks of at most
    `max_sentence_bytes` bytes (texts are cut at line ends into chunks). Choices made for code:
    `normalization_rule_name="identity"` (no NFKC: tabs, runs of spaces and every character
    survive, so decode(encode(x)) == x), `remove_extra_whitespaces=False`,
    `allow_whitespace_only_pieces=True` (indentation runs become single pieces) and
    `add_dummy_prefix=False` (no space is invented at the start of a text, so encoding
    concatenated texts does not depend on where documents begin).
    """
    if n_sentinels < 0:
        raise ValueError(f"n_sentinels={n_sentinels} must be >= 0")
    floor = min_vocab_size(n_sentinels, byte_fallback)
    if vocab_size < floor:
        raise ValueError(f"vocab_size={vocab_size} is too small: the special symbols"
                         f"{' and 256 byte pieces' if byte_fallback else ''} alone need at least "
                         f"{floor} (and the corpus's characters need more)")
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=_chunks(texts, max_sentence_bytes),
            model_prefix=str(model_prefix), vocab_size=vocab_size, model_type=model_type,
            pad_id=0, bos_id=1, eos_id=2, unk_id=3,
            user_defined_symbols=list(user_symbols(n_sentinels)),
            byte_fallback=byte_fallback, split_digits=split_digits,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, add_dummy_prefix=False,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            max_sentence_length=max_sentence_bytes,
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        need = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if need:
            raise ValueError(f"vocab_size={vocab_size} is too small for this corpus: its specials, "
                             f"bytes and characters need at least {need.group(2)}; raise "
                             f"vocab_size or lower character_coverage") from None
        raise
    return model_prefix.with_name(model_prefix.name + ".model")


def train_from_config(t, log=print) -> Path:
    """`jaxlm data tokenizer`: train on the usable records of `t.inputs` (a TokenizerConfig)."""
    from jaxlm.config import ConfigError
    from jaxlm.data.readers import describe_losses, expand_prepared, no_documents, texts

    if not t.inputs:
        raise ConfigError("tokenizer.inputs is empty; name the prepared files to train on")
    expand_prepared(t.inputs, "tokenizer.inputs")
    docs, counts = texts(t.inputs, t.text_field, t.max_documents)
    try:
        path = train_sentencepiece(docs, t.out, t.vocab_size, model_type=t.model_type, n_sentinels=t.n_sentinels)
    except ValueError as e:
        n, skipped = counts()
        if n == 0:
            raise ConfigError(no_documents("tokenizer", t.text_field, skipped)) from None
        raise ConfigError(f"tokenizer: {e}") from None
    n, skipped = counts()
    log(f"trained {path} (vocab {t.vocab_size}) on {n} documents; unusable records skipped: "
        f"{describe_losses(skipped)}")
    return path


class SentencePieceTokenizer(SubwordTokenizer):
    """A SentencePiece model file as a jaxlm tokenizer; adds no bos/eos when encoding.

    Works with any SentencePiece model; ids of specials it lacks are None in `special_ids`
    (and `pad_id`, `bos_id`, `eos_id`). A jaxlm-trained model round-trips any text exactly.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model {str(path)!r} does not exist; `jaxlm data tokenizer "
                                    "CONFIG` trains one (tokenizer.out + '.model'), or set data.tokenizer=byte")
        self.path = path
        self.name = str(path)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self._sp.vocab_size()
        special_ids = self._find_special_ids()
        # jaxlm's user-defined symbols in this vocabulary: SentencePiece matches them in any text
        self._set_specials(special_ids, symbol_pattern(s for s in user_symbols(len(special_ids.sentinels))
                                                       if self._piece_id(s) is not None))

    def _piece_id(self, piece: str) -> Optional[int]:
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    def _find_special_ids(self) -> SpecialIds:
        control = lambda i: i if i >= 0 else None
        return find_special_ids(self._piece_id, pad=control(self._sp.pad_id()), bos=control(self._sp.bos_id()),
                                eos=control(self._sp.eos_id()), unk=control(self._sp.unk_id()))

    def _encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def _encode_many(self, texts: list[str], num_threads: int) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=num_threads)  # SentencePiece's threads

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)  # unk decodes to " ⁇ "

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))
