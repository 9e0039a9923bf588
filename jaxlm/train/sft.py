"""Supervised fine-tuning: the LM loss on response tokens of instruction and chat examples.

Data: `sft.train_files` (JSONL instruction or chat records, `jaxlm.data.examples.chat`) and the
built-in verifiable tasks `sft.tasks` (`jaxlm.data.tasks`), rendered to examples whose
loss mask covers responses only, then packed several per row by first-fit decreasing
(`jaxlm.data.loader`: segment ids, restarted positions) or one per row (`sft.packing=false`).
The step is pretraining's: `pretrain.lm_objective`, summed over the micro-batch, normalised
by the response-token count of the whole global batch (`pretrain.token_count`), so the loss
is the mean over response tokens whether the batch is packed, accumulated or sharded.

Held-out: `sft.eval_files` (or `data.heldout_fraction` of the train files' records) and the
tasks' test splits, for the eval loss; at the end, exact-match accuracy per task by
greedy generation on `sft.task_eval_examples` distinct test problems, before (the
`train.init_from` params) and after training.
"""
from __future__ import annotations

from jaxlm import runs
from jaxlm.checkpoint import steps
from jaxlm.config import Config, ConfigError
from jaxlm.data import readers, tasks
from jaxlm.data.examples import chat
from jaxlm.data.loader import Loader, Source
from jaxlm.data.pipeline import heldout_indices
from jaxlm.data.tokenizers import load_tokenizer
from jaxlm.evaluate import task_accuracy
from jaxlm.train.loop import Stage, run
from jaxlm.train.pretrain import lm_objective, policy_role


def _file_records(paths):
    try:
        return list(readers.read_records(paths))
    except FileNotFoundError as e:
        raise ConfigError(f"sft: {e}") from None


def _split_heldout(examples: list, fraction: float):
    """(train, held out): a fixed hash of each usable example's index picks `fraction` of them."""
    held = heldout_indices("sft", len(examples), fraction)
    return [x for x, h in zip(examples, held) if not h], [x for x, h in zip(examples, held) if h]


def _counts(counts) -> str:
    return readers.counts_line(counts, truncated=True)  # chat.render_all counts the truncated too


def load_examples(cfg: Config, tok):
    """(train examples, eval examples, info) for `cfg.sft`.

    A file holding no usable record, or no data at all, is a `ConfigError`.
    """
    s, T = cfg.sft, cfg.train.seq_len
    if not s.train_files and not s.tasks:
        raise ConfigError("sft needs data: set sft.train_files (JSONL) and/or sft.tasks "
                          f"(built-in: {', '.join(tasks.TASK_NAMES)})")
    r = chat.Renderer.from_tokenizer(tok, s.template)
    try:
        train, train_counts = chat.render_all(r, _file_records(s.train_files) if s.train_files else [],
                                                 T, s.truncation)
        evals, eval_counts = chat.render_all(r, _file_records(s.eval_files) if s.eval_files else [],
                                                T, s.truncation)
    except ValueError as e:  # e.g. chat records and a tokenizer without role markers
        raise ConfigError(f"sft: {e}") from None
    for key, found, counts in (("train_files", train, train_counts), ("eval_files", evals, eval_counts)):
        if getattr(s, key) and not found:
            raise ConfigError(f"sft.{key}={list(getattr(s, key))} hold no usable record: " + _counts(counts))
    if not s.eval_files and len(train) >= 2:
        train, evals = _split_heldout(train, cfg.data.heldout_fraction)
    task_train, task_counts = chat.render_all(
        r, tasks.mixed(s.tasks, "train", s.task_examples, cfg.data.seed), T, s.truncation)
    task_eval, _ = chat.render_all(r, tasks.test_records(s.tasks, s.task_eval_examples), T, s.truncation)
    if s.tasks and not task_train:
        raise ConfigError(f"sft.tasks: no example fits train.seq_len={T}: " + _counts(task_counts))
    info = {"records_train": _counts(train_counts), "records_eval": _counts(eval_counts),
            "task_examples": _counts(task_counts),
            "counts_train": dict(train_counts), "counts_eval": dict(eval_counts)}
    return train + task_train, evals + task_eval, info


def build(cfg: Config) -> Stage:
    tok = load_tokenizer(cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tok.vocab_size})")
    train, evals, info = load_examples(cfg, tok)
    lookahead = cfg.data.lookahead if cfg.sft.packing else 1  # 1: one example per row
    common = dict(eos_id=tok.eos_id, seed=cfg.data.seed, packing="first_fit", lookahead=lookahead)
    train_data = Loader([Source("sft", train)], cfg.train.seq_len, **common)
    eval_data = Loader([Source("sft", evals)], cfg.train.seq_len, **common) if evals else None
    info.update(examples_train=len(train), examples_eval=len(evals), tasks=list(cfg.sft.tasks),
                response_tokens_train=int(sum(x["loss_mask"].sum() for x in train)),
                tokens_train=int(sum(len(x["tokens"]) for x in train)))
    return Stage("sft", policy_role(cfg), lm_objective(cfg.model), train_data, eval_data, info)


def run_accuracy(cfg: Config, run_dir: str, names=None) -> dict:
    """{task: exact match} of a run's model on the built-in tasks `names` (default sft.tasks),
    prompted as `cfg.sft` renders them (`jaxlm.evaluate.task_accuracy`)."""
    run = runs.load_run(run_dir)
    return {name: res["exact_match"] for name, res in task_accuracy(cfg, run.params, run.tokenizer, names,
                                                                     mesh=run.mesh).items()}


def main(cfg: Config) -> dict:
    """Run SFT; with built-in tasks, the summary adds exact-match accuracy per task before
    (the `train.init_from` params, on a fresh start) and after training."""
    stage = build(cfg)
    before = {}
    if cfg.sft.tasks and cfg.train.init_from and not steps(cfg.train.run_dir):
        runs.check_init_from(cfg.model, cfg.data.tokenizer, cfg.train.init_from)  # before using its params
        before = run_accuracy(cfg, cfg.train.init_from)
    summary = run(cfg, stage)
    summary.update(counts_train=stage.info["counts_train"], counts_eval=stage.info["counts_eval"])
    if cfg.sft.tasks:
        summary["task_accuracy"] = run_accuracy(cfg, cfg.train.run_dir)
        if before:
            summary["task_accuracy_before"] = before
    return summary
