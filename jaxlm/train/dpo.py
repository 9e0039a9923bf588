"""DPO and its family: the policy trained on preference pairs against a frozen reference.

Roles: `policy` (trained, from train.init_from) and `reference` (frozen, from `dpo.reference_from`,
by default the same run). With `dpo.precompute_reference` the reference's log-probs are computed
in one pass over the data before training and kept with the run (`RUN_DIR/reference_logp.npy`,
checked against the data on resume), so no reference model is in memory while training; both
give the same loss. simpo needs no reference at all.

Data: pairs (and rankings as best-against-each pairs) from `dpo.train_files` and the built-in
tasks (`dpo.tasks`: the right answer against near misses, or with `dpo.task_rejected: sampled`
against the init run's own wrong answers, sampled once and kept with the run), rendered as `jaxlm sft` renders them,
chosen and rejected of a pair packed into one row as two segments (`jaxlm.data.preferences`). A
response's log-prob is the sum over its response tokens (`jaxlm.objectives.lm.sequence_log_probs`,
closing token included, prompt and padding masked); `dpo.average_log_prob` divides by their count.
Loss: `jaxlm.objectives.dpo.preference_loss`, averaged over the pairs of the global batch, plus
`dpo.sft_coef` times the chosen responses' NLL per token.

After training: exact-match accuracy per task before (the init run) and after, as `jaxlm sft`
reports it; the held-out preference accuracy and margins are the loop's `eval_rewards/*`.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import model, runs, sharding
from jaxlm.checkpoint import steps
from jaxlm.config import Config, ConfigError
from jaxlm.config.stages import LLAMA2_MARGINS
from jaxlm.data import preferences, tasks
from jaxlm.data.examples import chat
from jaxlm.data.tokenizers import load_tokenizer
from jaxlm.generate import generate_texts
from jaxlm.objectives.dpo import preference_loss
from jaxlm.objectives.lm import sequence_log_probs
from jaxlm.train.loop import Stage, run
from jaxlm.train.sft import run_accuracy
from jaxlm.train.state import Role, role_params
from jaxlm.train.step import Objective

REFERENCE_FILE = "reference_logp.npy"
SAMPLES_FILE = "task_samples.json"


def dpo_roles(cfg: Config) -> tuple[Role, ...]:
    """The trained policy and, unless precomputed (or simpo), the frozen reference."""
    policy = Role("policy", cfg.model, init_from=cfg.train.init_from)
    return (policy,) if _reference_free(cfg) else (policy, _reference_role(cfg))


def _reference_free(cfg: Config) -> bool:
    return cfg.dpo.precompute_reference or cfg.dpo.loss_type == "simpo"


def _reference_role(cfg: Config) -> Role:
    key = "dpo.reference_from" if cfg.dpo.reference_from else "train.init_from"
    return Role("reference", cfg.model, trained=False, init_from=cfg.dpo.reference_from or cfg.train.init_from,
                init_from_key=key)


def pair_log_probs(model_cfg, params, batch):
    """(log-probs [B, G, K], response tokens [B, G, K]) of each response of packed preference rows:
    sums over its masked targets (0 for an empty slot)."""
    logits_BTV = model.apply(model_cfg, params, batch["tokens"], batch["segment_ids"], batch["positions"])
    B, G, K = batch["segment"].shape
    sums_BS, counts_BS = sequence_log_probs(logits_BTV, batch["targets"], batch["loss_mask"], batch["segment_ids"],
                                            n_segments=G * K)
    index = jnp.maximum(batch["segment"] - 1, 0).reshape(B, G * K)
    valid = (batch["segment"] > 0).astype(jnp.float32)
    pick = lambda x_BS: jnp.take_along_axis(x_BS, index, axis=1).reshape(B, G, K) * valid
    return pick(sums_BS), pick(counts_BS)


def dpo_objective(model_cfg, d) -> Objective:
    """The pairs' `preference_loss` summed (the loop divides by the pairs of the global batch), plus
    sft_coef times the chosen response's NLL per token; metrics from `preference_loss` and `sft_nll`."""

    def loss(params, frozen, batch):
        pi_sum_BGK, n_BGK = pair_log_probs(model_cfg, params["policy"], batch)
        if "reference" in frozen:
            ref_BGK = pair_log_probs(model_cfg, frozen["reference"], batch)[0]
        else:  # precomputed, or simpo's none
            ref_BGK = batch.get("ref_logp", jnp.zeros_like(pi_sum_BGK))
        pi_BGK = pi_sum_BGK
        if d.average_log_prob and d.loss_type != "simpo":  # simpo averages on its own
            pi_BGK, ref_BGK = pi_sum_BGK / jnp.maximum(n_BGK, 1), ref_BGK / jnp.maximum(n_BGK, 1)
        seg = batch["segment"]
        pair_P = ((seg[..., 0] > 0) & (seg[..., 1] > 0)).reshape(-1)
        chosen, rejected = (lambda x: x[..., 0].reshape(-1)), (lambda x: x[..., 1].reshape(-1))
        losses_P, metrics = preference_loss(
            chosen(pi_BGK), rejected(pi_BGK), chosen(ref_BGK), rejected(ref_BGK), beta=d.beta,
            loss_type=d.loss_type, label_smoothing=d.label_smoothing, gamma=d.gamma,
            chosen_tokens=chosen(n_BGK), rejected_tokens=rejected(n_BGK), mask=pair_P)
        nll_P = jnp.where(pair_P, -chosen(pi_sum_BGK) / jnp.maximum(chosen(n_BGK), 1), 0.0)
        metrics["sft_nll"] = (jnp.sum(nll_P), metrics["loss"][1])
        return jnp.sum(losses_P) + d.sft_coef * jnp.sum(nll_P), metrics

    return Objective(loss, lambda batch: jnp.sum((batch["segment"][..., 0] > 0) & (batch["segment"][..., 1] > 0)))


