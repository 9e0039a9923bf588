"""jaxlm's reserved special symbols, and the one table of their ids that every tokenizer gives.

Every model jaxlm trains has the same special ids, whatever the corpus:

    0 <pad>   1 <s> (bos)   2 </s> (eos)   3 <unk>
    4 <|fim_prefix|>   5 <|fim_middle|>   6 <|fim_suffix|>
    7 <|ul2_r|>   8 <|ul2_s|>   9 <|ul2_x|>
    10 .. 10+n-1 <|sentinel_0|> .. <|sentinel_{n-1}|>      (n = n_sentinels, default 100)
    10+n <|system|>   11+n <|user|>   12+n <|assistant|>   13+n <|end_turn|>

(`jaxlm.data.tokenizers.spm`); the byte tokenizer puts the same user symbols after its 256
bytes, and a tokenizer jaxlm did not train has the ids its vocabulary holds (None for the rest).

Text never becomes a special id by itself: every tokenizer's `encode(text)` encodes a symbol
written in the text ("<|user|>" in a document, a chat message or a prompt) as ordinary
characters, so data cannot forge chat turns or sentinels. Markup comes from the code that
renders it (role ids from `SpecialIds`, FIM layouts from `fim_permute`), or from
`encode(text, specials=True)`, the explicit opt-in for text a user writes markup into.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Optional

import numpy as np

CONTROL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3
FIM_TOKENS = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>")
UL2_TOKENS = {"r": "<|ul2_r|>", "s": "<|ul2_s|>", "x": "<|ul2_x|>"}  # UL2 [R], [S], [X]
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>",
               "end_turn": "<|end_turn|>"}
DEFAULT_N_SENTINELS = 100


def sentinel_token(i: int) -> str:
    return f"<|sentinel_{i}|>"


def user_symbols(n_sentinels: int = DEFAULT_N_SENTINELS) -> tuple[str, ...]:
    """The user-defined symbols, in id order (first id 4): FIM, UL2, sentinels, roles."""
    return (FIM_TOKENS + tuple(UL2_TOKENS.values())
            + tuple(sentinel_token(i) for i in range(n_sentinels)) + tuple(ROLE_TOKENS.values()))


def special_tokens(n_sentinels: int = DEFAULT_N_SENTINELS) -> tuple[str, ...]:
    """Every reserved symbol; the symbol at index i has id i in a jaxlm-trained model."""
    return CONTROL_TOKENS + user_symbols(n_sentinels)


SPECIAL_TOKENS = special_tokens()


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Ids of the special symbols; None for one the tokenizer lacks.

    `ul2` maps "r", "s", "x" and `roles` maps "system", "user", "assistant", "end_turn" to
    ids (or None); `sentinels` holds the ids of <|sentinel_0|>, <|sentinel_1|>, ... present
    without a gap (empty when there are none). The ids the objectives write (eos, FIM, UL2,
    sentinels) must be distinct; pad may share one (padding is never in a loss).
    """

    pad: Optional[int]
    bos: Optional[int]
    eos: Optional[int]
    unk: Optional[int] = None
    fim_prefix: Optional[int] = None
    fim_middle: Optional[int] = None
    fim_suffix: Optional[int] = None
    ul2: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(UL2_TOKENS))
    sentinels: tuple[int, ...] = ()
    roles: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(ROLE_TOKENS))

    def __post_init__(self):
        object.__setattr__(self, "sentinels", tuple(int(s) for s in self.sentinels))
        written = [self.eos, self.fim_prefix, self.fim_middle, self.fim_suffix, *self.ul2.values(),
                   *self.sentinels]
        seen = set()
        for i in (i for i in [self.pad, *written] if i is not None):
            if int(i) < 0:
                raise ValueError(f"special token id {i} must be >= 0")
        for i in (i for i in written if i is not None):
            if i in seen:
                raise ValueError(f"special token id {i} is used twice; ids must be distinct")
            seen.add(i)

    def missing(self, names: Iterable[str]) -> list[str]:
        """Which of `names` (fields, "ul2_r"/"ul2_s"/"ul2_x", role names) this tokenizer lacks."""
        def value(name):
            if name.startswith("ul2_"):
                return self.ul2.get(name[4:])
            if name in ROLE_TOKENS:
                return self.roles.get(name)
            if name == "sentinels":
                return self.sentinels or None
            return getattr(self, name)

        return [name for name in names if value(name) is None]


def find_special_ids(piece_id: Callable[[str], Optional[int]], *, pad=None, bos=None, eos=None,
                     unk=None) -> SpecialIds:
    """The table for a vocabulary: `piece_id(symbol)` is the id of a symbol, or None if absent.
    Sentinels are looked up from <|sentinel_0|> on, until the first missing one."""
    sentinels = []
    while (i := piece_id(sentinel_token(len(sentinels)))) is not None:
        sentinels.append(i)
    return SpecialIds(pad=pad, bos=bos, eos=eos, unk=unk, fim_prefix=piece_id(FIM_TOKENS[0]),
                      fim_middle=piece_id(FIM_TOKENS[1]), fim_suffix=piece_id(FIM_TOKENS[2]),
                      ul2={k: piece_id(v) for k, v in UL2_TOKENS.items()}, sentinels=tuple(sentinels),
                      roles={k: piece_id(v) for k, v in ROLE_TOKENS.items()})


def symbol_pattern(symbols: Iterable[str]) -> Optional[re.Pattern]:
    """A regex matching any of `symbols` (the longest first), or None when there is none."""
    symbols = sorted({s for s in symbols if len(s) >= 2}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, symbols))) if symbols else None


def encode_literally(encode: Callable[[str], Iterable[int]], text: str, pattern: Optional[re.Pattern]) -> np.ndarray:
    """`encode(text)`, with every reserved symbol written in the text encoded as ordinary text: its
    first character and its rest apart, so that neither half can match a symbol."""
    if pattern is None or pattern.search(text) is None:
        return np.asarray(encode(text), np.int32)
    parts, last = [], 0
    for m in pattern.finditer(text):
        parts += [text[last:m.start()], m.group()[:1], m.group()[1:]]
        last = m.end()
    parts.append(text[last:])
    return np.concatenate([np.asarray(encode(p), np.int32) for p in parts if p] or [np.zeros(0, np.int32)])
