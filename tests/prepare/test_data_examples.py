"""The two data examples in configs/data/: web prose in, English only; one text file of your own."""
import gzip
import json
from pathlib import Path

import numpy as np

from jaxlm.config import load_config
from jaxlm.data.pipeline import build_lm_data
from jaxlm.data.shards import tokenize_from_config
from jaxlm.prepare import prepare

REPO = Path(__file__).resolve().parents[2]
EN = ("the of and to in that it was for on with as at by from his her they this have had not but be are "
      "river garden morning letter music travel story paper light table city harbour village winter").split()
FR = ("le la les de des et en une un du que qui dans pour sur avec par est sont pas mais nous vous "
      "rivière jardin matin lettre musique voyage histoire papier lumière table ville port village hiver").split()


def prose(rng, words, n_sentences=24):
    sentences = [" ".join(rng.choice(words, int(rng.integers(9, 16)))).capitalize() + "." for _ in range(n_sentences)]
    return "\n\n".join(" ".join(sentences[i:i + 4]) for i in range(0, n_sentences, 4))


def test_web_prose_keeps_english_prose_and_says_why_the_rest_went(tmp_path):
    rng = np.random.default_rng(0)
    records = [{"id": f"en{i}", "text": prose(rng, EN)} for i in range(40)]
    records += [{"id": f"fr{i}", "text": prose(rng, FR)} for i in range(10)]
    records += [{"id": "list", "text": "\n".join(" ".join(rng.choice(EN, 3)) for _ in range(200))},
                {"id": "dup", "text": records[3]["text"]}, {"id": "short", "text": "A few words only."}]
    (tmp_path / "raw").mkdir()
    with gzip.open(tmp_path / "raw" / "part-0.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    cfg = load_config(REPO / "configs/data/web_prose.yaml", [f"prepare.out_dir={tmp_path / 'out'}", "prepare.workers=1",
                      f"prepare.sources=[{{name: web, paths: '{tmp_path}/raw/*.jsonl.gz', id_field: id}}]"])
    report = prepare(cfg.prepare, log=lambda *_: None)["sources"]["web"]
    kept = [json.loads(line)["id"] for line in open(tmp_path / "out" / "web.jsonl")]
    assert kept == [f"en{i}" for i in range(40)]
    rejects = {r["id"]: r["reason"] for r in map(json.loads, open(tmp_path / "out" / "rejects.jsonl"))}
    assert {rejects[f"fr{i}"] for i in range(10)} == {"language.other"}
    assert rejects["dup"] == "dedup.exact" and rejects["list"].startswith(("gopher", "c4", "fineweb"))
    assert report["read"] == len(records) and report["kept"] == 40


def test_own_text_is_cut_into_documents_and_validated_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example's paths are relative to where jaxlm runs
    cfg = load_config(REPO / "configs/data/own_text.yaml", ["tokenize.workers=1"])
    report = prepare(cfg.prepare, log=lambda *_: None)["sources"]["text"]
    assert report["read"] > 100 and report["kept"] > 100  # one 0.75 MB file, cut into 4,000-character chunks
    tokenize_from_config(cfg.tokenize, log=lambda *_: None)
    train, heldout, info = build_lm_data(cfg.data, cfg.train.seq_len)
    assert info["docs_heldout"] >= 5 and info["docs_train"] + info["docs_heldout"] == report["kept"]
    assert heldout is not None and heldout.batch(0, 4)["tokens"].shape == (4, cfg.train.seq_len)
