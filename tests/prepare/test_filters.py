"""Document filters: each rule and sub-rule just passes and just fails, plus build_rules errors."""
import collections
import dataclasses
import math
import random
from fractions import Fraction

import pytest

from jaxlm.config import ConfigError
from jaxlm.prepare.filters import (
    Blocklist,
    C4Lines,
    GopherQuality,
    GopherRepetition,
    HtmlStrip,
    MinWords,
    Verdict,
    ngram_fractions,
    words_of,
)
from jaxlm.prepare.pii import PiiScrub
from jaxlm.prepare.rules import RULES, build_rules

# Ten filler words with no stop words; mean length 4.7.
FILLER = "quiet river runs past old stone houses near green fields".split()
ENGLISH = (
    "The river runs past the old mill and through the town.\n"
    "Children play on its banks in the summer, and the fishermen say the water is clean.\n"
    "In the spring the meadows flood, which is good for the birds that nest in the reeds.\n"
    "Visitors come from far away to walk the path that follows the water to the sea.\n"
    "Most of them stay for a night at the inn, where the cook makes a stew of fish and potatoes."
)


def filler(n: int) -> list[str]:
    return [FILLER[i % len(FILLER)] for i in range(n)]


def stop_doc(n_filler: int, extra: str = "") -> str:
    """`n_filler` filler words plus two stop words, on one line, then `extra`."""
    return " ".join(["The", "and"] + filler(n_filler)) + extra


def unique_words(n: int, prefix: str = "u") -> list[str]:
    """`n` distinct five-character words."""
    return [f"{prefix}{i:04d}" for i in range(n)]


def test_verdict_is_frozen_and_rules_are_named():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Verdict("x").text = "y"
    assert list(RULES) == ["html", "language", "gopher_quality", "gopher_repetition", "c4", "fineweb",
                           "min_words", "blocklist", "pii", "quality_classifier", "perplexity"]
    assert all(cls.name == name for name, cls in RULES.items())


def test_words_strip_edge_punctuation_and_drop_punctuation_tokens():
    assert words_of("Hello, world! -- it's (fine) ... #tag") == ["Hello", "world", "it's", "fine", "tag"]


# --- html ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["plain text, a < b and c > d", "repr: <class 'int'> &amp; more", ""])
def test_html_leaves_non_html_alone(text):
    assert HtmlStrip()(text) == Verdict(text, "")


def test_html_strips_tags_scripts_styles_and_unescapes():
    page = ("<!DOCTYPE html><html><head><title>Title</title><style>p {color: red}</style></head>"
            "<body><h1>Fish &amp; chips</h1><p>Served\n   hot&nbsp;daily,<br>with peas.</p>"
            "<script>var s = \"<p>not text</p>\";</script><ul><li>one</li><li>two &lt;3</li></ul>"
            "</body></html>")
    assert HtmlStrip()(page) == Verdict("Fish & chips\n\nServed hot daily,\nwith peas.\n\none\ntwo <3",
                                        "html.stripped")


def test_html_body_ends_an_unclosed_head():
    assert HtmlStrip()("<html><head><title>T</title><body><p>Kept text.</p>") == Verdict("Kept text.", "html.stripped")


def test_html_with_no_visible_text_is_dropped():
    assert HtmlStrip()("<script>alert(1)</script><style>b {}</style>") == Verdict(None, "html.empty")


# --- Gopher quality -----------------------------------------------------------------------

def test_english_prose_passes_every_rule_unchanged():
    for cls in (GopherQuality, GopherRepetition, C4Lines, MinWords, PiiScrub):
        assert cls()(ENGLISH) == Verdict(ENGLISH, ""), cls.name


@pytest.mark.parametrize("rule,good,bad", [
    (GopherQuality(), stop_doc(48), stop_doc(47)),  # 50 vs 49 words
    (GopherQuality(max_words=60), stop_doc(58), stop_doc(59)),
])
def test_gopher_word_count(rule, good, bad):
    assert rule(good) == Verdict(good)
    assert rule(bad) == Verdict(None, "gopher_quality.word_count")


def test_gopher_word_count_default_maximum():
    rule = GopherQuality()
    good, bad = stop_doc(99_998), stop_doc(99_999)
    assert rule(good).reason == ""
    assert rule(bad) == Verdict(None, "gopher_quality.word_count")


