"""Tokenized documents as ArrayRecord shards, written in parallel and read back with Grain.

Layout of `out_dir`:

    shard-00000.array_record, shard-00001.array_record, ...
    index.json   {"format", "record", "tokenizer", "tokenizer_path", "tokenizer_sha256",
                  "vocab_size", "eos_id", "append_eos", "documents", "tokens",
                  "shards": [{"path", "documents", "tokens"}, ...]}

Record format: one record per document, in input order; the record is the document's token
ids as little-endian int32 bytes (4 * n_tokens bytes, no header), ending with eos when
`append_eos`. Shards are written with `group_size:1` (one record per compressed chunk,
zstd), the setting ArrayRecord asks for so that random access reads one record, not 65536.
`index.json` is written last, atomically: a directory without it is an unfinished write, whose
`progress.json` lists the shards complete so far (a rerun of the same write goes on from there).
"""
from __future__ import annotations

import collections
import itertools
import json
import multiprocessing
import os
from pathlib import Path
from typing import Iterable

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from jaxlm.data.tokenizers import file_sha256, load_tokenizer

INDEX = "index.json"
PROGRESS = "progress.json"  # the shards complete so far, while a write is unfinished
FORMAT = "jaxlm.tokens.v1"
RECORD = "<i4"  # little-endian int32 token ids, one document per record
WRITER_OPTIONS = "group_size:1"
_SHARD_NAME = "shard-{:05d}.array_record"

_worker_tokenizer = None  # set once per worker process by _init_worker


def _init_worker(tokenizer_name: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_name)


def _encode_chunk(texts: list[str], append_eos: bool) -> list[bytes]:
    """Each text's record: its token ids (+ eos) as little-endian int32 bytes."""
    tok = _worker_tokenizer
    records = []
    for text in texts:
        ids = tok.encode(text)
        if append_eos:
            ids = np.append(ids, np.int32(tok.eos_id))
        records.append(ids.astype(RECORD, copy=False).tobytes())
    return records


