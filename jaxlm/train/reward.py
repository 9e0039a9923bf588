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
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import model, runs, sharding
from jaxlm.config import Config, ConfigError
from jaxlm.data import preferences, readers
from jaxlm.data.examples import chat, preference
from jaxlm.data.tokenizers import load_tokenizer
from jaxlm.objectives.reward import ranking_loss
from jaxlm.train.loop import Stage, run
from jaxlm.train.state import Role
from jaxlm.train.step import Objective

STATS_FILE = "reward_stats.json"
HELDOUT_FILE = "heldout_rewards.json"  # {"accuracy": {task or "all": ...}, "groups": [{"task", "rewards"}]}


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


def load_groups(cfg: Config, tok):
    """(train groups, eval groups, info) for `cfg.reward` (`jaxlm.data.preferences.load_groups`)."""
    rc = cfg.reward
    return preferences.load_groups(rc, "reward", tok, template=cfg.sft.template, T=cfg.train.seq_len,
                                   heldout_fraction=cfg.data.heldout_fraction, seed=cfg.data.seed,
                                   margins=rc.margins, max_responses=rc.max_responses)


def _loader(cfg: Config, groups, pad: int):
    return preferences.loader("reward", groups, cfg.train.seq_len, pad, seed=cfg.data.seed,
                              lookahead=cfg.data.lookahead, groups_per_row=cfg.reward.groups_per_row,
                              max_responses=cfg.reward.max_responses)


def build(cfg: Config) -> Stage:
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


def score_groups(cfg: Config, params, groups, *, mesh) -> list[np.ndarray]:
    """The rewards of every group's responses (a list of [K_i] arrays, in the order of `groups`)."""
    model_cfg = dataclasses.replace(cfg.model, value_head=True)
    fn = lambda batch: _rewards(model_cfg, params, batch, mesh=mesh, rules=cfg.mesh.rules)
    return preferences.map_groups(fn, groups, cfg.train.seq_len, mesh, groups_per_row=cfg.reward.groups_per_row)


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
    held-out groups; with every held-out reward in RUN_DIR/heldout_rewards.json), and the reward's
    mean and std over training groups, written with the run (RUN_DIR/reward_stats.json)."""
    stage = build(cfg)
    summary = run(cfg, stage)
    loaded = runs.load_run(cfg.train.run_dir)
    evals = list(stage.eval_data.sources[0].docs) if stage.eval_data is not None else []
    if evals:
        rewards = score_groups(loaded.cfg, loaded.params, evals, mesh=loaded.mesh)
        summary["heldout_accuracy"] = pairwise_accuracy(evals, rewards)
        if jax.process_index() == 0:  # each held-out group's rewards, best response first (the report draws them)
            groups = [{"task": g.get("task"), "rewards": [float(x) for x in r]} for g, r in zip(evals, rewards)]
            (Path(loaded.path) / HELDOUT_FILE).write_text(
                json.dumps({"accuracy": summary["heldout_accuracy"], "groups": groups}) + "\n")
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
    print(line, file=sys.stderr)


def score_file(run_dir, path, *, out_path=None, normalize: bool = False, overrides=(), log=_stderr) -> list[dict]:
    """`jaxlm score RUN FILE`: the reward of every response of a JSONL of preference records (pairs,
    rankings, or {"prompt", "response"}), rendered as the run was trained; each usable record is
    written back with "rewards" (one per response, in its order) added, to `out_path` or stdout,
    and the distribution is logged (stderr). normalize: (r - mean) / std with the run's training stats."""
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
    for record in preferences.file_records("score", [path]):
        counts["records"] += 1
        group = record if isinstance(record, readers.Unreadable) else preference.to_group(
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
