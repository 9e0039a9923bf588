"""FineWeb's line rules against datatrove's formulas, language identification, C4's sentence count."""
import math
import random
import sys

import pytest

from jaxlm.config import ConfigError
from jaxlm.prepare import filters, language, web
from jaxlm.prepare.filters import C4Lines, Verdict, count_sentences
from jaxlm.prepare.language import LanguageId, identifier
from jaxlm.prepare.rules import build_rules
from jaxlm.prepare.web import FineWebQuality

# --- FineWeb ------------------------------------------------------------------------------

# The terminals the generated documents use; '"', "…", "," and ":" are not sentence terminals.
REF_TERMINALS = (".", "!", "?", "。", "।", "؟")


def fineweb_reference(text: str) -> str:
    """datatrove's FineWebQualityFilter.filter, restated: the drop reason, or "" to keep. Tokens
    are counted for documents of lowercase words and single marks (spaCy splits each mark off)."""
    lines = [line for line in text.split("\n") if line.strip() != ""]
    if not lines:
        return "empty"
    if sum(line.endswith(REF_TERMINALS) for line in lines) / len(lines) < 0.12:
        return "line_punct_ratio"
    if sum(len(line) <= 30 for line in lines) / len(lines) > 0.67:
        return "short_line_ratio"
    seen, dup_chars = set(), 0
    for line in lines:
        if line in seen:
            dup_chars += len(line)
        seen.add(line)
    if dup_chars / len(text.replace("\n", "")) > 0.01:
        return "char_dup_ratio"
    tokens = len(text.split()) + sum(not c.isalpha() and not c.isspace() for c in text)
    if text.count("\n") / tokens > 0.3:
        return "list_ratio"
    return ""


def random_document(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(0, 25)):
        r = rng.random()
        if r < 0.1:
            lines.append(rng.choice(["", " ", "\t"]))
        elif r < 0.14 and lines:
            lines.append(rng.choice(lines))
        else:
            n = rng.choice([1, 2, 3, 6, 10])
            words = " ".join("".join(rng.choices("abcdefgh", k=rng.randint(1, 7))) for _ in range(n))
            end = rng.choice(REF_TERMINALS[:3] * 3 + REF_TERMINALS[3:] + ('"', "…", ",", ":", "", ""))
            lines.append(words + end + (" " if rng.random() < 0.1 else ""))
    return rng.choice(["\n", "\n", "\n\n", "\n\n\n"]).join(lines)


def test_fineweb_matches_datatrove_formulas_on_random_documents():
    rng = random.Random(0)
    docs = [random_document(rng) for _ in range(600)]
    got = [FineWebQuality()(d) for d in docs]
    want = [fineweb_reference(d) for d in docs]
    assert [v.reason.removeprefix("fineweb.") if v.text is None else "" for v in got] == want
    assert all(v.text == d for v, d in zip(got, docs) if v.text is not None)
    assert [FineWebQuality()(d.replace("\n", "\r\n")).reason for d in docs] == [v.reason for v in got]
    counts = {reason: want.count(reason) for reason in set(want)}
    assert set(counts) == {"", "empty", "line_punct_ratio", "short_line_ratio", "char_dup_ratio", "list_ratio"}
    assert min(counts.values()) >= 10, counts


def unique_line(i: int, width: int = 50, end: str = ".") -> str:
    """A line of `width` characters, distinct for each i, ending in `end`; many word tokens."""
    return (f"line{i:03d}" + " ab" * width)[: width - len(end)] + end


@pytest.mark.parametrize("n_punct,reason", [(12, ""), (11, "fineweb.line_punct_ratio")])
def test_fineweb_line_punct_ratio(n_punct, reason):
    text = "\n".join(unique_line(i, end="." if i < n_punct else ",") for i in range(100))  # 0.12 | 0.11
    assert FineWebQuality()(text).reason == reason


def test_fineweb_line_punct_exclude_zero_and_what_is_a_terminal():
    none = "\n".join(unique_line(i, end=",") for i in range(10))
    assert FineWebQuality()(none) == Verdict(None, "fineweb.line_punct_ratio")
    assert FineWebQuality(line_punct_exclude_zero=True)(none) == Verdict(none)
    for end in ("。", "।", "؟", "!", "?"):
        assert FineWebQuality()(unique_line(0, end=end)).reason == "", end
    for end in ('"', "'", "…", ":", ". "):  # quotes, ellipsis, a full stop hidden by a space
        assert FineWebQuality()(unique_line(0, end=end)).reason == "fineweb.line_punct_ratio", end


def test_fineweb_terminals_are_datatrove_set():
    terminals = [chr(c) for c in range(0x110000) if web._TERMINAL.fullmatch(chr(c))]
    assert len(terminals) == 159
    assert {".", "!", "?", "。", "।", "؟", "\u17d6", "\U00011f43"} <= set(terminals)
    assert not {'"', "'", "…", ",", ":", ";", "\u2024"} & set(terminals)


@pytest.mark.parametrize("n_short,reason", [(67, ""), (68, "fineweb.short_line_ratio")])
def test_fineweb_short_line_ratio(n_short, reason):
    lines = [f"s{i:03d} short line." if i < n_short else unique_line(i) for i in range(100)]
    assert FineWebQuality()("\n".join(lines)).reason == reason


def test_fineweb_short_line_is_at_most_30_characters():
    assert FineWebQuality()("a" * 29 + ".") == Verdict(None, "fineweb.short_line_ratio")
    assert FineWebQuality()("a" * 30 + ".").reason == ""


