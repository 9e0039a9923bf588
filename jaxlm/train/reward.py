"""Reward models: an LM backbone plus the value head, trained on preferences with Bradley-Terry.

One trained role, `reward`: the config's model with a value head, its backbone from
`train.init_from` (an SFT or pretrained run; the head starts fresh, N(0, 1/(D+1))). Data:
`reward.train_files` (pair and ranking JSONL, `jaxlm.data.examples.preference`) and the
built-in tasks' preferences (`reward.tasks`: the right answer against near misses,
`jaxlm.data.tasks.preference_records`), every group packed whole into a row. The reward of a
response is the value head's output at its last token; the loss is `ranking_loss` (a pair is a
ranking of two) over the groups of the global batch, averaged per group.

After training: pairwise accuracy per task on the held-out groups, and the mean and standard
deviation of the reward over `reward.stats_groups` training groups, kept with the run
(`RUN_DIR/reward_stats.json`) so that scores can be reported normalised (`jaxlm score`).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import model, runs, sharding
from jaxlm.config import Config, ConfigError
from jaxlm.data import readers, tasks
from jaxlm.data.examples import chat, preference
from jaxlm.objectives.reward import ranking_loss
from jaxlm.train.loop import Stage, run
from jaxlm.train.state import Role
from jaxlm.train.step import Objective

STATS_FILE = "reward_stats.json"


def reward_role(cfg: Config) -> tuple[Role, ...]:
    """The one trained role: the config's model with a value head, from train.init_from if set."""
    return (Role("reward", dataclasses.replace(cfg.model, value_head=True), init_from=cfg.train.init_from),)


def group_rewards(model_cfg, params, batch):
    """Rewards [B, G, K] of packed preference rows (`preference.pack_groups`): the value head's
    output at each response's last token (0 where `ends` is -1), and their validity [B, G, K]."""
    values_BT = model.apply(model_cfg, params, batch["tokens"], batch["segment_ids"], batch["positions"],
                            head="value")
    ends_BGK = batch["ends"]
    B, G, K = ends_BGK.shape
    valid_BGK = ends_BGK >= 0
    r_BGK = jnp.take_along_axis(values_BT, jnp.maximum(ends_BGK, 0).reshape(B, G * K), axis=1).reshape(B, G, K)
    return jnp.where(valid_BGK, r_BGK, 0.0), valid_BGK


def reward_objective(model_cfg, center_coef: float = 0.0) -> Objective:
    """`ranking_loss` over the groups of packed preference rows, summed per group (the loop divides
    by the groups with a pair in the whole batch, so accumulated and sharded == one batch)."""
    model_cfg = dataclasses.replace(model_cfg, value_head=True)

    def loss(params, frozen, batch):
        del frozen
        r_BGK, valid_BGK = group_rewards(model_cfg, params["reward"], batch)
        B, G, K = r_BGK.shape
        mean, metrics = ranking_loss(r_BGK.reshape(B * G, K), valid_BGK.reshape(B * G, K),
                                     batch["margin"].reshape(B * G, K), center_coef)
        return mean * metrics["loss"][1], metrics

    return Objective(loss, lambda batch: jnp.sum(batch["ends"][..., 1] >= 0))


def _file_records(paths):
    try:
        return list(readers.read_records(paths))
    except FileNotFoundError as e:
        raise ConfigError(f"reward: {e}") from None


def _counts_line(counts) -> str:
    bad = {k: v for k, v in counts.items() if k not in ("records", "used")}
    return f"{counts['used']} of {counts['records']} records used; unusable: {dict(sorted(bad.items())) or 'none'}"


