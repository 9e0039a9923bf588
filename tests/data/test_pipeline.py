"""Byte tokenizer, stdlib corpus, split, packing and the Grain batch stream (exact resume)."""
import collections
import math
import random

import numpy as np
import pytest

from jaxlm.config import ConfigError, DataConfig
from jaxlm.data import (
    ByteTokenizer,
    LMBatches,
    build_lm_data,
    load_tokenizer,
    pack_documents,
    split_documents,
    stdlib_documents,
    unigram_entropy_bits,
    unigram_entropy_nats,
)


@pytest.fixture(scope="module")
def full_corpus():
    return stdlib_documents()


def _distinct_windows(n, width):
    """[n, width] windows whose first token is the row number, so rows are told apart."""
    return np.arange(n * width, dtype=np.int32).reshape(n, width)


def _rows(batch):
    """The full windows of a batch, rebuilt from tokens and targets: a tuple per row."""
    w = np.concatenate([batch["tokens"], batch["targets"][:, -1:]], axis=1)
    return [tuple(r) for r in w]


# --- tokenizer -----------------------------------------------------------------------------

def test_byte_tokenizer_special_ids_and_offsets():
    tok = load_tokenizer("byte")
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size, tok.name) == (0, 1, 2, 369, "byte")
    ids = tok.encode("A\x00\xff")  # U+00FF is two UTF-8 bytes: c3 bf
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [ord("A") + 3, 3, 0xC3 + 3, 0xBF + 3])
    # Specials and out-of-range ids are skipped; invalid UTF-8 becomes U+FFFD.
    assert tok.decode([1, ord("h") + 3, 0, 2, 259, -1, ord("i") + 3]) == "hi"
    assert tok.decode([0xFF + 3]) == "\ufffd"


def test_byte_tokenizer_round_trips_arbitrary_unicode():
    tok = ByteTokenizer()
    rng = random.Random(0)
    planes = [(0x20, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF)]
    for _ in range(200):
        text = "".join(chr(rng.randint(*rng.choice(planes))) for _ in range(rng.randint(0, 40)))
        ids = tok.encode(text)
        assert ids.min(initial=3) >= 3 and ids.max(initial=3) < tok.vocab_size
        assert len(ids) == len(text.encode("utf-8"))
        assert tok.decode(ids) == text


def test_unknown_tokenizer_names_the_key():
    with pytest.raises(ConfigError, match=r"data\.tokenizer='spm'.*byte"):
        load_tokenizer("spm")


# --- corpus and split ----------------------------------------------------------------------

def test_stdlib_documents_are_sorted_utf8_and_exclude_packages(full_corpus):
    paths = [p for p, _ in full_corpus.documents]
    assert len(paths) > 500
    assert paths == sorted(paths) and len(set(paths)) == len(paths)
    assert all(p.endswith(".py") for p in paths)
    assert not any(part in ("site-packages", "dist-packages") for p in paths for part in p.split("/"))
    assert "os.py" in paths and "json/decoder.py" in paths
    assert all(text for _, text in full_corpus.documents)
    skipped = {p for p, _ in full_corpus.skipped}
    assert not skipped & set(paths)
    assert all(reason for _, reason in full_corpus.skipped)


def test_max_documents_spreads_over_the_library(full_corpus):
    small = stdlib_documents(max_documents=20)
    assert small == stdlib_documents(max_documents=20)  # deterministic
    paths = [p for p, _ in small.documents]
    assert len(paths) == 20 and paths == sorted(paths)
    assert set(small.documents) <= set(full_corpus.documents)
    assert small.skipped == full_corpus.skipped
    # Evenly spread: first document of the library, and more than one top-level package.
    assert paths[0] == full_corpus.documents[0][0]
    assert len({p.split("/")[0] for p in paths}) > 5


def test_split_is_disjoint_and_stable_under_reordering():
    docs = [(f"pkg{i % 7}/mod_{i}.py", f"text {i}") for i in range(300)]
    train, heldout = split_documents(docs, 0.2)
    assert {p for p, _ in train}.isdisjoint({p for p, _ in heldout})
    assert sorted(train + heldout) == sorted(docs)
    assert 30 < len(heldout) < 90  # ~60 expected from a uniform hash
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    train2, heldout2 = split_documents(shuffled, 0.2)
    assert sorted(train2) == sorted(train) and sorted(heldout2) == sorted(heldout)
    # Membership of a document does not depend on the other documents (given both sides non-empty).
    _, sub_heldout = split_documents(docs[:150], 0.2)
    assert set(sub_heldout) == set(heldout) & set(docs[:150])


