"""Document filters: small named rules, each called on one document's text, returning a Verdict.

Pure Python: the stdlib, and pysbd for C4's sentence count (imported when a c4 rule is made).
A rule is a frozen dataclass whose fields are its thresholds, defaulting to the published
values; `rules.build_rules` makes a chain from a config mapping. Words are whitespace-separated
tokens with leading and trailing punctuation removed (tokens of punctuation alone are not
words); lines and paragraphs are compared stripped, and blank lines are neither counted nor
compared.
"""
from __future__ import annotations

import dataclasses
import functools
import html.parser
import re
import string
import typing
from collections import Counter
from itertools import accumulate, compress, count, repeat
from operator import add, mul, ne
from pathlib import Path
from typing import ClassVar

from jaxlm.config.schema import ConfigError
from jaxlm.data.readers import paragraphs


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What a rule decided: `text` None drops the document; a changed text comes with a reason."""

    text: str | None  # None: the document is dropped; else the (possibly changed) text
    reason: str = ""  # "" when kept unchanged; else "<rule>.<why>", e.g. "gopher_quality.word_count"


_PUNCT = string.punctuation + "…–—‘’“”«»•·‹›¡¿"


def words_of(text: str) -> list[str]:
    """The words of `text`: whitespace tokens stripped of edge punctuation, empty ones dropped."""
    return list(filter(None, map(str.strip, text.split(), repeat(_PUNCT))))


def _lines(text: str) -> list[str]:
    return [s for s in (line.strip() for line in text.splitlines()) if s]


# --- html ---------------------------------------------------------------------------------

_TAG_NAMES = ("html|head|body|title|meta|link|div|span|p|br|hr|a|img|b|i|u|em|strong|pre|code|"
              "table|thead|tbody|tr|td|th|ul|ol|li|dl|dt|dd|h[1-6]|script|style|section|article|"
              "nav|header|footer|main|aside|form|input|button|label|select|option|iframe|blockquote")
_LOOKS_LIKE_HTML = re.compile(rf"<!doctype\s+html|</?(?:{_TAG_NAMES})(?:\s[^<>]*)?/?>", re.IGNORECASE)
_LINE_TAGS = frozenset("div li dt dd tr title header footer nav aside main form hr".split())
_PARAGRAPH_TAGS = frozenset("p h1 h2 h3 h4 h5 h6 ul ol dl table blockquote pre section article".split())
_SPACES = re.compile(r"\s+")
_BLANK_LINES = re.compile(r"\n{3,}")


class _TextExtractor(html.parser.HTMLParser):
    """Collects the visible text; block tags become line or paragraph breaks."""

    def __init__(self, skip: frozenset[str]):
        super().__init__(convert_charrefs=True)  # entities arrive unescaped in handle_data
        self.skip, self.skipping, self.parts = skip, 0, []

    def _break(self, tag: str) -> None:
        if tag in _PARAGRAPH_TAGS:
            self.parts.append("\n\n")
        elif tag == "br" or tag in _LINE_TAGS and not (self.parts and self.parts[-1].endswith("\n")):
            self.parts.append("\n")  # "</li><li>" is one break; "<br><br>" is two

    def handle_starttag(self, tag, attrs):
        if tag == "body":
            self.skipping = 0  # as browsers do, <body> ends an unclosed <head>
        if tag in self.skip:
            self.skipping += 1
        self._break(tag)

    def handle_endtag(self, tag):
        if tag in self.skip:
            self.skipping = max(0, self.skipping - 1)
        self._break(tag)

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(_SPACES.sub(" ", data))  # source newlines are spaces in HTML


@dataclasses.dataclass(frozen=True)
class HtmlStrip:
    """If the text looks like HTML, keep its visible text (tags, scripts, styles gone; entities
    unescaped; block elements become line or paragraph breaks, other whitespace runs one space,
    also inside <pre>). A page with no visible text is dropped."""

    name: ClassVar[str] = "html"
    skip_tags: tuple[str, ...] = ("script", "style", "noscript", "template", "svg", "head")

    def __call__(self, text: str) -> Verdict:
        if not _LOOKS_LIKE_HTML.search(text):
            return Verdict(text)
        parser = _TextExtractor(frozenset(self.skip_tags))
        parser.feed(text)
        parser.close()
        lines = (line.strip() for line in "".join(parser.parts).split("\n"))
        stripped = _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()
        if not stripped:
            return Verdict(None, "html.empty")
        return Verdict(stripped, "html.stripped")


# --- Gopher quality (Rae et al. 2021, appendix A) -----------------------------------------

_HAS_LETTER = re.compile(r"[^\W\d_]")


@dataclasses.dataclass(frozen=True)
class GopherQuality:
    """Gopher's quality heuristics. Ratios are per word; line fractions count non-blank lines;
    stop words are matched case-insensitively and every occurrence counts."""

    name: ClassVar[str] = "gopher_quality"
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_hash_ratio: float = 0.1  # "#" per word
    max_ellipsis_ratio: float = 0.1  # "..." or "…" per word
    max_bullet_lines: float = 0.9  # fraction of lines starting with a bullet
    max_ellipsis_lines: float = 0.3  # fraction of lines ending with an ellipsis
    min_alpha_words: float = 0.8  # fraction of words with an alphabetic character
    min_stop_words: int = 2
    stop_words: tuple[str, ...] = ("the", "be", "to", "of", "and", "that", "have", "with")
    bullets: tuple[str, ...] = ("•", "‣", "◦", "▪", "●", "-", "*")

    def __call__(self, text: str) -> Verdict:
        words = words_of(text)
        n = len(words)
        if not self.min_words <= n <= self.max_words or n == 0:
            return Verdict(None, "gopher_quality.word_count")
        mean_length = sum(map(len, words)) / n
        if not self.min_mean_word_length <= mean_length <= self.max_mean_word_length:
            return Verdict(None, "gopher_quality.mean_word_length")
        if text.count("#") / n > self.max_hash_ratio:
            return Verdict(None, "gopher_quality.hash_ratio")
        if (text.count("...") + text.count("…")) / n > self.max_ellipsis_ratio:
            return Verdict(None, "gopher_quality.ellipsis_ratio")
        lines = _lines(text)
        bullets = tuple(self.bullets)
        if sum(line.startswith(bullets) for line in lines) / len(lines) > self.max_bullet_lines:
            return Verdict(None, "gopher_quality.bullet_lines")
        if sum(line.endswith(("...", "…")) for line in lines) / len(lines) > self.max_ellipsis_lines:
            return Verdict(None, "gopher_quality.ellipsis_lines")
        if sum(map(bool, map(_HAS_LETTER.search, words))) / n < self.min_alpha_words:
            return Verdict(None, "gopher_quality.alpha_words")
        stop = frozenset(w.lower() for w in self.stop_words)
        if sum(map(stop.__contains__, map(str.lower, words))) < self.min_stop_words:
            return Verdict(None, "gopher_quality.stop_words")
        return Verdict(text)


# --- Gopher repetition (Rae et al. 2021, table A1) ----------------------------------------


def duplicates(units: list[str]) -> tuple[int, int, int]:
    """(count of units equal to an earlier one, their characters, characters of all units)."""
    seen, n_dup, chars = set(), 0, 0
    for u in units:
        if u in seen:
            n_dup, chars = n_dup + 1, chars + len(u)
        else:
            seen.add(u)
    return n_dup, chars, sum(map(len, units))


def _covered_chars(starts: typing.Iterable[int], n: int, prefix: list[int]) -> int:
    """Characters of the words covered by n-grams at increasing `starts`, overlaps counted once."""
    total, end = 0, 0
    for i in starts:
        lo = max(i, end)
        end = i + n
        total += prefix[end] - prefix[lo]
    return total


def ngram_fractions(words: list[str], top_ns: typing.Iterable[int], dup_ns: typing.Iterable[int]):
    """Yield ("top", n, fraction) and ("dup", n, fraction) by increasing n, as fractions of word
    characters.

    top: characters covered by every occurrence of the most frequent n-gram (0 if none repeats;
    of tied n-grams, the one covering the most). dup: characters covered by the occurrences
    of n-grams that repeat an earlier occurrence. Overlapping n-grams count each character once.
    Linear time: the n-gram at i is the integer id(n-1 gram at i) * base + id(word i+n-1), and
    the per-position passes run in C (map, compress) except over repeated positions.
    """
    prefix = list(accumulate(map(len, words), initial=0))
    total = prefix[-1] or 1
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    base = len(vocab) + 1
    word_ids = ids = list(map(vocab.__getitem__, words))
    top_ns, dup_ns = set(top_ns), set(dup_ns)
    repeats = True
    for n in range(2, max(top_ns | dup_ns, default=1) + 1):
        if repeats:  # without a repeated (n-1)-gram no n-gram repeats: skip the work
            ids = list(map(add, map(mul, ids, repeat(base)), word_ids[n - 1:]))
            first = dict(zip(reversed(ids), range(len(ids) - 1, -1, -1)))  # id -> first index
            repeats = len(first) < len(ids)
        if n in top_ns:
            frac = 0.0
            if repeats:
                counts = Counter(ids)
                top = max(counts.values())
                tied = {g for g, c in counts.items() if c == top}
                covered, end = dict.fromkeys(tied, 0), dict.fromkeys(tied, 0)
                for i in compress(count(), map(tied.__contains__, ids)):
                    g = ids[i]
                    covered[g] += prefix[i + n] - prefix[max(i, end[g])]
                    end[g] = i + n
                frac = max(covered.values()) / total
            yield "top", n, frac
        if n in dup_ns:
            frac = 0.0
            if repeats:
                starts = compress(count(), map(ne, map(first.__getitem__, ids), count()))
                frac = _covered_chars(starts, n, prefix) / total
            yield "dup", n, frac


@dataclasses.dataclass(frozen=True)
class GopherRepetition:
    """Gopher's repetition rules. A duplicate line/paragraph is one equal to an earlier one;
    its character fraction is over the characters of all (stripped, non-blank) lines/paragraphs.
    n-gram fractions are over word characters, see `ngram_fractions`."""

    name: ClassVar[str] = "gopher_repetition"
    max_dup_para_frac: float = 0.30
    max_dup_para_char_frac: float = 0.20
    max_dup_line_frac: float = 0.30
    max_dup_line_char_frac: float = 0.20
    top_ngrams: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
    dup_ngrams: tuple[tuple[int, float], ...] = (
        (5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))

    def __post_init__(self):
        if any(n < 2 for n, _ in self.top_ngrams + self.dup_ngrams):
            raise ConfigError(f"gopher_repetition n-gram sizes must be >= 2; got "
                              f"top_ngrams={self.top_ngrams}, dup_ngrams={self.dup_ngrams}")

    def __call__(self, text: str) -> Verdict:
        for kind, units in (("para", paragraphs(text)), ("line", _lines(text))):
            n_dup, chars, total = duplicates(units)
            if units and n_dup / len(units) > getattr(self, f"max_dup_{kind}_frac"):
                return Verdict(None, f"gopher_repetition.dup_{kind}_frac")
            if units and chars / total > getattr(self, f"max_dup_{kind}_char_frac"):
                return Verdict(None, f"gopher_repetition.dup_{kind}_char_frac")
        limits = {("top", n): m for n, m in self.top_ngrams} | {("dup", n): m for n, m in self.dup_ngrams}
        fractions = ngram_fractions(words_of(text), [n for n, _ in self.top_ngrams],
                                    [n for n, _ in self.dup_ngrams])
        for kind, n, frac in fractions:
            if frac > limits[kind, n]:
                return Verdict(None, f"gopher_repetition.{kind}_{n}gram")
        return Verdict(text)


# --- C4 (Raffel et al. 2020; as in TFDS c4_utils and datatrove's C4QualityFilter) ----------

_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
_END_PUNCTUATION = (".", "?", "!", '"', "'")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
           "use cookies")
# Where a counted sentence break can be: terminal punctuation (then closing quotes or brackets), whitespace.
_MAYBE_BREAK = re.compile(r"[.!?…][\"')\]’”]*\s")
_ENDS_AT_BREAK = re.compile(r"[.!?…][\"')\]’”]*\s+\Z")


@functools.cache
def _segmenter():
    """pysbd's English sentence segmenter (rules inside the package, nothing downloaded)."""
    try:
        import pysbd
    except ImportError:
        raise ConfigError("the c4 rule counts sentences with pysbd, which is not installed: "
                          "pip install pysbd") from None
    return pysbd.Segmenter(language="en", clean=False)


