"""Model-based quality rules: a hashed n-gram logistic classifier, and a jaxlm LM's perplexity.

The classifier is the GPT-3 / LLaMA idea (fastText-like): learn to tell documents of a
reference set from the rest, keep those it scores as reference-like. Features are signed
hashes of lowercased word n-grams (words are `\\w+` runs and single punctuation marks) and,
optionally, of UTF-8 byte n-grams of the whitespace-collapsed text, summed per bucket and
L2-normalized. An n-gram x_1..x_n (64-bit word hashes, or bytes) with tag t (n for words,
2^32 + n for bytes) hashes to g = fold(t, x), one step being g <- mix(g * PHI + x) mod 2^64,
where mix is the splitmix64 finalizer and a word's hash is the little-endian blake2b-64 of its
UTF-8. The bucket is g mod buckets; the sign is -1 if bit 63 of g is set, else +1.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import re
from pathlib import Path
from typing import ClassVar, Iterable, NamedTuple

import numpy as np

from jaxlm.config import ConfigError, load_config
from jaxlm.prepare.filters import Verdict

PHI = 0x9E3779B97F4A7C15  # 2^64 / golden ratio
_CHAR_TAG = 1 << 32
_TOKEN = re.compile(r"\w+|[^\w\s]")


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@functools.lru_cache(maxsize=1 << 20)
def word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def _ngram_keys(x: np.ndarray, doc: np.ndarray, n: int, tag: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the n-grams of the concatenated sequences x (uint64) that lie inside one doc."""
    m = len(x) - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    g = np.full(m, tag, np.uint64)
    for k in range(n):
        g = _mix(g * np.uint64(PHI) + x[k:k + m])
    inside = doc[:m] == doc[n - 1:]
    return g[inside], doc[:m][inside]


class Features(NamedTuple):
    """Sparse rows (CSR): row i is indices[indptr[i]:indptr[i+1]] (sorted), with its values."""

    indptr: np.ndarray  # int64 [N + 1]
    indices: np.ndarray  # int64 [nnz], bucket ids
    values: np.ndarray  # float32 [nnz], each row of unit L2 norm (or empty)


def hash_features(texts: Iterable[str], buckets: int = 2**18, ngrams: int = 2,
                  char_ngrams: tuple[int, int] | None = None) -> Features:
    """Signed hashed n-gram counts of each text, L2-normalized (see the module docstring)."""
    texts = list(texts)
    lowered = [t.lower() for t in texts]
    words = [_TOKEN.findall(t) for t in lowered]
    tokens = list(itertools.chain.from_iterable(words))
    vocab = dict.fromkeys(tokens)  # hash each distinct word once
    vocab_h = np.fromiter(map(word_hash, vocab), np.uint64, len(vocab))
    vocab = dict(zip(vocab, range(len(vocab))))
    h = vocab_h[np.fromiter(map(vocab.__getitem__, tokens), np.int64, len(tokens))]
    doc = np.repeat(np.arange(len(texts)), [len(ws) for ws in words])
    keys, rows = zip(*[_ngram_keys(h, doc, n, n) for n in range(1, ngrams + 1)]) if ngrams else ((), ())
    if char_ngrams:
        raw = [" ".join(t.split()).encode("utf-8") for t in lowered]
        b = np.frombuffer(b"".join(raw), np.uint8).astype(np.uint64)
        cdoc = np.repeat(np.arange(len(texts)), [len(r) for r in raw])
        lo, hi = char_ngrams
        more = [_ngram_keys(b, cdoc, n, _CHAR_TAG + n) for n in range(lo, hi + 1)]
        keys, rows = keys + tuple(k for k, _ in more), rows + tuple(r for _, r in more)
    g = np.concatenate([np.zeros(0, np.uint64), *keys])
    row = np.concatenate([np.zeros(0, np.int64), *rows])
    sign = 1.0 - 2.0 * (g >> np.uint64(63)).astype(np.float64)
    cell, inverse = np.unique(row * buckets + (g % np.uint64(buckets)).astype(np.int64), return_inverse=True)
    value = np.bincount(inverse, weights=sign, minlength=len(cell))
    cell, value = cell[value != 0], value[value != 0]  # a +1 and a -1 in one bucket cancel
    row = cell // buckets
    norm = np.sqrt(np.bincount(row, weights=value * value, minlength=len(texts)))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=len(texts)))])
    return Features(indptr, cell % buckets, (value / norm[row]).astype(np.float32))


