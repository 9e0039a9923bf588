"""Rejection sampling: best-of-N from the current model, SFT on the best, repeated (Llama 2).

A round (`sample_round`) samples `rs.samples_per_prompt` responses per prompt from the round's
model through the sharded sampler (`jaxlm.generate.generate_texts`: fixed batches of
`rs.prompts_per_batch` prompts x N rows, one compile; sample j of prompt i draws with
fold_in(key(seed, round), i * N + j), so a prompt's samples do not depend on its batch), scores
them (`Scorer`: the built-in tasks' checker, or a reward-model run), and appends one line per
prompt to ROUND/samples.jsonl as it goes: a killed round resumes after the last complete line,
sampling no prompt twice and skipping none. Then (`keep`) each prompt's best response over all
rounds so far (`best_of`) is kept if it scores at least `rs.min_score` (ROUND/kept.jsonl, SFT
records as `jaxlm sft` reads them), best against worst make preference pairs (ROUND/pairs.jsonl,
as `jaxlm reward` and `jaxlm dpo` read them), and ROUND/sft is a `jaxlm sft` run on the kept
set from the round's model. The next round samples from that run. A finished round (its SFT run
at train.steps) is skipped on restart.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np

from jaxlm import runs
from jaxlm.checkpoint import steps
from jaxlm.config import Config, ConfigError
from jaxlm.data import readers, tasks
from jaxlm.data.examples import chat, preference
from jaxlm.generate import generate_texts
from jaxlm.train import reward, sft

SAMPLES, KEPT, PAIRS, SUMMARY = "samples.jsonl", "kept.jsonl", "pairs.jsonl", "summary.json"


# --- pure pieces ----------------------------------------------------------------------------------


def best_of(scores: Sequence[float], logprobs: Sequence[float]) -> int:
    """The index of the best sample: the highest score; among equal scores the highest log-prob
    (the model's own preference), then the first."""
    return min(range(len(scores)), key=lambda i: (-scores[i], -logprobs[i], i))


def worst_of(scores: Sequence[float], logprobs: Sequence[float]) -> int:
    """The index of the worst sample: the lowest score; among equal scores the lowest log-prob, then the first."""
    return min(range(len(scores)), key=lambda i: (scores[i], logprobs[i], i))


def prompt_stats(rows: Sequence[dict], min_score: float) -> dict:
    """{task or "all": prompts, samples, mean and max score, pass@1 (the share of samples scoring at
    least min_score) and best-of-N (the share of prompts with one that does)} of samples.jsonl rows."""
    groups = collections.defaultdict(list)
    for row in rows:
        for name in ("all", row["prompt"].get("task")):
            if name is not None:
                groups[name].append([s["score"] for s in row["samples"]])
    out = {}
    for name, per_prompt in groups.items():
        scores = np.concatenate([np.asarray(s, np.float64) for s in per_prompt])
        out[name] = {"prompts": len(per_prompt), "samples": int(len(scores)), "mean_score": float(scores.mean()),
                     "max_score": float(scores.max()), "pass@1": float(np.mean(scores >= min_score)),
                     "best_of_n": float(np.mean([max(s) >= min_score for s in per_prompt]))}
    return out


def keep(rounds_rows: Sequence[Sequence[dict]], min_score: float) -> tuple[list[dict], list[dict]]:
    """(kept SFT records, preference pairs) over the rows of every round so far (samples.jsonl, in
    round order): each prompt's best sample over all rounds (`best_of`, earlier rounds first among
    equals) if it scores at least `min_score`; a pair of its best and worst samples where they
    score differently."""
    samples = {}
    for rows in rounds_rows:
        for row in rows:
            samples.setdefault(row["id"], (row["prompt"], []))[1].extend(row["samples"])
    kept, pairs = [], []
    for prompt, ss in samples.values():
        scores, logprobs = [s["score"] for s in ss], [s["logprob"] for s in ss]
        best, worst = ss[best_of(scores, logprobs)], ss[worst_of(scores, logprobs)]
        extra = {k: v for k, v in prompt.items() if k not in ("prompt", "id")}
        if best["score"] >= min_score:
            kept.append({**preference.sft_record(prompt["prompt"], best["text"]), **extra, "score": best["score"]})
        if best["score"] > worst["score"]:
            pairs.append({"prompt": prompt["prompt"], "chosen": best["text"], "rejected": worst["text"], **extra,
                          "margin": float(best["score"] - worst["score"])})
    return kept, pairs


# --- prompts and scorers --------------------------------------------------------------------------


def _usable(record, checker: bool) -> Optional[str]:
    """Why a prompt record is unusable, or None."""
    if not isinstance(record, dict) or "prompt" not in record:
        return "missing_field"
    prompt = record["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            return "empty_prompt"
    elif not isinstance(prompt, list) or chat.check_record(preference.sft_record(prompt, "x")) is not None:
        return "bad_chat_prompt"
    if checker and (record.get("task") not in tasks.TASKS or not isinstance(record.get("answer"), str)):
        return "not_checkable"
    return None


def load_prompts(cfg: Config, section: str = "rs") -> tuple[list[dict], collections.Counter]:
    """The prompts of `cfg.<section>` (rs or ppo: prompt_files, tasks, task_prompts, checker), each
    {"id", "prompt", ...} (a file record's other fields kept; a task's "task" and "answer"), and the
    counts of file records (used, and each reason one was skipped)."""
    r, out, counts = getattr(cfg, section), [], collections.Counter()
    if r.prompt_files:
        try:
            records = list(readers.read_records(r.prompt_files))
        except FileNotFoundError as e:
            raise ConfigError(f"{section}.prompt_files: {e}") from None
        for i, record in enumerate(records):
            counts["records"] += 1
            reason = str(record) if isinstance(record, readers.Unreadable) else _usable(record, r.checker)
            if reason is not None:
                counts[reason] += 1
                continue
            counts["used"] += 1
            out.append({**record, "id": f"file:{i}"})
    for ex in tasks.mixed(r.tasks, "train", r.task_prompts, cfg.data.seed, distinct=True):
        out.append({"id": f"{ex['task']}:{ex['input']}", "prompt": chat.instruction_prompt(ex), "task": ex["task"],
                    "answer": ex["answer"]})
    if not out:
        raise ConfigError(f"{section} needs prompts: {section}.prompt_files (JSONL of {{\"prompt\": ...}}) and/or "
                          f"{section}.tasks; "
                          + (readers.counts_line(counts) if counts else "none given"))
    return out, counts


class Scorer:
    """Scores of sampled responses: the built-in tasks' checker (1.0 right, 0.0 wrong), or the
    rewards of a reward-model run (rendered as that run was trained)."""

    def __init__(self, cfg: Config, section: str = "rs"):
        r = getattr(cfg, section)  # rs or ppo: checker, reward_run
        if not r.checker and not r.reward_run:
            raise ConfigError(f"{section} needs a scorer: {section}.checker=true (the built-in tasks' check) or "
                              f"{section}.reward_run (a reward-model run)")
        self.checker, self.section = r.checker, section
        if not self.checker:
            self.run = runs.load_run(r.reward_run)
            if "value_head" not in self.run.params:
                raise ConfigError(f"{section}.reward_run={r.reward_run!r} is not a reward-model run (no value head)")
            self.renderer = chat.Renderer.from_tokenizer(self.run.tokenizer, self.run.cfg.sft.template)

    def __call__(self, prompts: Sequence[dict], texts: Sequence[Sequence[str]]) -> list[list[float]]:
        if self.checker:
            return [[float(tasks.check(p, t)) for t in ts] for p, ts in zip(prompts, texts)]
        c = self.run.cfg
        groups = []
        for p, ts in zip(prompts, texts):
            group = preference.to_group(self.renderer, {"prompt": p["prompt"], "responses": list(ts)},
                                        c.train.seq_len, "trim_context", {}, max_responses=len(ts), min_responses=1)
            if isinstance(group, str):  # e.g. two samples alike: scored one by one
                group = None
            groups.append(group)
        singles = [(i, j) for i, g in enumerate(groups) if g is None for j in range(len(texts[i]))]
        flat = [g for g in groups if g is not None] + [
            preference.to_group(self.renderer, {"prompt": prompts[i]["prompt"], "response": texts[i][j]},
                                c.train.seq_len, "trim_context", {}, max_responses=1, min_responses=1)
            for i, j in singles]
        bad = [g for g in flat if isinstance(g, str)]
        if bad:
            raise ConfigError(f"{self.section}.reward_run cannot score a sample: {bad[0]} (its train.seq_len="
                              f"{c.train.seq_len})")
        rewards = reward.score_groups(c, self.run.params, flat, mesh=self.run.mesh)
        whole = iter(rewards[:len(flat) - len(singles)])
        out = [[float(x) for x in next(whole)] if g is not None else [0.0] * len(texts[i])
               for i, g in enumerate(groups)]
        for (i, j), value in zip(singles, rewards[len(flat) - len(singles):]):
            out[i][j] = float(value[0])
        return out


# --- a round --------------------------------------------------------------------------------------


def read_rows(path: Path) -> tuple[list[dict], int]:
    """(rows, the bytes they take) of a samples.jsonl: its lines up to the first one that a kill cut short."""
    if not path.is_file():
        return [], 0
    rows, end = [], 0
    for line in path.read_bytes().split(b"\n")[:-1]:  # what follows the last newline is cut short
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
        end += len(line) + 1
    return rows, end


def sample_round(cfg: Config, round_dir: Path, model_run: str, prompts: list[dict], scorer: Scorer,
                 round_index: int) -> list[dict]:
    """Sample, score and append to round_dir/samples.jsonl every prompt not written yet; returns all rows."""
    r = cfg.rs
    path = round_dir / SAMPLES
    rows, end = read_rows(path)
    if rows and [row["id"] for row in rows] != [p["id"] for p in prompts[:len(rows)]]:
        raise ConfigError(f"{path} holds samples of other prompts; use a new train.run_dir")
    if len(rows) == len(prompts):
        return rows
    main = jax.process_index() == 0
    if main:  # cut a line a kill left short, so that appends start on a line of their own
        with open(path, "ab") as f:
            f.truncate(end)
    loaded = runs.load_run(model_run)
    renderer = chat.Renderer.from_tokenizer(loaded.tokenizer, cfg.sft.template)
    N, B = r.samples_per_prompt, r.prompts_per_batch
    key = jax.random.fold_in(jax.random.key(cfg.train.seed), round_index)
    sample = functools.partial(generate_texts, loaded.cfg.model, loaded.params, loaded.tokenizer, batch_size=B * N,
                               max_new_tokens=r.max_new_tokens, key=key, mesh=loaded.mesh,
                               rules=loaded.cfg.mesh.rules, fill=True, temperature=r.temperature,
                               top_p=None if r.top_p == 1 else r.top_p)
    ids = {p["id"]: i for i, p in enumerate(prompts)}
    for start in range(len(rows), len(prompts), B):
        chunk = prompts[start:start + B]
        tokens = [chat.prompt_ids(renderer, preference.sft_record(p["prompt"], "")) for p in chunk]
        out = sample([t for t in tokens for _ in range(N)], row_ids=[ids[p["id"]] * N + j for p in chunk
                                                                     for j in range(N)])
        texts = [[o["completion"] for o in out[i * N:(i + 1) * N]] for i in range(len(chunk))]
        scores = scorer(chunk, texts)
        new = [{"id": p["id"], "prompt": {k: v for k, v in p.items() if k != "id"},
                "samples": [{"text": t, "score": s, "logprob": o["logprob"]}
                            for t, s, o in zip(ts, ss, out[i * N:(i + 1) * N])]}
               for i, (p, ts, ss) in enumerate(zip(chunk, texts, scores))]
        if main:
            with open(path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in new)
                f.flush()
                os.fsync(f.fileno())
        rows += new
    return rows


def _write_jsonl(path: Path, records) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records), encoding="utf-8")
    tmp.replace(path)