def count_sentences(line: str) -> int:
    """Sentences in one line: 1 + the places where pysbd ends a sentence at a `_MAYBE_BREAK`.
    Its other breaks are not counted: inside a word ("$HOME/." | "bashrc") or at a bare space.
    A line with no `_MAYBE_BREAK` is one sentence without asking pysbd."""
    if not _MAYBE_BREAK.search(line):
        return 1
    segments = _segmenter().segment(line)  # clean=False: each keeps its trailing whitespace
    return 1 + sum(1 for s in segments[:-1] if _ENDS_AT_BREAK.search(s))


@dataclasses.dataclass(frozen=True)
class C4Lines:
    """C4's line filter. Lines are tested in order; only lines that pass the punctuation and
    word-count tests are checked for "lorem ipsum" and "{" (which drop the whole document), as
    in the published code. Sentences of the kept lines are counted line by line with
    `count_sentences` (pysbd; C4 used NLTK's punkt, datatrove uses spaCy's sentencizer), and
    only until there are `min_sentences`: the count decides nothing more."""

    name: ClassVar[str] = "c4"
    min_words_per_line: int = 3
    max_word_length: int = 1000  # lines with a longer word are dropped
    min_sentences: int = 5
    remove_citations: bool = True  # "[1]", "[edit]", "[citation needed]"
    filter_no_terminal_punct: bool = True
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True

    def __post_init__(self):
        _segmenter()  # a missing pysbd is a config error now, not a failure mid-run

    def __call__(self, text: str) -> Verdict:
        kept, sentences = [], 0
        for line in text.splitlines():
            line = line.strip()
            if any(len(w) > self.max_word_length for w in line.split()):
                continue
            if self.remove_citations:
                line = _CITATION.sub("", line)
            if self.filter_no_terminal_punct and (
                    not line.endswith(_END_PUNCTUATION) or line.endswith("...")):
                continue
            if len(line.split()) < self.min_words_per_line:
                continue
            lower = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in lower:
                return Verdict(None, "c4.lorem_ipsum")
            if self.filter_javascript and "javascript" in lower:
                continue
            if self.filter_curly_bracket and "{" in line:
                return Verdict(None, "c4.curly_bracket")
            if self.filter_policy and any(p in lower for p in _POLICY):
                continue
            kept.append(line)
        # pysbd is slow: skip it when even a break at every `_MAYBE_BREAK` gives too few sentences,
        # and stop once there are enough.
        if sum(1 + len(_MAYBE_BREAK.findall(line)) for line in kept) >= self.min_sentences:
            for line in kept:
                sentences += count_sentences(line)
                if sentences >= self.min_sentences:
                    break
        if sentences < self.min_sentences:
            return Verdict(None, "c4.too_few_sentences")
        out = "\n".join(kept)
        return Verdict(text) if out == text else Verdict(out, "c4.lines_removed")