def _chunked(texts: Iterable[str], size: int):
    it = iter(texts)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _encoded_chunks(texts, tokenizer_name: str, workers: int, chunk_docs: int, append_eos: bool):
    """Records of each chunk of `chunk_docs` texts, in input order.

    At most 2 * workers chunks are in flight, so memory stays bounded however long `texts`
    is. (`Pool.imap` would not bound it: its feeder thread drains the input iterator into
    the task queue as fast as it can read.) Workers are spawned, not forked: the parent may
    have JAX's threads running, and forking a multithreaded process can deadlock.
    """
    if workers <= 1:
        _init_worker(tokenizer_name)
        for chunk in _chunked(texts, chunk_docs):
            yield _encode_chunk(chunk, append_eos)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_name,)) as pool:
        pending = collections.deque()
        for chunk in _chunked(texts, chunk_docs):
            pending.append(pool.apply_async(_encode_chunk, (chunk, append_eos)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _ShardWriter:
    """Writes records to shard-00000, shard-00001, ... with `docs_per_shard` records each;
    `on_close(shards)` is called after each shard is complete."""

    def __init__(self, out_dir: Path, docs_per_shard: int, shards=(), on_close=lambda shards: None):
        self.out_dir, self.docs_per_shard, self.on_close = out_dir, docs_per_shard, on_close
        self.shards: list[dict] = list(shards)
        self._writer = None

    def write(self, record: bytes) -> None:
        if self._writer is None or self.shards[-1]["documents"] == self.docs_per_shard:
            self.close()
            name = _SHARD_NAME.format(len(self.shards))
            self._writer = ArrayRecordWriter(str(self.out_dir / name), WRITER_OPTIONS)
            if not self._writer.ok():
                raise OSError(f"cannot write the shard {str(self.out_dir / name)!r}")
            self.shards.append({"path": name, "documents": 0, "tokens": 0})
        self._writer.write(record)
        self.shards[-1]["documents"] += 1
        self.shards[-1]["tokens"] += len(record) // 4

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self.on_close(self.shards)


def _resumable(out_dir: Path, key: str):
    """The complete shards an unfinished write of the same `key` left in `out_dir` (PROGRESS),
    with every other shard file removed; None if there is no such write to resume."""
    path = out_dir / PROGRESS
    if not key or (out_dir / INDEX).exists() or not path.is_file():
        return None
    progress = json.loads(path.read_text())
    if progress.get("key") != key:
        return None
    done = progress["shards"]
    for f in out_dir.glob("shard-*.array_record"):
        if f.name not in {s["path"] for s in done}:
            f.unlink()  # the shard being written when the run stopped
    return done


def tokenize_to_shards(texts: Iterable[str], tokenizer_path_or_name: str, out_dir: str | Path, *,
                       workers: int = os.cpu_count() or 1, docs_per_shard: int = 8192,
                       chunk_docs: int = 64, append_eos: bool = True,
                       overwrite: bool = False, resume_key: str = "") -> dict:
    """Tokenize `texts` (any iterable, read lazily) into ArrayRecord shards; returns the index.

    `workers` processes each load the tokenizer once (`workers=1`: in this process); the
    output does not depend on `workers` or `chunk_docs`. An `out_dir` that already holds
    shards is an error unless `overwrite`, which removes them first, or unless it holds an
    unfinished write with the same `resume_key` (a caller's fingerprint of `texts` and the
    settings): then the complete shards are kept, their documents skipped in `texts`, and the
    write goes on from there. Workers are spawned, so a script that calls this with
    `workers > 1` needs the `if __name__ == "__main__":` guard.
    """
    if docs_per_shard < 1 or chunk_docs < 1:
        raise ValueError(f"docs_per_shard={docs_per_shard} and chunk_docs={chunk_docs} must be >= 1")
    tokenizer = load_tokenizer(tokenizer_path_or_name)  # fails here, not in a worker
    if append_eos and tokenizer.eos_id is None:
        raise ValueError(f"append_eos=True but the tokenizer {tokenizer.name!r} has no eos")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = json.dumps([resume_key, tokenizer.name, docs_per_shard, append_eos]) if resume_key else ""
    done = None if overwrite else _resumable(out_dir, key)
    old = sorted(out_dir.glob("shard-*.array_record")) + sorted(out_dir.glob(INDEX))
    if done is not None:
        texts = itertools.islice(texts, sum(s["documents"] for s in done), None)
    elif old and not overwrite:
        raise FileExistsError(f"{str(out_dir)!r} already holds shards; pass overwrite=True "
                              f"or choose an empty directory")
    else:
        for path in reversed(old):  # the index first, so no reader sees a half-deleted set
            path.unlink()

    def save_progress(shards):  # full shards only: one closed by an error is written again
        if key:
            full = [s for s in shards if s["documents"] == docs_per_shard]
            (out_dir / (PROGRESS + ".tmp")).write_text(json.dumps({"key": key, "shards": full}))
            os.replace(out_dir / (PROGRESS + ".tmp"), out_dir / PROGRESS)

    save_progress(done or [])
    writer = _ShardWriter(out_dir, docs_per_shard, done or [], save_progress)
    try:
        for records in _encoded_chunks(texts, tokenizer_path_or_name, workers, chunk_docs,
                                       append_eos):
            for record in records:
                writer.write(record)
    finally:
        writer.close()

    is_file = Path(tokenizer_path_or_name).is_file()
    index = {
        "format": FORMAT,
        "record": "little-endian int32 token ids, one document per record",
        "tokenizer": tokenizer.name,
        "tokenizer_path": str(Path(tokenizer_path_or_name).resolve()) if is_file else None,
        "tokenizer_sha256": file_sha256(Path(tokenizer_path_or_name)) if is_file else None,
        "vocab_size": int(tokenizer.vocab_size),
        "eos_id": tokenizer.eos_id,
        "append_eos": append_eos,
        "documents": sum(s["documents"] for s in writer.shards),
        "tokens": sum(s["tokens"] for s in writer.shards),
        "shards": writer.shards,
    }
    tmp = out_dir / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out_dir / INDEX)
    (out_dir / PROGRESS).unlink(missing_ok=True)
    return index


def tokenize_from_config(t, log=print) -> dict:
    """`jaxlm data tokenize`: the usable records of `t.inputs` (a TokenizeConfig) into shards."""
    from jaxlm.config import ConfigError
    from jaxlm.data.readers import describe_losses, expand_prepared, file_stamps, no_documents, texts

    if not t.inputs:
        raise ConfigError("tokenize.inputs is empty; name the prepared files to tokenize")
    inputs = file_stamps(expand_prepared(t.inputs, "tokenize.inputs"))
    docs, counts = texts(t.inputs, t.text_field)
    index = tokenize_to_shards(docs, t.tokenizer, t.out_dir, workers=t.workers or os.cpu_count() or 1,
                               docs_per_shard=t.docs_per_shard, overwrite=t.overwrite,
                               resume_key=json.dumps([inputs, t.text_field]))
    n, skipped = counts()
    if n == 0:
        for f in [*Path(t.out_dir).glob("shard-*.array_record"), Path(t.out_dir) / INDEX]:
            f.unlink(missing_ok=True)  # nothing written: a rerun with the right inputs needs no overwrite
        raise ConfigError(no_documents("tokenize", t.text_field, skipped))
    log(f"wrote {len(index['shards'])} shards to {t.out_dir}: {index['documents']} documents, "
        f"{index['tokens']} tokens; unusable records skipped: {describe_losses(skipped)}")
    return index


def load_index(out_dir: str | Path) -> dict:
    """The `index.json` that `tokenize_to_shards` wrote in `out_dir`."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"token shard directory {str(out_dir)!r} does not exist")
    path = out_dir / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{str(out_dir)!r} has no {INDEX}: not written by "
                                f"tokenize_to_shards, or the write did not finish")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a {FORMAT} index")
    return index


def _decode_record(record: bytes) -> np.ndarray:
    return np.frombuffer(record, dtype=RECORD).astype(np.int32)


def read_shards(out_dir: str | Path) -> grain.MapDataset:
    """A Grain `MapDataset` over the documents in `out_dir`: element i is document i's int32 ids."""
    out_dir = Path(out_dir)
    index = load_index(out_dir)
    paths = [out_dir / s["path"] for s in index["shards"]]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"shard {str(path)!r} listed in {INDEX} does not exist")
    if not paths:
        return grain.MapDataset.source([])
    source = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
    if len(source) != index["documents"]:
        raise ValueError(f"{str(out_dir)!r} holds {len(source)} records but its {INDEX} "
                         f"counts {index['documents']} documents")
    return grain.MapDataset.source(source).map(_decode_record)
