"""`jaxlm data prepare`: filter, scrub and deduplicate raw documents, as a map over input files
and one reduce.

1. Map (`map_step`): each source's files, in groups of about `prepare.task_mb`, are tasks run
   in `prepare.workers` processes (or on a Ray cluster, `prepare.executor: ray`); a task counts
   and skips unusable records, runs the source's rules, and writes the survivors with their
   exact key and MinHash signature under OUT_DIR/work/. A killed run, started again with the
   same settings on the same files, runs only the tasks that did not finish.
2. Reduce (this process, in input order, so the output does not depend on the workers or the
   order tasks finished): drop exact duplicates (normalized-text hash; the first occurrence
   across all sources is kept), index the survivors' signatures and drop all but the first of
   each near-duplicate cluster, optionally cut exact repeated spans (suffix array over UTF-8
   bytes), and write `OUT_DIR/<source>.jsonl` (under a temporary name, renamed when complete).

Memory is bounded by the work (exact hashes, the LSH index), not by the corpus, but for the
suffix array, which holds the surviving corpus.

Every dropped or changed document is counted by rule and source in `report.json` and
`report.txt`; with `write_rejects`, `rejects.jsonl` holds each dropped document's source,
place, id (`id_field`), reason and first 2000 characters (none for a document dropped for its
personal data). A source that holds no record, whose records are mostly unusable as read
(`max_unusable`), or of which nothing is kept, stops the run with one line of counts by reason
(the report is written first).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np

from jaxlm.config import ConfigError, PrepareConfig
from jaxlm.data import readers
from jaxlm.prepare import dedup
from jaxlm.prepare.map_step import Task, reject_record, run_task
from jaxlm.prepare.rules import build_rules


class _Counts:
    """Per-source counters: read, kept, dropped by reason, changed by reason."""

    def __init__(self, sources):
        self.by_source = {name: {"read": 0, "kept": 0, "dropped": collections.Counter(),
                                 "changed": collections.Counter()} for name in sources}

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


def _tasks(cfg: PrepareConfig, plans, work: Path) -> list[Task]:
    """The map tasks: each source's files in order, grouped while under prepare.task_mb."""
    common = dict(max_chars=cfg.max_chars, exact=cfg.exact_dedup, work=str(work),
                  minhash=(cfg.minhash_bands * cfg.minhash_rows, cfg.minhash_bands, cfg.minhash_rows,
                           cfg.minhash_ngram) if cfg.minhash_dedup else None)
    tasks = []
    for src, files, _ in plans:
        rules = json.dumps(cfg.rules if src.rules is None else src.rules)  # in order: a chain
        groups, size = [[]], 0
        for path, fmt in files:
            if groups[-1] and size >= cfg.task_mb * 2**20:
                groups.append([])
                size = 0
            groups[-1].append((str(path), fmt))
            size += path.stat().st_size
        tasks += [Task(len(tasks) + i, src.name, tuple(g), src.text_field, src.id_field, src.split, src.chunk_chars,
                       rules=rules, **common) for i, g in enumerate(groups)]
    return tasks