# --- word count and blocklist -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MinWords:
    """Drop documents with fewer than `min_words` words (for wiki-like sources)."""

    name: ClassVar[str] = "min_words"
    min_words: int = 50

    def __call__(self, text: str) -> Verdict:
        if len(words_of(text)) < self.min_words:
            return Verdict(None, "min_words.too_few")
        return Verdict(text)


@dataclasses.dataclass(frozen=True)
class Blocklist:
    """Drop documents containing a listed term as a whole word, ignoring case. Terms come from
    `terms` and/or `terms_file` (UTF-8, one per line; blank lines and lines starting with "#"
    are skipped). A multi-word term matches across any whitespace."""

    name: ClassVar[str] = "blocklist"
    terms: tuple[str, ...] = ()
    terms_file: str = ""
    _pattern: re.Pattern | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _canonical: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        terms = list(self.terms)
        if self.terms_file:
            try:
                lines = Path(self.terms_file).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"blocklist terms_file {self.terms_file!r} cannot be read: "
                                  f"{getattr(e, 'strerror', None) or e}") from None
            terms += [t for t in (s.strip() for s in lines) if t and not t.startswith("#")]
        for term in terms:
            key = " ".join(term.lower().split())
            if key:
                self._canonical.setdefault(key, term.strip())
        if not self._canonical:
            raise ConfigError("blocklist has no terms; give terms: [...] or a non-empty terms_file")
        keys = sorted(self._canonical, key=lambda k: (-len(k), k))
        alternatives = "|".join(r"\s+".join(map(re.escape, k.split())) for k in keys)
        object.__setattr__(self, "_pattern", re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)"))

    def matched_term(self, text: str) -> str | None:
        """The first listed term found in `text`, as written in the list; None if none is."""
        m = self._pattern.search(text.lower())
        return None if m is None else self._canonical[" ".join(m.group(0).split())]

    def __call__(self, text: str) -> Verdict:
        if self._pattern.search(text.lower()):
            return Verdict(None, "blocklist.match")
        return Verdict(text)
