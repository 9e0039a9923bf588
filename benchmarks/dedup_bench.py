"""MinHash-LSH dedup throughput: jaxlm.prepare.dedup.MinHashDedup vs datasketch, same corpus.

    python benchmarks/dedup_bench.py [--docs 10000] [--dup-frac 0.2] [--words 300]

Both sides start from raw text, use the same shingles (word 5-grams of `normalize(text)`) and
the same (num_perm, bands, rows), and run back to back in one process (alternating `--repeats`
times, best time of each). datasketch gets its fastest ordinary path: permutations built
once and shared, `MinHash.update_batch`, and the streaming idiom `MinHashLSH.query` then
`insert`. Prints docs/s for each, the ratio, and how far the duplicate pairs found agree.
Needs `datasketch` (a dev-only dependency).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from jaxlm.prepare.dedup import MinHashDedup, normalize


def synthetic_corpus(n_docs: int, dup_frac: float, words: int, vocab_size: int, seed: int
                     ) -> tuple[list[str], set[tuple[int, int]]]:
    """Random-word documents; a `dup_frac` share are copies of an earlier one with a contiguous
    run of 2-3% of the words replaced. Returns (texts, planted (original, copy) pairs)."""
    rng = np.random.default_rng(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(letters[c] for c in rng.integers(0, 26, rng.integers(2, 9)))
             for _ in range(vocab_size)]
    n_copies = int(n_docs * dup_frac)
    bases = [rng.integers(0, vocab_size, words).tolist() for _ in range(n_docs - n_copies)]
    docs, planted = list(bases), set()
    for _ in range(n_copies):
        src = int(rng.integers(len(bases)))
        run = int(rng.integers(words // 50, words * 3 // 100 + 1))
        at = int(rng.integers(0, words - run))
        docs.append(bases[src][:at] + rng.integers(0, vocab_size, run).tolist()
                    + bases[src][at + run:])
        planted.add((src, len(docs) - 1))
    return [" ".join(vocab[w] for w in d) for d in docs], planted


def run_jaxlm(texts: list[str], num_perm: int, bands: int, rows: int, ngram: int):
    start = time.perf_counter()
    dedup = MinHashDedup(num_perm=num_perm, bands=bands, rows=rows, ngram=ngram)
    dedup.add_many(range(len(texts)), texts)
    drop = dedup.duplicates()
    seconds = time.perf_counter() - start
    return seconds, drop, dedup.candidate_pairs()


def run_datasketch(texts: list[str], num_perm: int, bands: int, rows: int, ngram: int):
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    perms = MinHash(num_perm=num_perm).permutations
    lsh = MinHashLSH(num_perm=num_perm, params=(bands, rows))
    drop, pairs = set(), set()
    for i, text in enumerate(texts):
        words = normalize(text).split(" ")
        grams = [" ".join(words[j:j + ngram]) for j in range(max(len(words) - ngram + 1, 1))]
        m = MinHash(num_perm=num_perm, permutations=perms, scheme="affine32")
        m.update_batch([g.encode("utf-8") for g in grams])
        found = lsh.query(m)
        if found:
            drop.add(i)
            pairs.update((j, i) for j in found)
        lsh.insert(i, m)
    return time.perf_counter() - start, drop, pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--dup-frac", type=float, default=0.2)
    parser.add_argument("--words", type=int, default=300)
    parser.add_argument("--vocab", type=int, default=5_000)
    parser.add_argument("--num-perm", type=int, default=112)
    parser.add_argument("--bands", type=int, default=14)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--ngram", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    texts, planted = synthetic_corpus(args.docs, args.dup_frac, args.words, args.vocab, args.seed)
    params = (args.num_perm, args.bands, args.rows, args.ngram)
    print(f"corpus: {len(texts)} docs x {args.words} words, {len(planted)} planted near-duplicates;"
          f" num_perm={args.num_perm} bands={args.bands} rows={args.rows} ngram={args.ngram}")
    jx_s = ds_s = float("inf")
    for _ in range(args.repeats):  # alternate, keep the best of each: fairer on a busy machine
        seconds, jx_drop, jx_pairs = run_jaxlm(texts, *params)
        jx_s = min(jx_s, seconds)
        seconds, ds_drop, ds_pairs = run_datasketch(texts, *params)
        ds_s = min(ds_s, seconds)
    jx_rate, ds_rate = len(texts) / jx_s, len(texts) / ds_s
    print(f"jaxlm      {jx_rate:10.0f} docs/s  ({jx_s:.2f} s)  drops {len(jx_drop)}  "
          f"pairs {len(jx_pairs)}  planted recall {len(jx_pairs & planted) / len(planted):.4f}")
    print(f"datasketch {ds_rate:10.0f} docs/s  ({ds_s:.2f} s)  drops {len(ds_drop)}  "
          f"pairs {len(ds_pairs)}  planted recall {len(ds_pairs & planted) / len(planted):.4f}")
    union = jx_pairs | ds_pairs
    print(f"speedup jaxlm/datasketch = {jx_rate / ds_rate:.2f}x; candidate-pair overlap "
          f"|A&B|/|A|B| = {len(jx_pairs & ds_pairs) / max(len(union), 1):.4f}; "
          f"drop-set overlap = {len(jx_drop & ds_drop) / max(len(jx_drop | ds_drop), 1):.4f}")


if __name__ == "__main__":
    main()