def test_gopher_mean_word_length():
    short = "the and " + " ".join((["cat", "dog", "sun", "sky", "red"] * 10)[:48])  # 50 words of 3
    assert len(words_of(short)) == 50
    assert GopherQuality()(short).reason == ""
    too_short = short.replace("cat", "at", 1)  # mean 149 / 50 < 3
    assert GopherQuality()(too_short) == Verdict(None, "gopher_quality.mean_word_length")
    long_words = [f"{'l' * 6}{i:04d}" for i in range(46)] + ["x" * 17, "y" * 17]  # 494 chars
    long = "the and " + " ".join(long_words)  # mean (6 + 494) / 50 == 10
    assert GopherQuality()(long).reason == ""
    too_long = long.replace("x" * 17, "x" * 18)
    assert GopherQuality()(too_long) == Verdict(None, "gopher_quality.mean_word_length")


def test_gopher_hash_ratio():
    assert GopherQuality()(stop_doc(48, " #" * 5)).reason == ""  # 5 / 50 == 0.1
    assert GopherQuality()(stop_doc(48, " #" * 6)) == Verdict(None, "gopher_quality.hash_ratio")


def test_gopher_ellipsis_ratio_counts_both_spellings():
    good = stop_doc(48, " ... river" * 3 + " … river" * 2)  # 5 ellipses / 55 words
    assert len(words_of(good)) == 55 and GopherQuality()(good).reason == ""
    bad = stop_doc(48, " ... river" * 3 + " … river" * 2 + " … …")  # 7 / 55 > 0.1
    assert GopherQuality()(bad) == Verdict(None, "gopher_quality.ellipsis_ratio")


def _lines_doc(n_marked: int, mark) -> str:
    """Ten lines of six words (the first with two stop words); `mark` applied to `n_marked`."""
    lines = [" ".join((["the", "and"] if i == 0 else []) + filler(6 if i else 4)) for i in range(10)]
    return "\n\n".join(mark(i, line) if i < n_marked else line for i, line in enumerate(lines))


def test_gopher_bullet_lines_ignore_blank_lines():
    def bullet(i, line):
        return "• " + line
    assert GopherQuality()(_lines_doc(9, bullet)).reason == ""  # 9 / 10 == 0.9
    assert GopherQuality()(_lines_doc(10, bullet)) == Verdict(None, "gopher_quality.bullet_lines")
    assert GopherQuality()(_lines_doc(10, lambda i, line: "- " + line)).reason == "gopher_quality.bullet_lines"


def test_gopher_ellipsis_lines():
    def trail(i, line):
        return line + ("…" if i % 2 else "...")
    assert GopherQuality()(_lines_doc(3, trail)).reason == ""  # 3 / 10 == 0.3
    assert GopherQuality()(_lines_doc(4, trail)) == Verdict(None, "gopher_quality.ellipsis_lines")


def test_gopher_alpha_words():
    assert GopherQuality()(stop_doc(38, " 1234" * 10)).reason == ""  # 40 / 50 == 0.8
    assert GopherQuality()(stop_doc(37, " 1234" * 11)) == Verdict(None, "gopher_quality.alpha_words")


def test_gopher_stop_words_case_insensitive_and_counted_per_occurrence():
    two = " ".join(["The"] + filler(48) + ["THE"])
    assert GopherQuality()(two).reason == ""
    one = " ".join(["The"] + filler(49))
    assert GopherQuality()(one) == Verdict(None, "gopher_quality.stop_words")
    assert GopherQuality(min_stop_words=1)(one).reason == ""


# --- Gopher repetition --------------------------------------------------------------------

