"""`jaxlm data prepare`: filter, scrub and deduplicate raw documents, source by source.

Two streaming passes, so memory is bounded by the work (hashes and MinHash signatures),
not by the corpus:

1. read each source's files; count and skip unusable records; run the source's rules in
   order (a rule may drop or change a document); drop exact duplicates (normalized-text
   hash, across all sources); write survivors to a staging file and add their MinHash
   signatures to the LSH index;
2. drop one of every near-duplicate cluster, optionally cut exact repeated spans (suffix
   array over UTF-8 bytes), and write `OUT_DIR/<source>.jsonl`.

Every dropped or changed document is counted by rule and source in `report.json` and
`report.txt`; with `write_rejects`, `rejects.jsonl` holds each dropped document's source,
place, id (`id_field`), reason and first 2000 characters (none for a document dropped for its
personal data). A source that holds no record, whose records are mostly unusable as read
(`max_unusable`), or of which nothing is kept, stops the run with one line of counts by reason
(the report is written first).
"""
from __future__ import annotations

import collections
import json
import shutil
import time
from pathlib import Path

import numpy as np

from jaxlm.config import ConfigError, PrepareConfig
from jaxlm.data import readers
from jaxlm.prepare import dedup
from jaxlm.prepare.rules import build_rules


class _Counts:
    """Per-source counters: read, kept, dropped by reason, changed by reason."""

    def __init__(self):
        self.by_source = collections.defaultdict(lambda: {"read": 0, "kept": 0,
                                                          "dropped": collections.Counter(),
                                                          "changed": collections.Counter()})

    def __getitem__(self, source):
        return self.by_source[source]

    def as_dict(self) -> dict:
        out = {}
        for name, c in self.by_source.items():
            out[name] = {"read": c["read"], "kept": c["kept"], "dropped": dict(c["dropped"]),
                         "changed": dict(c["changed"])}
        return out


def _check(cfg: PrepareConfig):
    """Every input and rule is valid before any work starts."""
    if not cfg.sources:
        raise ConfigError("prepare.sources is empty; give at least one {name, paths} source")
    names = [s.name for s in cfg.sources]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"prepare.sources need unique, non-empty names; got {names}")
    plans = []
    for i, src in enumerate(cfg.sources):
        try:
            files = readers.check_inputs(src.paths, src.format)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"prepare.sources[{i}] ({src.name}): {e}") from None
        rules = build_rules(cfg.rules if src.rules is None else src.rules)
        plans.append((src, files, rules))
    return plans


def prepare(cfg: PrepareConfig, log=print) -> dict:
    """Run both passes; returns the report (also written to OUT_DIR/report.json)."""
    plans = _check(cfg)
    out_dir = Path(cfg.out_dir)
    staging = out_dir / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    counts = _Counts()
    rejects = open(out_dir / "rejects.jsonl", "w") if cfg.write_rejects else None
    seen = set()
    lsh = dedup.MinHashDedup(num_perm=cfg.minhash_bands * cfg.minhash_rows, bands=cfg.minhash_bands,
                             rows=cfg.minhash_rows, ngram=cfg.minhash_ngram) if cfg.minhash_dedup else None
    t0 = time.perf_counter()

    id_fields = {src.name: src.id_field for src, _, _ in plans}

    def reject(source, where, reason, text=None, fields=None):
        counts[source]["dropped"][reason] += 1
        if rejects is not None:
            if reason.startswith("pii."):
                text = None  # the personal data that dropped it stays out of the rejects, too
            doc_id = (fields or {}).get(id_fields[source]) if id_fields[source] else None
            rejects.write(json.dumps({"source": source, "where": where, "id": doc_id, "reason": reason,
                                      "text": None if text is None else text[:2000]}) + "\n")

    def stop(message):
        if rejects is not None:
            rejects.close()
        shutil.rmtree(staging, ignore_errors=True)
        _write_report(out_dir, counts, t0)
        raise ConfigError(message)

    doc_id = 0
    for src, files, rules in plans:
        c = counts[src.name]
        with open(staging / f"{src.name}.jsonl", "w") as stage_f:
            for path, fmt in files:
                for rec in readers.read_documents(path, fmt, src.text_field, cfg.max_chars, src.split,
                                                  src.chunk_chars):
                    c["read"] += 1
                    if rec.text is None:
                        reject(src.name, rec.where, f"read.{rec.error}", fields=rec.fields)
                        continue
                    text, dropped = rec.text, False
                    for rule in rules:
                        verdict = rule(text)
                        if verdict.text is None:
                            reject(src.name, rec.where, verdict.reason, text, rec.fields)
                            dropped = True
                            break
                        if verdict.reason:
                            c["changed"][verdict.reason] += 1
                        text = verdict.text
                    if dropped:
                        continue
                    if cfg.exact_dedup:
                        key = dedup.exact_key(text)
                        if key in seen:
                            reject(src.name, rec.where, "dedup.exact", text, rec.fields)
                            continue
                        seen.add(key)
                    if lsh is not None:
                        lsh.add(doc_id, text)
                    doc = {**rec.fields, "text": text}  # the other fields are kept
                    stage_f.write(json.dumps({"id": doc_id, "where": rec.where, "doc": doc}) + "\n")
                    doc_id += 1
        problem = _unusable(src, c, cfg.max_unusable)
        if problem:
            stop(problem)
    near = lsh.duplicates() if lsh is not None else set()
    log(f"pass 1: {sum(c['read'] for c in counts.by_source.values())} documents in "
        f"{time.perf_counter() - t0:.1f} s; {len(near)} near-duplicates")

    def survivors(name):
        for line in open(staging / f"{name}.jsonl"):
            obj = json.loads(line)
            if obj["id"] in near:
                reject(name, obj["where"], "dedup.minhash", obj["doc"]["text"], obj["doc"])
                continue
            yield obj

    docs = ((src.name, obj) for src, _, _ in plans for obj in survivors(src.name))
    if cfg.suffix_dedup:  # needs the whole surviving corpus in memory, as bytes
        docs = _cut_repeated_spans(list(docs), cfg.suffix_min_len, counts, log)
    outputs = {src.name: open(out_dir / f"{src.name}.jsonl", "w") for src, _, _ in plans}
    for name, obj in docs:
        if not obj["doc"]["text"].strip():
            reject(name, obj["where"], "dedup.suffix_array_empty", fields=obj["doc"])
            continue
        counts[name]["kept"] += 1
        outputs[name].write(json.dumps(obj["doc"]) + "\n")
    for f in outputs.values():
        f.close()
    if rejects is not None:
        rejects.close()
    for src, _, _ in plans:
        (staging / f"{src.name}.jsonl").unlink()
    staging.rmdir()

    report = _write_report(out_dir, counts, t0)
    log(format_report(report))
    empty = [name for name, c in report["sources"].items() if c["kept"] == 0]
    if empty:
        raise ConfigError("; ".join(f"source {name!r} kept no document: read {report['sources'][name]['read']}, "
                                    f"dropped {readers.describe_losses(report['sources'][name]['dropped'])}"
                                    for name in empty) + f" (see {out_dir / 'report.txt'})")
    return report


