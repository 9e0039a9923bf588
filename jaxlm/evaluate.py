"""Evaluation: perplexity and bits per byte on held-out text, exact-match accuracy with the sampler.

Perplexity: each document is scored as packed pretraining shows it, after a document
boundary (eos) and through its own closing eos: inputs `eos + doc`, targets `doc + eos`, cut
into windows of `seq_len` tokens without overlap (each window's first token sees only its
window). nats/token = summed NLL / scored tokens; perplexity = exp(nats/token); bits per
byte = summed NLL / ln 2 / UTF-8 bytes of the documents' text, which compares models with
different tokenizers (the closing eos is scored but has no bytes).

Exact match: `exact_match(cfg, params, tokenizer, pairs)` samples a completion per prompt
(greedy by default) and asks each pair's checker whether it is right.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import math
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import jax
import numpy as np

from jaxlm import generate as gen
from jaxlm import model, sharding
from jaxlm.config import ConfigError
from jaxlm.data import readers, tasks
from jaxlm.data.examples import chat
from jaxlm.data.pipeline import build_lm_data
from jaxlm.data.tokenizers import load_tokenizer
from jaxlm.runs import MetricsWriter
from jaxlm.objectives.lm import lm_loss

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
    """(summed NLL in nats, scored tokens) of one batch of windows."""
    with sharding.activate(mesh, rules) if mesh is not None else contextlib.nullcontext():
        logits_BTV = model.apply(cfg, params, batch["tokens"])
        _, metrics = lm_loss(logits_BTV, batch["targets"], batch["loss_mask"])
        return metrics["loss"]


def perplexity(cfg, params, docs: Sequence[np.ndarray], n_bytes: int, *, seq_len: int, eos_id: int,
               batch_size: int = 8, mesh=None, rules: str = "fsdp") -> dict:
    """nats/token, perplexity and bits/byte of `docs` (token arrays; `n_bytes`: their text's UTF-8
    bytes). Windows are scored in batches of `batch_size` (the last filled with empty windows),
    so one compile serves the whole set."""
    cfg = getattr(cfg, "model", cfg)
    w = document_windows(docs, seq_len, eos_id)
    W = len(w["tokens"])
    if mesh is not None:
        shards = sharding.batch_shards(mesh)
        batch_size = -(-batch_size // shards) * shards
        params = model.place(cfg, params, mesh, rules)
    nll, count = 0.0, 0.0
    for start in range(0, W, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in w.items()}
        short = batch_size - len(batch["tokens"])
        batch = {k: np.pad(v, ((0, short), (0, 0))) for k, v in batch.items()}
        if mesh is not None:
            batch = sharding.put_batch(mesh, batch)
        s, c = _nll_sums(cfg, params, batch, mesh=mesh, rules=rules)
        nll, count = nll + float(s), count + float(c)
    nats = nll / max(count, 1.0)
    return {"documents": len(docs), "tokens": int(count), "bytes": int(n_bytes),
            "nats_per_token": nats, "perplexity": math.exp(nats),
            "bits_per_byte": nll / math.log(2) / max(n_bytes, 1)}


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


def read_qa(path) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from a JSONL file of {"prompt": ..., "answer": ...} records."""
    valid = lambda r: isinstance(r.get("prompt"), str) and isinstance(r.get("answer"), str)
    records = readers.read_valid_records(path, valid, 'string fields "prompt" and "answer"')
    return [(r["prompt"], r["answer"]) for r in records]


def format_table(rows: list[dict]) -> str:
    """Results as an aligned text table, one row per dataset."""
    cols = ["dataset", "documents", "tokens", "bytes", "nats_per_token", "perplexity", "bits_per_byte",
            "exact_match", "correct", "total"]
    cols = [c for c in cols if any(c in r for r in rows)]
    fmt = lambda v: "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
    cells = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def run_eval(run_dir, cfg, params, step: int, mesh, tokenizer, *, texts=(), text_field: str = "text",
             qa=(), heldout: Optional[bool] = None, seq_len: Optional[int] = None, batch_size: int = 8,
             max_documents: int = 0, max_new_tokens: int = 64, doc_start: bool = True,
             tasks: Optional[Sequence[str]] = None) -> list[dict]:
    """Evaluate a restored run on its held-out data (default when no files are given), text files,
    question/answer files and built-in tasks (`tasks`: names, or [] for the run's `sft.tasks`;
    exact match per task, prompted as `jaxlm sft` trains: `task_accuracy`);
    append one metrics row at `step` to RUN_DIR/metrics.jsonl; return one result dict per dataset."""
    seq_len = seq_len or cfg.train.seq_len
    common = dict(seq_len=seq_len, eos_id=tokenizer.eos_id, batch_size=batch_size, mesh=mesh,
                  rules=cfg.mesh.rules)
    rows = []
    if heldout or (heldout is None and not texts and not qa and tasks is None):
        docs = heldout_documents(cfg, max_documents)
        n_bytes = sum(len(tokenizer.decode(d).encode("utf-8")) for d in docs)
        rows.append({"dataset": "heldout", **perplexity(cfg.model, params, docs, n_bytes, **common)})
    for path in texts:
        docs, n_bytes = text_documents([path], tokenizer, text_field, max_documents)
        rows.append({"dataset": Path(path).name, **perplexity(cfg.model, params, docs, n_bytes, **common)})
    for path in qa:
        pairs = [(gen.encode_prompt(tokenizer, p, doc_start), a) for p, a in read_qa(path)]
        pairs = pairs[:max_documents] if max_documents else pairs
        res = exact_match(cfg.model, params, tokenizer, pairs, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, mesh=mesh, rules=cfg.mesh.rules)
        rows.append({"dataset": Path(path).name, **{k: v for k, v in res.items() if k not in ("completions", "hits")}})
    if tasks is not None:
        accuracy = task_accuracy(cfg, params, tokenizer, tasks, max_documents, batch_size=batch_size, mesh=mesh)
        rows += [{"dataset": f"task:{name}", **{k: v for k, v in res.items() if k != "examples"}}
                 for name, res in accuracy.items()]
    log = MetricsWriter(run_dir, enabled=jax.process_index() == 0)
    log.scalars({"step": step, **{f"eval/{r['dataset']}/{k}": v for r in rows for k, v in r.items()
                                  if k != "dataset"}})
    log.event("eval", step=step, datasets=[r["dataset"] for r in rows], seq_len=seq_len)
    log.close()
    return rows