def _ngram_reference(words, n):
    """Brute force: (top fraction, duplicate fraction) of word characters, as defined."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    total = sum(map(len, words)) or 1

    def chars(positions):
        return sum(len(words[j]) for j in {j for i in positions for j in range(i, i + n)})
    counts = collections.Counter(grams)
    top = 0.0
    if grams and max(counts.values()) > 1:
        best = max(counts.values())
        top = max(chars([i for i, h in enumerate(grams) if h == g]) for g in counts if counts[g] == best)
    repeats = [i for i, g in enumerate(grams) if g in grams[:i]]
    return top / total, chars(repeats) / total


def test_ngram_fractions_match_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        vocab = ["".join(rng.choices("ab", k=rng.randint(1, 3))) for _ in range(rng.randint(1, 5))]
        words = rng.choices(vocab, k=rng.randint(0, 30))
        got = {(kind, n): f for kind, n, f in ngram_fractions(words, range(2, 11), range(2, 11))}
        for n in range(2, 11):
            top, dup = _ngram_reference(words, n)
            assert got.get(("top", n), 0.0) == pytest.approx(top) and got.get(("dup", n), 0.0) == pytest.approx(dup)


LINES_ONLY = GopherRepetition(top_ngrams=(), dup_ngrams=())


def _units(n_unique: int, dup: str, copies: int, sep: str, length: int = 29) -> str:
    uniques = [" ".join(unique_words(5, f"{chr(97 + i // 100)}{i % 100:02d}"))[:length] for i in range(n_unique)]
    return sep.join(uniques[: n_unique // 2] + [dup] * copies + uniques[n_unique // 2:])


@pytest.mark.parametrize("kind,sep", [("line", "\n"), ("para", "\n\n")])
def test_duplicate_line_and_paragraph_fraction(kind, sep):
    good = _units(69, "a b", 31, sep)  # 30 duplicates in 100
    assert GopherRepetition()(good).reason == ""
    bad = _units(68, "a b", 32, sep)  # 31 duplicates in 100
    assert GopherRepetition()(bad) == Verdict(None, f"gopher_repetition.dup_{kind}_frac")


@pytest.mark.parametrize("kind,sep", [("line", "\n"), ("para", "\n\n")])
def test_duplicate_line_and_paragraph_char_fraction(kind, sep):
    good = _units(8, "d" * 16, 2, sep, length=6)  # 16 / (48 + 32) == 0.2
    assert LINES_ONLY(good).reason == ""
    bad = good[:-1]  # 16 / 79
    assert LINES_ONLY(bad) == Verdict(None, f"gopher_repetition.dup_{kind}_char_frac")


def _repeated_gram_doc(n: int, total_chars: int) -> str:
    """One n-gram of 5-char words twice among distinct words; `total_chars` word characters."""
    gram = unique_words(n, "g")
    rest = total_chars - 10 * n
    fill = unique_words(rest // 5, "f") + (["q" * (rest % 5)] if rest % 5 else [])
    half = len(fill) // 2
    return " ".join(gram + fill[:half] + gram + fill[half:])


@pytest.mark.parametrize("n,limit", [(2, "0.20"), (3, "0.18"), (4, "0.16")])
def test_top_ngram_char_share(n, limit):
    # Both occurrences count: 10n characters; the shortest passing document is ceil(10n / limit).
    total = math.ceil(10 * n / Fraction(limit))
    assert GopherRepetition()(_repeated_gram_doc(n, total)).reason == ""
    assert GopherRepetition()(_repeated_gram_doc(n, total - 1)) == Verdict(None, f"gopher_repetition.top_{n}gram")


@pytest.mark.parametrize("n,limit", [(5, "0.15"), (6, "0.14"), (7, "0.13"), (8, "0.12"), (9, "0.11"), (10, "0.10")])
def test_duplicate_ngram_char_fraction(n, limit):
    # Only the repeat counts: 5n characters. Top n-gram shares are off to reach these checks.
    rule = GopherRepetition(top_ngrams=())
    total = math.ceil(5 * n / Fraction(limit))
    assert rule(_repeated_gram_doc(n, total)).reason == ""
    assert rule(_repeated_gram_doc(n, total - 1)) == Verdict(None, f"gopher_repetition.dup_{n}gram")


def test_overlapping_repeats_count_each_character_once():
    words = ["abcde"] * 20  # the 5-gram at 1 repeats the one at 0: all but the first word
    fractions = {(k, n): f for k, n, f in ngram_fractions(words, [2], [5])}
    assert fractions == {("top", 2): 1.0, ("dup", 5): 19 / 20}


def test_repetition_of_empty_text_keeps_it():
    assert GopherRepetition()("") == Verdict("", "")


# --- C4 -----------------------------------------------------------------------------------

C4_LINES = ["The cat sat on the mat.", "It was a sunny day!", "Was it really sunny?",
            'She said "it is."', "He said 'no way.'"]


def test_c4_keeps_clean_document_unchanged():
    text = "\n".join(C4_LINES)
    assert C4Lines()(text) == Verdict(text, "")


def test_c4_too_few_sentences_counts_sentences_within_lines():
    assert C4Lines()("\n".join(C4_LINES[:4])) == Verdict(None, "c4.too_few_sentences")
    two = "\n".join(C4_LINES[:3] + ["One two three. Four five six."])
    assert C4Lines()(two) == Verdict(two, "")


@pytest.mark.parametrize("line", [
    "no terminal punctuation here",
    "trailing ellipsis is not an end...",
    "Two words.",
    "Please enable JavaScript to view this page.",
    "Read our Privacy Policy now.",
    "This site uses cookies for you.",
    "A line with " + "w" * 1001 + " word.",
])
def test_c4_drops_bad_lines(line):
    text = "\n".join(C4_LINES[:2] + [line] + C4_LINES[2:])
    assert C4Lines()(text) == Verdict("\n".join(C4_LINES), "c4.lines_removed")


def test_c4_keeps_three_word_lines_and_strips_citations():
    text = "\n".join(C4_LINES + ["Three words here.", "Rivers are long.[1][citation needed]"])
    want = "\n".join(C4_LINES + ["Three words here.", "Rivers are long."])
    assert C4Lines()(text) == Verdict(want, "c4.lines_removed")


def test_c4_document_level_drops_apply_to_surviving_lines_only():
    assert C4Lines()("\n".join(C4_LINES + ["Lorem ipsum dolor sit amet."])) == Verdict(None, "c4.lorem_ipsum")
    assert C4Lines()("\n".join(C4_LINES + ["Use a dict {1: 2} here."])) == Verdict(None, "c4.curly_bracket")
    code = "\n".join(C4_LINES + ["d = {1: 2}"])  # the line fails the punctuation test first
    assert C4Lines()(code) == Verdict("\n".join(C4_LINES), "c4.lines_removed")


# --- min words and blocklist --------------------------------------------------------------

def test_min_words():
    assert MinWords()(" ".join(filler(50))).reason == ""
    assert MinWords()(" ".join(filler(49))) == Verdict(None, "min_words.too_few")
    assert MinWords(min_words=3)("one, two -- three") == Verdict("one, two -- three")


def test_blocklist_whole_words_any_case_and_multiword_terms():
    rule = Blocklist(terms=("Ass", "bad  phrase", "f*ck"))
    for clean in ["a class of assessment", "bad phrasebook", "fuck"]:
        assert rule(clean) == Verdict(clean) and rule.matched_term(clean) is None
    for text, term in [("Kick ASS!", "Ass"), ("a BAD\n phrase", "bad  phrase"), ("f*ck.", "f*ck")]:
        assert rule(text) == Verdict(None, "blocklist.match")
        assert rule.matched_term(text) == term


def test_blocklist_terms_file(tmp_path):
    path = tmp_path / "terms.txt"
    path.write_text("# comment\n\nbadword\nworse word\n", encoding="utf-8")
    rule = build_rules({"blocklist": {"terms_file": str(path)}})[0]
    assert rule("a BadWord here") == Verdict(None, "blocklist.match")
    assert rule.matched_term("it is worse  word") == "worse word"
    assert rule("comment") == Verdict("comment")
    with pytest.raises(ConfigError, match="missing.txt"):
        Blocklist(terms_file=str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="no terms"):
        Blocklist()


# --- build_rules --------------------------------------------------------------------------

def test_build_rules_in_order_with_params():
    rules = build_rules({"pii": {"max_matches": 3}, "html": True, "c4": False, "min_words": None,
                         "gopher_quality": {"min_words": 20, "max_hash_ratio": 1},
                         "gopher_repetition": {"top_ngrams": [[2, 0.5]]}})
    assert rules == [PiiScrub(max_matches=3), HtmlStrip(), MinWords(),
                     GopherQuality(min_words=20, max_hash_ratio=1.0),
                     GopherRepetition(top_ngrams=((2, 0.5),))]
    assert isinstance(rules[3].max_hash_ratio, float)


@pytest.mark.parametrize("spec,match", [
    ({"nope": True}, r"unknown filter 'nope'; allowed: html, language, gopher_quality, .*pii"),
    ({"pii": {"max": 3}}, r"filter 'pii' has no parameter 'max'; allowed: max_matches"),
    ({"pii": {"max_matches": "3"}}, r"pii.max_matches='3' has the wrong type; expected int"),
    ({"pii": {"max_matches": True}}, r"expected int"),
    ({"pii": {"max_matches": 3.0}}, r"expected int"),
    ({"gopher_quality": {"max_hash_ratio": "high"}}, r"max_hash_ratio='high' has the wrong type; expected float"),
    ({"gopher_repetition": {"top_ngrams": [[2]]}}, r"top_ngrams"),
    ({"gopher_repetition": {"dup_ngrams": [[1, 0.5]]}}, r"sizes must be >= 2"),
    ({"blocklist": {"terms": 5}}, r"expected a list of str"),
    ({"html": "yes"}, r"filter 'html' takes true, false or a mapping"),
])
def test_build_rules_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        build_rules(spec)


def test_build_rules_missing_blocklist_file_names_path(tmp_path):
    with pytest.raises(ConfigError, match="nowhere/x.txt"):
        build_rules({"blocklist": {"terms_file": str(tmp_path / "nowhere" / "x.txt")}})
