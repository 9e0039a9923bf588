"""Pretraining objectives: layouts against hand-built sequences, T5 span statistics and exact
reconstruction, prefix-LM visibility by gradients through the model, the FIM loss as the sum
of its segments' terms, mixture proportions, static shapes and one compile for all draws.

References: the FIM paper's PSM/SPM formats (Bavarian et al. 2022, section 3), the T5 paper's
span-corruption example (Raffel et al. 2020, figure 2) and its random-segmentation counts,
the UL2 denoiser table (Tay et al. 2022, section 3.1.2).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import model
from jaxlm.config import ModelConfig
from jaxlm.data import examples as objectives
from jaxlm.data.examples import fim, lm, span
from jaxlm.data.tokenizers.specials import SpecialIds
from jaxlm.objectives import lm_loss, token_log_probs
from jaxlm.testing import random_params

SP = SpecialIds(pad=0, bos=None, eos=1, fim_prefix=2, fim_middle=3, fim_suffix=4, ul2={"r": 5, "s": 6, "x": 7},
                sentinels=tuple(range(8, 108)))
V = 151  # document tokens of the model tests: [108, V), never special
CFG = ModelConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                  max_seq_len=32)
T = 24
B = 4
TRACES = {"forward": 0}


@pytest.fixture(scope="module")
def params():
    """Random N(0, 0.2^2) params (`model.init`'s eager init costs seconds); norm scales around 1
    so every layer passes signal."""
    return random_params(CFG, 0, scale=0.2, norm_scale=0.2)


@jax.jit
def _forward(params, tokens_BT, targets_BT, loss_mask_BT, prefix_len_B):
    """Per-token log-probs [B, T] and the summed masked NLL: the one compile every test shares."""
    TRACES["forward"] += 1
    logits_BTV = model.apply(CFG, params, tokens_BT, prefix_len=prefix_len_B)
    _, metrics = lm_loss(logits_BTV, targets_BT, loss_mask_BT)
    return token_log_probs(logits_BTV, targets_BT), metrics["loss"][0]


def _batch(examples):
    """Stack examples (padded with all-pad rows to B) into the arrays `_forward` takes."""
    examples = list(examples) + [lm.clm_example([], T, SP)] * (B - len(examples))
    stack = lambda k, dt: np.stack([np.asarray(e[k], dt) for e in examples])
    return (stack("tokens", np.int32), stack("targets", np.int32), stack("loss_mask", np.float32),
            stack("prefix_len", np.int32))


def _doc(n, seed=0, low=108, high=V):
    return np.random.default_rng(seed).integers(low, high, size=n).astype(np.int32)


def _distinct_doc(n, seed=0):
    return (108 + np.random.default_rng(seed).permutation(V - 108)[:n]).astype(np.int32)


def _split(example):
    """(inputs, target) of a prefix example: the prefix, then the loss-masked target tokens."""
    p = example["prefix_len"]
    n_target = int(example["loss_mask"].sum())
    return example["tokens"][:p], example["targets"][p - 1:p - 1 + n_target]


def _seq(example):
    """The real sequence tokens + final target (padding removed)."""
    n = int(np.sum(example["tokens"] != SP.pad))
    return np.append(example["tokens"][:n], example["targets"][n - 1])


# ----------------------------------------------------------------------------- FIM


def test_fim_layouts_match_hand_built():
    doc = np.arange(201, 209)  # prefix 201 202 | middle 203 204 205 | suffix 206 207 208
    pre, mid, suf = SP.fim_prefix, SP.fim_middle, SP.fim_suffix
    np.testing.assert_array_equal(fim.fim_permute(doc, 2, 5, SP, "psm"),
                                  [pre, 201, 202, suf, 206, 207, 208, mid, 203, 204, 205])
    np.testing.assert_array_equal(fim.fim_permute(doc, 2, 5, SP, "spm"),
                                  [pre, suf, 206, 207, 208, mid, 201, 202, 203, 204, 205])
    for mode in ("psm", "spm"):
        i, j = fim.fim_split(len(doc), np.random.default_rng(5))
        assert 0 < i < j < len(doc), (i, j)  # a split with all three parts non-empty
        ex = fim.fim_example(doc, 16, SP, np.random.default_rng(5), mode=mode)
        p, m, s = list(doc[:i]), list(doc[i:j]), list(doc[j:])
        seq = ([pre] + p + [suf] + s + [mid] + m if mode == "psm" else
               [pre, suf] + s + [mid] + p + m) + [SP.eos]
        n = len(seq) - 1
        np.testing.assert_array_equal(ex["tokens"], seq[:-1] + [SP.pad] * (16 - n))
        np.testing.assert_array_equal(ex["targets"], seq[1:] + [SP.pad] * (16 - n))
        np.testing.assert_array_equal(ex["loss_mask"], [1.0] * n + [0.0] * (16 - n))
        assert ex["prefix_len"] == 0


def test_fim_infill_example_scores_only_the_middle_and_its_end():
    doc = np.arange(201, 209)
    pre, mid, suf = SP.fim_prefix, SP.fim_middle, SP.fim_suffix
    ex = fim.fim_infill_example(doc, 2, 5, 14, SP)
    seq = [pre, 201, 202, suf, 206, 207, 208, mid, 203, 204, 205, SP.eos]
    np.testing.assert_array_equal(ex["tokens"][:11], seq[:-1])
    np.testing.assert_array_equal(ex["targets"][:11], seq[1:])
    # Targets 203 204 205 eos (predicted from <mid> onward) and nothing else.
    np.testing.assert_array_equal(ex["loss_mask"], [0.0] * 7 + [1.0] * 4 + [0.0] * 3)
    with pytest.raises(ValueError, match="i=5, j=2"):
        fim.fim_infill_example(doc, 5, 2, 14, SP)


@pytest.mark.parametrize("mode", ["psm", "spm"])
def test_fim_summed_loss_is_the_sum_of_its_segment_terms(params, mode):
    """The example's masked log-likelihood equals log p(segment 1) + log p(segment 2) +
    log p(segment 3), each computed by a separate forward pass on the sequence cut right
    after that segment: so the mask covers every real target once, and nothing else."""
    doc = _distinct_doc(14, seed=1)
    rng_seed = 2
    i, j = fim.fim_split(len(doc), np.random.default_rng(rng_seed))
    ex = fim.fim_example(doc, T, SP, np.random.default_rng(rng_seed), mode=mode)
    seq = _seq(ex)
    assert len(seq) == len(doc) + 4 and ex["loss_mask"].sum() == len(doc) + 3
    # Segments as [start, end) of seq (the tokens they predict), sentinels with their part.
    if mode == "psm":  # <P> prefix | <S> suffix | <M> middle <E>
        s_at = 1 + i
        bounds = [(1, s_at), (s_at, s_at + 1 + len(doc) - j), (s_at + 1 + len(doc) - j, len(seq))]
    else:  # <P> | <S> suffix | <M> prefix | middle <E>
        m_at = 2 + len(doc) - j
        bounds = [(1, m_at), (m_at, m_at + 1 + i), (m_at + 1 + i, len(seq))]
    assert 0 < i < j < len(doc)  # three non-empty parts for this seed
    starts = [seq[start] for start, _ in bounds[1:]]
    assert starts == ([SP.fim_suffix, SP.fim_middle] if mode == "psm" else [SP.fim_middle, doc[i]])
    cut_examples = []
    for _, end in bounds:  # the sequence up to `end`, re-padded: same shapes, same compile
        cut = seq[:end]
        tokens = np.full(T, SP.pad, np.int32)
        targets = np.full(T, SP.pad, np.int32)
        tokens[:end - 1], targets[:end - 1] = cut[:-1], cut[1:]
        cut_examples.append({"tokens": tokens, "targets": targets,
                             "loss_mask": np.zeros(T, np.float32), "prefix_len": 0})
    lp_BT, loss_sum_B = _forward(params, *_batch([ex] + cut_examples))
    lp_BT = np.asarray(lp_BT)
    terms = [lp_BT[1 + r, start - 1:end - 1].sum() for r, (start, end) in enumerate(bounds)]
    full = float((lp_BT[0] * ex["loss_mask"]).sum())
    np.testing.assert_allclose(full, sum(terms), rtol=1e-5)
    np.testing.assert_allclose(-float(loss_sum_B), sum(terms), rtol=1e-5)


def test_apply_fim_rate_modes_and_content():
    doc = _doc(30, seed=3)
    rng = np.random.default_rng(4)
    n, rate, spm_rate = 4000, 0.7, 0.25
    outs = [fim.apply_fim(doc, rate, rng, SP, spm_rate=spm_rate) for _ in range(n)]
    fimmed = [o for o in outs if len(o) != len(doc)]
    assert all(np.array_equal(o, doc) for o in outs if len(o) == len(doc))
    assert abs(len(fimmed) / n - rate) < 3 * np.sqrt(rate * (1 - rate) / n)
    # o[1] is <fim_suffix> in SPM, and in PSM when the prefix is empty (i = 0, probability
    # 1 - (n / (n + 1))^2 for two cuts uniform on [0, n]).
    p_suf = spm_rate + (1 - spm_rate) * (1 - (30 / 31) ** 2)
    suf = np.mean([o[1] == SP.fim_suffix for o in fimmed])
    assert abs(suf - p_suf) < 3 * np.sqrt(p_suf * (1 - p_suf) / len(fimmed))
    for o in fimmed:  # a permutation of the document plus the three sentinels
        assert len(o) == len(doc) + 3 and o[0] == SP.fim_prefix
        np.testing.assert_array_equal(np.sort(o[~np.isin(o, [2, 3, 4])]), np.sort(doc))
    # Two cuts uniform on [0, n]: E[j - i] = E|X - Y| = n (n + 2) / (3 (n + 1)).
    cuts = np.array([fim.fim_split(30, rng) for _ in range(4000)])
    assert np.all(cuts[:, 0] <= cuts[:, 1]) and cuts.min() == 0 and cuts.max() == 30
    assert abs(np.mean(cuts[:, 1] - cuts[:, 0]) - 30 * 32 / (3 * 31)) < 0.4
    np.testing.assert_array_equal(fim.apply_fim(doc, 0.0, rng, SP), doc)
    with pytest.raises(ValueError, match="rate"):
        fim.apply_fim(doc, 1.5, rng, SP)


# ----------------------------------------------------------------------------- span corruption


def test_corrupt_matches_the_t5_paper_example():
    # "Thank you for inviting me to your party last week ." with "for inviting" and "last"
    # dropped: inputs "Thank you <X> me to your party <Y> week ."; target "<X> for inviting
    # <Y> last", closed by eos here (T5's encoder-decoder form closes with a final sentinel).
    doc = np.arange(200, 211)
    mask = np.zeros(11, bool)
    mask[[2, 3, 8]] = True
    x, y = SP.sentinels[:2]
    inputs, target = span.corrupt(doc, mask, SP)
    np.testing.assert_array_equal(inputs, [200, 201, x, 204, 205, 206, 207, y, 209, 210])
    np.testing.assert_array_equal(target, [x, 202, 203, y, 208, SP.eos])
    np.testing.assert_array_equal(span.reconstruct(inputs, target, SP), doc)


def test_span_corruption_statistics_and_exact_reconstruction():
    rng = np.random.default_rng(6)
    noise = spans = kept = ones = 0
    expected_ones, longest, first_sentinel_at = 0.0, 0, set()
    for draw in range(100):
        doc = _doc(int(rng.integers(600, 700)), seed=draw, low=1000, high=5000)
        ex = span.span_corruption_example(doc, 1024, SP, rng)
        inputs, target = _split(ex)
        is_sentinel = np.isin(inputs, SP.sentinels)
        n_spans = int(is_sentinel.sum())
        assert inputs[0] == doc[0] and is_sentinel[-1]  # non-noise first, noise last (T5)
        np.testing.assert_array_equal(target[np.isin(target, SP.sentinels)], SP.sentinels[:n_spans])
        assert target[-1] == SP.eos
        np.testing.assert_array_equal(span.reconstruct(inputs, target, SP), doc)  # fits whole
        n_noise = len(target) - n_spans - 1
        noise, spans, kept = noise + n_noise, spans + n_spans, kept + len(doc)
        cuts = np.flatnonzero(np.isin(target, SP.sentinels))
        lengths = np.diff(np.append(cuts, len(target) - 1)) - 1
        assert lengths.min() >= 1 and lengths.sum() == n_noise
        ones += int(np.sum(lengths == 1))
        # Random segmentation of N items into S non-empty runs: P(run length 1) = (S-1)/(N-1).
        expected_ones += n_spans * (n_spans - 1) / (n_noise - 1)
        longest = max(longest, int(lengths.max()))
        first_sentinel_at.add(int(np.argmax(is_sentinel)))
    assert abs(noise / kept - 0.15) < 0.01
    assert abs(noise / spans - 3.0) < 0.3
    assert abs(ones - expected_ones) < 3 * np.sqrt(expected_ones), (ones, expected_ones)
    assert longest > 6
    assert len(first_sentinel_at) > 20  # span positions vary from draw to draw


def test_span_corruption_truncates_long_documents_to_a_leading_piece():
    rng = np.random.default_rng(7)
    for n in (0, 1, 2, 3, 40, 5000):
        doc = _doc(n, seed=n, low=1000, high=5000)
        for density, mean in ((0.15, 3.0), (0.5, 3.0), (0.15, 64.0)):
            ex = span.span_corruption_example(doc, 64, SP, rng, density, mean)
            if ex["prefix_len"] == 0:  # an empty document: nothing to corrupt
                assert n == 0 and ex["loss_mask"].sum() == 0
                continue
            inputs, target = _split(ex)
            original = span.reconstruct(inputs, target, SP)
            np.testing.assert_array_equal(original, doc[:len(original)])
            assert len(inputs) + len(target) <= 65
            if n == 5000:  # the kept piece fills the window (one more token adds 1 or 3)
                assert len(inputs) + len(target) >= 65 - 2


# ----------------------------------------------------------------------------- prefix LM


@jax.jit
def _grad_of_position(params, tokens_BT, prefix_len_B, position, w_V):
    """d(w . logits[0, position]) / d(embedding table) [V, D]."""
    def f(table_VD):
        p = {**params, "embed": {**params["embed"], "embedding": table_VD}}
        logits_BTV = model.apply(CFG, p, tokens_BT, prefix_len=prefix_len_B)
        return jnp.sum(logits_BTV[0, position] * w_V)
    return jax.grad(f)(params["embed"]["embedding"])


def test_prefix_lm_prefix_sees_later_prefix_never_suffix(params):
    doc = _distinct_doc(14, seed=8)  # distinct tokens: one embedding row per position
    ex = lm.prefix_lm_example(doc, T, SP, np.random.default_rng(9))
    k = ex["prefix_len"]
    assert 3 <= k <= 11, k
    np.testing.assert_array_equal(ex["tokens"][:14], doc)
    np.testing.assert_array_equal(ex["targets"][:14], np.append(doc[1:], SP.eos))
    expected_mask = np.zeros(T, np.float32)
    expected_mask[k - 1:14] = 1  # the suffix tokens (and eos); none inside the prefix, no padding
    np.testing.assert_array_equal(ex["loss_mask"], expected_mask)

    tokens = jnp.asarray(ex["tokens"][None])
    w_V = jnp.asarray(np.random.default_rng(10).standard_normal(V), jnp.float32)

    def grad_norm(position):  # per document position: the norm of its token's embedding grad
        g_VD = _grad_of_position(params, tokens, jnp.asarray([k], jnp.int32), position, w_V)
        return np.linalg.norm(np.asarray(g_VD)[doc], axis=-1)

    g = grad_norm(0)  # the first prefix position
    assert np.all(g[1:k] > 1e-6 * g.max()), g  # sees every later prefix token
    assert np.all(g[k:] == 0.0), g  # never a suffix token
    g = grad_norm(k + 1)  # a suffix position stays causal: sees the prefix and itself only
    assert np.all(g[:k + 2] > 1e-6 * g.max()) and np.all(g[k + 2:] == 0.0), g


def test_prefix_lm_split_is_uniform():
    doc = _doc(10)
    rng = np.random.default_rng(11)
    ks = np.array([lm.prefix_lm_example(doc, T, SP, rng)["prefix_len"] for _ in range(4000)])
    assert set(ks) == set(range(1, 10))  # every valid k: prefix and suffix both non-empty
    counts = np.bincount(ks, minlength=10)[1:]
    assert np.all(np.abs(counts / 4000 - 1 / 9) < 3 * np.sqrt((1 / 9) * (8 / 9) / 4000))


# ----------------------------------------------------------------------------- UL2


@pytest.mark.parametrize("index", range(len(span.DEFAULT_UL2)))
def test_each_ul2_denoiser_emits_its_mode_token_and_its_statistics(index):
    d = span.DEFAULT_UL2[index]
    mode_token = SP.ul2[d.mode]
    rng = np.random.default_rng(12 + index)
    noise = spans = kept = 0
    for draw in range(12):
        doc = _doc(3000, seed=draw, low=1000, high=5000)
        ex = span.ul2_example(doc, 4096, SP, rng, denoisers=(d,))
        assert ex["denoiser"] == 0 and ex["tokens"][0] == mode_token
        inputs, target = _split(ex)
        if d.kind == "prefix_lm":  # prefix = mode + doc[:k - 1]; target = the rest + eos
            k = ex["prefix_len"]
            np.testing.assert_array_equal(inputs[1:], doc[:k - 1])
            np.testing.assert_array_equal(target, np.append(doc[k - 1:], SP.eos))
            assert not np.isin(ex["tokens"], SP.sentinels).any()
            continue
        original = span.reconstruct(inputs[1:], target, SP)
        np.testing.assert_array_equal(original, doc[:len(original)])
        n_spans = int(np.isin(inputs, SP.sentinels).sum())
        noise += len(target) - n_spans - 1
        spans += n_spans
        kept += len(original)
    if d.kind == "span":
        assert abs(noise / kept - d.noise_density) < 0.01
        assert abs(noise / spans - d.mean_span) < 0.1 * d.mean_span
        if d.mode == "x":
            assert d.mean_span >= 32 or d.noise_density >= 0.5


def test_ul2_draws_denoisers_by_weight():
    rng = np.random.default_rng(13)
    n = 3000
    used = np.bincount([span.ul2_example(_doc(40), 64, SP, rng)["denoiser"] for _ in range(n)],
                       minlength=len(span.DEFAULT_UL2))
    w = np.array([d.weight for d in span.DEFAULT_UL2])
    p = w / w.sum()
    assert np.all(np.abs(used / n - p) < 3 * np.sqrt(p * (1 - p) / n)), used


# ----------------------------------------------------------------------------- mixture


def test_objective_mixture_matches_its_weights():
    weights = {"clm": 0.5, "fim": 0.3, "ul2": 0.15, "span_corruption": 0.05}
    rng = np.random.default_rng(14)
    n = 10_000
    names = [objectives.sample_objective(weights, rng) for _ in range(n)]
    for name, w in weights.items():
        p = w / sum(weights.values())
        assert abs(names.count(name) / n - p) < 3 * np.sqrt(p * (1 - p) / n), name


@pytest.mark.parametrize("weights, match", [
    ({"clm": 0.5, "bert": 0.5}, r"'bert'.*clm, prefix_lm, fim, span_corruption, ul2"),
    ({"clm": 0.0, "fim": 1.0}, r"'clm'=0\.0 must be positive"),
    ({"fim": -1.0}, r"'fim'=-1\.0 must be positive"),
    ({}, r"empty"),
])
def test_objective_mixture_rejects_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        objectives.sample_objective(weights, np.random.default_rng(0))


def test_make_example_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"'mlm'.*allowed: clm, prefix_lm, fim"):
        objectives.make_example("mlm", _doc(5), T, SP, np.random.default_rng(0))


# ----------------------------------------------------------------------------- shapes, jit


def _all_transforms():
    yield "clm", lambda doc, rng: lm.clm_example(doc, T, SP)
    yield "prefix_lm", lambda doc, rng: lm.prefix_lm_example(doc, T, SP, rng)
    for mode in ("psm", "spm"):
        yield f"fim_{mode}", lambda doc, rng, mode=mode: fim.fim_example(doc, T, SP, rng, mode=mode)
    yield "span", lambda doc, rng: span.span_corruption_example(doc, T, SP, rng)
    for i, d in enumerate(span.DEFAULT_UL2):
        yield f"ul2_{i}", lambda doc, rng, d=d: span.ul2_example(doc, T, SP, rng, denoisers=(d,))
    for name in objectives.OBJECTIVES:
        yield f"make_{name}", lambda doc, rng, name=name: objectives.make_example(name, doc, T, SP, rng)


@pytest.mark.parametrize("n", [0, 1, 2, 5, T - 3, T, T + 1, 3 * T])
def test_every_transform_returns_exactly_T(n):
    rng = np.random.default_rng(n)
    doc = _doc(n, seed=n)
    for name, transform in _all_transforms():
        ex = transform(doc, rng)
        assert ex["tokens"].shape == ex["targets"].shape == ex["loss_mask"].shape == (T,), name
        assert ex["tokens"].dtype == ex["targets"].dtype == np.int32, name
        assert ex["loss_mask"].dtype == np.float32, name
        real = int(np.sum(ex["tokens"] != SP.pad))
        assert np.all(ex["tokens"][:real] != SP.pad) and np.all(ex["tokens"][real:] == SP.pad), name
        np.testing.assert_array_equal(ex["targets"][:max(real - 1, 0)],
                                      ex["tokens"][1:max(real, 1)], name)
        p = ex["prefix_len"]
        assert isinstance(p, int) and 0 <= p <= real, name
        expected_mask = np.zeros(T, np.float32)
        expected_mask[max(p - 1, 0):real] = 1
        np.testing.assert_array_equal(ex["loss_mask"], expected_mask, name)
        assert n < T or real >= T - 2, name  # long documents fill the window
    if n > T:  # CLM keeps the leading T + 1 tokens and no eos (the document did not end)
        ex = lm.clm_example(doc, T, SP)
        np.testing.assert_array_equal(_seq(ex), doc[:T + 1])


def test_examples_of_all_objectives_share_one_jitted_apply(params):
    rng = np.random.default_rng(15)
    examples = [objectives.make_example(name, _doc(int(rng.integers(0, 3 * T)), seed=s), T, SP, rng)
                for s in range(3) for name in objectives.OBJECTIVES]
    examples += [span.ul2_example(_doc(30, seed=s), T, SP, rng) for s in range(4)]
    assert len({ex["prefix_len"] for ex in examples}) > 3  # different masks, same compile
    for start in range(0, len(examples), B):
        lp_BT, loss_sum = _forward(params, *_batch(examples[start:start + B]))
        assert np.isfinite(np.asarray(lp_BT)).all() and np.isfinite(float(loss_sum))
    assert TRACES["forward"] == 1
    assert _forward._cache_size() == 1