def _write_report(out_dir: Path, counts: _Counts, t0: float) -> dict:
    report = {"sources": counts.as_dict(), "seconds": time.perf_counter() - t0, "out_dir": str(out_dir)}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.txt").write_text(format_report(report))
    return report


def _unusable(src, c: dict, max_unusable: float) -> str:
    """Why source `src` stops the run after its first pass (counts `c`), or ""."""
    lost = {reason[len("read."):]: n for reason, n in c["dropped"].items() if reason.startswith("read.")}
    where = f"source {src.name!r} ({', '.join(map(str, src.paths))})"
    if c["read"] == 0:
        return f"{where} holds no record: are its files empty?"
    n_lost = sum(lost.values())
    if n_lost == c["read"]:
        head = f"{where}: none of its {c['read']} records is usable"
    elif n_lost > max_unusable * c["read"]:
        head = (f"{where}: {n_lost} of its {c['read']} records are unusable, more than "
                f"prepare.max_unusable={max_unusable} of them")
    else:
        return ""
    hints = []
    if lost.get("missing_text"):
        hints.append(f"is the text under another field than text_field={src.text_field!r}?")
    if lost.get("too_long"):
        hints.append("a long text can be cut into documents with split: chunks (or paragraphs)")
    return f"{head} ({readers.describe_losses(lost)})" + (f"; {' '.join(hints)}" if hints else "")


def _cut_repeated_spans(docs, min_len: int, counts, log):
    """Cut every span of >= min_len bytes repeated across the corpus (Lee et al. 2022)."""
    arrays = [np.frombuffer(o["doc"]["text"].encode("utf-8"), np.uint8).astype(np.int32) for _, o in docs]
    new_arrays, stats = dedup.remove_repeated_spans(arrays, min_len=min_len)
    for (name, obj), old, new in zip(docs, arrays, new_arrays):
        if len(new) != len(old):
            counts[name]["changed"]["dedup.suffix_array"] += 1
            obj["doc"]["text"] = new.astype(np.uint8).tobytes().decode("utf-8", errors="ignore")
    log(f"suffix array: {stats}")
    return docs


def format_report(report: dict) -> str:
    """A readable table: per source, read / kept, then every drop and change reason."""
    lines = []
    for name, c in report["sources"].items():
        lines.append(f"{name}: read {c['read']}, kept {c['kept']}, "
                     f"dropped {sum(c['dropped'].values())}, changed {sum(c['changed'].values())}")
        for kind in ("dropped", "changed"):
            for reason, n in sorted(c[kind].items(), key=lambda kv: -kv[1]):
                lines.append(f"  {kind:8s} {reason:40s} {n:>10d}")
    return "\n".join(lines) + "\n"
