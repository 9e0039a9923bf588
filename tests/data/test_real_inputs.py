"""Readers on inputs as they come: compressed files, JSON arrays, a BOM, directories, and long
texts cut into documents."""
import bz2
import gzip
import json
import lzma

import numpy as np
import pytest

from jaxlm.config import ConfigError, TokenizeConfig
from jaxlm.data import readers
from jaxlm.data.shards import tokenize_from_config

RECORDS = [{"text": "first document", "id": 1}, {"text": "second\nwith two lines", "id": 2},
           {"body": "no text here", "id": 3}, {"text": "fourth, with ünïcödé", "id": 4}]


def jsonl_bytes(records=RECORDS) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def documents(path, fmt="auto", **kw):
    return [(r.text, r.fields, r.where.replace(str(path), "F"), r.error)
            for r in readers.read_documents(path, readers.format_of(path, fmt), **kw)]


def compress(kind: str, data: bytes) -> bytes:
    if kind == "zst":
        zstandard = pytest.importorskip("zstandard")
        return zstandard.ZstdCompressor().compress(data)
    return {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[kind](data)


@pytest.mark.parametrize("kind", ["gz", "zst", "bz2", "xz"])
def test_a_compressed_file_reads_as_its_plain_text(tmp_path, kind):
    plain = tmp_path / "docs.jsonl"
    plain.write_bytes(jsonl_bytes())
    packed = tmp_path / f"docs.jsonl.{kind}"
    packed.write_bytes(compress(kind, plain.read_bytes()))
    misnamed = tmp_path / f"misnamed_{kind}.jsonl"  # told by its leading bytes, not its name
    misnamed.write_bytes(packed.read_bytes())
    expected = documents(plain)
    assert [d[3] for d in expected] == ["", "", "missing_text", ""]
    assert documents(packed) == documents(misnamed) == expected

    book = tmp_path / f"book.txt.{kind}"
    book.write_bytes(compress(kind, "one plain text\n".encode()))
    assert [r.text for r in readers.read_documents(book, readers.format_of(book))] == ["one plain text\n"]


def test_a_truncated_compressed_file_keeps_what_came_before_and_counts_the_damage(tmp_path):
    many = [{"text": f"document number {i} " * 20} for i in range(2000)]
    path = tmp_path / "cut.jsonl.gz"
    data = gzip.compress(jsonl_bytes(many))
    path.write_bytes(data[:len(data) // 2])
    got = list(readers.read_documents(path, "jsonl"))
    good = [r for r in got if r.text is not None]
    assert 0 < len(good) < len(many)
    assert [r.text for r in good] == [m["text"] for m in many[:len(good)]]
    assert [r.error for r in got if r.text is None] == ["damaged_file"]


def test_a_json_array_with_a_bom_is_read_element_by_element(tmp_path):
    path = tmp_path / "docs.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORDS + ["a string"], indent=2).encode())
    got = documents(path)
    assert [g[0] for g in got] == ["first document", "second\nwith two lines", None, "fourth, with ünïcödé", None]
    assert [g[2] for g in got] == [f"F[{i}]" for i in range(5)]
    assert [g[3] for g in got] == ["", "", "missing_text", "", "not_an_object"]
    assert list(readers.read_records([path]))[:4] == RECORDS  # SFT, prompts, preferences read arrays too

    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + jsonl_bytes())
    assert [g[3] for g in documents(jsonl)] == ["", "", "missing_text", ""]
    lines_of_arrays = tmp_path / "arrays.jsonl"  # JSONL whose lines are arrays stays line by line
    lines_of_arrays.write_text('[1, 2]\n[3]\n')
    assert [g[3] for g in documents(lines_of_arrays)] == ["not_an_object", "not_an_object"]


def test_a_directory_is_every_file_below_it(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.jsonl").write_bytes(jsonl_bytes())
    (tmp_path / "d" / "sub" / "a.txt").write_text("text")
    (tmp_path / "d" / ".hidden.txt").write_text("not read")
    (tmp_path / "d" / ".git").mkdir()
    (tmp_path / "d" / ".git" / "x.txt").write_text("not read")
    assert readers.expand([tmp_path / "d"]) == [tmp_path / "d" / "b.jsonl", tmp_path / "d" / "sub" / "a.txt"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is a directory with no file"):
        readers.expand([tmp_path / "empty"])


def random_text(rng, n_chars):
    pieces = rng.choice(["word", "another", "x" * 30, ".", "\n", "\n\n", " ", "  ", "\t"], n_chars // 3,
                        p=[.3, .2, .01, .05, .05, .03, .3, .04, .02])
    return "".join(w if w.isspace() else w + " " for w in pieces)[:n_chars]


@pytest.mark.parametrize("seed", range(5))
def test_chunks_cover_the_text_exactly_and_cut_at_breaks(seed):
    rng = np.random.default_rng(seed)
    text = random_text(rng, 20_000)
    chunk = int(rng.integers(200, 2000))
    pieces = readers.split_text(text, "chunks", chunk)
    assert "".join(pieces) == text
    assert all(0 < len(p) <= chunk for p in pieces)
    start = 0
    for p in pieces[:-1]:
        assert p[-1].isspace() or not any(c.isspace() for c in p[1:])  # a hard cut only inside a long word
        window = text[start:start + chunk]
        if window.rfind("\n\n") >= chunk // 2:  # a paragraph break in the second half is where it cuts
            assert len(p) == window.rfind("\n\n") + 2
        start += len(p)
    assert readers.split_text("y" * 25, "chunks", 10) == ["y" * 10, "y" * 10, "y" * 5]
    assert readers.split_text("a b\n\n  \n c \n\n", "paragraphs") == ["a b", "c"]


def test_one_long_text_becomes_documents(tmp_path):
    rng = np.random.default_rng(0)
    book = tmp_path / "book.txt"
    paragraphs = [" ".join(rng.choice(["word", "another.", "line\nbreak"], int(rng.integers(20, 600))))
                  for _ in range(400)]
    book.write_text("\n\n".join(paragraphs))
    whole = list(readers.read_documents(book, "text", max_chars=100_000))
    assert [r.error for r in whole] == ["too_long"]
    chunks = list(readers.read_documents(book, "text", max_chars=100_000, split="chunks", chunk_chars=20_000))
    assert len(chunks) > 1 and all(r.text is not None and len(r.text) <= 20_000 for r in chunks)
    assert "".join(r.text for r in chunks) == book.read_text()
    assert [r.where for r in chunks] == [f"{book}#{k}" for k in range(len(chunks))]
    paras = [r.text for r in readers.read_documents(book, "text", split="paragraphs")]
    assert paras == paragraphs


def test_tokenize_with_no_usable_record_stops_and_writes_nothing(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(jsonl_bytes([{"content": "a"}, {"content": "b"}]))
    cfg = TokenizeConfig(inputs=(str(path),), tokenizer="byte", out_dir=str(tmp_path / "tok"), workers=1)
    with pytest.raises(ConfigError, match=r"no usable record \(skipped: 2 missing_text\).*text_field='text'"):
        tokenize_from_config(cfg, log=lambda *_: None)
    assert not list((tmp_path / "tok").iterdir())
    index = tokenize_from_config(TokenizeConfig(**{**cfg.__dict__, "text_field": "content"}), log=lambda *_: None)
    assert index["documents"] == 2
