"""The map step of `jaxlm data prepare`: one task per group of input files of one source.

A task reads its files, counts and skips unusable records, runs the source's rules in order (a
rule may drop or change a document), and writes what survives with its exact-duplicate key and
MinHash signature under the work directory. It depends on nothing but its own inputs and
settings, so tasks run in any order, in any process or on any machine (the work directory on a
filesystem they share). Its outputs are written under temporary names, renamed into place, and
then marked done: a task that was killed leaves no done marker and is run again whole.

Files of task N (`NNNNNN.*` in the work directory): `docs.jsonl` (one line per surviving
document: where it came from, its exact key, the document), `sigs.npy` (uint32 [documents,
num_perm] MinHash signatures, row i for line i), `rejects.jsonl`, `counts.json` and `done`.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from jaxlm.data import readers
from jaxlm.prepare import dedup
from jaxlm.prepare.rules import build_rules

REJECT_CHARS = 2000  # of a rejected document's text kept in rejects.jsonl
_SIGNATURE_BATCH = 512  # documents hashed together (a signature does not depend on its batch)


@dataclasses.dataclass(frozen=True)
class Task:
    """Everything one map task needs, picklable for a process pool or a Ray cluster."""

    number: int  # place in the plan: the reduce reads tasks in this order
    source: str
    files: tuple[tuple[str, str], ...]  # (path, format), in input order
    text_field: str
    id_field: str
    split: str
    chunk_chars: int
    max_chars: int
    rules: str  # the rule chain's spec, as JSON
    exact: bool  # compute exact-duplicate keys
    minhash: Optional[tuple[int, int, int, int]]  # (num_perm, bands, rows, ngram); None: no signatures
    work: str  # the work directory

    def path(self, name: str) -> Path:
        return Path(self.work) / f"{self.number:06d}.{name}"

    def done(self) -> bool:
        return self.path("done").exists()


def reject_record(source: str, where: str, reason: str, text: Optional[str], fields: Optional[dict],
                  id_field: str) -> str:
    """One line of rejects.jsonl. A document dropped for personal data keeps no text here either."""
    if reason.startswith("pii."):
        text = None
    doc_id = (fields or {}).get(id_field) if id_field else None
    return json.dumps({"source": source, "where": where, "id": doc_id, "reason": reason,
                       "text": None if text is None else text[:REJECT_CHARS]}) + "\n"


@functools.lru_cache(maxsize=8)
def _rules(spec: str) -> list:
    return build_rules(json.loads(spec))


@functools.lru_cache(maxsize=2)
def _minhash(params: tuple[int, int, int, int]) -> dedup.MinHashDedup:
    num_perm, bands, rows, ngram = params
    return dedup.MinHashDedup(num_perm=num_perm, bands=bands, rows=rows, ngram=ngram)


def run_task(task: Task) -> dict:
    """Run one task; returns its counts (read, dropped and changed by reason), also in counts.json."""
    rules = _rules(task.rules)
    minhash = _minhash(task.minhash) if task.minhash else None
    counts = {"read": 0, "dropped": collections.Counter(), "changed": collections.Counter()}
    tmp = {name: Path(f"{task.path(name)}.tmp") for name in ("docs.jsonl", "rejects.jsonl", "sigs.npy",
                                                              "counts.json")}
    sigs, batch = [], []
    with open(tmp["docs.jsonl"], "w") as docs_f, open(tmp["rejects.jsonl"], "w") as rejects_f:
        def reject(where, reason, text=None, fields=None):
            counts["dropped"][reason] += 1
            rejects_f.write(reject_record(task.source, where, reason, text, fields, task.id_field))

        for path, fmt in task.files:
            for rec in readers.read_documents(Path(path), fmt, task.text_field, task.max_chars, task.split,
                                              task.chunk_chars):
                counts["read"] += 1
                if rec.text is None:
                    reject(rec.where, f"read.{rec.error}", fields=rec.fields)
                    continue
                text = rec.text
                for rule in rules:
                    verdict = rule(text)
                    if verdict.text is None:
                        reject(rec.where, verdict.reason, text, rec.fields)
                        break
                    if verdict.reason:
                        counts["changed"][verdict.reason] += 1
                    text = verdict.text
                else:
                    key = dedup.exact_key(text).hex() if task.exact else ""
                    doc = {**rec.fields, "text": text}  # the other fields are kept
                    docs_f.write(json.dumps({"where": rec.where, "key": key, "doc": doc}) + "\n")
                    if minhash is not None:
                        batch.append(text)
                        if len(batch) == _SIGNATURE_BATCH:
                            sigs.append(minhash.signatures(batch))
                            batch = []
    if minhash is not None and batch:
        sigs.append(minhash.signatures(batch))
    with open(tmp["sigs.npy"], "wb") as f:
        np.save(f, np.concatenate(sigs) if sigs else np.zeros((0, task.minhash[0] if task.minhash else 0),
                                                                np.uint32))
    tmp["counts.json"].write_text(json.dumps(counts))
    for name, path in tmp.items():
        os.replace(path, task.path(name))
    task.path("done").write_text("")  # last: everything above is complete
    return counts