def load_groups(cfg: Config, tok):
    """(train pairs, eval pairs, info) for `cfg.dpo`: groups of two, chosen first."""
    sampled = cfg.dpo.tasks and cfg.dpo.task_rejected == "sampled"
    return preferences.load_groups(cfg.dpo, "dpo", tok, template=cfg.sft.template, T=cfg.train.seq_len,
                                   heldout_fraction=cfg.data.heldout_fraction, seed=cfg.data.seed,
                                   margins=LLAMA2_MARGINS, max_responses=2, pairs_only=True,
                                   task_records=sampled_task_records(cfg) if sampled else None)


def sampled_task_records(cfg: Config) -> tuple[list, list]:
    """(train, test) preference records of the built-in tasks from the init run's own answers
    (`tasks.sampled_preference_records`): dpo.task_pairs train problems and dpo.task_eval_pairs test
    problems per task, each sampled dpo.task_samples times at dpo.task_temperature. The samples are
    kept with the run (RUN_DIR/task_samples.json), so a resumed run trains on the same pairs."""
    d = cfg.dpo
    if not cfg.train.init_from:
        raise ConfigError("dpo.task_rejected=sampled samples the init run's answers: set train.init_from")
    problems = {"train": tasks.mixed(d.tasks, "train", d.task_pairs, cfg.data.seed),
                "test": tasks.mixed(d.tasks, "test", d.task_eval_pairs, 0, distinct=True)}
    key = hashlib.sha256(json.dumps([problems, d.task_samples, d.task_temperature, cfg.sft.template,
                                     str(Path(cfg.train.init_from).absolute())]).encode()).hexdigest()
    # the run directory is checked (another run's is refused) before anything is written into it
    path = Path(runs.start(cfg, jax.process_index() == 0).train.run_dir) / SAMPLES_FILE
    try:
        kept = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:  # cut short by a kill while written: sampled again
        kept = {}
    if kept.get("key") == key:
        samples = kept["samples"]
    else:
        loaded = runs.load_run(cfg.train.init_from)
        r = chat.Renderer.from_tokenizer(loaded.tokenizer, cfg.sft.template)
        samples = {}
        for split, probs in problems.items():
            prompts = [chat.prompt_ids(r, p) for p in probs for _ in range(d.task_samples)]
            out = generate_texts(loaded.cfg.model, loaded.params, loaded.tokenizer, prompts, batch_size=256,
                                 max_new_tokens=cfg.sft.max_new_tokens, stops=[loaded.tokenizer.eos_id],
                                 key=cfg.train.seed, mesh=loaded.mesh, rules=loaded.cfg.mesh.rules,
                                 temperature=d.task_temperature)
            texts = [o["completion"] for o in out]
            samples[split] = [texts[i:i + d.task_samples] for i in range(0, len(texts), d.task_samples)]
        if jax.process_index() == 0:
            path.write_text(json.dumps({"key": key, "samples": samples}))
    return tuple(tasks.sampled_preference_records(problems[s], samples[s], cfg.data.seed) for s in ("train", "test"))


