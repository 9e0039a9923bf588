"""`jaxlm data prepare`: bad input is counted and skipped, every drop has a reason, dedup works."""
import json
import subprocess
import sys

import numpy as np
import pytest

from jaxlm.config import ConfigError, from_dict
from jaxlm.prepare import prepare

WORDS = ("the of and to in that have with be it for on as at by this from or an are was we "
         "river stone garden window morning letter music travel story paper light table city").split()


def prose(rng, n_words=80):
    words = rng.choice(WORDS, n_words)
    sentences = [" ".join(words[i:i + 8]).capitalize() + "." for i in range(0, n_words, 8)]
    return " ".join(sentences)


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    base = [prose(rng) for _ in range(20)]
    near = base[0].split()
    near[5] = "lantern"  # one word changed: a near duplicate of base[0]
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(base)]
    lines += [
        json.dumps({"text": base[1].upper().replace(" ", "  "), "id": 100}),  # exact dup after normalizing
        json.dumps({"text": " ".join(near), "id": 101}),
        "{not json",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": "   "}),
        json.dumps({"text": "x " * 5000}),  # enormous: over max_chars
        json.dumps({"text": prose(rng) + " Write to jane.doe@example.com today.", "id": 102}),
        json.dumps({"text": prose(rng) + " " + " ".join(f"u{i}@example.org" for i in range(6)), "id": 103}),
        json.dumps({"text": "too short", "id": 104}),
    ]
    web = tmp_path / "web.jsonl"
    web.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe broken utf8\n")
    books = tmp_path / "books"
    books.mkdir()
    (books / "a.txt").write_text(prose(rng, 120))
    (books / "b.txt").write_text(base[4])  # exact duplicate of a web document, across sources
    return tmp_path, web, books


def config(tmp_path, web, books, **prepare):
    tree = {"prepare": {"out_dir": str(tmp_path / "out"), "max_chars": 5000,
                        "rules": {"pii": True, "min_words": {"min_words": 5}},
                        "sources": [{"name": "web", "paths": [str(web)]},
                                    {"name": "books", "paths": [str(books / "*.txt")]}],
                        **prepare}}
    return from_dict(tree).prepare


def read_out(path):
    return [json.loads(line) for line in open(path)]


def test_every_document_is_kept_or_counted_with_a_reason(corpus):
    tmp_path, web, books = corpus
    report = prepare(config(tmp_path, web, books), log=lambda *_: None)
    w = report["sources"]["web"]
    assert w["dropped"] == {"read.malformed_json": 1, "read.missing_text": 1, "read.empty": 1,
                            "read.too_long": 1, "read.invalid_utf8": 1, "pii.too_many": 1,
                            "min_words.too_few": 1, "dedup.exact": 1, "dedup.minhash": 1}
    assert w["changed"] == {"pii.scrubbed": 1}
    assert w["read"] == 30 and w["kept"] == w["read"] - sum(w["dropped"].values()) == 21
    b = report["sources"]["books"]
    assert b["read"] == 2 and b["kept"] == 1 and b["dropped"] == {"dedup.exact": 1}

    out = read_out(tmp_path / "out" / "web.jsonl")
    assert len(out) == 21
    ids = [d["id"] for d in out]
    assert 100 not in ids and 101 not in ids and 103 not in ids  # other fields are kept
    scrubbed = next(d for d in out if d["id"] == 102)["text"]
    assert "jane.doe@example.com" not in scrubbed and "|||EMAIL_ADDRESS|||" in scrubbed

    rejects = read_out(tmp_path / "out" / "rejects.jsonl")
    assert len(rejects) == sum(w["dropped"].values()) + sum(b["dropped"].values())
    assert {r["reason"] for r in rejects} >= {"dedup.minhash", "read.malformed_json"}
    assert "kept 21" in (tmp_path / "out" / "report.txt").read_text()


def test_parquet_source(corpus):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    tmp_path, web, books = corpus
    rng = np.random.default_rng(1)
    table = pa.table({"content": [prose(rng) for _ in range(5)] + [None], "lang": ["en"] * 6})
    pq.write_table(table, tmp_path / "p.parquet")
    cfg = from_dict({"prepare": {"out_dir": str(tmp_path / "pq"), "rules": {},
                                 "sources": [{"name": "pq", "paths": [str(tmp_path / "p.parquet")],
                                              "text_field": "content"}]}}).prepare
    report = prepare(cfg, log=lambda *_: None)
    assert report["sources"]["pq"]["kept"] == 5
    assert report["sources"]["pq"]["dropped"] == {"read.missing_text": 1}
    assert all(d["lang"] == "en" for d in read_out(tmp_path / "pq" / "pq.jsonl"))


@pytest.mark.parametrize("change, message", [
    ({"sources": [{"name": "x", "paths": ["/nonexistent/*.jsonl"]}]}, "matches no file"),
    ({"sources": [{"name": "x", "paths": ["WEB"], "format": "csv"}]}, "not a format"),
    ({"rules": {"gopher_qualty": True}}, "gopher_qualty"),
    ({"sources": []}, "prepare.sources"),
])
def test_bad_config_stops_before_any_work(corpus, change, message):
    tmp_path, web, books = corpus
    tree = {"out_dir": str(tmp_path / "bad"), "sources": [{"name": "web", "paths": [str(web)]}]}
    tree.update(change)
    for s in tree["sources"]:
        s["paths"] = [str(web) if p == "WEB" else p for p in s["paths"]]
    with pytest.raises(ConfigError, match=message):
        prepare(from_dict({"prepare": tree}).prepare, log=lambda *_: None)
    assert not (tmp_path / "bad").exists()


def jaxlm_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "jaxlm", *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_cli_prepare_tokenizer_tokenize_on_the_embedded_corpus(tmp_path):
    out = tmp_path / "stdlib"
    cfg = "configs/pretrain/tiny.yaml"
    jaxlm_cli("data", "prepare", cfg, f"prepare.out_dir={out}",
              "prepare.sources=[{name: stdlib, paths: 'stdlib:json/*.py', format: text}]")
    report = json.loads((out / "report.json").read_text())
    s = report["sources"]["stdlib"]
    assert s["read"] >= 5 and s["kept"] >= 3
    assert s["kept"] + sum(s["dropped"].values()) == s["read"]

    docs = [json.loads(line)["text"] for line in open(out / "stdlib.jsonl")]
    jaxlm_cli("data", "tokenizer", cfg, f"tokenizer.inputs={out / 'stdlib.jsonl'}",
              f"tokenizer.out={tmp_path / 'spm'}", "tokenizer.vocab_size=600")
    jaxlm_cli("data", "tokenize", cfg, f"tokenize.inputs={out / 'stdlib.jsonl'}",
              f"tokenize.tokenizer={tmp_path / 'spm.model'}", f"tokenize.out_dir={tmp_path / 'tokens'}",
              "tokenize.workers=1")
    from jaxlm.data.shards import read_shards
    from jaxlm.data.tokenizers import load_tokenizer

    tok = load_tokenizer(str(tmp_path / "spm.model"))
    shards = read_shards(tmp_path / "tokens")
    assert len(shards) == len(docs)
    for i, text in enumerate(docs):
        assert shards[i][-1] == tok.eos_id and tok.decode(shards[i]) == text
