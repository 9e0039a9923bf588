"""Document deduplication: exact (normalized hash) and near-duplicate (MinHash-LSH).

Exact-substring removal with a suffix array (Lee et al. 2022) lives in `dedup_suffix.py` and is
re-exported here, so `jaxlm.prepare.dedup` is the one entry point. Everything is numpy and pure
Python: no I/O. `MinHashDedup` is a small streaming index whose memory is its band buckets
(`bands` keys per document) and a buffer of a few thousand words, never the whole texts.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Hashable, Iterable, Sequence

import numpy as np

from jaxlm.prepare.dedup_suffix import SpanStats, lcp_array, remove_repeated_spans, suffix_array

__all__ = [
    "MinHashDedup",
    "SpanStats",
    "estimate_jaccard",
    "exact_duplicates",
    "exact_key",
    "lcp_array",
    "normalize",
    "remove_repeated_spans",
    "suffix_array",
]

# Anything that is not a word character (a Unicode letter or digit) or whitespace; `_` counts as
# punctuation although `\w` matches it. `_ASCII_DELETE` is the same set restricted to ASCII, for
# a fast path that gives identical results on ASCII text (NFKC leaves ASCII unchanged).
_PUNCT = re.compile(r"[^\w\s]|_")
_ASCII_DELETE = bytes(c for c in range(128)
                      if not (chr(c).isalnum() or chr(c).isspace()) or chr(c) == "_")


def normalize(text: str) -> str:
    """The text that dedup compares: NFKC, lowercase, punctuation deleted, whitespace collapsed.

    Steps, in order: Unicode NFKC (full-width letters, ligatures and compatibility forms fold to
    their plain forms); `str.lower`; delete every character that is neither a Unicode letter or
    digit nor whitespace, and `_` (so "Don't!" -> "dont"; symbols, emoji and control characters
    vanish); replace each run of whitespace by one space and strip both ends. Words are then
    `text.split(" ")`.
    """
    if text.isascii():
        text = text.lower().encode("ascii").translate(None, _ASCII_DELETE).decode("ascii")
    else:
        text = _PUNCT.sub("", unicodedata.normalize("NFKC", text).lower())
    return " ".join(text.split())


def exact_key(text: str) -> bytes:
    """128-bit BLAKE2b digest of `normalize(text)`: equal keys mean exact duplicates."""
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()


def exact_duplicates(texts: Iterable[str]) -> list[bool]:
    """True for each text whose `normalize`d form equals an earlier one's (the first is kept).

    Compares `exact_key`s, so memory is 16 bytes (plus a set entry) per distinct document,
    whatever the corpus size; a false match needs a 128-bit collision.
    """
    seen: set[bytes] = set()
    flags = []
    for text in texts:
        key = exact_key(text)
        flags.append(key in seen)
        seen.add(key)
    return flags


# ---------------------------------------------------------------------------------------------
# MinHash-LSH (Broder 1997), as in the Gopher / RefinedWeb / FineWeb pipelines.


_CHUNK_WORDS = 4096  # words hashed per numpy pass: [num_perm, ~4096] uint64 stays in cache


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: an avalanching bijection of uint64 (wrapping multiplies)."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """MinHash estimate of the Jaccard similarity of two sets: the fraction of equal slots."""
    return float(np.mean(np.asarray(sig_a) == np.asarray(sig_b)))


class MinHashDedup:
    """Near-duplicate detection: word n-gram shingles, MinHash signatures, LSH bands, union-find.

    Shingles are the n-grams of words of `normalize(text)` (a document of fewer than `ngram`
    words is one shingle; an empty one is the empty shingle). Hashing, all vectorized:

    - word: each byte c at offset k of " " + word contributes (c + 1) * K[k mod 64] (random odd
      uint64 K, sums wrap mod 2^64), then the MurmurHash3 finalizer;
    - shingle: sum_j word_hash[i + j] * G[j] mod 2^64 (order-sensitive), then the finalizer;
      its top 32 bits x are the key;
    - permutation p: h_p(x) = ((a_p * x + b_p) mod 2^64) >> 32 with a_p, b_p uniform 64-bit
      integers: Dietzfelbinger's multiply-add-shift family, 2-independent (strongly universal)
      from 32-bit keys to 32-bit values (Dietzfelbinger 1996). The products wrap mod 2^64 by
      design, so numpy uint64 arithmetic is exact; no overflow to guard.

    The signature is the per-permutation minimum: uint32 [num_perm]. LSH cuts it into `bands`
    bands of `rows` values; two documents are candidates when any band matches exactly, which
    happens with probability 1 - (1 - J^rows)^bands for Jaccard J (14 x 8: 0.9 -> 99.96%,
    0.8 -> 92%, 0.5 -> 5%). Candidates are joined with union-find; each cluster keeps the
    document added first.

    Streaming: `add` / `add_many` in any number of calls, then `duplicates()`, `clusters()` or
    `candidate_pairs()` at any time. The index holds `bands` bucket entries and one union-find
    slot per document, never signatures, and texts only in a buffer of ~4k words that `add`
    hashes in one batch. `fit(texts)` does all of it in one call.
    """

    def __init__(self, num_perm: int = 112, bands: int = 14, rows: int = 8, ngram: int = 5,
                 seed: int = 0):
        if bands * rows != num_perm:
            raise ValueError(f"bands * rows must equal num_perm, got bands={bands} * rows={rows} "
                             f"= {bands * rows} and num_perm={num_perm}.")
        if min(bands, rows, ngram) < 1:
            raise ValueError(f"bands, rows and ngram must be >= 1, got bands={bands}, "
                             f"rows={rows}, ngram={ngram}.")
        self.num_perm, self.bands, self.rows, self.ngram = num_perm, bands, rows, ngram
        rng = np.random.default_rng(seed)
        u64 = lambda k: rng.integers(0, 2**64, size=k, dtype=np.uint64)  # noqa: E731
        self._char_keys = u64(64) | np.uint64(1)  # odd multipliers
        self._gram_keys = u64(ngram) | np.uint64(1)
        self._a, self._b = u64(num_perm), u64(num_perm)
        self._band_keys = u64(rows) | np.uint64(1)
        self._buckets: list[dict[int, list[int]]] = [{} for _ in range(bands)]
        self._parent: list[int] = []  # union-find over insertion indices; a root is its oldest
        self._ids: list[Hashable] = []
        self._index: dict[Hashable, int] = {}
        self._pending: list[str] = []  # normalized texts of the newest ids, not yet in buckets
        self._pending_words = 0

    # -- signatures (pure) --------------------------------------------------------------------

    def signature(self, text: str) -> np.ndarray:
        """uint32 [num_perm] MinHash signature of one text."""
        return self.signatures([text])[0]

    def signatures(self, texts: Iterable[str], chunk_words: int = _CHUNK_WORDS) -> np.ndarray:
        """uint32 [N, num_perm] signatures; texts are hashed together ~`chunk_words` words at a
        time (a row does not depend on its neighbours)."""
        out, batch, words = [], [], 0
        for text in texts:
            norm = normalize(text)
            batch.append(norm)
            words += norm.count(" ") + 1
            if words >= chunk_words:
                out.append(self._signatures_of_normalized(batch))
                batch, words = [], 0
        if batch:
            out.append(self._signatures_of_normalized(batch))
        return np.concatenate(out) if out else np.zeros((0, self.num_perm), np.uint32)

    def _signatures_of_normalized(self, norms: list[str]) -> np.ndarray:
        """[len(norms), num_perm] signatures of already-normalized texts, all in one pass."""
        counts_D = np.array([s.count(" ") + 1 for s in norms], np.int64)  # words per doc
        # Every word (an empty doc is one empty word) starts with its own leading space byte.
        buf = np.frombuffer((" " + " ".join(norms)).encode("utf-8"), np.uint8)
        starts_W = np.flatnonzero(buf == 32)
        offset = np.arange(buf.size) - np.repeat(starts_W, np.diff(starts_W, append=buf.size))
        byte_keys = (buf.astype(np.uint64) + np.uint64(1)) * self._char_keys[offset & 63]
        word_W = _fmix64(np.add.reduceat(byte_keys, starts_W))

        n, total = self.ngram, word_W.size
        doc_start_D = np.cumsum(counts_D) - counts_D
        pos_W = np.arange(total) - np.repeat(doc_start_D, counts_D)  # word index in its doc
        count_W = np.repeat(counts_D, counts_D)
        padded = np.concatenate([word_W, np.zeros(n - 1, np.uint64)])
        acc_W = padded[:total] * self._gram_keys[0]
        for j in range(1, n):
            acc_W += padded[j:j + total] * self._gram_keys[j]
        for d in np.flatnonzero(counts_D < n):  # one shingle that stops at the doc's last word
            first, c = doc_start_D[d], counts_D[d]
            acc_W[first] = np.sum(word_W[first:first + c] * self._gram_keys[:c], dtype=np.uint64)
        valid = (pos_W + n <= count_W) | (pos_W == 0)
        key_S = _fmix64(acc_W[valid]) >> np.uint64(32)

        # [P, S] so each permutation's row is contiguous for the segmented min. `>> 32` is
        # monotone, so it is applied after the min, on [P, D] instead of [P, S].
        perm_PS = np.multiply.outer(self._a, key_S)
        perm_PS += self._b[:, None]
        shingles_D = np.maximum(counts_D - n + 1, 1)
        min_PD = np.minimum.reduceat(perm_PS, np.cumsum(shingles_D) - shingles_D, axis=1)
        return (min_PD >> np.uint64(32)).astype(np.uint32).T

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """uint64 [N, bands] hash of each band of `rows` signature values (mixed after each)."""
        sigs_NBR = np.asarray(sigs, np.uint64).reshape(-1, self.bands, self.rows)
        key_NB = np.zeros(sigs_NBR.shape[:2], np.uint64)
        for r in range(self.rows):
            key_NB = _fmix64(key_NB * self._band_keys[r] + sigs_NBR[:, :, r])
        return key_NB

    # -- the streaming index ------------------------------------------------------------------

    def add(self, doc_id: Hashable, text: str) -> None:
        """Index one document; `doc_id` must be new. Texts are buffered (a few thousand words at
        most) and hashed in batches; every query flushes the buffer first."""
        norm = normalize(text)
        self._register([doc_id])
        self._pending.append(norm)
        self._pending_words += norm.count(" ") + 1
        if self._pending_words >= _CHUNK_WORDS:
            self._flush()

    def add_many(self, doc_ids: Sequence[Hashable], texts: Sequence[str]) -> None:
        """Index documents in order, hashing them in vectorized batches."""
        if len(doc_ids) != len(texts):
            raise ValueError(f"doc_ids and texts differ in length: {len(doc_ids)} != {len(texts)}.")
        self.add_signatures(doc_ids, self.signatures(texts))

    def add_signatures(self, doc_ids: Sequence[Hashable], sigs: np.ndarray) -> None:
        """Index precomputed signatures [N, num_perm] (e.g. computed on other workers)."""
        if len(doc_ids) != len(sigs):
            raise ValueError(f"doc_ids and sigs differ in length: {len(doc_ids)} != {len(sigs)}.")
        self._flush()
        self._insert(self._register(doc_ids), sigs)

    def _register(self, doc_ids: Sequence[Hashable]) -> range:
        """Give new ids the next insertion indices (union-find slots)."""
        first = len(self._ids)
        for doc_id in doc_ids:
            if doc_id in self._index:
                raise ValueError(f"doc_id {doc_id!r} was already added; ids must be unique.")
            self._index[doc_id] = len(self._ids)
            self._ids.append(doc_id)
            self._parent.append(len(self._parent))
        return range(first, len(self._ids))

    def _flush(self) -> None:
        if self._pending:
            n = len(self._pending)
            sigs = self._signatures_of_normalized(self._pending)
            self._pending, self._pending_words = [], 0
            self._insert(range(len(self._ids) - n, len(self._ids)), sigs)

    def _insert(self, idxs: range, sigs: np.ndarray) -> None:
        for idx, keys in zip(idxs, self.band_keys(sigs).tolist(), strict=True):
            for bucket, key in zip(self._buckets, keys):
                members = bucket.setdefault(key, [])
                if members:
                    self._union(members[0], idx)
                members.append(idx)

    def _find(self, i: int) -> int:
        parent = self._parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    def _union(self, i: int, j: int) -> None:
        ri, rj = self._find(i), self._find(j)
        if ri != rj:  # the older root wins, so every root is its cluster's first document
            self._parent[max(ri, rj)] = min(ri, rj)

    def duplicates(self) -> set[Hashable]:
        """Ids to drop: every document but the first-added of its cluster."""
        self._flush()
        return {self._ids[i] for i in range(len(self._ids)) if self._find(i) != i}

    def clusters(self) -> list[list[Hashable]]:
        """Clusters of two or more documents, each in insertion order (its first is kept)."""
        self._flush()
        groups: dict[int, list[Hashable]] = {}
        for i, doc_id in enumerate(self._ids):
            groups.setdefault(self._find(i), []).append(doc_id)
        return [members for _, members in sorted(groups.items()) if len(members) > 1]

    def candidate_pairs(self) -> set[tuple[Hashable, Hashable]]:
        """Every (earlier id, later id) pair sharing at least one band bucket, for evaluation.

        Quadratic in bucket size: meant for measuring recall and precision, not for production.
        """
        self._flush()
        pairs = set()
        for bucket in self._buckets:
            for members in bucket.values():
                for a in range(len(members)):
                    for b in range(a + 1, len(members)):
                        pairs.add((self._ids[members[a]], self._ids[members[b]]))
        return pairs

    def fit(self, texts: Sequence[str]) -> tuple[np.ndarray, list[list[int]]]:
        """Dedup a whole corpus on a fresh index: (keep_mask bool [N], clusters of indices)."""
        if self._ids:
            raise ValueError(f"fit needs a fresh index, but {len(self._ids)} documents were "
                             "already added.")
        self.add_many(range(len(texts)), texts)
        keep = np.array([self._find(i) == i for i in range(len(texts))], bool)
        return keep, self.clusters()