def load_groups(cfg: Config, tok):
    """(train groups, eval groups, info) for `cfg.reward`; no usable data is a ConfigError."""
    from jaxlm.data.pipeline import heldout_indices

    rc, T = cfg.reward, cfg.train.seq_len
    if not rc.train_files and not rc.tasks:
        raise ConfigError("reward needs data: set reward.train_files (preference JSONL) and/or reward.tasks "
                          f"(built-in: {', '.join(tasks.TASK_NAMES)})")
    r = chat.Renderer.from_tokenizer(tok, cfg.sft.template)
    grouped = functools.partial(preference.to_groups, r, T=T, truncation=rc.truncation, margins=rc.margins,
                                max_responses=rc.max_responses)
    try:
        train, train_counts = grouped(_file_records(rc.train_files) if rc.train_files else [])
        evals, eval_counts = grouped(_file_records(rc.eval_files) if rc.eval_files else [])
    except ValueError as e:  # chat prompts and a tokenizer without role markers
        raise ConfigError(f"reward: {e}") from None
    for key, found, counts in (("train_files", train, train_counts), ("eval_files", evals, eval_counts)):
        if getattr(rc, key) and not found:
            raise ConfigError(f"reward.{key}={list(getattr(rc, key))} hold no usable record: " + _counts_line(counts))
    if not rc.eval_files and len(train) >= 2:
        held = heldout_indices("reward", len(train), cfg.data.heldout_fraction)
        train, evals = [g for g, h in zip(train, held) if not h], [g for g, h in zip(train, held) if h]
    task_train, task_counts = grouped(tasks.preference_records(rc.tasks, "train", rc.task_pairs, cfg.data.seed))
    task_eval, _ = grouped(tasks.preference_records(rc.tasks, "test", rc.task_eval_pairs, 0, distinct=True))
    if rc.tasks and not task_train:
        raise ConfigError(f"reward.tasks: no group fits train.seq_len={T}: " + _counts_line(task_counts))
    info = {"records_train": _counts_line(train_counts), "records_eval": _counts_line(eval_counts),
            "counts_train": dict(train_counts), "counts_eval": dict(eval_counts),
            "task_groups": _counts_line(task_counts)}
    return train + task_train, evals + task_eval, info


def _loader(cfg: Config, groups, pad: int):
    from jaxlm.data.loader import Loader, Source

    packer = functools.partial(preference.pack_groups, groups_per_row=cfg.reward.groups_per_row,
                               max_responses=cfg.reward.max_responses)
    return Loader([Source("reward", groups)], cfg.train.seq_len, eos_id=pad, seed=cfg.data.seed,
                  packing="first_fit", lookahead=cfg.data.lookahead, packer=packer)


def build(cfg: Config) -> Stage:
    from jaxlm.data.tokenizers import load_tokenizer

    tok = load_tokenizer(cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tok.vocab_size})")
    train, evals, info = load_groups(cfg, tok)
    info.update(groups_train=len(train), groups_eval=len(evals), tasks=list(cfg.reward.tasks))
    return Stage("reward", reward_role(cfg), reward_objective(cfg.model, cfg.reward.center_coef),
                 _loader(cfg, train, tok.pad_id), _loader(cfg, evals, tok.pad_id) if evals else None, info)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("mesh", "rules"))
def _rewards(model_cfg, params, batch, *, mesh=None, rules="fsdp"):
    with sharding.activate(mesh, rules) if mesh is not None else contextlib.nullcontext():
        return group_rewards(model_cfg, params, batch)[0]


