"""Tokenized ArrayRecord shards: written in parallel, read back with Grain, in input order."""
import itertools
import json

import grain
import numpy as np
import pytest

from jaxlm.data.corpus import stdlib_documents
from jaxlm.data.shards import _encoded_chunks, load_index, read_shards, tokenize_to_shards
from jaxlm.data.tokenizers.spm import SentencePieceTokenizer, train_sentencepiece

EXTRA_DOCS = ["", "x", "emoji 🎉 and\ttabs  \n", "<|user|>hi<|end_turn|>"]


@pytest.fixture(scope="module")
def texts():
    return [t for _, t in stdlib_documents(max_documents=40).documents] + EXTRA_DOCS


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, texts):
    return str(train_sentencepiece(texts[:30], tmp_path_factory.mktemp("spm") / "tiny",
                                   vocab_size=600, num_threads=2))


@pytest.fixture(scope="module")
def reference(model_path, texts):
    """Each text tokenized in this process, with eos: what the shards must hold, in order."""
    tok = SentencePieceTokenizer(model_path)
    return [np.append(tok.encode(t), np.int32(tok.eos_id)) for t in texts]


@pytest.fixture(scope="module")
def written(tmp_path_factory, model_path, texts):
    """The same texts written with 1 and with 2 workers (different chunking too)."""
    out = {}
    for workers, chunk_docs in ((1, 5), (2, 3)):
        out_dir = tmp_path_factory.mktemp(f"shards{workers}")
        index = tokenize_to_shards(iter(texts), model_path, out_dir, workers=workers,
                                   docs_per_shard=7, chunk_docs=chunk_docs)
        out[workers] = (out_dir, index)
    return out


def test_documents_read_back_in_input_order(written, reference):
    out_dir, _ = written[1]
    ds = read_shards(out_dir)
    assert isinstance(ds, grain.MapDataset)
    assert len(ds) == len(reference)
    for i, expected in enumerate(reference):
        got = ds[i]
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, expected)
        assert got[-1] == 2  # eos appended, even to the empty document
    # Grain transforms compose on top: a shuffle is a permutation of the same documents.
    shuffled = [tuple(x) for x in ds.seed(3).shuffle()]
    assert sorted(shuffled) == sorted(tuple(x) for x in reference)


def test_index_counts(written, reference, model_path):
    out_dir, index = written[1]
    assert load_index(out_dir) == index
    n = len(reference)
    assert [s["documents"] for s in index["shards"]] == [7] * (n // 7) + ([n % 7] if n % 7 else [])
    assert [s["path"] for s in index["shards"]] == [f"shard-{i:05d}.array_record"
                                                    for i in range(len(index["shards"]))]
    expected_tokens = [sum(len(r) for r in reference[i:i + 7]) for i in range(0, n, 7)]
    assert [s["tokens"] for s in index["shards"]] == expected_tokens
    assert index["documents"] == n and index["tokens"] == sum(len(r) for r in reference)
    assert (index["tokenizer"], index["vocab_size"], index["eos_id"]) == (model_path, 600, 2)
    assert len(index["tokenizer_sha256"]) == 64 and index["append_eos"] is True


def test_one_and_two_workers_write_identical_shards(written):
    (dir1, index1), (dir2, index2) = written[1], written[2]
    assert index1 == index2
    for shard in index1["shards"]:
        assert (dir1 / shard["path"]).read_bytes() == (dir2 / shard["path"]).read_bytes()


def test_without_eos(tmp_path, model_path, texts, reference):
    index = tokenize_to_shards(texts[:9], model_path, tmp_path, workers=1, append_eos=False)
    ds = read_shards(tmp_path)
    for i in range(9):
        np.testing.assert_array_equal(ds[i], reference[i][:-1])
    assert index["tokens"] == sum(len(r) - 1 for r in reference[:9])


def test_byte_tokenizer_by_name(tmp_path):
    index = tokenize_to_shards(["ab", "", "é"], "byte", tmp_path, workers=1)
    assert (index["tokenizer"], index["tokenizer_path"], index["vocab_size"]) == ("byte", None, 369)
    assert [read_shards(tmp_path)[i].tolist() for i in range(3)] == [[100, 101, 2], [2], [198, 172, 2]]


def test_parallel_encoding_reads_its_input_lazily(model_path):
    """An endless input: only a bounded number of chunks is ever read ahead."""
    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield f"doc {i}\n"

    chunks = _encoded_chunks(endless(), model_path, workers=2, chunk_docs=4, append_eos=True)
    first = list(itertools.islice(chunks, 3))
    chunks.close()
    assert [len(c) for c in first] == [4, 4, 4]
    # To hand out chunk k, at most 2 * workers chunks are in flight: k + 2 * 2 - 1 submitted.
    assert len(pulled) <= (3 + 2 * 2 - 1) * 4


def test_existing_shards_need_overwrite(tmp_path, model_path, texts):
    tokenize_to_shards(texts[:10], model_path, tmp_path, workers=1, docs_per_shard=3)
    assert len(list(tmp_path.glob("shard-*"))) == 4
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        tokenize_to_shards(texts[:2], model_path, tmp_path, workers=1)
    index = tokenize_to_shards(texts[:2], model_path, tmp_path, workers=1, overwrite=True)
    assert len(list(tmp_path.glob("shard-*"))) == 1  # stale shards are gone
    assert index["documents"] == 2 and len(read_shards(tmp_path)) == 2


def test_missing_or_unfinished_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_shards(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*index.json"):
        load_index(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_shards(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps(
        {"format": "jaxlm.tokens.v1", "documents": 1,
         "shards": [{"path": "shard-00000.array_record", "documents": 1, "tokens": 1}]}))
    with pytest.raises(FileNotFoundError, match="shard-00000"):
        read_shards(tmp_path)


@pytest.mark.parametrize("stop_at", [0, 7, 25])
def test_an_interrupted_write_goes_on_from_its_last_full_shard(tmp_path, texts, stop_at):
    def interrupted():
        for i, text in enumerate(texts[:30]):
            if i == stop_at:
                raise KeyboardInterrupt  # the finally closes a part-written shard
            yield text

    whole = tokenize_to_shards(texts[:30], "byte", tmp_path / "whole", workers=1, docs_per_shard=4)
    with pytest.raises(KeyboardInterrupt):
        tokenize_to_shards(interrupted(), "byte", tmp_path / "cut", workers=1, docs_per_shard=4, chunk_docs=2,
                           resume_key="k")
    progress = json.loads((tmp_path / "cut" / "progress.json").read_text())
    assert len(progress["shards"]) == stop_at // 4  # full shards only
    if stop_at:
        with pytest.raises(FileExistsError):  # another write (another key) does not take them over
            tokenize_to_shards(texts[:30], "byte", tmp_path / "cut", workers=1, docs_per_shard=4,
                               resume_key="other")
    pulled = []
    index = tokenize_to_shards((pulled.append(t) or t for t in texts[:30]), "byte", tmp_path / "cut", workers=1,
                               docs_per_shard=4, resume_key="k")
    assert len(pulled) == 30  # the finished shards' documents are skipped, not tokenized again
    assert index["shards"] == whole["shards"] and index["documents"] == 30
    resumed, reference = read_shards(tmp_path / "cut"), read_shards(tmp_path / "whole")
    assert all(np.array_equal(resumed[i], reference[i]) for i in range(30))
    assert not (tmp_path / "cut" / "progress.json").exists()