def test_split_always_holds_out_one_when_asked():
    docs = [("a.py", "a"), ("b.py", "b")]
    train, heldout = split_documents(docs, 1e-9)
    assert len(train) == 1 and len(heldout) == 1
    assert split_documents(docs, 0.0) == (docs, [])
    train, heldout = split_documents(docs[:1], 0.5)  # one document: nothing to guarantee
    assert sorted(train + heldout) == docs[:1]


def test_unigram_entropy_against_reference():
    tokens = np.array([5] * 4 + [6] * 2 + [7] + [9])  # p = 1/2, 1/4, 1/8, 1/8
    assert unigram_entropy_bits(tokens, vocab_size=11) == pytest.approx(1.75)
    assert unigram_entropy_nats(tokens, vocab_size=11) == pytest.approx(1.75 * math.log(2))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 13, size=1000)
    p = np.array([np.mean(tokens == v) for v in range(13)])
    p = p[p > 0]
    assert unigram_entropy_bits(tokens, 13) == pytest.approx(-sum(p * np.log2(p)))
    assert unigram_entropy_bits(np.full(7, 3), 4) == 0.0
    with pytest.raises(ValueError):
        unigram_entropy_bits(np.array([4]), 4)


# --- packing -------------------------------------------------------------------------------

def test_pack_documents_against_hand_written_windows():
    docs = [np.array([10, 11, 12]), np.array([13]), np.array([], dtype=np.int32), np.array([14, 15])]
    # stream: 10 11 12 E 13 E E 14 15 E   (E = 2), 10 tokens
    windows, dropped = pack_documents(docs, eos_id=2, seq_len=3)
    np.testing.assert_array_equal(windows, [[10, 11, 12, 2], [13, 2, 2, 14]])
    assert windows.dtype == np.int32 and dropped == 2
    windows, dropped = pack_documents(docs, eos_id=2, seq_len=4)
    np.testing.assert_array_equal(windows, [[10, 11, 12, 2, 13], [2, 2, 14, 15, 2]])
    assert dropped == 0
    windows, dropped = pack_documents(docs[:1], eos_id=2, seq_len=4)
    assert windows.shape == (0, 5) and dropped == 4


def test_targets_are_inputs_shifted_by_one_and_mask_is_ones():
    windows = _distinct_windows(9, 6)
    batch = LMBatches(windows, seed=3).batch(cursor=4, global_batch=5)
    assert batch["tokens"].shape == batch["targets"].shape == batch["loss_mask"].shape == (5, 5)
    assert batch["tokens"].dtype == batch["targets"].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32 and (batch["loss_mask"] == 1).all()
    np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
    np.testing.assert_array_equal(batch["targets"], batch["tokens"] + 1)  # rows are aranges


# --- the batch stream ----------------------------------------------------------------------

def test_same_seed_and_cursor_give_identical_batches():
    windows = _distinct_windows(37, 8)
    a, b = LMBatches(windows, seed=5), LMBatches(windows.copy(), seed=5)
    for cursor in (0, 12, 36, 37, 1000, 10**12):
        ba, bb = a.batch(cursor, 6), b.batch(cursor, 6)
        for key in ba:
            np.testing.assert_array_equal(ba[key], bb[key])
    assert _rows(a.batch(0, 12)) != _rows(LMBatches(windows, seed=6).batch(0, 12))