def _round_sft_config(cfg: Config, round_dir: Path, init_from: str) -> Config:
    """The round's `jaxlm sft` run: the kept set, from the round's model, with the config's sft.* and train.*."""
    return dataclasses.replace(
        cfg, sft=dataclasses.replace(cfg.sft, train_files=(str(round_dir / KEPT),), eval_files=(), tasks=()),
        train=dataclasses.replace(cfg.train, run_dir=str(round_dir / "sft"), init_from=init_from))


def _accuracy(cfg: Config, run_dir: str) -> dict:
    return sft.run_accuracy(cfg, run_dir, cfg.rs.tasks) if cfg.rs.tasks else {}


def main(cfg: Config, log=print) -> dict:
    """Run `rs.rounds` rounds from train.init_from; returns {"rounds": [round summaries]}. A round's
    summary: prompts, counts of the prompt files, samples, kept, pairs, prompt_stats, and (built-in
    tasks) the exact-match accuracy of the round's SFT model (and of train.init_from, "accuracy_before")."""
    if not cfg.train.init_from:
        raise ConfigError("rs samples from a model: set train.init_from (an SFT run)")
    runs.check_init_from(cfg.model, cfg.data.tokenizer, cfg.train.init_from)
    # the run directory: refused if another run's, before anything is written into it
    run_dir = Path(runs.start(cfg, jax.process_index() == 0).train.run_dir)
    prompts, counts = load_prompts(cfg)
    scorer = Scorer(cfg)
    model_run, all_rows, summaries = cfg.train.init_from, [], []
    before = _accuracy(cfg, cfg.train.init_from)
    for index in range(cfg.rs.rounds):
        round_dir = run_dir / f"round_{index}"
        sft_cfg = _round_sft_config(cfg, round_dir, model_run)
        summary_path = round_dir / SUMMARY
        if summary_path.is_file() and steps(sft_cfg.train.run_dir)[-1:] == [cfg.train.steps]:
            summary = json.loads(summary_path.read_text())  # a finished round
            all_rows.append(read_rows(round_dir / SAMPLES)[0])
        else:
            round_dir.mkdir(parents=True, exist_ok=True)
            rows = sample_round(cfg, round_dir, model_run, prompts, scorer, index)
            all_rows.append(rows)
            kept, pairs = keep(all_rows, cfg.rs.min_score)
            if not kept:
                raise ConfigError(f"round {index}: no prompt has a sample scoring rs.min_score={cfg.rs.min_score} "
                                  f"or more ({len(rows)} prompts); lower rs.min_score or sample more")
            if jax.process_index() == 0:
                _write_jsonl(round_dir / KEPT, kept)
                _write_jsonl(round_dir / PAIRS, pairs)
            stats = prompt_stats(rows, cfg.rs.min_score)
            log(f"round {index}: {len(rows)} prompts x {cfg.rs.samples_per_prompt} samples; kept {len(kept)}, "
                f"{len(pairs)} pairs; pass@1 {stats['all']['pass@1']:.3f}, best-of-N {stats['all']['best_of_n']:.3f}")
            trained = sft.main(sft_cfg)
            summary = {"round": index, "sampled_from": str(model_run), "prompts": len(rows), "kept": len(kept),
                       "pairs": len(pairs), "prompt_files": dict(counts), "stats": stats,
                       "sft_loss": trained.get("loss"), "accuracy": _accuracy(cfg, sft_cfg.train.run_dir)}
            if index == 0 and before:
                summary["accuracy_before"] = before
            if jax.process_index() == 0:
                summary_path.write_text(json.dumps(summary) + "\n")
        summaries.append(summary)
        model_run = sft_cfg.train.run_dir
    return {"rounds": summaries}
