"""Exact repeated substrings with a suffix array (Lee et al. 2022, "Deduplicating Training Data
Makes Language Models Better", ExactSubstr).

Policy, as in google-research/deduplicate-text-datasets (`self-similar`, then `collect`, then
`finish_single_file.py`; README, "Collecting the duplicates together"): every window of
`min_len` tokens that occurs at least twice in the corpus is marked at *every* occurrence, the
first included; the union of the marked windows (overlapping or touching windows merge into one
span) is struck out. No copy is kept: the README says "we suggest just taking all of these
duplicate sequences ... and completely striking them from the dataset". Documents are joined
with separators that are unique per document, so no match crosses a document boundary. As the
README notes, striking can create new repeats (the paper ran the pass twice); call again to
iterate.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class SpanStats:
    """What `remove_repeated_spans` struck out."""

    spans_removed: int  # maximal contiguous runs of removed tokens, over all documents
    tokens_removed: int
    docs_changed: int


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """int64 [n] start positions of the suffixes of a 1-D int array, in lexicographic order.

    Prefix doubling (Manber & Myers 1993) with Larsson & Sadakane's (2007) shortcut: after the
    round with step k every suffix is ranked by its first 2k tokens, its rank being the
    position in `sa` where its group of equal prefixes starts. A round re-sorts only suffixes
    in groups of two or more, by (rank[i], rank[i + k]) packed into one int64, so unique
    prefixes drop out and later rounds touch only repeated text. Each round is one argsort:
    O(n log^2 n) at worst, about log2(longest repeat) rounds. A suffix that is a prefix of
    another sorts first.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape} "
                         f"and dtype {tokens.dtype}.")
    n = tokens.size
    sa = np.argsort(tokens, kind="stable").astype(np.int64)
    rank = np.empty(n, np.int64)
    pos = np.arange(n, dtype=np.int64)  # positions in `sa` still to sort: all, at first
    first = np.ones(n, bool)
    first[1:] = tokens[sa[1:]] != tokens[sa[:-1]]
    k = 1
    while True:
        # Rank = where the group starts in sa; then keep the groups of two or more.
        group_start = np.maximum.accumulate(np.where(first, pos, 0))
        rank[sa[pos]] = group_start
        starts = np.flatnonzero(first)
        sizes = np.diff(starts, append=pos.size)
        pos = pos[np.repeat(sizes > 1, sizes)]
        if pos.size == 0:
            return sa
        members = sa[pos]
        second = np.full(pos.size, -1, np.int64)  # -1 = past the end, which sorts first
        inside = members + k < n
        second[inside] = rank[members[inside] + k]
        key = rank[members] * (n + 1) + second + 1  # < 2^63 for n < 3e9
        order = np.argsort(key)
        sa[pos] = members[order]  # a group's members stay inside its own slots
        key = key[order]
        first = np.ones(pos.size, bool)
        first[1:] = key[1:] != key[:-1]
        k *= 2


def lcp_array(tokens: np.ndarray, sa: np.ndarray) -> np.ndarray:
    """int64 [n]: lcp[i] = length of the longest common prefix of suffixes sa[i-1] and sa[i];
    lcp[0] = 0.

    Kasai et al. (2001), in its Phi form (Karkkainen et al. 2009): walk the text in order,
    comparing suffix i with the suffix just before it in `sa`; that LCP drops by at most one
    from i to i + 1, so the total work is O(n). The loop is plain Python over lists (about
    1.5 s per million tokens); the permutations around it are numpy.
    """
    tokens, sa = np.asarray(tokens), np.asarray(sa, np.int64)
    n = sa.size
    if n == 0:
        return np.zeros(0, np.int64)
    t = tokens.tolist()
    t.append(None)  # equal to no token, so a match stops at the end without a bounds check
    phi = np.empty(n, np.int64)  # phi[i] = the suffix before suffix i in sa (-1 for the first)
    phi[sa[0]] = -1
    phi[sa[1:]] = sa[:-1]
    plcp = [0] * n  # plcp[i] = lcp of suffix i with phi[i]
    h = 0
    for i, j in enumerate(phi.tolist()):
        if j < 0:
            h = 0
            continue
        while t[i + h] == t[j + h]:
            h += 1
        plcp[i] = h
        if h:
            h -= 1
    return np.array(plcp, np.int64)[sa]


def remove_repeated_spans(docs: Sequence[np.ndarray], min_len: int = 50
                          ) -> tuple[list[np.ndarray], SpanStats]:
    """Strike every occurrence of every token window of length >= `min_len` that occurs at least
    twice in the corpus (see the module docstring for the policy and its source).

    docs: 1-D integer token arrays. Returns the documents with those tokens deleted (same
    dtypes; untouched documents are returned as they are) and the counts.
    """
    if min_len < 1:
        raise ValueError(f"min_len must be >= 1, got {min_len}.")
    docs = [np.asarray(d) for d in docs]
    for i, d in enumerate(docs):
        if d.ndim != 1 or not np.issubdtype(d.dtype, np.integer):
            raise ValueError(f"docs[{i}] must be a 1-D integer array, got shape {d.shape} "
                             f"and dtype {d.dtype}.")
    if not docs:
        return [], SpanStats(0, 0, 0)
    lengths = np.array([d.size for d in docs], np.int64)
    # Dense token ids 0..u-1, then document i is followed by the separator u + i (unique).
    values, dense = np.unique(np.concatenate(docs), return_inverse=True)
    seps = values.size + np.arange(len(docs), dtype=np.int64)
    ends = np.cumsum(lengths + 1)  # one past each separator
    seq = np.empty(int(ends[-1]), np.int64)
    is_sep = np.zeros(seq.size, bool)
    is_sep[ends - 1] = True
    seq[is_sep] = seps
    seq[~is_sep] = dense.reshape(-1)

    sa = suffix_array(seq)
    long_lcp = lcp_array(seq, sa) >= min_len
    # A suffix starts a repeated window when it shares min_len tokens with a neighbour in sa.
    repeated = long_lcp | np.append(long_lcp[1:], False)
    starts = sa[repeated]
    cover = (np.bincount(starts, minlength=seq.size + 1)
             - np.bincount(starts + min_len, minlength=seq.size + 1))
    removed = np.cumsum(cover[:-1]) > 0  # separators never match, so never removed

    new_docs, spans, tokens, changed = [], 0, 0, 0
    for d, end in zip(docs, ends.tolist()):
        cut = removed[end - 1 - d.size:end - 1]
        if not cut.any():
            new_docs.append(d)
            continue
        new_docs.append(d[~cut])
        spans += int(np.count_nonzero(cut[1:] & ~cut[:-1]) + cut[0])
        tokens += int(cut.sum())
        changed += 1
    return new_docs, SpanStats(spans, tokens, changed)
