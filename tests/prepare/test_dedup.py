"""Dedup: exact (normalized hash), MinHash-LSH near-duplicates, suffix-array repeated spans."""
import itertools
import random
import re
import unicodedata

import numpy as np
import pytest

from jaxlm.prepare.dedup import (
    MinHashDedup,
    SpanStats,
    estimate_jaccard,
    exact_duplicates,
    exact_key,
    lcp_array,
    normalize,
    remove_repeated_spans,
    suffix_array,
)

# -- exact ----------------------------------------------------------------------------------


def _reference_normalize(text):
    """The documented definition, spelled out without the ASCII fast path."""
    text = re.sub(r"[^\w\s]|_", "", unicodedata.normalize("NFKC", text).lower())
    return " ".join(text.split())


def test_normalize_folds_case_width_punctuation_and_whitespace():
    assert normalize("  Hello,\tWORLD!!\n") == "hello world"
    assert normalize("Don't   stop_me now.") == "dont stopme now"
    assert normalize("ＦＵＬＬ ﬁne Ⅻ") == "full fine xii"  # NFKC: width, ligature, numeral
    assert normalize("Café  —  ÉTÉ") == "café été"
    assert normalize(" \t\n") == ""


def test_normalize_ascii_fast_path_equals_the_documented_definition():
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(128)] + ["é", "ß", "—", "\u00a0", "ｆ"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert normalize(text) == _reference_normalize(text), repr(text)


def test_exact_duplicates_collapse_case_and_whitespace_variants_only():
    texts = ["The quick brown fox.", "the  QUICK brown\nfox", "The quick brown dog.",
             "THE QUICK BROWN FOX!!", "", "  ", "quick the brown fox"]
    assert exact_duplicates(texts) == [False, True, False, True, False, True, False]
    assert exact_duplicates(iter(["a", "b", "c"])) == [False, False, False]
    assert exact_key("A  b!") == exact_key("a b") != exact_key("a c")
    assert len(exact_key("a b")) == 16


# -- MinHash-LSH ----------------------------------------------------------------------------


def _shingles(text, n=5):
    words = normalize(text).split(" ")
    return {tuple(words[i:i + n]) for i in range(max(len(words) - n + 1, 1))}


def _jaccard(a, b):
    return len(a & b) / len(a | b)


@pytest.fixture(scope="module")
def planted():
    """200 random 300-word docs from a 5k vocabulary, then one copy of each with a contiguous
    run of 6-9 words (2-3%) replaced. Returns (texts, [(original, copy)], true Jaccards)."""
    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
             for _ in range(5000)]
    bases = [[rng.choice(vocab) for _ in range(300)] for _ in range(200)]
    copies = []
    for words in bases:
        run = rng.randint(6, 9)
        at = rng.randrange(0, 300 - run)
        copies.append(words[:at] + [rng.choice(vocab) for _ in range(run)] + words[at + run:])
    texts = [" ".join(w) for w in bases + copies]
    pairs = [(i, 200 + i) for i in range(200)]
    jaccards = [_jaccard(_shingles(texts[i]), _shingles(texts[j])) for i, j in pairs]
    return texts, pairs, jaccards


def test_bands_times_rows_must_equal_num_perm():
    with pytest.raises(ValueError, match=r"bands=10 \* rows=8.*num_perm=112"):
        MinHashDedup(num_perm=112, bands=10, rows=8)
    with pytest.raises(ValueError, match="ngram"):
        MinHashDedup(num_perm=8, bands=2, rows=4, ngram=0)


def test_signatures_are_deterministic_and_independent_of_batching():
    texts = ["", "one", "two words", "a b c d", "a b c d e", "A, b; C d E!"] + [
        " ".join(f"w{i * j % 97}" for i in range(50 + j)) for j in range(40)]
    dedup = MinHashDedup(seed=3)
    sigs = dedup.signatures(texts, chunk_words=64)  # many chunks, short docs inside them
    assert sigs.shape == (len(texts), 112) and sigs.dtype == np.uint32
    np.testing.assert_array_equal(sigs, np.stack([dedup.signature(t) for t in texts]))
    np.testing.assert_array_equal(sigs, MinHashDedup(seed=3).signatures(texts))
    assert (sigs[1] != MinHashDedup(seed=4).signature(texts[1])).mean() > 0.9
    np.testing.assert_array_equal(sigs[4], sigs[5])  # same words after normalize
    assert estimate_jaccard(sigs[3], sigs[4]) < 0.2  # a short doc is one whole-text shingle