def _open_work(work: Path, cfg: PrepareConfig, tasks: list[Task], log) -> None:
    """Keep the finished tasks of an earlier run of the same settings on the same files; else start over."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("workers", "executor", "ray_address")}
    files = readers.file_stamps(p for t in tasks for p, _ in t.files)
    plan = json.dumps({"settings": settings, "files": files}, default=str)  # rule order matters
    stored = work / "plan.json"
    if work.exists() and not (stored.is_file() and stored.read_text() == plan):
        log(f"{work}: left by a run of other settings or inputs; starting over")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    stored.write_text(plan)


def _execute(todo: list[Task], cfg: PrepareConfig) -> None:
    """Run the map tasks: in this process, in a pool of prepare.workers processes, or on Ray."""
    if cfg.executor == "ray":
        return _execute_ray(todo, cfg)
    workers = min(cfg.workers or os.cpu_count() or 1, len(todo))
    if workers <= 1:
        for task in todo:
            run_task(task)
        return
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(run_task, todo))  # a failed task raises here; the others finish and are kept


def _execute_ray(todo: list[Task], cfg: PrepareConfig) -> None:
    try:
        import ray
    except ImportError:
        raise ConfigError("prepare.executor=ray needs Ray: pip install 'jaxlm[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.ray_address or None, num_cpus=None if cfg.ray_address else cfg.workers or None,
                 include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(run_task)
        ray.get([remote.remote(task) for task in todo])
    finally:
        if started:
            ray.shutdown()


def prepare(cfg: PrepareConfig, log=print) -> dict:
    """Map, then reduce; returns the report (also written to OUT_DIR/report.json)."""
    plans = _check(cfg)
    out_dir = Path(cfg.out_dir)
    work = out_dir / "work"
    tasks = _tasks(cfg, plans, work)
    _open_work(work, cfg, tasks, log)
    t0 = time.perf_counter()
    todo = [t for t in tasks if not t.done()]
    if len(todo) < len(tasks):
        log(f"resuming: {len(tasks) - len(todo)} of {len(tasks)} map tasks already done")
    _execute(todo, cfg)
    counts = _Counts([src.name for src, _, _ in plans])
    for t in tasks:
        c = json.loads(t.path("counts.json").read_text())
        counts[t.source]["read"] += c["read"]
        counts[t.source]["dropped"].update(c["dropped"])
        counts[t.source]["changed"].update(c["changed"])
    for src, _, _ in plans:
        problem = _unusable(src, counts[src.name], cfg.max_unusable)
        if problem:
            _write_report(out_dir, counts, t0)
            raise ConfigError(problem)
    log(f"map: {sum(c['read'] for c in counts.by_source.values())} documents in {len(tasks)} tasks, "
        f"{time.perf_counter() - t0:.1f} s")

    rejects = open(out_dir / "rejects.jsonl.tmp", "w") if cfg.write_rejects else None
    id_fields = {src.name: src.id_field for src, _, _ in plans}

    def reject(source, where, reason, text=None, fields=None):
        counts[source]["dropped"][reason] += 1
        if rejects is not None:
            rejects.write(reject_record(source, where, reason, text, fields, id_fields[source]))

    if rejects is not None:
        for t in tasks:
            with open(t.path("rejects.jsonl")) as f:
                shutil.copyfileobj(f, rejects)
    docs = _deduplicated(tasks, cfg, reject, log)
    if cfg.suffix_dedup:  # needs the whole surviving corpus in memory, as bytes
        docs = _cut_repeated_spans(list(docs), cfg.suffix_min_len, counts, log)
    outputs = {src.name: open(out_dir / f"{src.name}.jsonl.tmp", "w") for src, _, _ in plans}
    for name, obj in docs:
        if not obj["doc"]["text"].strip():
            reject(name, obj["where"], "dedup.suffix_array_empty", fields=obj["doc"])
            continue
        counts[name]["kept"] += 1
        outputs[name].write(json.dumps(obj["doc"]) + "\n")
    for name, f in outputs.items():
        f.close()
        os.replace(f.name, out_dir / f"{name}.jsonl")
    if rejects is not None:
        rejects.close()
        os.replace(rejects.name, out_dir / "rejects.jsonl")
    shutil.rmtree(work)

    report = _write_report(out_dir, counts, t0)
    log(format_report(report))
    empty = [name for name, c in report["sources"].items() if c["kept"] == 0]
    if empty:
        raise ConfigError("; ".join(f"source {name!r} kept no document: read {report['sources'][name]['read']}, "
                                    f"dropped {readers.describe_losses(report['sources'][name]['dropped'])}"
                                    for name in empty) + f" (see {out_dir / 'report.txt'})")
    return report


def _deduplicated(tasks: list[Task], cfg: PrepareConfig, reject, log):
    """(source, record) of every mapped document that is neither an exact nor a near duplicate of
    one before it (in task order, so the first occurrence is kept); the others go to `reject`.
    Two passes over the map's files: the first indexes, the second yields."""
    seen, exact_kept, n = set(), [], 0
    lsh = dedup.MinHashDedup(num_perm=cfg.minhash_bands * cfg.minhash_rows, bands=cfg.minhash_bands,
                             rows=cfg.minhash_rows, ngram=cfg.minhash_ngram) if cfg.minhash_dedup else None
    for t in tasks:
        rows = []
        for j, obj in enumerate(_task_docs(t)):
            if cfg.exact_dedup:
                if obj["key"] in seen:
                    reject(t.source, obj["where"], "dedup.exact", obj["doc"]["text"], obj["doc"])
                    continue
                seen.add(obj["key"])
            rows.append(j)
        if lsh is not None:
            lsh.add_signatures(range(n, n + len(rows)), np.load(t.path("sigs.npy"))[rows])
        exact_kept.append(set(rows))
        n += len(rows)
    near = lsh.duplicates() if lsh is not None else set()
    log(f"dedup: {n} documents after exact dedup, {len(near)} near-duplicates among them")
    doc_id = 0
    for t, rows in zip(tasks, exact_kept):
        for j, obj in enumerate(_task_docs(t)):
            if j in rows:
                if doc_id in near:
                    reject(t.source, obj["where"], "dedup.minhash", obj["doc"]["text"], obj["doc"])
                else:
                    yield t.source, obj
                doc_id += 1


def _task_docs(task: Task):
    with open(task.path("docs.jsonl")) as f:
        for line in f:
            yield json.loads(line)


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
        hints.append(readers.text_field_hint("text_field", src.text_field))
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