@functools.partial(jax.jit, static_argnums=0, static_argnames=("mesh", "rules"))
def _log_probs(model_cfg, params, batch, *, mesh=None, rules="fsdp"):
    with sharding.activate(mesh, rules) if mesh is not None else contextlib.nullcontext():
        return pair_log_probs(model_cfg, params, batch)[0]


def _groups_digest(groups) -> str:
    h = hashlib.sha256()
    for g in groups:
        for seq in g["sequences"]:
            h.update(np.asarray(seq, np.int32).tobytes())
            h.update(b"|")
    return h.hexdigest()


def precompute_reference(cfg: Config, groups) -> None:
    """Each group's reference log-probs ("ref_logp", summed), in one pass, kept with the run: a
    resumed run reads them back (recomputed if the data differ)."""
    # the run directory is checked (another run's is refused) before anything is written into it
    run_dir = Path(runs.start(cfg, jax.process_index() == 0).train.run_dir)
    path, digest_path = run_dir / REFERENCE_FILE, run_dir / (REFERENCE_FILE + ".sha256")
    digest = _groups_digest(groups)
    if path.is_file() and digest_path.is_file() and digest_path.read_text().strip() == digest:
        values = np.load(path)
    else:
        mesh = sharding.make_mesh(cfg.mesh)
        params, _ = role_params(_reference_role(cfg), jax.random.key(cfg.train.seed), mesh, cfg.mesh.rules)
        fn = lambda batch: _log_probs(cfg.model, params, batch, mesh=mesh, rules=cfg.mesh.rules)
        values = np.stack(preferences.map_groups(fn, groups, cfg.train.seq_len, mesh,
                                                 groups_per_row=cfg.dpo.groups_per_row)) if groups else np.zeros((0, 2))
        del params
        if jax.process_index() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            np.save(path, values)
            digest_path.write_text(digest + "\n")
    for g, v in zip(groups, values):
        g["ref_logp"] = [float(x) for x in v]


def build(cfg: Config) -> Stage:
    tok = load_tokenizer(cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tok.vocab_size})")
    train, evals, info = load_groups(cfg, tok)
    if cfg.dpo.precompute_reference and cfg.dpo.loss_type != "simpo":
        precompute_reference(cfg, train + evals)
    info.update(pairs_train=len(train), pairs_eval=len(evals), tasks=list(cfg.dpo.tasks))
    loader = functools.partial(preferences.loader, "dpo", T=cfg.train.seq_len, pad=tok.pad_id, seed=cfg.data.seed,
                               lookahead=cfg.data.lookahead, groups_per_row=cfg.dpo.groups_per_row, max_responses=2)
    return Stage("dpo", dpo_roles(cfg), dpo_objective(cfg.model, cfg.dpo), loader(groups=train),
                 loader(groups=evals) if evals else None, info)


def main(cfg: Config) -> dict:
    """Run DPO; with built-in tasks, the summary adds exact match per task before (the init run, on
    a fresh start) and after, prompted as `jaxlm sft` renders them."""
    stage = build(cfg)
    before = {}
    if cfg.dpo.tasks and cfg.train.init_from and not steps(cfg.train.run_dir):
        runs.check_init_from(cfg.model, cfg.data.tokenizer, cfg.train.init_from)
        before = run_accuracy(cfg, cfg.train.init_from, cfg.dpo.tasks)
    summary = run(cfg, stage)
    if cfg.dpo.tasks:
        summary["task_accuracy"] = run_accuracy(cfg, cfg.train.run_dir, cfg.dpo.tasks)
        if before:
            summary["task_accuracy_before"] = before
    return summary
