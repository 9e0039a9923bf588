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
    pii = [r for r in rejects if r["reason"] == "pii.too_many"]
    assert len(pii) == 1 and pii[0]["text"] is None  # the addresses that dropped it are not kept either
    assert all(r["text"] for r in rejects if r["reason"].startswith(("dedup", "min_words")))


def test_rejects_name_documents_by_their_id_field(corpus):
    tmp_path, web, books = corpus
    cfg = config(tmp_path, web, books)
    cfg = cfg.__class__(**{**cfg.__dict__, "sources": (cfg.sources[0].__class__(
        **{**cfg.sources[0].__dict__, "id_field": "id"}),)})
    prepare(cfg, log=lambda *_: None)
    ids = {r["reason"]: r["id"] for r in read_out(tmp_path / "out" / "rejects.jsonl")}
    assert ids["dedup.exact"] == 100 and ids["dedup.minhash"] == 101 and ids["pii.too_many"] == 103
    assert ids["read.malformed_json"] is None


def test_one_text_file_split_into_chunks_is_prepared_with_a_gopher_rule(tmp_path):
    rng = np.random.default_rng(3)
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(prose(rng, 200) for _ in range(300)))  # ~300 kB, ~60k words
    tree = {"out_dir": str(tmp_path / "out"), "max_chars": 100_000, "rules": {"gopher_quality": True},
            "sources": [{"name": "book", "paths": [str(book)]}]}
    with pytest.raises(ConfigError, match=r"none of its 1 records is usable \(1 too_long\); .*split: chunks"):
        prepare(from_dict({"prepare": tree}).prepare, log=lambda *_: None)
    tree["sources"][0].update(split="chunks", chunk_chars=10_000)
    report = prepare(from_dict({"prepare": tree}).prepare, log=lambda *_: None)
    kept = read_out(tmp_path / "out" / "book.jsonl")
    assert report["sources"]["book"]["read"] == len(kept) > 25
    assert "".join(d["text"] for d in kept) == book.read_text()


def write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.mark.parametrize("records, settings, message", [
    ([], {}, r"holds no record: are its files empty\?"),
    ([{"content": "a b c d e f"}] * 3, {}, r"none of its 3 records is usable \(3 missing_text\); is the text "
                                           r"under another field than text_field='text'\?"),
    (["{bad", {"text": "fine words here"}, "{bad", {"text": "  "}], {"max_unusable": 0.5},
     r"3 of its 4 records are unusable, more than prepare.max_unusable=0.5 of them \(2 malformed_json, 1 empty\)"),
    ([{"text": "short"}] * 2, {"rules": {"min_words": {"min_words": 5}}},
     r"source 'web' kept no document: read 2, dropped 2 min_words.too_few \(see .*report.txt\)"),
])
def test_a_source_that_yields_nothing_usable_stops_the_run(tmp_path, records, settings, message):
    path = write_lines(tmp_path / "web.jsonl", records)
    tree = {"out_dir": str(tmp_path / "out"), "rules": {}, "sources": [{"name": "web", "paths": [str(path)]}],
            **settings}
    with pytest.raises(ConfigError, match=message):
        prepare(from_dict({"prepare": tree}).prepare, log=lambda *_: None)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["sources"]["web"]["read"] == len(records)


def test_a_few_unusable_records_are_counted_and_the_run_goes_on(tmp_path):
    path = write_lines(tmp_path / "web.jsonl", ["{bad", {"text": "fine words here"}, {"text": "more fine words"}])
    tree = {"out_dir": str(tmp_path / "out"), "rules": {}, "max_unusable": 0.5,
            "sources": [{"name": "web", "paths": [str(path)]}]}
    report = prepare(from_dict({"prepare": tree}).prepare, log=lambda *_: None)
    assert report["sources"]["web"]["kept"] == 2 and report["sources"]["web"]["dropped"] == {"read.malformed_json": 1}


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


def test_rules_run_in_the_order_given(tmp_path):
    path = write_lines(tmp_path / "web.jsonl", [{"text": "a short one"}, {"text": "another short text"}])
    for rules, reason in (({"min_words": {"min_words": 10}, "gopher_quality": True}, "min_words.too_few"),
                          ({"gopher_quality": True, "min_words": {"min_words": 10}}, "gopher_quality.word_count")):
        tree = {"out_dir": str(tmp_path / "out"), "rules": rules, "workers": 1,
                "sources": [{"name": "web", "paths": [str(path)]}]}
        with pytest.raises(ConfigError, match=f"kept no document: read 2, dropped 2 {reason}"):
            prepare(from_dict({"prepare": tree}).prepare, log=lambda *_: None)
