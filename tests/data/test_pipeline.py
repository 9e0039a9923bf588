"""Byte tokenizer, stdlib corpus, split, and the pretraining data built from config (stdlib or shards)."""
import collections
import dataclasses
import math
import random

import numpy as np
import pytest

from jaxlm.config import ConfigError, DataConfig
from jaxlm.config import MixSourceConfig, StageConfig
from jaxlm.data.corpus import split_documents, stdlib_documents, unigram_entropy_bits, unigram_entropy_nats
from jaxlm.data.pipeline import build_lm_data
from jaxlm.data.tokenizers import ByteTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def full_corpus():
    return stdlib_documents()


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


# --- build_lm_data -------------------------------------------------------------------------

def test_build_lm_data_counts_and_resume(full_corpus):
    cfg = DataConfig(max_documents=40, heldout_fraction=0.1, seed=1)
    train, heldout, info = build_lm_data(cfg, seq_len=64)
    assert info["docs_train"] + info["docs_heldout"] == 40 and info["docs_heldout"] >= 1
    assert info["docs_skipped"] == len(full_corpus.skipped) and info["packing"] == "concat"
    texts = [text for _, text in stdlib_documents(40).documents]
    assert info["tokens_train"] + info["tokens_heldout"] == sum(len(t.encode()) + 1 for t in texts)
    # The tokens are the stdlib text: a decoded window without eos occurs verbatim in a document.
    batch = train.batch(0, 8)
    np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
    tok = ByteTokenizer()
    piece = max((tok.decode(s) for r in batch["tokens"] for s in np.split(r, np.flatnonzero(r == tok.eos_id))),
                key=len)
    assert len(piece) > 10 and any(piece in t for t in texts)
    # The baseline entropy against a Counter over the first 256 rows' targets.
    counts = collections.Counter(train.batch(0, 256)["targets"].ravel().tolist())
    total = sum(counts.values())
    ref = -sum(k / total * math.log2(k / total) for k in counts.values())
    assert info["unigram_entropy_bits"] == pytest.approx(ref)
    assert 0 < info["unigram_entropy_bits"] < math.log2(259)
    assert info["unigram_entropy_nats"] == pytest.approx(info["unigram_entropy_bits"] * math.log(2))
    # A separately built pipeline resumes exactly: same batches at the same cursor.
    train2, heldout2, _ = build_lm_data(cfg, seq_len=64)
    for cursor in (0, 48, 100_003):
        np.testing.assert_array_equal(train.batch(cursor, 8)["tokens"], train2.batch(cursor, 8)["tokens"])
    np.testing.assert_array_equal(heldout.batch(0, 2)["tokens"], heldout2.batch(0, 2)["tokens"])
    # data.shuffle_block reaches the loader: in stream order the rows differ from the shuffled ones.
    in_order, _, _ = build_lm_data(dataclasses.replace(cfg, shuffle_block=1), seq_len=64)
    assert not np.array_equal(in_order.batch(0, 8)["tokens"], batch["tokens"])


def test_build_lm_data_rejects_bad_config():
    with pytest.raises(ConfigError, match=r"data\.source"):
        build_lm_data(DataConfig(source="web"), seq_len=8)
    with pytest.raises(ConfigError, match=r"data\.sources"):
        build_lm_data(DataConfig(source="shards"), seq_len=8)
    _, heldout, info = build_lm_data(DataConfig(max_documents=3, heldout_fraction=0.0), seq_len=8)
    assert heldout is None and info["docs_heldout"] == 0


def _write_shards(tmp_path, name, texts, tokenizer="byte"):
    from jaxlm.data.shards import tokenize_to_shards

    tokenize_to_shards(iter(texts), tokenizer, tmp_path / name, workers=1, docs_per_shard=7)
    return str(tmp_path / name)