def _rows(f: Features, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(segment of each entry, indices, values) of the chosen rows, concatenated."""
    lengths = f.indptr[rows + 1] - f.indptr[rows]
    starts = np.repeat(f.indptr[rows] - np.cumsum(lengths) + lengths, lengths)
    at = starts + np.arange(lengths.sum())
    return np.repeat(np.arange(len(rows)), lengths), f.indices[at], f.values[at]


def _margins(weights, bias, seg, idx, val, n) -> np.ndarray:
    return np.bincount(seg, weights=weights[idx] * val, minlength=n) + bias


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|


@dataclasses.dataclass(frozen=True, eq=False)
class QualityModel:
    """Logistic regression on hashed n-grams; `score` gives P(reference-like) per text."""

    weights: np.ndarray  # float32 [buckets]
    bias: float
    ngrams: int = 2
    char_ngrams: tuple[int, int] | None = None
    meta: dict = dataclasses.field(default_factory=dict)  # training settings and counts

    @property
    def buckets(self) -> int:
        return len(self.weights)

    def features(self, texts: Iterable[str]) -> Features:
        return hash_features(texts, self.buckets, self.ngrams, self.char_ngrams)

    def score(self, texts: Iterable[str]) -> np.ndarray:
        """Probabilities [N] float64 that each text is like the positives."""
        texts, out = list(texts), []
        for i in range(0, len(texts), 256):  # bounded memory; sorts stay cache-sized
            f = self.features(texts[i:i + 256])
            n = len(f.indptr) - 1
            seg = np.repeat(np.arange(n), np.diff(f.indptr))
            out.append(_sigmoid(_margins(self.weights, self.bias, seg, f.indices, f.values, n)))
        return np.concatenate([np.zeros(0), *out])

    def save(self, path: str | Path) -> None:
        """A directory with `weights.npz` and `meta.json`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.savez(path / "weights.npz", weights=self.weights, bias=np.float64(self.bias))
        meta = {"format": "jaxlm.quality/1", "buckets": self.buckets, "ngrams": self.ngrams,
                "char_ngrams": list(self.char_ngrams) if self.char_ngrams else None, **self.meta}
        (path / "meta.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "QualityModel":
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        with np.load(path / "weights.npz") as z:
            weights, bias = z["weights"], float(z["bias"])
        char = meta.pop("char_ngrams")
        return cls(weights, bias, meta.pop("ngrams"), tuple(char) if char else None,
                   {k: v for k, v in meta.items() if k not in ("format", "buckets")})


def train_quality_classifier(positives: Iterable[str], negatives: Iterable[str], *,
                             buckets: int = 2**18, ngrams: int = 2,
                             char_ngrams: tuple[int, int] | None = None, epochs: int = 5,
                             lr: float = 0.5, l2: float = 1e-6, batch_size: int = 32,
                             seed: int = 0) -> QualityModel:
    """Fit P(positive | text) by mini-batch Adagrad on the mean log-loss plus l2/2 * ||w||^2.

    The L2 term is applied to the weights a batch touches (the usual sparse approximation).
    Deterministic given `seed`, which only orders the examples.
    """
    positives, negatives = list(positives), list(negatives)
    if not positives or not negatives:
        raise ValueError(f"need positives and negatives; got {len(positives)} and {len(negatives)}")
    if buckets < 2 or ngrams < 0 or (not ngrams and not char_ngrams):
        raise ValueError(f"buckets={buckets} must be >= 2 and some n-grams used (ngrams={ngrams}, "
                         f"char_ngrams={char_ngrams})")
    f = hash_features(positives + negatives, buckets, ngrams, char_ngrams)
    y = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    w, b = np.zeros(buckets), 0.0
    g2_w, g2_b = np.zeros(buckets), 0.0  # Adagrad's running sums of squared gradients
    eps = 1e-8
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch_size):
            rows = order[start:start + batch_size]
            seg, idx, val = _rows(f, rows)
            err = (_sigmoid(_margins(w, b, seg, idx, val, len(rows))) - y[rows]) / len(rows)
            touched, at = np.unique(idx, return_inverse=True)
            grad = np.bincount(at, weights=err[seg] * val, minlength=len(touched)) + l2 * w[touched]
            g2_w[touched] += grad * grad
            w[touched] -= lr * grad / (np.sqrt(g2_w[touched]) + eps)
            grad_b = err.sum()
            g2_b += grad_b * grad_b
            b -= lr * grad_b / (math.sqrt(g2_b) + eps)
    meta = {"epochs": epochs, "lr": lr, "l2": l2, "batch_size": batch_size, "seed": seed,
            "positives": len(positives), "negatives": len(negatives)}
    return QualityModel(w.astype(np.float32), float(b), ngrams, char_ngrams, meta)


# --- rules --------------------------------------------------------------------------------

_LOADED: dict[str, object] = {}  # resolved path -> QualityModel or _LMScorer, shared by rules


@dataclasses.dataclass(frozen=True)
class QualityClassifier:
    """Drop documents a saved `QualityModel` scores below `threshold`."""

    name: ClassVar[str] = "quality_classifier"
    model: str = ""  # a directory written by QualityModel.save
    threshold: float = 0.5

    def __post_init__(self):
        if not self.model or not (Path(self.model) / "meta.json").is_file():
            raise ConfigError(f"quality_classifier.model={self.model!r} is not a saved quality model "
                              f"(a directory with meta.json and weights.npz)")

    def score(self, text: str) -> float:
        key = str(Path(self.model).resolve())
        if key not in _LOADED:
            _LOADED[key] = QualityModel.load(key)
        return float(_LOADED[key].score([text])[0])

    def __call__(self, text: str) -> Verdict:
        if self.score(text) < self.threshold:
            return Verdict(None, "quality_classifier.low_score")
        return Verdict(text)


class _LMScorer:
    """A run's config, tokenizer, params and one jitted masked-NLL function."""

    def __init__(self, run_dir: Path):
        import jax

        from jaxlm import model, runs, sharding
        from jaxlm.config import MeshConfig
        from jaxlm.objectives.lm import lm_loss

        one_device = sharding.make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])
        run = runs.load_run(run_dir, mesh=one_device)
        self.cfg, self.tokenizer, self.params, self.step = run.cfg, run.tokenizer, run.params, run.step
        model_cfg = self.cfg.model

        @jax.jit
        def nll(params, tokens_BT, targets_BT, mask_BT):
            _, metrics = lm_loss(model.apply(model_cfg, params, tokens_BT), targets_BT, mask_BT)
            return metrics["loss"]

        self.nll = nll

    def mean_nll(self, text: str, max_tokens: int) -> float:
        """Mean NLL (nats) of the first T = min(max_tokens, max_seq_len) tokens of `text`.

        The context starts with EOS, as every document but the first does in packed training.
        Inputs are padded to T (one compile); padded targets are masked out.
        """
        T = min(max_tokens, self.cfg.model.max_seq_len)
        ids = self.tokenizer.encode(text)[:T]
        tokens, targets, mask = np.zeros((3, 1, T), np.int32)
        tokens[0, 0] = self.tokenizer.eos_id
        tokens[0, 1:len(ids)] = ids[:-1]
        targets[0, :len(ids)] = ids
        mask[0, :len(ids)] = 1
        loss_sum, count = self.nll(self.params, tokens, targets, mask)
        return float(loss_sum) / max(float(count), 1.0)


