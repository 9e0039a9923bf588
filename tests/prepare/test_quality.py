"""Model-based quality rules: the hashed n-gram classifier and the jaxlm perplexity filter."""
import hashlib
import inspect
import json

import numpy as np
import pytest

from jaxlm import model
from jaxlm.config import ConfigError, from_dict
from jaxlm.prepare import quality
from jaxlm.prepare.filters import Verdict
from jaxlm.prepare.quality import QualityModel, hash_features, train_quality_classifier
from jaxlm.prepare.rules import RULES, build_rules

MASK = 2**64 - 1

# --- a hand-written reference of the feature hashing (module docstring), in Python ints ----


def ref_mix(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def ref_fold(tag, items):
    g = tag
    for x in items:
        g = ref_mix((g * quality.PHI + x) & MASK)
    return g


def ref_features(text, buckets, ngrams, char_ngrams=None):
    """{bucket: value} by explicit loops over the n-grams of one document."""
    words = quality._TOKEN.findall(text.lower())
    h = [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") for w in words]
    keys = [ref_fold(n, h[i:i + n]) for n in range(1, ngrams + 1) for i in range(len(h) - n + 1)]
    if char_ngrams:
        b = list(" ".join(text.lower().split()).encode())
        keys += [ref_fold(2**32 + n, b[i:i + n])
                 for n in range(char_ngrams[0], char_ngrams[1] + 1) for i in range(len(b) - n + 1)]
    out = {}
    for g in keys:
        out[g % buckets] = out.get(g % buckets, 0) + (-1 if g >> 63 else 1)
    out = {k: v for k, v in out.items() if v}
    norm = sum(v * v for v in out.values()) ** 0.5
    return {k: v / norm for k, v in out.items()}


def test_hashed_features_match_hand_computation():
    texts = ["The cat sat; the cat ran.", "", "Ünïcode wörds, and the cat!"]
    for ngrams, char in [(1, None), (2, None), (3, (3, 5))]:
        f = hash_features(texts, buckets=64, ngrams=ngrams, char_ngrams=char)  # collisions likely
        for i, text in enumerate(texts):
            lo, hi = f.indptr[i], f.indptr[i + 1]
            got = dict(zip(f.indices[lo:hi].tolist(), f.values[lo:hi].tolist()))
            want = ref_features(text, 64, ngrams, char)
            assert got.keys() == want.keys()
            np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-6)
    # "a a": one unigram feature, counted twice, normalized to +-1 at its word hash's bucket.
    f = hash_features(["A a"], buckets=2**18, ngrams=1)
    g = ref_fold(1, [quality.word_hash("a")])
    assert f.indices.tolist() == [g % 2**18] and f.values.tolist() == [-1.0 if g >> 63 else 1.0]


ADJ = "quick lazy bright quiet small large green old young happy".split()
NOUN = "fox dog river house garden teacher city window market forest child letter".split()
VERB = "sees finds watches builds carries follows opens reads".split()


def corpus(rng, n):
    """n English-like documents and n negatives: keyword spam from the same words, or soup."""
    def sentence():
        return (f"The {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(VERB)} a {rng.choice(ADJ)} "
                f"{rng.choice(NOUN)} near the {rng.choice(NOUN)}.")

    def negative():
        if rng.random() < 0.5:
            keywords = rng.choice(ADJ + NOUN + VERB, 4)
            return " ".join(rng.choice(keywords, rng.integers(20, 60))) + " best cheap click"
        return "".join(map(chr, rng.integers(33, 127, rng.integers(50, 300))))

    good = [" ".join(sentence() for _ in range(rng.integers(3, 8))) for _ in range(n)]
    return good, [negative() for _ in range(n)]


def test_classifier_separates_styles_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    pos, neg = corpus(rng, 400)
    test_pos, test_neg = corpus(rng, 200)
    for char in (None, (3, 5)):
        m = train_quality_classifier(pos, neg, buckets=2**18, char_ngrams=char, seed=1)
        s = m.score(test_pos + test_neg)
        assert np.mean((s >= 0.5) == np.repeat([True, False], 200)) >= 0.95
        again = train_quality_classifier(pos, neg, buckets=2**18, char_ngrams=char, seed=1)
        np.testing.assert_array_equal(again.weights, m.weights)  # deterministic given the seed
        m.save(tmp_path / f"m{char}")
        loaded = QualityModel.load(tmp_path / f"m{char}")
        np.testing.assert_array_equal(loaded.score(test_pos + test_neg), s)
        assert loaded.char_ngrams == char and loaded.meta["positives"] == 400


def test_quality_classifier_rule(tmp_path):
    rng = np.random.default_rng(2)
    m = train_quality_classifier(*corpus(rng, 200), buckets=2**16)
    m.save(tmp_path / "qm")
    good, bad = corpus(rng, 1)
    (rule,) = build_rules({"quality_classifier": {"model": str(tmp_path / "qm"), "threshold": 0.5}})
    assert rule(good[0]) == Verdict(good[0])
    assert rule(bad[0]) == Verdict(None, "quality_classifier.low_score")
    assert RULES["quality_classifier"] is quality.QualityClassifier
    for params in ({}, {"model": str(tmp_path / "missing")}):
        with pytest.raises(ConfigError, match="quality_classifier.model"):
            build_rules({"quality_classifier": params})


# --- perplexity under a tiny jaxlm run ------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from jaxlm.train import pretrain

    path = tmp_path_factory.mktemp("lm") / "run"
    cfg = from_dict({
        "model": dict(vocab_size=369, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                      max_seq_len=64),
        "data": dict(max_documents=40, heldout_fraction=0.0),
        "optim": dict(lr=3e-3, warmup_steps=2),
        "train": dict(steps=30, batch_size=8, seq_len=64, progress=False, peak_tflops=1.0,
                      eval_every=30, save_every=30, run_dir=str(path))})
    pretrain.main(cfg)
    return path


def reference_mean_nll(rule, text):
    """Mean NLL from model.apply on the unpadded sequence, log-softmax in numpy."""
    scorer = rule.scorer()
    ids = scorer.tokenizer.encode(text)[:min(rule.max_tokens, scorer.cfg.model.max_seq_len)]
    tokens = np.concatenate([[scorer.tokenizer.eos_id], ids[:-1]])[None].astype(np.int32)
    logits = np.asarray(model.apply(scorer.cfg.model, scorer.params, tokens), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    return -logp[np.arange(len(ids)), ids].mean()


@pytest.mark.slow
def test_perplexity_rule_keeps_code_and_drops_soup(run_dir):
    code = inspect.getsource(json.encoder)[:3000]
    rng = np.random.default_rng(0)
    soup = "".join(map(chr, rng.choice(np.r_[33:127, 0xC0:0x17F, 0x400:0x4FF, 0x4E00:0x4F00], 400)))
    probe = quality.Perplexity(run_dir=str(run_dir), max_perplexity=1.0, max_tokens=48)
    p_code, p_soup = probe.perplexity(code), probe.perplexity(soup)
    assert p_code < p_soup
    for text in (code, soup, "x = 1\n"):  # padding and its mask change nothing
        assert np.log(probe.perplexity(text)) == pytest.approx(reference_mean_nll(probe, text), abs=1e-4)
    assert probe.perplexity("") == 1.0
    assert probe.scorer().nll._cache_size() == 1  # one compile for all document lengths
    (rule,) = build_rules({"perplexity": {"run_dir": str(run_dir), "max_tokens": 48,
                                          "max_perplexity": float(np.sqrt(p_code * p_soup))}})
    assert rule(code) == Verdict(code)
    assert rule(soup) == Verdict(None, "perplexity.too_high")


@pytest.mark.slow
def test_perplexity_rule_checks_paths_when_built(run_dir, tmp_path):
    (tmp_path / "no_ckpt").mkdir()
    (tmp_path / "no_ckpt" / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    for bad in (str(tmp_path / "missing"), str(tmp_path / "no_ckpt"), ""):
        with pytest.raises(ConfigError, match="perplexity.run_dir"):
            build_rules({"perplexity": {"run_dir": bad, "max_perplexity": 10.0}})
    with pytest.raises(ConfigError, match="max_perplexity"):
        build_rules({"perplexity": {"run_dir": str(run_dir)}})
