"""jaxlm's `data prepare` against datatrove 0.10.1: same input, same rules, documents/s and kept sets.

    python benchmarks/datatrove_compare.py [--docs 20000] [--files 8] [--repeats 2] [--workers 1 2]
        [--out /tmp/dtbench] [--datatrove-python /tmp/dtvenv/bin/python]

`--datatrove-python` is a separate environment: pip install 'datatrove[processing]==0.10.1' spacy
(its MinHash needs xxhash<4, as that extra pins; a newer xxhash rejects str).

Input: a seeded corpus of `--docs` records {"id", "text"} in `--files` .jsonl.gz files: English-like
prose (abbreviations, numbers, some sentences starting lowercase) plus documents planted for each
rule to drop: too short, lists of short lines, repeated lines, lines without final punctuation,
"lorem ipsum", a curly bracket, few sentences full of abbreviations, exact and one-word-changed
copies of earlier documents.

Compared, in this order on both sides: Gopher repetition, Gopher quality, C4 lines (keeping lines
without final punctuation, as FineWeb), FineWeb lines, then MinHash dedup (5-gram words, 14 bands of
8 hashes). jaxlm also runs `html` (web_prose.yaml's first rule; no document here is HTML, so it only
costs a regex search) and exact dedup first (datatrove's FineWeb chain has no exact stage; MinHash at
Jaccard 1 catches exact copies, so the kept sets do not depend on it).
Not compared: language ID (datatrove's LanguageFilter downloads a fastText model, impossible
offline, so neither side runs it) and PII (jaxlm scrubs e-mails, IPs and phone numbers and drops a
document with more than 5; datatrove's PIIFormatter only rewrites e-mails and IPs, never drops:
not the same rule, so neither side runs it).
Known differences in the rules themselves: datatrove's words are spaCy tokens (punctuation marks are
tokens; "don't" is two), so its Gopher alpha-word ratio counts "." and "," as words without a letter
(the largest difference on this corpus); its Gopher ratios divide by all characters, its top n-gram
counts an n-gram seen once, its stop-word test counts distinct lowercase stop words; C4 counts
sentences with spaCy's sentencizer, which breaks after "etc." and "No." (jaxlm: pysbd). Its
MinHash normalises numbers to 0, turns punctuation into spaces and strips diacritics (jaxlm deletes
punctuation, keeps numbers), hashes shingles with 64-bit xxhash mod 2^61-1 (jaxlm: 32-bit
multiply-shift), skips documents of fewer than 5 words, and keeps the root of a union-by-size
cluster (jaxlm keeps a cluster's first document).

Timing: wall clock of the whole run, best of `--repeats`, runs alternated (jaxlm 1w, datatrove 1w,
jaxlm 2w, ...) as the machine may be shared. jaxlm: the `prepare()` call (one map task per file,
then the reduce). datatrove, in a subprocess of `--datatrove-python` (datatrove is never imported in
jaxlm's environment): four LocalPipelineExecutor stages, tasks = files, 14 (buckets), 1, files:
read -> filters -> writer -> signatures; buckets; cluster; read -> MinHash filter -> writer;
uncompressed outputs, dropped documents kept by exclusion writers (jaxlm writes rejects.jsonl).
Neither time includes starting Python or importing the library.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

STOP = "the be to of and that have with a in is it for on as was at by this from or but not are".split()
CONTENT = ("model data train river music history science language number water light energy market school "
           "family animal season garden window letter city people system method paper result value "
           "network mountain village road bridge harbour winter summer autumn spring kitchen library "
           "museum church castle forest island valley station hospital doctor teacher student farmer "
           "painter writer engineer council budget report survey policy contract company factory "
           "machine engine signal cable bottle basket blanket carpet ladder mirror pocket pencil "
           "rabbit salmon turtle eagle falcon meadow orchard harvest weather climate storm thunder "
           "quietly slowly carefully usually recently however although because between during "
           "without against around under over through across beyond early late small large ancient "
           "modern famous local public private simple complex bright narrow heavy gentle").split()
NAMES = "Paris London Smith Johnson Berlin Maria Thames Europe Monday October Oxford Lisbon".split()
ABBREV = "Dr. Mr. Mrs. e.g. i.e. U.S. etc. approx. St. vs. No. Prof.".split()
MENU = ["Home", "About us", "Contact", "Products", "Blog", "Log in", "Sign up", "Shopping cart",
        "Privacy", "Careers", "FAQ", "Help center", "Gift cards", "Store locator", "Newsletter"]
KINDS = {"prose": 70, "short": 4, "list": 4, "dup_lines": 3, "no_punct": 3, "lorem": 1.5, "curly": 1.5,
         "few_sentences": 3, "exact_dup": 5, "near_dup": 5}
JAXLM_RULES = {"html": True, "gopher_repetition": True, "gopher_quality": True,
               "c4": {"filter_no_terminal_punct": False}, "fineweb": True}
STAGES = ("html", "gopher_repetition", "gopher_quality", "c4", "fineweb", "dedup")


# --- the corpus -----------------------------------------------------------------------------------

def sentence(rng: random.Random, k: int, abbrev: float = 0.025) -> str:
    words = []
    for _ in range(k):
        r = rng.random()
        if r < abbrev:
            w = rng.choice(ABBREV)
        elif r < 0.42:
            w = rng.choice(STOP)
        elif r < 0.9:
            w = rng.choice(CONTENT)
        elif r < 0.95:
            w = rng.choice(NAMES)
        else:
            w = rng.choice([str(rng.randint(2, 99)), str(rng.randint(1900, 2024)), f"{rng.randint(1, 9)}.5"])
        words.append(w + ("," if rng.random() < 0.06 else ""))
    s = " ".join(words).rstrip(",.")
    if rng.random() < 0.9:  # else it starts lowercase, as scraped text often does
        s = s[0].upper() + s[1:]
    return s + rng.choices([".", "?", "!", '."'], [85, 7, 4, 4])[0]


def prose(rng: random.Random, n_words: int) -> str:
    """Paragraphs of 2-6 sentences of 6-22 words, separated by a blank line (or one newline)."""
    sents, n = [], 0
    while n < n_words:
        k = rng.randint(6, 22)
        sents.append(sentence(rng, k))
        n += k
    paras, i = [], 0
    while i < len(sents):
        j = i + rng.randint(2, 6)
        paras.append(" ".join(sents[i:j]))
        i = j
    return "".join(p + (rng.choice(["\n\n"] * 4 + ["\n"]) if k < len(paras) - 1 else "")
                   for k, p in enumerate(paras))


def insert_lines(rng: random.Random, text: str, line: str, times: int) -> str:
    lines = text.split("\n")
    for _ in range(times):
        lines.insert(rng.randint(0, len(lines)), line)
    return "\n".join(lines)


def planted(rng: random.Random, kind: str, earlier: list[str]) -> str:
    length = lambda: int(min(1500, max(60, rng.lognormvariate(5.6, 0.6))))  # noqa: E731 (median ~270 words)
    if kind == "prose":
        return prose(rng, length())
    if kind == "short":
        return prose(rng, rng.randint(8, 45))
    if kind == "list":
        items = [rng.choice(MENU) if rng.random() < 0.5 else
                 f"{rng.choice(CONTENT).title()} {rng.choice(CONTENT)} - ${rng.randint(3, 300)}"
                 for _ in range(rng.randint(12, 40))]
        return sentence(rng, 12) + "\n" + "\n".join(items)
    if kind == "dup_lines":
        return insert_lines(rng, prose(rng, length()), "Click here to subscribe to our weekly newsletter today.",
                            rng.randint(1, 12))
    if kind == "no_punct":
        n = rng.randint(10, 30)
        return "\n".join(sentence(rng, rng.randint(4, 12))[:-1] + ("." if rng.random() < 0.15 else "")
                         for _ in range(n)).replace('"', "")
    if kind == "lorem":
        return insert_lines(rng, prose(rng, length()), "Lorem ipsum dolor sit amet, consectetur adipiscing elit.", 1)
    if kind == "curly":
        return insert_lines(rng, prose(rng, length()), "var config = { debug: true, retries: 3 };", 1)
    if kind == "few_sentences":
        return " ".join(sentence(rng, rng.randint(12, 22), abbrev=0.15) for _ in range(rng.randint(3, 6)))
    text = rng.choice(earlier)
    if kind == "near_dup":
        words = text.split(" ")
        words[rng.randrange(len(words))] = rng.choice(CONTENT)
        text = " ".join(words)
    return text


def build_corpus(out: Path, n_docs: int, n_files: int, seed: int) -> dict[str, str]:
    """Write out/corpus/NNNNN.jsonl.gz (consecutive slices, byte-reproducible); return id -> kind."""
    rng = random.Random(seed)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    kinds, earlier, docs = {}, [], []
    for i in range(n_docs):
        kind = rng.choices(list(KINDS), list(KINDS.values()))[0]
        if kind in ("exact_dup", "near_dup") and not earlier:
            kind = "prose"
        text = planted(rng, kind, earlier)
        if kind == "prose":
            earlier.append(text)
        kinds[f"d{i:06d}"] = kind
        docs.append({"id": f"d{i:06d}", "text": text})
    per_file = -(-n_docs // n_files)
    for f in range(n_files):
        with gzip.GzipFile(out / f"{f:05d}.jsonl.gz", "wb", mtime=0) as fh:
            fh.write("".join(json.dumps(d) + "\n" for d in docs[f * per_file:(f + 1) * per_file]).encode())
    return kinds


def read_jsonl(paths) -> list[dict]:
    rows = []
    for path in sorted(paths):
        with open(path) as f:
            rows += [json.loads(line) for line in f]
    return rows


# --- jaxlm ----------------------------------------------------------------------------------------

def run_jaxlm(corpus: Path, out: Path, workers: int) -> tuple[float, set[str], dict[str, str]]:
    """(seconds, kept ids, dropped id -> reason) of one `prepare` into a fresh out_dir."""
    from jaxlm.config import from_dict
    from jaxlm.prepare import prepare

    shutil.rmtree(out, ignore_errors=True)
    cfg = from_dict({"prepare": {
        "out_dir": str(out), "rules": JAXLM_RULES, "workers": workers,
        "task_mb": 1e-6,  # one map task per file, as datatrove's one task per file
        "sources": [{"name": "web", "paths": [str(corpus / "*.jsonl.gz")], "id_field": "id"}]}}).prepare
    t0 = time.perf_counter()
    prepare(cfg, log=lambda *_: None)
    seconds = time.perf_counter() - t0
    kept = {d["id"] for d in read_jsonl([out / "web.jsonl"])}
    return seconds, kept, {r["id"]: r["reason"] for r in read_jsonl([out / "rejects.jsonl"])}


# --- datatrove (the subprocess, in datatrove's environment) ---------------------------------------

def datatrove_worker(corpus: Path, out: Path, workers: int, files: int) -> None:
    """Run datatrove's chain; write out/seconds.json."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    def removed(stage):
        return JsonlWriter(str(out / "removed" / stage), compression=None)

    mh = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, hash_config=HashConfig(precision=64))
    stages = [
        ([JsonlReader(str(corpus), glob_pattern="*.jsonl.gz"),
          GopherRepetitionFilter(exclusion_writer=removed("gopher_repetition")),
          GopherQualityFilter(exclusion_writer=removed("gopher_quality")),
          C4QualityFilter(filter_no_terminal_punct=False, exclusion_writer=removed("c4")),
          FineWebQualityFilter(exclusion_writer=removed("fineweb")),
          JsonlWriter(str(out / "filtered"), compression=None),
          MinhashDedupSignature(str(out / "sigs"), config=mh)], files),
        ([MinhashDedupBuckets(str(out / "sigs"), str(out / "buckets"), config=mh)], mh.num_buckets),
        ([MinhashDedupCluster(str(out / "buckets"), str(out / "remove"), config=mh)], 1),
        ([JsonlReader(str(out / "filtered")),
          MinhashDedupFilter(str(out / "remove"), exclusion_writer=removed("dedup")),
          JsonlWriter(str(out / "kept"), compression=None)], files),
    ]
    t0 = time.perf_counter()
    for i, (pipeline, tasks) in enumerate(stages):
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks),
                              logging_dir=str(out / "logs" / str(i))).run()
    (out / "seconds.json").write_text(json.dumps(time.perf_counter() - t0))