@dataclasses.dataclass(frozen=True)
class Perplexity:
    """Drop documents whose perplexity (exp of mean NLL per token, nats) under a jaxlm run's latest
    checkpoint exceeds `max_perplexity`. Scores the first min(max_tokens, model.max_seq_len)
    tokens; an empty document has perplexity 1. The model loads on the first document."""

    name: ClassVar[str] = "perplexity"
    run_dir: str = ""  # a jaxlm run: config.yaml and checkpoints/
    max_perplexity: float = 0.0
    max_tokens: int = 1024

    def __post_init__(self):
        run = Path(self.run_dir)
        if not self.run_dir or not (run / "config.yaml").is_file():
            raise ConfigError(f"perplexity.run_dir={self.run_dir!r} has no config.yaml; give the "
                              f"directory of a jaxlm run")
        ckpts = run / "checkpoints"
        if not ckpts.is_dir() or not any(p.name.isdigit() for p in ckpts.iterdir()):
            raise ConfigError(f"perplexity.run_dir={self.run_dir!r} has no saved checkpoint in "
                              f"{str(ckpts)!r}")
        if not self.max_perplexity > 0:
            raise ConfigError(f"perplexity.max_perplexity={self.max_perplexity} must be > 0")
        if self.max_tokens < 1:
            raise ConfigError(f"perplexity.max_tokens={self.max_tokens} must be >= 1")
        load_config(run / "config.yaml")  # a malformed run config fails here, not at a document

    def scorer(self) -> _LMScorer:
        key = str(Path(self.run_dir).resolve())
        if key not in _LOADED:
            _LOADED[key] = _LMScorer(Path(key))
        return _LOADED[key]

    def perplexity(self, text: str) -> float:
        return math.exp(self.scorer().mean_nll(text, self.max_tokens))

    def __call__(self, text: str) -> Verdict:
        if self.perplexity(text) > self.max_perplexity:
            return Verdict(None, "perplexity.too_high")
        return Verdict(text)