def test_each_epoch_covers_every_window_once_in_a_fresh_order():
    n, global_batch = 23, 5  # batches straddle epoch boundaries
    windows = _distinct_windows(n, 4)
    data = LMBatches(windows, seed=0)
    seen = []
    for cursor in range(0, 3 * n + global_batch, global_batch):
        seen += _rows(data.batch(cursor, global_batch))
    dataset = sorted(tuple(r) for r in windows)
    epochs = [seen[e * n:(e + 1) * n] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == dataset
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert epochs[0] != [tuple(r) for r in windows]  # shuffled, not identity
    assert [data.epoch_of(c) for c in (0, n - 1, n, 3 * n)] == [0, 0, 1, 3]
    assert data.num_examples == n and data.seq_len == 3


def test_process_slices_are_disjoint_and_concatenate_to_the_global_batch():
    data = LMBatches(_distinct_windows(50, 6), seed=2)
    whole = data.batch(cursor=17, global_batch=12)
    parts = [data.batch(17, 12, process_index=p, process_count=4) for p in range(4)]
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    rows = [set(_rows(p)) for p in parts]
    assert all(len(r) == 3 for r in rows)
    assert len(set().union(*rows)) == 12
    with pytest.raises(ValueError, match="process_count=4 must divide"):
        data.batch(0, 10, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        data.batch(0, 12, process_index=4, process_count=4)


# --- build_lm_data -------------------------------------------------------------------------

def test_build_lm_data_counts_and_resume(full_corpus):
    cfg = DataConfig(max_documents=40, heldout_fraction=0.1, seed=1)
    train, heldout, info = build_lm_data(cfg, seq_len=64)
    assert info["docs_train"] + info["docs_heldout"] == 40 and info["docs_heldout"] >= 1
    assert info["docs_skipped"] == len(full_corpus.skipped)
    assert train.num_examples == info["windows_train"] and train.seq_len == 64
    assert heldout.num_examples == info["windows_heldout"]
    for split in ("train", "heldout"):
        assert info[f"windows_{split}"] * 65 + info[f"tail_tokens_dropped_{split}"] == info[f"tokens_{split}"]
    # The tokens are the stdlib text: a decoded window without eos occurs verbatim in a document.
    texts = [text for _, text in stdlib_documents(40).documents]
    row = train.batch(0, 8)["tokens"]
    tok = ByteTokenizer()
    piece = max((tok.decode(s) for r in row for s in np.split(r, np.flatnonzero(r == tok.eos_id))),
                key=len)
    assert len(piece) > 10 and any(piece in t for t in texts)
    # Baseline entropy against a Counter over every training target.
    counts = collections.Counter()
    for c in range(0, train.num_examples, 16):  # exactly one epoch
        counts.update(train.batch(c, min(16, train.num_examples - c))["targets"].ravel().tolist())
    total = sum(counts.values())
    ref = -sum(k / total * math.log2(k / total) for k in counts.values())
    assert info["unigram_entropy_bits"] == pytest.approx(ref)
    assert 0 < info["unigram_entropy_bits"] < math.log2(259)
    assert info["unigram_entropy_nats"] == pytest.approx(info["unigram_entropy_bits"] * math.log(2))
    # A separately built pipeline resumes exactly: same batches at the same cursor.
    train2, heldout2, _ = build_lm_data(cfg, seq_len=64)
    for cursor in (0, 48, 10 * train.num_examples + 3):
        np.testing.assert_array_equal(train.batch(cursor, 8)["tokens"], train2.batch(cursor, 8)["tokens"])
    np.testing.assert_array_equal(heldout.batch(0, 2)["tokens"], heldout2.batch(0, 2)["tokens"])


def test_build_lm_data_rejects_bad_config():
    with pytest.raises(ConfigError, match=r"data\.source"):
        build_lm_data(DataConfig(source="web"), seq_len=8)
    with pytest.raises(ConfigError, match=r"train\.seq_len"):
        build_lm_data(DataConfig(max_documents=2, heldout_fraction=0.0), seq_len=10**7)
    _, heldout, info = build_lm_data(DataConfig(max_documents=3, heldout_fraction=0.0), seq_len=8)
    assert heldout is None and info["docs_heldout"] == 0


def test_byte_tokenizer_reserves_jaxlm_specials_after_the_bytes():
    from jaxlm.data import spm

    tok = ByteTokenizer()
    sp = tok.special_ids
    symbols = spm.user_symbols()
    ids = [sp.fim_prefix, sp.fim_middle, sp.fim_suffix, *sp.ul2.values(), *sp.sentinels, *sp.roles.values()]
    assert ids == list(range(259, 259 + len(symbols))) and tok.vocab_size == 259 + len(symbols)
    # A symbol written in text is its one id; decode drops it and keeps the bytes around it.
    got = tok.encode("a<|user|>b<|sentinel_7|><|no_such|>")
    want = [ord("a") + 3, sp.roles["user"], ord("b") + 3, sp.sentinels[7]] + list(tok.encode("<|no_such|>"))
    np.testing.assert_array_equal(got, want)
    assert tok.decode(got) == "ab<|no_such|>"
