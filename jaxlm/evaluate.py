"""Evaluation: perplexity and bits per byte on held-out text, exact-match accuracy with the sampler.

Perplexity: each document is scored as packed pretraining shows it, after a document
boundary (eos) and through its own closing eos: inputs `eos + doc`, targets `doc + eos`, cut
into windows of `seq_len` tokens without overlap (each window's first token sees only its
window). nats/token = summed NLL / scored tokens; perplexity = exp(nats/token); bits per
byte = summed NLL / ln 2 / UTF-8 bytes of the documents' text, which compares models with
different tokenizers (the closing eos is scored but has no bytes).

Exact match: `exact_match(cfg, params, tokenizer, pairs)` samples a completion per prompt
(greedy by default) and asks each pair's checker whether it is right.

Long context: `loss_by_position` is the mean NLL of the same windows by position in the window
(windows may be longer than training's), `passkey` the greedy retrieval of a 5-digit key hidden
at a given depth of filler text (Mohtashami & Jaggi 2023; LM-Infinite's and YaRN's format).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import math
import re
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import jax
import numpy as np

from jaxlm import generate as gen
from jaxlm import model, sharding
from jaxlm.config import ConfigError
from jaxlm.data import readers, tasks
from jaxlm.data.examples import chat, preference
from jaxlm.data.pipeline import build_lm_data
from jaxlm.data.tokenizers import load_tokenizer
from jaxlm.runs import MetricsWriter
from jaxlm.objectives.lm import token_log_probs

Checker = Union[str, Callable[[str], bool]]


def document_windows(docs: Iterable[np.ndarray], seq_len: int, eos_id: int) -> dict[str, np.ndarray]:
    """Score windows [W, seq_len] (tokens, targets int32, loss_mask float32) of documents.

    A document's trailing eos, if it has one, is dropped first, so token arrays with and
    without it give the same windows.
    """
    tokens, targets = [], []
    for doc in docs:
        doc = np.asarray(doc, np.int32)
        if len(doc) and doc[-1] == eos_id:
            doc = doc[:-1]
        seq = np.concatenate([[eos_id], doc, [eos_id]]).astype(np.int32)
        n = len(seq) - 1
        pad = -n % seq_len
        tokens.append(np.pad(seq[:-1], (0, pad)).reshape(-1, seq_len))
        targets.append(np.pad(seq[1:], (0, pad), constant_values=-1).reshape(-1, seq_len))
    if not tokens:
        return {"tokens": np.zeros((0, seq_len), np.int32), "targets": np.zeros((0, seq_len), np.int32),
                "loss_mask": np.zeros((0, seq_len), np.float32)}
    targets_WT = np.concatenate(targets)
    return {"tokens": np.concatenate(tokens), "targets": np.maximum(targets_WT, 0),
            "loss_mask": (targets_WT >= 0).astype(np.float32)}


@functools.partial(jax.jit, static_argnums=0, static_argnames=("mesh", "rules"))
def _nll_sums(cfg, params, batch, *, mesh=None, rules="fsdp"):
    """(summed NLL in nats [T], scored tokens [T]) of one batch of windows, by position in the window."""
    with sharding.activate(mesh, rules) if mesh is not None else contextlib.nullcontext():
        logits_BTV = model.apply(cfg, params, batch["tokens"])
        nll_BT = -token_log_probs(logits_BTV, batch["targets"]) * batch["loss_mask"]
        return nll_BT.sum(0), batch["loss_mask"].sum(0)


def _position_sums(cfg, params, w: dict, *, batch_size: int, mesh, rules: str) -> tuple[np.ndarray, np.ndarray]:
    """(summed NLL [T], scored tokens [T]) of windows `w` by position, float64. Windows are scored
    in batches of `batch_size` (the last filled with empty windows), so one compile serves them all."""
    W, T = w["tokens"].shape
    if mesh is not None:
        shards = sharding.batch_shards(mesh)
        batch_size = -(-batch_size // shards) * shards
        params = model.place(cfg, params, mesh, rules)
    nll_T, count_T = np.zeros(T), np.zeros(T)
    for start in range(0, W, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in w.items()}
        short = batch_size - len(batch["tokens"])
        batch = {k: np.pad(v, ((0, short), (0, 0))) for k, v in batch.items()}
        if mesh is not None:
            batch = sharding.put_batch(mesh, batch)
        s_T, c_T = _nll_sums(cfg, params, batch, mesh=mesh, rules=rules)
        nll_T, count_T = nll_T + np.asarray(s_T, np.float64), count_T + np.asarray(c_T, np.float64)
    return nll_T, count_T


def perplexity(cfg, params, docs: Sequence[np.ndarray], n_bytes: int, *, seq_len: int, eos_id: int,
               batch_size: int = 8, mesh=None, rules: str = "fsdp") -> dict:
    """nats/token, perplexity and bits/byte of `docs` (token arrays; `n_bytes`: their text's UTF-8
    bytes), in windows of `seq_len` scored `batch_size` at a time."""
    cfg = getattr(cfg, "model", cfg)
    w = document_windows(docs, seq_len, eos_id)
    nll_T, count_T = _position_sums(cfg, params, w, batch_size=batch_size, mesh=mesh, rules=rules)
    nll, count = float(nll_T.sum()), float(count_T.sum())
    nats = nll / max(count, 1.0)
    return {"documents": len(docs), "tokens": int(count), "bytes": int(n_bytes),
            "nats_per_token": nats, "perplexity": math.exp(nats),
            "bits_per_byte": nll / math.log(2) / max(n_bytes, 1)}


def bucket_edges(seq_len: int, buckets: int = 8) -> tuple[int, ...]:
    """Bounds 0 = e_0 < e_1 < ... < e_n = seq_len of `buckets` near-equal position buckets."""
    if not 1 <= buckets <= seq_len:
        raise ValueError(f"buckets={buckets} must be in [1, seq_len={seq_len}]")
    return tuple(round(i * seq_len / buckets) for i in range(buckets + 1))


def loss_by_position(cfg, params, docs: Sequence[np.ndarray], *, seq_len: int, eos_id: int,
                     edges: Optional[Sequence[int]] = None, buckets: int = 8, full_windows: bool = True,
                     batch_size: int = 8, mesh=None, rules: str = "fsdp") -> dict:
    """Mean next-token NLL (nats) of `docs` by position in windows of `seq_len` (`document_windows`;
    `seq_len` may exceed the training length): the target at position t is predicted from the t + 1
    tokens before it in its window. edges: bucket bounds 0 = e_0 < ... < e_n = seq_len, bucket i
    holding positions [e_i, e_i+1); default `buckets` near-equal ones. full_windows: score only the
    windows the documents fill, so every bucket averages the same windows.
    Returns {"windows", "edges", "nats_per_token": [per bucket], "tokens": [per bucket], "overall":
    nats/token over all scored tokens}."""
    cfg = getattr(cfg, "model", cfg)
    edges = tuple(bucket_edges(seq_len, buckets) if edges is None else (int(e) for e in edges))
    if len(edges) < 2 or edges[0] != 0 or edges[-1] != seq_len or any(a >= b for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges={list(edges)} must rise strictly from 0 to seq_len={seq_len}")
    w = document_windows(docs, seq_len, eos_id)
    if full_windows:
        full = w["loss_mask"].all(axis=1)
        w = {k: v[full] for k, v in w.items()}
    nll_T, count_T = _position_sums(cfg, params, w, batch_size=batch_size, mesh=mesh, rules=rules)
    nll_n, count_n = np.add.reduceat(nll_T, edges[:-1]), np.add.reduceat(count_T, edges[:-1])
    return {"windows": len(w["tokens"]), "edges": list(edges),
            "nats_per_token": (nll_n / np.maximum(count_n, 1.0)).tolist(), "tokens": count_n.astype(int).tolist(),
            "overall": float(nll_T.sum() / max(count_T.sum(), 1.0))}


def _check(checker: Checker, completion: str) -> bool:
    if isinstance(checker, str):
        return completion.strip() == checker.strip()
    return bool(checker(completion))


def exact_match(cfg, params, tokenizer, pairs: Sequence[tuple], *, max_new_tokens: int = 64,
                batch_size: int = 16, temperature: float = 0.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, stop_tokens: Optional[Sequence[int]] = None, key=0,
                prefix_lm: bool = False, mesh=None, rules: str = "fsdp_tp") -> dict:
    """Accuracy of sampled completions on (prompt, checker) pairs.

    cfg: the ModelConfig (or a Config). prompt: text, encoded with `tokenizer` as given (as text:
    a special symbol such as "<|user|>" written in it stays characters; nothing is prepended), or
    a sequence of ids (for markup, e.g. `chat.prompt_ids`).
    checker: a callable completion -> bool, or a string the completion must equal after
    stripping surrounding whitespace. The completion is the decoded new tokens up to, not
    including, the stop token; stop_tokens default to eos and <|end_turn|> (if the tokenizer
    has it). Greedy unless `temperature` > 0; pair i draws with fold_in(key, i).
    Returns {"exact_match": accuracy, "correct", "total", "completions": [text per pair],
    "hits": [whether each pair's completion passed]}.
    """
    model_cfg = getattr(cfg, "model", cfg)
    prompts = [tokenizer.encode(p) if isinstance(p, str) else np.asarray(p, np.int32) for p, _ in pairs]
    for i, p in enumerate(prompts):
        if len(p) == 0 or len(p) + max_new_tokens > model_cfg.max_seq_len:
            raise ValueError(f"pair {i}: prompt of {len(p)} tokens + max_new_tokens={max_new_tokens} must "
                             f"be in [1, model.max_seq_len={model_cfg.max_seq_len}]")
    stops = gen.default_stops(tokenizer) if stop_tokens is None else list(stop_tokens)
    results = gen.generate_texts(model_cfg, params, tokenizer, prompts, batch_size=batch_size,
                                 max_new_tokens=max_new_tokens, stops=stops, key=key, mesh=mesh, rules=rules,
                                 temperature=temperature, top_k=top_k, top_p=top_p, prefix_lm=prefix_lm)
    completions = [r["completion"] for r in results]
    hits = [bool(_check(checker, c)) for (_, checker), c in zip(pairs, completions)]
    correct, total = sum(hits), len(pairs)
    return {"exact_match": correct / max(total, 1), "correct": correct, "total": total,
            "completions": completions, "hits": hits}


def task_accuracy(cfg, params, tokenizer=None, names=None, n: int = 0, *, batch_size: int = 64,
                  mesh=None) -> dict:
    """{task: {"exact_match", "correct", "total", "examples"}}: greedy completions of each task's test problems
    (`n` distinct ones, default `sft.task_eval_examples`; `jaxlm.data.tasks.test_records`),
    prompted as SFT renders them (`sft.template`), checked by `jaxlm.data.tasks.check`; "examples" holds
    each problem's {"prompt", "answer", "completion", "hit"}."""
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    names = list(names or cfg.sft.tasks or tasks.TASK_NAMES)
    unknown = [name for name in names if name not in tasks.TASKS]
    if unknown:
        raise ConfigError(f"tasks {unknown} are not built-in tasks; allowed: {', '.join(tasks.TASK_NAMES)}")
    records = tasks.test_records(names, n or cfg.sft.task_eval_examples)
    r = chat.Renderer.from_tokenizer(tokenizer, cfg.sft.template)
    pairs = [(chat.prompt_ids(r, rec), functools.partial(tasks.check, rec)) for rec in records]
    res = exact_match(cfg.model, params, tokenizer, pairs, max_new_tokens=cfg.sft.max_new_tokens,
                      batch_size=batch_size, stop_tokens=[tokenizer.eos_id], mesh=mesh, rules=cfg.mesh.rules)
    hits, totals, examples = collections.Counter(), collections.Counter(), collections.defaultdict(list)
    for rec, hit, completion in zip(records, res["hits"], res["completions"]):
        totals[rec["task"]] += 1
        hits[rec["task"]] += hit
        examples[rec["task"]].append({"prompt": f"{rec['instruction']} {rec['input']}", "answer": rec["answer"],
                                      "completion": completion, "hit": hit})
    return {name: {"exact_match": hits[name] / totals[name], "correct": hits[name], "total": totals[name],
                   "examples": examples[name]} for name in names}


# Passkey retrieval as LM-Infinite and YaRN prompt it (after Mohtashami & Jaggi 2023).
PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                "I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def passkey_line(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def _passkey_parts(tokenizer, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ids of what precedes the filler (eos, the task), the key's line, and the question."""
    return (gen.encode_prompt(tokenizer, PASSKEY_TASK + "\n"), tokenizer.encode(f"\n{passkey_line(key)}\n"),
            tokenizer.encode("\n" + PASSKEY_QUESTION))


def passkey_prompt(tokenizer, key: str, length: int, depth: float) -> np.ndarray:
    """Prompt ids [length]: eos (a document's start), the task, filler text with the key's line
    after `round(depth * F)` of its F tokens, and the question, joined by newlines. The filler is cut
    at token granularity (as LM-Infinite cuts it at characters) so that the length is exact."""
    head, line, tail = _passkey_parts(tokenizer, key)
    n = length - len(head) - len(line) - len(tail)
    if n < 0:
        raise ValueError(f"passkey length={length} is too short: the prompt without filler takes {length - n} tokens")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth={depth} must be in [0, 1] (the share of the filler before the key)")
    unit = tokenizer.encode(PASSKEY_FILLER)
    filler = np.tile(unit, -(-n // len(unit)))[:n]
    a = round(depth * n)
    return np.concatenate([head, filler[:a], line, filler[a:], tail]).astype(np.int32)


def passkey_hit(completion: str, key: str) -> bool:
    """Whether the completion's first run of digits is the key (" 12345." is right, " 123456" is not)."""
    digits = re.search(r"\d+", completion)
    return digits is not None and digits.group() == key


def passkey_cases(lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int = 0) -> list[dict]:
    """{"length", "depth", "key"} of every case; key i of `trials` (5 digits, drawn from `seed`) is
    the same at every length and depth, so the cells differ only in where the key is."""
    keys = [str(k) for k in np.random.default_rng(seed).integers(10_000, 100_000, trials)]
    return [{"length": int(n), "depth": float(d), "key": k} for n in lengths for d in depths for k in keys]


def passkey_accuracy(cases: Sequence[dict], completions: Sequence[str]) -> list[dict]:
    """{"length", "depth", "accuracy", "correct", "total"} per (length, depth), in the cases' order."""
    cells: dict = {}
    for case, completion in zip(cases, completions, strict=True):
        cell = cells.setdefault((case["length"], case["depth"]), [0, 0])
        cell[0] += passkey_hit(completion, case["key"])
        cell[1] += 1
    return [{"length": n, "depth": d, "accuracy": c / t, "correct": c, "total": t} for (n, d), (c, t) in cells.items()]


def passkey(cfg, params, tokenizer, lengths: Sequence[int], depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
            trials: int = 10, *, seed: int = 0, batch_size: int = 8, mesh=None, rules: str = "fsdp_tp") -> dict:
    """Greedy passkey retrieval (`passkey_prompt`, `exact_match`) with prompts of each of `lengths`
    tokens; the model generates as many tokens as the longest " " + key takes, + 1.
    Returns {"cells": `passkey_accuracy` rows, "cases", "completions"}."""
    cases = passkey_cases(lengths, depths, trials, seed)
    new = max(len(tokenizer.encode(" " + c["key"])) for c in cases) + 1
    pairs = [(passkey_prompt(tokenizer, c["key"], c["length"], c["depth"]),
              functools.partial(passkey_hit, key=c["key"])) for c in cases]
    res = exact_match(cfg, params, tokenizer, pairs, max_new_tokens=new, batch_size=batch_size, mesh=mesh, rules=rules)
    return {"cells": passkey_accuracy(cases, res["completions"]), "cases": cases, "completions": res["completions"]}


def _passkey_bounds(model_cfg, tokenizer) -> tuple[int, Optional[int]]:
    """(shortest, longest) passkey prompt in tokens: the prompt without filler; model.max_seq_len
    less 7 for the answer (None with a sliding window, which generates past it)."""
    shortest = sum(map(len, _passkey_parts(tokenizer, "00000")))
    return shortest, None if model_cfg.sliding_window else model_cfg.max_seq_len - 7


def default_passkey_lengths(model_cfg, tokenizer) -> list[int]:
    """A quarter, half and all of model.max_seq_len less 7 tokens (the answer's room), those that
    are no shorter than the prompt without filler."""
    shortest = _passkey_bounds(model_cfg, tokenizer)[0]
    longest = model_cfg.max_seq_len - 7
    return sorted({n for n in (longest // 4, longest // 2, longest) if n >= shortest})


# --- the shell: `jaxlm eval` ------------------------------------------------------------------


def heldout_documents(cfg, max_documents: int = 0) -> list[np.ndarray]:
    """The run's held-out documents (token arrays), as its data config splits them."""
    _, heldout, _ = build_lm_data(cfg.data, cfg.train.seq_len, batch_size=cfg.train.batch_size)
    if heldout is None:
        raise ConfigError("the run holds out no documents (data.heldout_fraction=0 and no data.sources heldout_path); "
                          "pass --text FILE")
    docs = [src.docs[i] for src in heldout.sources for i in range(len(src.docs))]
    return docs[:max_documents] if max_documents else docs


def text_documents(paths, tokenizer, text_field: str = "text", max_documents: int = 0):
    """(token arrays, UTF-8 bytes) of the usable records of text / JSONL / Parquet files."""
    docs, n_bytes = [], 0
    for path, fmt in readers.check_inputs(paths):
        for rec in readers.read_documents(path, fmt, text_field):
            if rec.text is None:
                continue
            if max_documents and len(docs) >= max_documents:
                return docs, n_bytes
            docs.append(tokenizer.encode(rec.text))
            n_bytes += len(rec.text.encode("utf-8"))
    return docs, n_bytes


QA_RECORDS = '{"prompt": str, "answer": str} or {"messages": [..., a user turn], "answer": str}'


def fine_tuned(cfg) -> bool:
    """Whether a run was trained on prompts rendered as `jaxlm sft` renders them: its config names
    the data of a post-training stage (sft, reward, rs, dpo or ppo); a pretraining run's names none."""
    return any((cfg.sft.train_files, cfg.sft.tasks, cfg.reward.train_files, cfg.reward.tasks, cfg.rs.prompt_files,
                cfg.rs.tasks, cfg.dpo.train_files, cfg.dpo.tasks, cfg.ppo.prompt_files, cfg.ppo.tasks))


def qa_record(obj) -> Union[dict, str]:
    """A question/answer record (`QA_RECORDS`) as the SFT record it asks for (`preference.sft_record`:
    an instruction, or the conversation with the answer as its assistant turn), or the reason it is
    unusable (`chat.BAD_REASONS`, or "not_ending_with_user")."""
    if not isinstance(obj, dict) or ("prompt" in obj) == ("messages" in obj):
        return "unknown_format"
    prompt, answer = obj.get("prompt", obj.get("messages")), obj.get("answer")
    if not isinstance(prompt, (str, list)) or not isinstance(answer, str):
        return "missing_field"
    rec = preference.sft_record(prompt, answer)
    reason = chat.check_record(rec)
    if reason is None and isinstance(prompt, list) and (not prompt or prompt[-1]["role"] != "user"):
        return "not_ending_with_user"
    return reason or rec


def read_qa(path) -> tuple[list[tuple[str, dict]], collections.Counter]:
    """The usable records of a question/answer JSONL file as (where: "FILE:LINE", SFT record:
    `qa_record`), and counts: `records`, `used` and one per reason a record was skipped (malformed
    JSON and the like arrive as `readers.Unreadable`'s reasons). A missing file, or one with no usable
    record, is a ConfigError."""
    if not Path(path).is_file():
        raise ConfigError(f"--qa file {str(path)!r} does not exist")
    found, counts = [], collections.Counter()
    for where, obj, error in readers.jsonl_values(Path(path)):
        counts["records"] += 1
        rec = error or qa_record(obj)
        if isinstance(rec, str):
            counts[rec] += 1
            continue
        counts["used"] += 1
        found.append((where, rec))
    if not found:
        raise ConfigError(f"--qa file {str(path)!r} holds no usable record ({QA_RECORDS}): "
                          + readers.counts_line(counts))
    return found, counts


def qa_renderer(cfg, tokenizer, raw: bool = False) -> Optional[chat.Renderer]:
    """The renderer of --qa prompts: the run's own SFT rendering (`sft.template`; role markers for
    chat) when it was fine-tuned (`fine_tuned`), else None: text (`raw`: always text)."""
    return None if raw or not fine_tuned(cfg) else chat.Renderer.from_tokenizer(tokenizer, cfg.sft.template)


def qa_prompts(records: Sequence[tuple[str, dict]], tokenizer, renderer: Optional[chat.Renderer],
               doc_start: bool = True, why_text: str = "") -> tuple[list[np.ndarray], Optional[list[int]], str]:
    """(prompt ids, stop tokens, how they were rendered) of `read_qa` records. With a renderer: the
    ids a sampler starts from as `jaxlm sft` trains (`chat.prompt_ids`, as --tasks prompts) and the
    ids that close a response there (`chat.stop_token`). Without: the prompt as text, after eos when
    `doc_start` (stops: None, the default ones); a chat record is then a ConfigError naming its line
    (`why_text` says why the prompts are text)."""
    if renderer is None:
        for where, rec in records:
            if chat.kind_of(rec) == "chat":
                raise ConfigError(f"{where}: a chat record needs the run's chat template, but --qa prompts are "
                                  f"raw text here ({why_text or 'no template'}); allowed: "
                                  '{"prompt": str, "answer": str} records')
        prompts = [gen.encode_prompt(tokenizer, rec["instruction"], doc_start) for _, rec in records]
        return prompts, None, "raw text" + (" after eos" if doc_start else "") + (f" ({why_text})" if why_text else "")
    prompts, stops, kinds = [], set(), {}
    for where, rec in records:
        try:
            prompts.append(chat.prompt_ids(renderer, rec))
            stops.add(chat.stop_token(renderer, rec))
        except ValueError as e:  # a chat record and a tokenizer without role markers
            raise ConfigError(f"{where}: {e}; allowed: " + '{"prompt": str, "answer": str} records') from None
        kinds[chat.kind_of(rec)] = True
    names = {"instruction": f"instruction template {renderer.template!r}", "chat": "chat template (role markers)"}
    return prompts, sorted(stops), " and ".join(names[k] for k in kinds)


def qa_answer(rec: dict) -> str:
    """The answer of a `qa_record`: the instruction's output, or the conversation's last turn."""
    return rec["messages"][-1]["content"] if chat.kind_of(rec) == "chat" else rec["output"]


def format_table(rows: list[dict]) -> str:
    """Results as an aligned text table, one row per dataset."""
    cols = ["dataset", "documents", "tokens", "bytes", "nats_per_token", "perplexity", "bits_per_byte",
            "exact_match", "correct", "total", "skipped"]
    cols = [c for c in cols if any(c in r for r in rows)]
    fmt = lambda v: "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
    cells = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def format_qa(rows: list[dict]) -> str:
    """One line per question/answer row: how its prompts were rendered, and the records skipped."""
    return "\n".join(f"qa rendering of {r['dataset']}: {r['rendering']}; "
                     + f"records skipped: {r['skipped']}" + (f" {r['unusable']}" if r["skipped"] else "")
                     for r in rows if "rendering" in r)


def format_breakdown(rows: list[dict], field: str, value: str) -> str:
    """The rows that have `field` ({label: {value: ...}}) as tables, one per set of labels: a column
    per label, then the row's own `value` as "all"."""
    groups: dict = {}
    for r in rows:
        if field in r:
            groups.setdefault(tuple(r[field]), []).append(r)
    fmt = lambda v: "" if v is None else f"{v:.3f}"
    tables = []
    for labels, group in groups.items():
        cells = [["dataset", *labels, "all"]] + [[r["dataset"], *(fmt(r[field][k][value]) for k in labels),
                                                 fmt(r[value])] for r in group]
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        tables.append("\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                           for i, (c, w) in enumerate(zip(row, widths))) for row in cells))
    return "\n\n".join(tables)


_NOT_SCALARS = ("dataset", "rendering", "unusable")  # a --qa row's words: in the "eval" event instead


def _flat(prefix: str, value) -> dict:
    """A result's nested dicts as one level of "a/b/c" names."""
    if not isinstance(value, dict):
        return {prefix: value}
    return {k: v for key, sub in value.items() for k, v in _flat(f"{prefix}/{key}", sub).items()}


def _position_row(dataset: str, documents: int, res: dict) -> dict:
    """A `loss_by_position` result as a row: the overall numbers, and by_position {"START-END": ...}."""
    spans = [f"{a}-{b}" for a, b in zip(res["edges"], res["edges"][1:])]
    return {"dataset": dataset, "documents": documents, "windows": res["windows"], "tokens": sum(res["tokens"]),
            "nats_per_token": res["overall"],
            "by_position": {span: {"nats_per_token": x, "tokens": n}
                            for span, x, n in zip(spans, res["nats_per_token"], res["tokens"])}}


def _passkey_rows(cells: list[dict]) -> list[dict]:
    """`passkey_accuracy` cells as one row per length ("passkey@LEN"), by_depth {"DEPTH": ...}."""
    rows = []
    for n in dict.fromkeys(c["length"] for c in cells):
        mine = [c for c in cells if c["length"] == n]
        correct, total = sum(c["correct"] for c in mine), sum(c["total"] for c in mine)
        by_depth = {f"{c['depth']:g}": {"exact_match": c["accuracy"], "correct": c["correct"], "total": c["total"]}
                    for c in mine}
        rows.append({"dataset": f"passkey@{n}", "exact_match": correct / total, "correct": correct, "total": total,
                     "by_depth": by_depth})
    return rows


def _check_passkey(model_cfg, tokenizer, lengths, depths, trials) -> None:
    """ConfigError unless every passkey length fits the prompt and its answer, depths are in [0, 1]
    and there is a trial."""
    shortest, longest = _passkey_bounds(model_cfg, tokenizer)
    if not lengths or not all(shortest <= n <= (longest or n) for n in lengths):
        raise ConfigError(f"--passkey-lengths {' '.join(map(str, lengths)) or '(none fit)'} must be in [{shortest}, "
                          f"{longest}]: the prompt without filler takes {shortest} tokens, and model.max_seq_len="
                          f"{model_cfg.max_seq_len} holds the prompt and 7 for the answer (override it to go longer)")
    if not all(0.0 <= d <= 1.0 for d in depths) or trials < 1:
        raise ConfigError(f"--passkey-depths {' '.join(map(str, depths))} must be in [0, 1] and --passkey-trials "
                          f"{trials} at least 1")


def run_eval(run_dir, cfg, params, step: int, mesh, tokenizer, *, texts=(), text_field: str = "text",
             qa=(), heldout: Optional[bool] = None, seq_len: Optional[int] = None, batch_size: int = 8,
             max_documents: int = 0, max_new_tokens: int = 64, raw: bool = False,
             tasks: Optional[Sequence[str]] = None, by_position: Sequence[int] = (), buckets: int = 8,
             passkey_lengths: Optional[Sequence[int]] = None, passkey_depths: Sequence[float] = (),
             passkey_trials: int = 10, seed: int = 0, log=functools.partial(print, flush=True)) -> list[dict]:
    """Evaluate a restored run on its held-out data (default when nothing else is asked for), text
    files, question/answer files (`qa`: prompted as the run was fine-tuned, `qa_renderer`; as text with
    `raw`), built-in tasks (`tasks`: names, or [] for the run's `sft.tasks`;
    exact match per task, prompted as `jaxlm sft` trains: `task_accuracy`), the held-out loss by
    position in windows of each of `by_position` tokens (`buckets` buckets; row "heldout@LEN") and
    passkey retrieval (`passkey_lengths`, [] for `default_passkey_lengths`; rows "passkey@LEN");
    append one metrics row at `step` to RUN_DIR/metrics.jsonl; return one result dict per dataset.
    `log`: a line as each part starts (process 0's)."""
    seq_len = seq_len or cfg.train.seq_len
    common = dict(seq_len=seq_len, eos_id=tokenizer.eos_id, batch_size=batch_size, mesh=mesh,
                  rules=cfg.mesh.rules)
    rows = []
    renderer = qa_renderer(cfg, tokenizer, raw) if qa else None
    why_text = "--raw" if raw else "not fine-tuned: its config names no post-training data"
    qa_sets = {}  # every file read, and its prompts rendered, before any work
    for path in qa:
        records, counts = read_qa(path)
        records = records[:max_documents] if max_documents else records
        qa_sets[path] = (*qa_prompts(records, tokenizer, renderer, not raw, why_text),
                         [qa_answer(rec) for _, rec in records], counts)
    asked = texts or qa or tasks is not None or by_position or passkey_lengths is not None
    scores_text = heldout or texts or by_position or (heldout is None and not asked)
    if cfg.model.arch != "decoder" and scores_text:
        raise ConfigError(f"perplexity and loss by position score text with a decoder; a model.arch="
                          f"{cfg.model.arch} run's held-out loss on its objective is eval_loss in its "
                          "metrics.jsonl. --qa, --tasks and --passkey (generation) serve it")

    def say(line):
        if jax.process_index() == 0:
            log(f"[jaxlm] eval: {line}")

    if heldout or (heldout is None and not asked):
        docs = heldout_documents(cfg, max_documents)
        say(f"perplexity on {len(docs)} held-out documents")
        n_bytes = sum(len(tokenizer.decode(d).encode("utf-8")) for d in docs)
        rows.append({"dataset": "heldout", **perplexity(cfg.model, params, docs, n_bytes, **common)})
    for path in texts:
        docs, n_bytes = text_documents([path], tokenizer, text_field, max_documents)
        say(f"perplexity on {len(docs)} documents of {path}")
        rows.append({"dataset": Path(path).name, **perplexity(cfg.model, params, docs, n_bytes, **common)})
    for path, (prompts, stops, rendering, answers, counts) in qa_sets.items():
        say(f"exact match on {len(prompts)} prompts of {path} (greedy, up to {max_new_tokens} new tokens)")
        res = exact_match(cfg.model, params, tokenizer, list(zip(prompts, answers)), max_new_tokens=max_new_tokens,
                          batch_size=batch_size, stop_tokens=stops, mesh=mesh, rules=cfg.mesh.rules)
        rows.append({"dataset": Path(path).name, **{k: v for k, v in res.items() if k not in ("completions", "hits")},
                     "skipped": counts["records"] - counts["used"], "rendering": rendering,
                     "unusable": {k: v for k, v in sorted(counts.items()) if k not in ("records", "used")}})
    if tasks is not None:
        say(f"exact match on the built-in tasks: {', '.join(tasks or cfg.sft.tasks) or 'all'}")
        accuracy = task_accuracy(cfg, params, tokenizer, tasks, max_documents, batch_size=batch_size, mesh=mesh)
        rows += [{"dataset": f"task:{name}", **{k: v for k, v in res.items() if k != "examples"}}
                 for name, res in accuracy.items()]
    if by_position:
        if min(by_position) < 1 or not 1 <= buckets <= min(by_position):
            raise ConfigError(f"--by-position {' '.join(map(str, by_position))} must be positive, and --buckets "
                              f"{buckets} in [1, the shortest window]")
        docs = heldout_documents(cfg, max_documents)
    for window in by_position:
        say(f"loss by position in windows of {window} tokens on {len(docs)} held-out documents")
        res = loss_by_position(cfg.model, params, docs, **{**common, "seq_len": window}, buckets=buckets)
        rows.append(_position_row(f"heldout@{window}", len(docs), res))
    if passkey_lengths is not None:
        lengths = list(passkey_lengths) or default_passkey_lengths(cfg.model, tokenizer)
        _check_passkey(cfg.model, tokenizer, lengths, passkey_depths, passkey_trials)
        say(f"passkey retrieval at lengths {', '.join(map(str, lengths))}")
        res = passkey(cfg.model, params, tokenizer, lengths, passkey_depths or (0.0, 0.25, 0.5, 0.75, 1.0),
                      passkey_trials, seed=seed, batch_size=batch_size, mesh=mesh, rules=cfg.mesh.rules)
        rows += _passkey_rows(res["cells"])
    log = MetricsWriter(run_dir, enabled=jax.process_index() == 0)
    log.scalars({"step": step, **{k: v for r in rows for key, value in r.items() if key not in _NOT_SCALARS
                                  for k, v in _flat(f"eval/{r['dataset']}/{key}", value).items()}})
    qa_info = {r["dataset"]: {k: r[k] for k in _NOT_SCALARS[1:]} for r in rows if "rendering" in r}
    log.event("eval", step=step, datasets=[r["dataset"] for r in rows], seq_len=seq_len,
              **({"qa": qa_info} if qa_info else {}))
    log.close()
    return rows