def score_groups(cfg: Config, params, groups, *, mesh, batch_rows: int = 8) -> list[np.ndarray]:
    """The rewards of every group's responses (a list of [K_i] arrays, in the order of `groups`):
    packed rows in fixed batches of `batch_rows` (one compile), sharded on `mesh`."""
    model_cfg = dataclasses.replace(cfg.model, value_head=True)
    rows, _ = preference.pack_groups(groups, cfg.train.seq_len, 0, groups_per_row=cfg.reward.groups_per_row,
                                     max_responses=max([len(g["sequences"]) for g in groups] + [2]))
    shards = sharding.batch_shards(mesh)
    batch_rows = -(-batch_rows // shards) * shards
    out: list = [None] * len(groups)
    for start in range(0, len(rows["tokens"]), batch_rows):
        batch = {k: rows[k][start:start + batch_rows] for k in ("tokens", "segment_ids", "positions", "ends")}
        short = batch_rows - len(batch["tokens"])
        batch = {k: np.concatenate([v, np.full((short, *v.shape[1:]), -1 if k == "ends" else 0, v.dtype)])
                 for k, v in batch.items()}
        r_BGK = np.asarray(jax.device_get(_rewards(model_cfg, params, sharding.put_batch(mesh, batch), mesh=mesh,
                                                   rules=cfg.mesh.rules)))
        for b in range(len(batch["tokens"]) - short):
            for g, i in enumerate(rows["index"][start + b]):
                if i >= 0:
                    out[i] = r_BGK[b, g, :len(groups[i]["sequences"])]
    return out


def pairwise_accuracy(groups, rewards) -> dict:
    """{task or "all": share of the pairs (i above j in a group) whose rewards are strictly in order}."""
    hits, pairs = collections.Counter(), collections.Counter()
    for group, r in zip(groups, rewards):
        for name in ("all", group.get("task")):
            if name is None:
                continue
            for i in range(len(r)):
                for j in range(i + 1, len(r)):
                    hits[name] += bool(r[i] > r[j])
                    pairs[name] += 1
    return {name: hits[name] / pairs[name] for name in pairs}


def reward_stats(rewards) -> dict:
    values = np.concatenate(rewards) if rewards else np.zeros(0)
    return {"mean": float(values.mean()) if len(values) else 0.0, "std": float(values.std()) if len(values) else 1.0,
            "responses": int(len(values))}


def main(cfg: Config) -> dict:
    """Train the reward model; the summary adds held-out pairwise accuracy per task (and over all
    held-out groups), and the reward's mean and std over training groups, written with the run."""
    stage = build(cfg)
    summary = run(cfg, stage)
    loaded = runs.load_run(cfg.train.run_dir)
    evals = list(stage.eval_data.sources[0].docs) if stage.eval_data is not None else []
    if evals:
        summary["heldout_accuracy"] = pairwise_accuracy(evals, score_groups(loaded.cfg, loaded.params, evals,
                                                                     mesh=loaded.mesh))
    train = list(stage.train_data.sources[0].docs)
    picked = np.random.default_rng(0).permutation(len(train))[:cfg.reward.stats_groups]
    stats = reward_stats(score_groups(loaded.cfg, loaded.params, [train[i] for i in picked], mesh=loaded.mesh))
    if jax.process_index() == 0:
        (Path(loaded.path) / STATS_FILE).write_text(json.dumps(stats) + "\n")
    summary["reward_stats"] = stats
    return summary


def _distribution(values: np.ndarray) -> str:
    q = np.quantile(values, [0.0, 0.1, 0.5, 0.9, 1.0]) if len(values) else np.zeros(5)
    return (f"{len(values)} rewards: mean {values.mean() if len(values) else 0:.3f}, std "
            f"{values.std() if len(values) else 0:.3f}; min {q[0]:.3f}, p10 {q[1]:.3f}, median {q[2]:.3f}, "
            f"p90 {q[3]:.3f}, max {q[4]:.3f}")


def _stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr)


def score_file(run_dir, path, *, out_path=None, normalize: bool = False, overrides=(), log=_stderr) -> list[dict]:
    """`jaxlm score RUN FILE`: the reward of every response of a JSONL of preference records (pairs,
    rankings, or {"prompt", "response"}), rendered as the run was trained; each usable record is
    written back with "rewards" (one per response, in its order) added, to `out_path` or stdout,
    and the distribution is logged (stderr). normalize: (r - mean) / std with the run's training stats."""
    import sys

    loaded = runs.load_run(run_dir, overrides)
    cfg = loaded.cfg
    stats = None
    if normalize:
        stats_path = Path(run_dir) / STATS_FILE
        if not stats_path.is_file():
            raise ConfigError(f"--normalize needs {str(stats_path)!r}, which `jaxlm reward` writes after training")
        stats = json.loads(stats_path.read_text())
    r = chat.Renderer.from_tokenizer(loaded.tokenizer, cfg.sft.template)
    records, groups, counts = [], [], collections.Counter()
    for record in _file_records([path]):
        counts["records"] += 1
        group = record if isinstance(record, str) else preference.to_group(
            r, record, cfg.train.seq_len, cfg.reward.truncation, cfg.reward.margins, max_responses=64,
            min_responses=1)
        if isinstance(group, str):
            counts[group] += 1
            continue
        records.append(record)
        groups.append(group)
    if not groups:
        raise ConfigError(f"{path} holds no record to score: {dict(counts)}")
    rewards = score_groups(cfg, loaded.params, groups, mesh=loaded.mesh)
    if stats is not None:
        rewards = [(x - stats["mean"]) / max(stats["std"], 1e-8) for x in rewards]
    results = [{**rec, "rewards": [round(float(v), 6) for v in x]} for rec, x in zip(records, rewards)]
    if jax.process_index() == 0:
        with open(out_path, "w") if out_path else contextlib.nullcontext(sys.stdout) as out:
            for row in results:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        counts["used"] = len(groups)
        kind = "normalised " if stats is not None else ""
        log(f"scored {len(groups)} of {counts['records']} records; {kind}{_distribution(np.concatenate(rewards))}; "
            f"unusable: {dict((k, v) for k, v in counts.items() if k not in ('records', 'used')) or 'none'}")
    return results