def test_shard_sources_mix_split_and_follow_the_curriculum(tmp_path):
    # Source a's documents are all "a...", b's all "b...": a row's first byte names its source.
    a = _write_shards(tmp_path, "a", ["a" * (40 + i) for i in range(30)])
    b = _write_shards(tmp_path, "b", ["b" * (40 + i) for i in range(30)])
    sources = (MixSourceConfig("a", a, 1.0), MixSourceConfig("b", b, 3.0))
    cfg = DataConfig(source="shards", sources=sources, heldout_fraction=0.2, seed=3)
    train, heldout, info = build_lm_data(cfg, seq_len=16)
    per = info["sources"]
    assert per["a"]["docs_train"] + per["a"]["docs_heldout"] == 30 and per["a"]["docs_heldout"] >= 1
    first = lambda batch: [chr(t - 3) for t in batch["tokens"][:, 0] if t >= 3]
    rows = first(train.batch(0, 4000))
    share_b = rows.count("b") / len(rows)
    assert abs(share_b - 0.75) < 3 * math.sqrt(0.75 * 0.25 / len(rows))
    # Held-out and training documents are disjoint: their lengths identify them.
    lengths = lambda ld: {(s.name, len(s.docs[i])) for s in ld.sources for i in range(len(s.docs))}
    assert lengths(train).isdisjoint(lengths(heldout))
    assert len(lengths(train) | lengths(heldout)) == 60
    # A curriculum in steps: only a for the first 10 steps of 8 rows, then only b.
    stages = (StageConfig(10, {"a": 1.0}), StageConfig(None, {"b": 1.0}))
    cur = DataConfig(source="shards", sources=sources, curriculum=stages, curriculum_unit="steps")
    train, _, _ = build_lm_data(cur, seq_len=16, batch_size=8)
    assert set(first(train.batch(0, 80))) == {"a"} and set(first(train.batch(80, 80))) == {"b"}


def test_shards_must_match_the_configured_tokenizer(tmp_path):
    import json

    a = _write_shards(tmp_path, "a", ["some text here"] * 4)
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert build_lm_data(DataConfig(source="shards", sources=(MixSourceConfig("a", a),)), seq_len=8)
    index.update(tokenizer="/elsewhere/spm.model", tokenizer_path="/elsewhere/spm.model")
    (tmp_path / "a" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"tokenized with '/elsewhere/spm\.model'.*data\.tokenizer='byte'"):
        build_lm_data(DataConfig(source="shards", sources=(MixSourceConfig("a", a),)), seq_len=8)
    with pytest.raises(ConfigError, match=r"holds no token shards"):
        build_lm_data(DataConfig(source="shards", sources=(MixSourceConfig("z", str(tmp_path / "z")),)),
                      seq_len=8)


def test_objective_mixtures_reach_the_rows():
    tok = ByteTokenizer()
    sp = tok.special_ids
    cfg = DataConfig(max_documents=20, heldout_fraction=0.0, objective={"clm": 0.5, "fim": 0.5})
    n = build_lm_data(cfg, seq_len=128)[2]["tokens_train"] // 129  # windows in about one epoch
    # Shuffle blocks of n windows: 4 blocks of rows cover the first 4n windows of the stream once
    # each (4 epochs: which documents are FIM'd is drawn per document, so one epoch of 20 varies).
    train, _, info = build_lm_data(dataclasses.replace(cfg, shuffle_block=n), seq_len=128)
    rows = train.batch(0, 4 * n)["tokens"]
    n_fim = [(rows == t).sum() for t in (sp.fim_prefix, sp.fim_middle, sp.fim_suffix)]
    # About half the documents in FIM form, each cut into pieces of seq_len // 2 = 64 tokens
    # that are FIM'd alone: about (tokens / 2) / 64 pieces per epoch, each with its three sentinels.
    expected = 4 * info["tokens_train"] / 2 / 64
    assert info["packing"] == "concat" and max(n_fim) - min(n_fim) <= 2
    assert 0.3 * expected < n_fim[0] < 1.7 * expected
    cfg = DataConfig(max_documents=20, heldout_fraction=0.0, objective={"ul2": 1.0})
    train, _, info = build_lm_data(cfg, seq_len=128)
    batch = train.batch(0, 16)
    assert info["packing"] == "first_fit" and batch["prefix_mask"].any()
    assert np.isin(batch["tokens"], list(sp.ul2.values())).any()


@pytest.mark.parametrize("objective", ["span_corruption", "prefix_lm"])
def test_a_causal_decoder_reads_the_prefix_decoders_rows_without_the_prefix(objective):
    cfg = DataConfig(max_documents=12, heldout_fraction=0.2, objective={objective: 1.0}, lookahead=5)
    prefix = build_lm_data(cfg, seq_len=48)
    causal = build_lm_data(dataclasses.replace(cfg, bidirectional_prefix=False), seq_len=48)
    for split in (0, 1):  # training and held-out rows
        with_prefix, without = prefix[split].batch(0, 11), causal[split].batch(0, 11)
        assert with_prefix["prefix_mask"].any() and "prefix_mask" not in without
        assert set(with_prefix) == set(without) | {"prefix_mask"}
        for key, value in without.items():  # the same tokens, targets, loss mask, segments and positions
            np.testing.assert_array_equal(value, with_prefix[key])
    # whole packing groups hold the same examples, here as in an encoder-decoder's loader
    encdec = build_lm_data(cfg, seq_len=48, arch="encoder_decoder")[1]
    rows, examples = prefix[1].rows_for_examples(7)
    enc_rows, enc_examples = encdec.rows_for_examples(7)
    assert examples == enc_examples == 10  # two groups of 5
    assert prefix[1].batch(0, rows)["segment_ids"].max(axis=1).sum() == 10  # each example once
    targets = lambda b: np.sort(b["targets"][b["loss_mask"] > 0])
    np.testing.assert_array_equal(targets(prefix[1].batch(0, rows)), targets(encdec.batch(0, enc_rows)))