def char_dup_doc(dup_chars: int, total: int = 1000) -> str:
    """A line of `dup_chars` characters twice among distinct lines; `total` characters but "\\n"."""
    dup = "d" * (dup_chars - 1) + "."
    rest = total - 2 * dup_chars
    widths = [50] * (rest // 50 - 1) + [50 + rest % 50]
    lines = [unique_line(i, w) for i, w in enumerate(widths)]
    text = "\n".join(lines[:5] + [dup] + lines[5:] + [dup])
    assert len(text.replace("\n", "")) == total
    return text


@pytest.mark.parametrize("dup_chars,reason", [(10, ""), (11, "fineweb.char_dup_ratio")])
def test_fineweb_char_dup_ratio(dup_chars, reason):
    assert FineWebQuality()(char_dup_doc(dup_chars)).reason == reason  # 10 | 11 of 1000


@pytest.mark.parametrize("newlines,reason", [(21, ""), (22, "fineweb.list_ratio")])
def test_fineweb_list_ratio_counts_every_newline(newlines, reason):
    lines = [f"line{i:03d} abcdef abcdef abcdef abcdef abcdef." for i in range(10)]  # 7 tokens each
    text = "\n\n".join(lines) + "\n" * (newlines - 18)  # 21 | 22 newlines over 70 tokens
    assert FineWebQuality()(text).reason == reason


def test_fineweb_reads_crlf_as_lf_and_drops_blank_text():
    text = "\n".join(unique_line(i) for i in range(5))
    assert FineWebQuality()(text.replace("\n", "\r\n")) == Verdict(text.replace("\n", "\r\n"))
    assert FineWebQuality()(" \n\t\n") == Verdict(None, "fineweb.empty")


# --- language -----------------------------------------------------------------------------

TEXTS = {
    "en": "The river runs past the old mill and through the town. Children play on its banks in summer.",
    "fr": "La rivière passe devant le vieux moulin et traverse la ville. Les enfants jouent sur ses rives en été.",
    "de": "Der Fluss fließt an der alten Mühle vorbei und durch die Stadt. Im Sommer spielen dort die Kinder.",
}


@pytest.mark.parametrize("languages", [("en",), ("fr", "de"), ("de",), ("en", "fr", "de")])
def test_language_keeps_listed_languages_only(languages):
    rule = LanguageId(languages=languages)
    for code, text in TEXTS.items():
        assert rule(text) == (Verdict(text) if code in languages else Verdict(None, "language.other")), code


def test_language_low_score_and_threshold_is_inclusive():
    noise = "1234 5678 %%% ### 99 -- 10/12"
    assert LanguageId()(noise) == Verdict(None, "language.low_score")
    assert LanguageId(min_score=0.0)(noise) == Verdict(None, "language.other")  # "zxx" or another code
    _, score = identifier().classify(TEXTS["fr"])
    assert sum(s for _, s in identifier().rank(TEXTS["fr"])) == pytest.approx(1.0, abs=1e-4)
    assert LanguageId(languages=("fr",), min_score=score)(TEXTS["fr"]).reason == ""
    above = math.nextafter(score, 1.0)
    assert LanguageId(languages=("fr",), min_score=above)(TEXTS["fr"]) == Verdict(None, "language.low_score")


@pytest.mark.parametrize("params,match", [
    ({"languages": ["en", "xx"]}, r"unknown code\(s\) 'xx'; allowed: ace, af, .*\ben\b.*\bfr\b"),
    ({"languages": []}, r"no code; allowed: ace, af, "),
    ({"min_score": 1.5}, r"min_score=1.5 must be between 0 and 1"),
])
def test_language_config_errors(params, match):
    with pytest.raises(ConfigError, match=match):
        build_rules({"language": params})


def test_language_builds_from_config():
    assert build_rules({"language": {"languages": ["fr"], "min_score": 0.5}, "fineweb": True}) == [
        LanguageId(languages=("fr",), min_score=0.5), FineWebQuality()]


# --- C4's sentence count ------------------------------------------------------------------

def test_c4_counts_sentences_that_start_lowercase():
    five = "the tide came in. the boats rose. the gulls left.\nthen the rain began. it did not stop."
    assert C4Lines()(five) == Verdict(five, "")
    four = "the tide came in. the boats rose. the gulls left.\nthen the rain began and did not stop."
    assert C4Lines()(four) == Verdict(None, "c4.too_few_sentences")


@pytest.mark.parametrize("line", [
    "Dr. Smith met Mr. Jones at the pier.",
    "Bring fruit, e.g. apples or pears, to the picnic.",
    "She arrived at 5 p.m. and left the U.S. on Friday.",
    "It costs $3.50 and goes in $HOME/.bashrc today.",
])
def test_c4_abbreviations_do_not_split(line):
    assert count_sentences(line) == 1
    assert count_sentences(f"{line} the next one starts lowercase.") == 2
    lines = [f"{line[:-1]} ({i})." for i in range(5)]
    assert C4Lines()("\n".join(lines)).reason == ""
    assert C4Lines()("\n".join(lines[:4])) == Verdict(None, "c4.too_few_sentences")


# --- missing packages ---------------------------------------------------------------------

@pytest.fixture
def fresh_loaders():
    language.identifier.cache_clear()
    filters._segmenter.cache_clear()
    yield
    language.identifier.cache_clear()
    filters._segmenter.cache_clear()


@pytest.mark.parametrize("modules,make,match", [
    (("py3langid", "py3langid.langid"), LanguageId, r"needs py3langid, .*pip install py3langid"),
    (("pysbd",), C4Lines, r"pysbd, which is not installed: pip install pysbd"),
])
def test_missing_package_is_one_config_error(monkeypatch, fresh_loaders, modules, make, match):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match=match):
        make()
