"""Loader: mixtures, curricula, concat-then-split and first-fit packing, exact resume, sharding."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import model
from jaxlm.config import ModelConfig
from jaxlm.data.loader import Loader, Source, pack_first_fit
from jaxlm.data.prefetch import Prefetcher
from jaxlm.model import attention
from jaxlm.objectives import lm_loss
from jaxlm.data.tokenizers.specials import SpecialIds

SP = SpecialIds(pad=0, bos=None, eos=1, fim_prefix=2, fim_middle=3, fim_suffix=4, ul2={"r": 5, "s": 6, "x": 7},
                sentinels=tuple(range(8, 108)))
EOS, FIRST = SP.eos, 108  # document tokens are >= FIRST, never special
FIM_IDS = {SP.fim_prefix, SP.fim_middle, SP.fim_suffix}
KEYS_CONCAT = {"tokens": np.int32, "targets": np.int32, "loss_mask": np.float32}
KEYS_PACKED = {**KEYS_CONCAT, "segment_ids": np.int32, "positions": np.int32, "prefix_mask": bool}


def _docs(n, start, seed, lo=0, hi=20):
    """n documents (eos appended, as `read_shards` gives them) of distinct tokens from `start`."""
    lengths = np.random.default_rng(seed).integers(lo, hi, n)
    ends = start + np.cumsum(lengths)
    return [np.append(np.arange(e - m, e), EOS).astype(np.int32) for e, m in zip(ends, lengths)]


def _stream(batch):
    """The windows of a concat batch, rebuilt from tokens and targets, back to back."""
    return np.concatenate([batch["tokens"], batch["targets"][:, -1:]], axis=1).reshape(-1)


def _pieces(tokens):
    """Split a token stream at eos: the documents, as tuples (the tail after the last eos dropped)."""
    starts = np.concatenate([[0], np.flatnonzero(tokens == EOS) + 1])
    return [tuple(tokens[a:b - 1]) for a, b in zip(starts[:-1], starts[1:])]


def _assert_static(batch, rows, T, keys):
    assert set(batch) == set(keys)
    for k, dtype in keys.items():
        assert batch[k].shape == (rows, T) and batch[k].dtype == dtype, k


# Three sources with disjoint token ranges, so a window tells its source.
A, B, C = _docs(7, FIRST, 0, lo=1), _docs(13, 10_000, 1, lo=1), _docs(30, 20_000, 2, lo=1)


def _source_of(row):
    t = row[row != EOS].min()
    return "a" if t < 10_000 else "b" if t < 20_000 else "c"


# --- mixture and curriculum ----------------------------------------------------------------

def test_mixture_proportions_within_three_standard_errors():
    weights = {"a": 5.0, "b": 3.0, "c": 2.0}
    loader = Loader([Source("a", A, 5.0), Source("b", B, 3.0), Source("c", C, 2.0)], 4,
                    eos_id=EOS, seed=3)
    n = 10_000
    batch = loader.batch(0, n)
    drawn = [_source_of(np.append(t, y[-1])) for t, y in zip(batch["tokens"], batch["targets"])]
    for name, w in weights.items():
        p = w / sum(weights.values())
        assert abs(drawn.count(name) - n * p) <= 3 * np.sqrt(n * p * (1 - p)), name


def test_curriculum_switches_exactly_and_sources_keep_their_position():
    T = 4
    stages = [(300, {"a": 1.0}), (700, {"b": 1.0}), (None, {"a": 1.0, "b": 3.0})]
    src = [Source("a", A), Source("b", B)]
    batch = Loader(src, T, eos_id=EOS, seed=5, curriculum=stages).batch(0, 1200)
    rows = [np.append(t, y[-1]) for t, y in zip(batch["tokens"], batch["targets"])]
    names = [_source_of(r) for r in rows]
    assert set(names[:300]) == {"a"} and set(names[300:700]) == {"b"}
    assert {"a", "b"} == set(names[700:]) and names[700:].count("b") > names[700:].count("a")
    # Each source continues its own stream across stages: its rows are a single-source loader's.
    for name in ("a", "b"):
        own = [r for r, s in zip(rows, names) if s == name]
        alone = Loader([s for s in src if s.name == name], T, eos_id=EOS, seed=5).batch(0, len(own))
        np.testing.assert_array_equal(np.stack(own)[:, :-1], alone["tokens"])
    # Boundaries in tokens: ceil(until / T) rows, the same switch.
    in_tokens = [(300 * T - 3, {"a": 1.0}), (700 * T, {"b": 1.0}), (None, {"a": 1.0, "b": 3.0})]
    same = Loader(src, T, eos_id=EOS, seed=5, curriculum=in_tokens,
                  curriculum_unit="tokens").batch(0, 1200)
    np.testing.assert_array_equal(same["tokens"], batch["tokens"])


def test_first_fit_rows_never_mix_curriculum_stages():
    stages = [(40, {"a": 1.0}), (None, {"b": 1.0})]
    loader = Loader([Source("a", A), Source("b", B)], 16, eos_id=EOS, seed=0, packing="first_fit",
                    curriculum=stages, lookahead=16)
    batch = loader.batch(0, 60)
    names = [_source_of(r[s > 0]) for r, s in zip(batch["tokens"], batch["segment_ids"])]
    switch = names.index("b")
    assert set(names[:switch]) == {"a"} and set(names[switch:]) == {"b"}
    assert batch["segment_ids"][:switch].max(axis=1).sum() == 40  # the stage's 40 examples


@pytest.mark.parametrize("kwargs, match", [
    (dict(curriculum=[(10, {"a": 1.0}), (None, {"z": 1.0})]), r"stage 1 .*'z'.*allowed: a, b"),
    (dict(curriculum=[(10, {"a": 0.0})]), r"stage 0: weight of source 'a'"),
    (dict(curriculum=[(10, {"a": 1.0}), (10, {"b": 1.0})]), r"stage 1 ends at until=10"),
    (dict(curriculum=[(None, {"a": 1.0}), (10, {"b": 1.0})]), r"stage 0 ends at until=None"),
    (dict(curriculum=[(10, {})]), r"stage 0 has no weights.*a, b"),
    (dict(objective_weights={"ul2": 1.0}, specials=SP), r"need packing='first_fit'.*clm, fim"),
    (dict(objective_weights={"fim": 1.0}), r"need `specials`"),
    (dict(objective_weights={"bogus": 1.0}), r"'bogus' is not an objective"),
    (dict(packing="zigzag"), r"allowed: concat, first_fit"),
    (dict(curriculum_unit="tokens", packing="first_fit"), r"needs packing='concat'"),
])
def test_bad_configuration_is_a_value_error_naming_it(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Loader([Source("a", A), Source("b", B)], 8, eos_id=EOS, **kwargs)


# --- resume, sharding, prefetch ------------------------------------------------------------

CONFIGS = {
    "concat": (dict(packing="concat", objective_weights={"clm": 1.0, "fim": 1.0}), KEYS_CONCAT),
    "first_fit": (dict(packing="first_fit", lookahead=16, objective_weights={
        "clm": 1.0, "prefix_lm": 1.0, "span_corruption": 1.0, "ul2": 1.0, "fim": 1.0}), KEYS_PACKED),
}


def _loader(kind):
    stages = [(40, {"a": 1.0, "b": 1.0}), (100, {"b": 1.0}), (None, {"a": 2.0, "b": 1.0})]
    return Loader([Source("a", A), Source("b", B)], 12, eos_id=EOS, seed=11, specials=SP,
                  curriculum=stages, **CONFIGS[kind][0])


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_resume_from_scratch_equals_uninterrupted(kind):
    B = 8
    original = _loader(kind)
    seen = {c: original.batch(c, B) for c in range(0, 240, B)}  # many epochs of a and b
    for batch in seen.values():
        _assert_static(batch, B, 12, CONFIGS[kind][1])
    for c in (0, 40, 96, 104, 232):  # stage boundaries at 40 and 100
        resumed = _loader(kind).batch(c, B)
        for k in seen[c]:
            np.testing.assert_array_equal(resumed[k], seen[c][k], err_msg=f"{k} at cursor {c}")
    again = original.batch(40, B)  # going back on a warm loader is exact too
    np.testing.assert_array_equal(again["tokens"], seen[40]["tokens"])


def test_resume_across_mixture_blocks_and_per_source_positions():
    # The mixture caches source counts per block of 4096 positions: cross two block edges.
    src = [Source("a", A, 1.0), Source("b", B, 3.0)]
    full = Loader(src, 4, eos_id=EOS, seed=7).batch(0, 9016)
    for c in (4090, 8188, 9000):
        got = Loader(src, 4, eos_id=EOS, seed=7).batch(c, 16)
        np.testing.assert_array_equal(got["tokens"], full["tokens"][c:c + 16])
    rows = np.concatenate([full["tokens"], full["targets"][:, -1:]], axis=1)
    names = np.array([_source_of(r) for r in rows])
    for s in src:  # source s's rows, in order, are its own stream from window 0
        alone = Loader([s], 4, eos_id=EOS, seed=7).batch(0, int((names == s.name).sum()))
        np.testing.assert_array_equal(full["tokens"][names == s.name], alone["tokens"])


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_process_slices_concatenate_to_the_global_batch(kind):
    B, cursor = 8, 96
    full = _loader(kind).batch(cursor, B)
    for P in (2, 4):
        parts = [_loader(kind).batch(cursor, B, p, P) for p in range(P)]  # one loader per process
        for k in full:
            np.testing.assert_array_equal(np.concatenate([x[k] for x in parts]), full[k])
    with pytest.raises(ValueError, match="must divide"):
        _loader(kind).batch(0, 6, 0, 4)


def test_prefetcher_serves_the_loaders_batches_and_drops_stale_ones():
    loader, prefetch = _loader("concat"), Prefetcher(_loader("concat"))
    try:
        for c in (0, 8, 16, 64, 72, 8):  # a jump forward, then a restore back
            np.testing.assert_array_equal(prefetch.batch(c, 8)["tokens"], loader.batch(c, 8)["tokens"])
        assert prefetch.seq_len == 12
    finally:
        prefetch.close()


# --- concat-then-split ---------------------------------------------------------------------

def test_concat_every_document_token_once_per_epoch():
    docs = _docs(9, FIRST, 4)  # some empty: just eos
    docs[3] = np.array([EOS], np.int32)
    T, L = 5, sum(len(d) for d in docs)
    n_rows = -(-3 * L // (T + 1))
    stream = _stream(Loader([Source("d", docs)], T, eos_id=EOS, seed=2, shuffle_block=1).batch(0, n_rows))
    want = sorted(tuple(d[:-1]) for d in docs)
    orders = []
    for e in range(3):
        pieces = _pieces(stream[e * L:(e + 1) * L])
        assert sorted(pieces) == want, e  # each document once, whole, eos-terminated
        orders.append(pieces)
    assert orders[0] != orders[1]  # a fresh order each epoch


def test_concat_fim_pieces_fit_a_context_each():
    doc = np.arange(FIRST, FIRST + 50, dtype=np.int32)  # one document of 50 tokens, pieces of <= 16
    loader = Loader([Source("d", [doc])], 8, eos_id=EOS, seed=3, specials=SP, shuffle_block=1,
                    objective_weights={"fim": 1.0}, fim_piece=16)
    first_epoch = _stream(loader.batch(0, 50))[:50 + 4 * 4]  # 4 pieces: 16 16 16 2, +4 tokens each
    pieces = np.split(first_epoch, np.flatnonzero(first_epoch == EOS) + 1)[:4]
    for k, piece in enumerate(pieces):
        body = doc[16 * k:16 * (k + 1)]
        assert piece[0] == SP.fim_prefix and piece[-1] == EOS and len(piece) == len(body) + 4
        assert sorted(t for t in piece if t >= FIRST) == list(body)  # the piece's tokens, moved


def test_concat_windows_are_shuffled_within_blocks_each_exactly_once():
    docs = [np.arange(FIRST + 100 * i, FIRST + 100 * i + 40 + 7 * i, dtype=np.int32) for i in range(30)]
    plain = Loader([Source("d", docs)], 8, eos_id=EOS, seed=4, shuffle_block=1).batch(0, 64)
    mixed = Loader([Source("d", docs)], 8, eos_id=EOS, seed=4, shuffle_block=16).batch(0, 64)
    rows = lambda b: [tuple(r) for r in np.concatenate([b["tokens"], b["targets"][:, -1:]], 1)]
    for blk in range(4):  # block b holds the same 16 windows, in a different order
        a, m = rows(plain)[16 * blk:16 * blk + 16], rows(mixed)[16 * blk:16 * blk + 16]
        assert sorted(a) == sorted(m) and a != m


def test_concat_fim_at_document_level_keeps_each_documents_tokens():
    docs = _docs(20, FIRST, 6, lo=2)
    loader = Loader([Source("d", docs)], 8, eos_id=EOS, seed=1, specials=SP, shuffle_block=1,
                    objective_weights={"clm": 1.0, "fim": 3.0})
    pieces = _pieces(_stream(loader.batch(0, 120)))[:40]  # two epochs
    fim = 0
    for e in range(2):
        group = pieces[e * 20:(e + 1) * 20]
        plain = sorted(tuple(sorted(t for t in p if t not in FIM_IDS)) for p in group)
        assert plain == sorted(tuple(d[:-1]) for d in docs)
        for p in group:
            if FIM_IDS & set(p):
                assert p[0] == SP.fim_prefix and sorted(FIM_IDS) == sorted(set(p) & FIM_IDS)
                fim += 1
    assert 20 <= fim <= 40  # rate 3/4 of 40 documents: 30 expected


# --- first-fit packing ---------------------------------------------------------------------

def _ex(n, start, prefix_len=0, loss_from=0):
    t = np.arange(start, start + n, dtype=np.int32)
    mask = (np.arange(n) >= loss_from).astype(np.float32)
    return {"tokens": t, "targets": t + 1, "loss_mask": mask, "prefix_len": prefix_len}


def test_first_fit_decreasing_layout_by_hand():
    # Lengths 5 3 4 2 6 10 into T = 8. Decreasing order: 10 (cut to 8), 6, 5, 4, 3, 2.
    # 8 -> row 0 (full); 6 -> row 1; 5 -> row 2; 4 -> row 3; 3 -> row 2 (5 + 3); 2 -> row 1.
    examples = [_ex(5, 10, prefix_len=2, loss_from=1), _ex(3, 20), _ex(4, 30), _ex(2, 40),
                _ex(6, 50, prefix_len=3, loss_from=2), _ex(10, 60)]
    rows, truncated = pack_first_fit(examples, 8, pad_id=0)
    assert truncated == 1
    np.testing.assert_array_equal(rows["tokens"], [
        [60, 61, 62, 63, 64, 65, 66, 67],
        [50, 51, 52, 53, 54, 55, 40, 41],
        [10, 11, 12, 13, 14, 20, 21, 22],
        [30, 31, 32, 33, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["targets"][3], [31, 32, 33, 34, 0, 0, 0, 0])
    np.testing.assert_array_equal(rows["segment_ids"], [
        [1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 2, 2],
        [1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["positions"], [
        [0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 0, 1],
        [0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["loss_mask"], [
        [1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["prefix_mask"], [
        [0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]])


def test_packed_prefix_mask_gives_each_segment_its_own_prefix():
    loader = Loader([Source("a", A), Source("b", B)], 24, eos_id=EOS, seed=2, specials=SP,
                    packing="first_fit", objective_weights={"prefix_lm": 1.0, "ul2": 1.0})
    batch = loader.batch(0, 16)
    segments = 0
    for r in range(16):
        seg, pm, lm = batch["segment_ids"][r], batch["prefix_mask"][r], batch["loss_mask"][r]
        mask = np.asarray(attention.make_mask(len(seg), jnp.asarray(seg)[None],
                                              prefix_mask_BT=jnp.asarray(pm)[None]).dense_BTS[0])
        for s in range(1, seg.max() + 1):
            cols = np.flatnonzero(seg == s)
            k = int(pm[cols].sum())
            assert k >= 1 and pm[cols[:k]].all()  # a leading run: positions < k
            assert np.flatnonzero(lm[cols])[0] == k - 1  # the last prefix token starts the loss
            alone = attention.make_mask(len(cols), prefix_len_B=jnp.array([k])).dense_BTS[0]
            np.testing.assert_array_equal(mask[np.ix_(cols, cols)], np.asarray(alone))
            assert not mask[np.ix_(cols, np.flatnonzero(seg != s))].any()
            segments += 1
    assert segments > 16  # rows really hold several examples


CFG = ModelConfig(vocab_size=61, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=24,
                  max_seq_len=32, rope_theta=100.0)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _loss_sum(cfg, params, batch):
    logits = model.apply(cfg, params, batch["tokens"], batch.get("segment_ids"),
                         batch.get("positions"))
    return lm_loss(logits, batch["targets"], batch["loss_mask"])[1]["loss"][0]


def test_packed_loss_equals_unpacked_loss():
    rng = np.random.default_rng(0)
    T, N = 16, 12
    examples = []
    for n in rng.integers(1, T + 4, N):  # some longer than T: truncated the same in both
        t = rng.integers(3, CFG.vocab_size, n + 1)
        examples.append({"tokens": t[:-1], "targets": t[1:],
                         "loss_mask": (rng.random(n) < 0.7).astype(np.float32)})
    loader = Loader([Source("sft", examples)], T, eos_id=1, packing="first_fit", lookahead=N)
    loader.batch(0, 1)  # builds the first group: the N examples, each once
    R = loader.stats["rows"]
    packed = loader.batch(0, R)
    assert R < N and loader.stats["truncated"] == sum(len(x["tokens"]) > T for x in examples)
    unpacked = {k: np.zeros((N, T), np.float32 if k == "loss_mask" else np.int32)
                for k in ("tokens", "targets", "loss_mask")}
    for i, x in enumerate(examples):
        n = min(len(x["tokens"]), T)
        for k in unpacked:
            unpacked[k][i, :n] = x[k][:n]
    params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype),
                          model.abstract_params(CFG))
    want = _loss_sum(CFG, params, unpacked)
    got = _loss_sum(CFG, params, packed)
    np.testing.assert_allclose(float(got), float(want), rtol=2e-5)
    assert packed["loss_mask"].sum() == unpacked["loss_mask"].sum()


def test_source_errors_name_the_source():
    sft = [{"tokens": np.arange(3), "targets": np.arange(1, 4)}]
    with pytest.raises(ValueError, match="source 'sft' holds example dicts.*first_fit"):
        Loader([Source("sft", sft)], 8, eos_id=EOS)
    with pytest.raises(ValueError, match=r"Source.weight: weight of source 'b' is -1"):
        Loader([Source("a", A), Source("b", B, -1.0)], 8, eos_id=EOS)