def test_signature_estimate_of_jaccard_is_unbiased():
    base = [f"w{i}" for i in range(120)]
    for keep in (30, 70, 105):  # shared prefix; the tail differs -> a range of Jaccards
        other = base[:keep] + [f"x{i}" for i in range(120 - keep)]
        a, b = " ".join(base), " ".join(other)
        truth = _jaccard(_shingles(a), _shingles(b))
        estimates = [estimate_jaccard(*MinHashDedup(seed=s).signatures([a, b])) for s in range(25)]
        sigma = np.sqrt(truth * (1 - truth) / (25 * 112))
        assert abs(np.mean(estimates) - truth) < 4 * sigma + 1e-3, (keep, truth, np.mean(estimates))


def test_planted_near_duplicates_are_caught_and_distinct_docs_are_not(planted):
    texts, pairs, jaccards = planted
    high = [p for p, j in zip(pairs, jaccards) if j >= 0.9]
    assert len(high) >= 150  # the corpus really has near-duplicates above the threshold
    keep, clusters = MinHashDedup().fit(texts)
    label = np.arange(len(texts))
    for c in clusters:
        label[c] = c[0]
    caught = [label[i] == label[j] for i, j in high]
    assert np.mean(caught) >= 0.95
    assert keep[:200].all()  # the original is the first of its cluster

    same = sum(len(c) * (len(c) - 1) // 2 for c in clusters)
    merged_planted = sum(label[i] == label[j] for i, j in pairs)
    distinct_pairs = len(texts) * (len(texts) - 1) // 2 - len(pairs)
    assert (same - merged_planted) / distinct_pairs <= 0.01


def test_streaming_adds_give_the_same_result_as_fit(planted):
    texts, pairs, _ = planted
    keep, clusters = MinHashDedup().fit(texts)
    stream = MinHashDedup()
    stream.add_many([f"d{i}" for i in range(300)], texts[:300])
    for i in range(300, 350):
        stream.add(f"d{i}", texts[i])  # buffered: the query below must flush it
    assert stream.duplicates() == {f"d{i}" for i in range(200, 350) if not keep[i]}
    for i in range(350, len(texts)):
        stream.add(f"d{i}", texts[i])
    assert stream.duplicates() == {f"d{i}" for i in np.flatnonzero(~keep)}
    assert stream.clusters() == [[f"d{i}" for i in c] for c in clusters]
    found = stream.candidate_pairs()
    assert all(a < b for a, b in ((int(a[1:]), int(b[1:])) for a, b in found))
    assert sum((f"d{i}", f"d{j}") in found for i, j in pairs) >= 190
    with pytest.raises(ValueError, match="'d7' was already added"):
        stream.add("d7", "anything")


def test_same_pairs_as_datasketch(planted):
    datasketch = pytest.importorskip("datasketch")
    texts, pairs, jaccards = planted
    lsh = datasketch.MinHashLSH(num_perm=112, params=(14, 8))
    theirs = set()
    for i, text in enumerate(texts):
        m = datasketch.MinHash(num_perm=112)
        m.update_batch([" ".join(s).encode() for s in _shingles(text)])
        theirs.update((j, i) for j in lsh.query(m))
        lsh.insert(i, m)
    dedup = MinHashDedup()
    dedup.add_many(range(len(texts)), texts)
    ours = dedup.candidate_pairs()
    high = {p for p, j in zip(pairs, jaccards) if j >= 0.9}
    assert len(ours & theirs & high) >= 0.95 * len(theirs & high)
    assert len(ours & theirs & high) >= 0.95 * len(ours & high)
    assert len(ours ^ theirs) <= 0.05 * len(ours | theirs)


# -- suffix array ---------------------------------------------------------------------------


def _brute_sa(t):
    return sorted(range(len(t)), key=lambda i: tuple(t[i:]))


def _brute_lcp(t, sa):
    lcp = [0] * len(sa)
    for r in range(1, len(sa)):
        a, b = t[sa[r - 1]:], t[sa[r]:]
        while lcp[r] < min(len(a), len(b)) and a[lcp[r]] == b[lcp[r]]:
            lcp[r] += 1
    return lcp


def test_suffix_array_and_lcp_match_brute_force():
    rng = np.random.default_rng(0)
    cases = [np.zeros(0, np.int32), np.array([5]), np.full(17, 2), np.tile([1, 2], 9),
             np.array([-3, 7, -3, 7, -3, 0])]
    cases += [rng.integers(-1, alphabet - 1, rng.integers(1, 60)) for alphabet in (2, 3, 5)
              for _ in range(40)]
    for t in cases:
        sa = suffix_array(t)
        assert sa.dtype == np.int64
        assert sa.tolist() == _brute_sa(t.tolist()), t
        assert lcp_array(t, sa).tolist() == _brute_lcp(t.tolist(), sa.tolist()), t
    with pytest.raises(ValueError, match="1-D integer"):
        suffix_array(np.zeros((2, 2), np.int32))


def _docs(rng, lengths, vocab=1000):
    return [rng.integers(0, vocab, n).astype(np.int32) for n in lengths]


def _insert(doc, span, at):
    return np.concatenate([doc[:at], span, doc[at:]]).astype(doc.dtype)


def test_repeated_span_is_struck_everywhere_and_short_repeat_kept():
    rng = np.random.default_rng(1)
    clean = _docs(rng, [200, 150, 180, 220, 90])
    long_span, short_span = rng.integers(2000, 3000, 60), rng.integers(3000, 4000, 40)
    docs = list(clean)
    docs[0] = _insert(clean[0], long_span, 50)
    docs[3] = _insert(clean[3], long_span, 120)
    docs[1] = _insert(clean[1], short_span, 10)
    docs[2] = _insert(clean[2], short_span, 170)
    new, stats = remove_repeated_spans(docs, min_len=50)
    assert stats == SpanStats(spans_removed=2, tokens_removed=120, docs_changed=2)
    np.testing.assert_array_equal(new[0], clean[0])  # the first occurrence goes too
    np.testing.assert_array_equal(new[3], clean[3])
    for i in (1, 2, 4):
        np.testing.assert_array_equal(new[i], docs[i])
    assert all(n.dtype == np.int32 for n in new)


def test_matches_never_cross_document_boundaries():
    rng = np.random.default_rng(2)
    span = rng.integers(2000, 3000, 60)
    a, b, c, d, e = _docs(rng, [100, 100, 100, 100, 100])
    # span is whole in c, and split over the a|b and d|e boundaries: joined with one shared
    # separator (or none), a|b and d|e would repeat 60+ tokens.
    docs = [np.concatenate([a, span[:30]]), np.concatenate([span[30:], b]), _insert(c, span, 40),
            np.concatenate([d, span[:30]]), np.concatenate([span[30:], e])]
    new, stats = remove_repeated_spans(docs, min_len=50)
    assert stats == SpanStats(0, 0, 0)
    for got, want in zip(new, docs):
        np.testing.assert_array_equal(got, want)


def test_overlapping_windows_merge_and_repeats_inside_one_document_count():
    rng = np.random.default_rng(3)
    span = rng.integers(2000, 3000, 80)
    a, b = _docs(rng, [120, 100])
    doc = np.concatenate([a[:30], span, a[30:70], span, a[70:]])
    new, stats = remove_repeated_spans([doc, b], min_len=50)
    assert stats == SpanStats(spans_removed=2, tokens_removed=160, docs_changed=1)
    np.testing.assert_array_equal(new[0], a)
    assert new[1] is b


def test_remove_repeated_spans_edge_cases():
    assert remove_repeated_spans([], min_len=5) == ([], SpanStats(0, 0, 0))
    new, stats = remove_repeated_spans([np.zeros(0, np.int64), np.arange(4)], min_len=2)
    assert stats == SpanStats(0, 0, 0) and [n.size for n in new] == [0, 4]
    with pytest.raises(ValueError, match="min_len must be >= 1"):
        remove_repeated_spans([np.arange(3)], min_len=0)


def test_every_removed_window_really_repeats():
    """Property check against brute force on a small corpus with many repeats."""
    rng = np.random.default_rng(4)
    docs = [rng.integers(0, 3, n) for n in (40, 30, 25)]
    min_len = 6
    windows = {}
    for d, doc in enumerate(docs):
        for i in range(len(doc) - min_len + 1):
            windows.setdefault(tuple(doc[i:i + min_len]), []).append((d, i))
    expected = [np.zeros(len(doc), bool) for doc in docs]
    for places in windows.values():
        if len(places) > 1:
            for d, i in places:
                expected[d][i:i + min_len] = True
    new, stats = remove_repeated_spans(docs, min_len=min_len)
    for doc, cut, got in zip(docs, expected, new):
        np.testing.assert_array_equal(got, doc[~cut])
    assert stats.tokens_removed == sum(int(c.sum()) for c in expected)
    assert list(itertools.chain(*expected)).count(True) > 0
