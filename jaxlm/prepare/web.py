"""FineWeb's line rules (Penedo et al. 2024), as datatrove's FineWebQualityFilter defines them.

Definitions, each following datatrove's `fineweb_quality_filter.py` (v0.10) unless said otherwise:
- Lines: the text split at "\\n", lines that are blank once stripped left out; a line is not
  stripped for the tests below (trailing spaces count and hide a final full stop). Differs: a
  "\\r\\n" break is read as "\\n" first (datatrove keeps the "\\r" on the line, so no line of a
  CRLF document ends in punctuation and every such document is dropped).
- Line punctuation ratio: lines whose last character is a sentence terminal, over lines.
  The terminals are datatrove's TERMINAL_PUNCTUATION: Unicode 15.0's Sentence_Terminal
  characters (".", "!", "?", "。", "।", "؟", ...) and the Khmer signs U+17D4-17D6, U+17D9-17DA.
  Quotes and ellipses are not terminals. (The release behind FineWeb v1 used ". ' \\" ! ?",
  counted blank lines and dropped at <= 0.12; today's code drops below 0.12, as here.)
- Short line ratio: lines of at most `short_line_length` characters, over lines.
- Duplicated-line character ratio: characters of the lines equal to an earlier line (exact,
  unstripped), over the characters of the text other than "\\n". The paper prints 0.1; the
  code's default, used for FineWeb, is 0.01, and so is ours.
- List ratio: "\\n" count over the word tokens of the text. Differs: datatrove counts spaCy's
  English tokens (punctuation marks are tokens), and we approximate them with `_TOKEN` (no
  spaCy dependency): the verdicts part only near the threshold, mostly on code-like text whose
  symbols spaCy keeps inside one token ("worker.getData(key").
Every threshold keeps a document that sits exactly on it, as datatrove does.
"""
from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

from jaxlm.prepare.filters import Verdict, duplicates

# datatrove's TERMINAL_PUNCTUATION (159 characters) as a character class of ranges.
_TERMINALS = ("!.?\u0589\u061d-\u061f\u06d4\u0700-\u0702\u07f9\u0837\u0839\u083d-\u083e\u0964-\u0965"
              "\u104a-\u104b\u1362\u1367-\u1368\u166e\u1735-\u1736\u17d4-\u17d6\u17d9-\u17da\u1803\u1809"
              "\u1944-\u1945\u1aa8-\u1aab\u1b5a-\u1b5b\u1b5e-\u1b5f\u1b7d-\u1b7e\u1c3b-\u1c3c\u1c7e-\u1c7f"
              "\u203c-\u203d\u2047-\u2049\u2e2e\u2e3c\u2e53-\u2e54\u3002\ua4ff\ua60e-\ua60f\ua6f3\ua6f7"
              "\ua876-\ua877\ua8ce-\ua8cf\ua92f\ua9c8-\ua9c9\uaa5d-\uaa5f\uaaf0-\uaaf1\uabeb\ufe52"
              "\ufe56-\ufe57\uff01\uff0e\uff1f\uff61\U00010a56-\U00010a57\U00010f55-\U00010f59"
              "\U00010f86-\U00010f89\U00011047-\U00011048\U000110be-\U000110c1\U00011141-\U00011143"
              "\U000111c5-\U000111c6\U000111cd\U000111de-\U000111df\U00011238-\U00011239"
              "\U0001123b-\U0001123c\U000112a9\U0001144b-\U0001144c\U000115c2-\U000115c3"
              "\U000115c9-\U000115d7\U00011641-\U00011642\U0001173c-\U0001173e\U00011944\U00011946"
              "\U00011a42-\U00011a43\U00011a9b-\U00011a9c\U00011c41-\U00011c42\U00011ef7-\U00011ef8"
              "\U00011f43-\U00011f44\U00016a6e-\U00016a6f\U00016af5\U00016b37-\U00016b38\U00016b44"
              "\U00016e98\U0001bc9f\U0001da88")
_TERMINAL = re.compile(f"[{_TERMINALS}]")
# A word token, near spaCy's English tokenizer: word characters joined by . ' ’ : / @ (3.14, U.S,
# don't, a/b, user@host), a run of dots or of hyphens, or any other single visible character.
_TOKEN = re.compile(r"\w+(?:[.'’:/@]\w+)*|\.{2,}|-{2,}|[^\w\s]")


def fineweb_lines(text: str) -> list[str]:
    """FineWeb's lines: `text` split at "\\n" ("\\r\\n" read as "\\n"), blank lines left out."""
    return [line for line in text.replace("\r\n", "\n").split("\n") if line.strip()]


@dataclasses.dataclass(frozen=True)
class FineWebQuality:
    """FineWeb's line rules, in datatrove's order; see the module docstring for the definitions."""

    name: ClassVar[str] = "fineweb"
    min_line_punct_ratio: float = 0.12  # lines ending in a sentence terminal, over lines
    line_punct_exclude_zero: bool = False  # True: a text with no such line is not dropped for it
    max_short_line_ratio: float = 0.67  # lines of at most short_line_length characters, over lines
    short_line_length: int = 30
    max_char_dup_ratio: float = 0.01  # characters in duplicated lines, over characters
    max_list_ratio: float = 0.3  # "\n" per word token

    def __call__(self, text: str) -> Verdict:
        text_n = text.replace("\r\n", "\n")
        lines = fineweb_lines(text_n)
        if not lines:
            return Verdict(None, "fineweb.empty")
        punct = sum(1 for line in lines if _TERMINAL.match(line[-1])) / len(lines)
        if punct < self.min_line_punct_ratio and not (punct == 0 and self.line_punct_exclude_zero):
            return Verdict(None, "fineweb.line_punct_ratio")
        if sum(len(line) <= self.short_line_length for line in lines) / len(lines) > self.max_short_line_ratio:
            return Verdict(None, "fineweb.short_line_ratio")
        newlines = text_n.count("\n")
        if duplicates(lines)[1] / (len(text_n) - newlines) > self.max_char_dup_ratio:
            return Verdict(None, "fineweb.char_dup_ratio")
        if newlines / len(_TOKEN.findall(text_n)) > self.max_list_ratio:
            return Verdict(None, "fineweb.list_ratio")
        return Verdict(text)