def run_datatrove(python: str, corpus: Path, out: Path, workers: int,
                  files: int) -> tuple[float, set[str], dict[str, str]]:
    """(seconds, kept ids, dropped id -> stage.reason) of one datatrove run in a fresh folder."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with open(out / "log.txt", "w") as log:
        subprocess.run([python, __file__, "--datatrove-worker", "--corpus", str(corpus), "--out", str(out),
                        "--workers", str(workers), "--files", str(files)], stdout=log, stderr=log, check=True)
    kept = {d["id"] for d in read_jsonl((out / "kept").glob("*.jsonl"))}
    reasons = {}
    for stage_dir in (out / "removed").iterdir():
        for d in read_jsonl(stage_dir.glob("*.jsonl")):
            reasons[d["id"]] = f"{stage_dir.name}.{d.get('metadata', {}).get('filter_reason', 'duplicate')}"
    return json.loads((out / "seconds.json").read_text()), kept, reasons


# --- the comparison -------------------------------------------------------------------------------

def stage_of(reason: str | None) -> str:
    return "kept" if reason is None else reason.split(".")[0]


def top(counter: collections.Counter, n: int = 6) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.most_common(n)) or "-"


def report(n_docs: int, times: dict, results: dict, kinds: dict[str, str]) -> str:
    lines = ["| tool | workers | wall s (best) | docs/s | docs/s per worker | kept |", "|---|---|---|---|---|---|"]
    for (tool, w), secs in sorted(times.items()):
        kept = len(results[tool, w][0])
        lines.append(f"| {tool} | {w} | {min(secs):.1f} | {n_docs / min(secs):.0f} | "
                     f"{n_docs / min(secs) / w:.0f} | {kept} |")
    w = min(w for _, w in results)
    (kj, rj), (kd, rd) = results["jaxlm", w], results["datatrove", w]
    same = {tool: all(results[tool, v][0] == results[tool, w][0] for _, v in results)
            for tool in ("jaxlm", "datatrove")}
    only_j, only_d = kj - kd, kd - kj
    lines += ["", f"kept sets (workers={w}; equal at every worker count: jaxlm {same['jaxlm']}, "
                  f"datatrove {same['datatrove']}): |J & D| / |J | D| = {len(kj & kd)} / {len(kj | kd)} "
                  f"= {len(kj & kd) / len(kj | kd):.4f}",
              f"kept by jaxlm only: {len(only_j)}; datatrove dropped them for: "
              f"{top(collections.Counter(rd[i] for i in only_j))}; planted as: "
              f"{top(collections.Counter(kinds[i] for i in only_j))}",
              f"kept by datatrove only: {len(only_d)}; jaxlm dropped them for: "
              f"{top(collections.Counter(rj[i] for i in only_d))}; planted as: "
              f"{top(collections.Counter(kinds[i] for i in only_d))}",
              "", "where each document ended (rows jaxlm, columns datatrove):", ""]
    cols = ["kept", *STAGES[1:]]
    cells = collections.Counter((stage_of(rj.get(i)), stage_of(rd.get(i))) for i in kinds)
    lines += ["| jaxlm \\ datatrove | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in ["kept", *STAGES]:
        if any(cells[row, c] for c in cols):
            lines.append(f"| {row} | " + " | ".join(str(cells[row, c]) for c in cols) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=20_000)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", type=Path, default=Path("/tmp/dtbench"))
    p.add_argument("--datatrove-python", default="/tmp/dtvenv/bin/python")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--datatrove-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.datatrove_worker:
        return datatrove_worker(args.corpus, args.out, args.workers[0], args.files)

    corpus = args.out / "corpus"
    kinds = build_corpus(corpus, args.docs, args.files, args.seed)
    print(f"corpus: {args.docs} documents in {args.files} files under {corpus}: "
          f"{top(collections.Counter(kinds.values()), len(KINDS))}", flush=True)
    times, results = collections.defaultdict(list), {}
    for r in range(args.repeats):
        for w in args.workers:
            for tool in ("jaxlm", "datatrove"):
                out = args.out / f"{tool}_w{w}"
                if tool == "jaxlm":
                    secs, kept, reasons = run_jaxlm(corpus, out, w)
                else:
                    secs, kept, reasons = run_datatrove(args.datatrove_python, corpus, out, w, args.files)
                times[tool, w].append(secs)
                results[tool, w] = (kept, reasons)
                print(f"repeat {r + 1}: {tool} {w} worker(s): {secs:.1f} s, kept {len(kept)}", flush=True)
    print()
    print(report(args.docs, times, results, kinds))


if __name__ == "__main__":
    sys.exit(main())