def test_byte_tokenizer_reserves_jaxlm_specials_after_the_bytes():
    from jaxlm.data.tokenizers import specials as spm

    tok = ByteTokenizer()
    sp = tok.special_ids
    symbols = spm.user_symbols()
    ids = [sp.fim_prefix, sp.fim_middle, sp.fim_suffix, *sp.ul2.values(), *sp.sentinels, *sp.roles.values()]
    assert ids == list(range(259, 259 + len(symbols))) and tok.vocab_size == 259 + len(symbols)
    # Asked for (specials=True), a symbol written in text is its one id; decode drops it and keeps
    # the bytes around it. Unasked, it is its bytes (tests/data/test_untrusted_text.py).
    got = tok.encode("a<|user|>b<|sentinel_7|><|no_such|>", specials=True)
    want = [ord("a") + 3, sp.roles["user"], ord("b") + 3, sp.sentinels[7]] + list(tok.encode("<|no_such|>"))
    np.testing.assert_array_equal(got, want)
    assert tok.decode(got) == "ab<|no_such|>"


BYTE = ByteTokenizer()


@pytest.mark.parametrize("how", ["document", "content", "tail"])
def test_a_one_document_source_is_validated_on_its_tail_whatever_its_name(tmp_path, how):
    text = "".join(f"line {i} of the one long text\n" for i in range(400))
    path = _write_shards(tmp_path, "book", [text])
    doc = np.asarray(load_tokenizer("byte").encode(text).tolist() + [load_tokenizer("byte").eos_id])
    for name in ("book", "b", "x", "novel", "corpus", "a1"):  # the old hash put it on one side by name
        cfg = DataConfig(source="shards", sources=(MixSourceConfig(name, path),), heldout_fraction=0.1,
                         heldout_split=how)
        train, heldout, info = build_lm_data(cfg, seq_len=16)
        assert info["sources"][name]["heldout_split"] == "tail"
        head, tail = train.sources[0].docs[0], heldout.sources[0].docs[0]
        np.testing.assert_array_equal(np.concatenate([head, tail]), doc)
        assert len(tail) == round(0.1 * len(doc))


def test_content_split_follows_the_text_not_its_name_or_place(tmp_path):
    texts = [f"document {i} " * (3 + i % 5) for i in range(60)]
    a = _write_shards(tmp_path, "a", texts)
    b = _write_shards(tmp_path, "b", texts[::-1] + texts[:5])  # reordered, five duplicated
    held_texts = {}
    for name, path in (("first", a), ("second", b)):
        cfg = DataConfig(source="shards", sources=(MixSourceConfig(name, path),), heldout_fraction=0.2,
                         heldout_split="content")
        train, heldout, _ = build_lm_data(cfg, seq_len=16)
        as_text = lambda src: {BYTE.decode(src.docs[i][:-1]) for i in range(len(src.docs))}
        held_texts[name] = as_text(heldout.sources[0])
        assert held_texts[name].isdisjoint(as_text(train.sources[0]))  # duplicates on one side
    assert held_texts["first"] == held_texts["second"] and 4 <= len(held_texts["first"]) <= 24


def test_a_source_can_bring_its_own_heldout_shards(tmp_path):
    from jaxlm.evaluate import heldout_documents

    a = _write_shards(tmp_path, "a", [f"train {i}" for i in range(10)])
    v = _write_shards(tmp_path, "v", ["valid one", "valid two"])
    cfg = DataConfig(source="shards", sources=(MixSourceConfig("a", a, heldout_path=v),), heldout_fraction=0.5)
    train, heldout, info = build_lm_data(cfg, seq_len=8)
    assert len(train.sources[0].docs) == 10 and info["sources"]["a"]["heldout_split"] == "heldout_path"
    run = type("Run", (), {"data": cfg, "train": type("T", (), {"seq_len": 8, "batch_size": 2})})
    docs = heldout_documents(run)  # what `jaxlm eval` scores by default
    assert [BYTE.decode(d[:-1]) for d in docs] == ["valid one", "valid two"]
