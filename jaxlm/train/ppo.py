"""PPO, GRPO and RLOO: the policy trained on its own sampled responses, scored by a checker or a
reward model, under a KL penalty to a frozen reference (Ouyang et al. 2022; Shao et al. 2024;
Ahmadian et al. 2024).

Roles: `policy` (trained, from train.init_from); `value`, the critic (trained, ppo only: from
ppo.value_from, default train.init_from, its value head fresh where that run has none; its own
optimizer, optim.* with ppo.value_lr); `reference` (frozen, train.init_from); and the scorer:
the built-in tasks' checker, or a reward-model run (`jaxlm.train.rejection.Scorer`). The frozen
models can be kept in bfloat16 (ppo.frozen_dtype), sharded as the trained ones.

An iteration (train.steps of them):
1. rollout: ppo.prompts_per_iteration prompts (in a shuffled order of all of them, cycling), and
   ppo.group_size responses to each from the current policy through the shared KV-cache sampler
   (`jaxlm.generate.generate`; row r of iteration k draws with fold_in(split(fold_in(key(seed), k))[0], r)),
   laid out as rows [prompt, response, padding] of one width for every iteration (`layout`);
2. scoring: a score per response, less ppo.missing_stop_penalty where it never stopped;
3. forward passes: the policy's log-probs (the sampling policy's "old" ones; logits divided by
   ppo.temperature, as sampled), the reference's, and the critic's values;
4. advantages (`advantages`): ppo: the score on the last response token less kl_coef x KL per
   token (`jaxlm.objectives.advantages.token_rewards`), GAE, whitened; grpo and rloo: the group
   baseline of (score - kl_coef x the response's KL), or of the score alone with ppo.kl_in_loss;
5. update: ppo.epochs passes of ppo.minibatches steps over the rollout, shuffled, through the
   loop's jitted train step (`jaxlm.train.state.compile_stage`: state donated, one optimizer per
   trained role, gradient accumulation, a non-finite update dropped); the loss is the clipped
   policy loss + vf_coef x the clipped value loss - ent_coef x entropy (+ kl_coef x k3 KL with
   ppo.kl_in_loss), per response token of the minibatch.

A checkpoint every train.save_every iterations (and at the last) holds the trained roles, their
optimizer states and the KL coefficient. SIGTERM or SIGINT stops the run after the iteration in
flight, saved there (`jaxlm.train.loop.Interrupted`: exit 143 or 130 from the CLI; a second
SIGINT at once). A stopped or killed run resumes after its newest checkpoint, and as every draw is
keyed by the iteration, a resumed run repeats the uninterrupted one. One row per iteration
in RUN_DIR/metrics.jsonl: score (and correct, with the checker), KL to the reference, kl_coef, the
update's losses, entropy, clip fraction and approximate KL, the critic's explained variance,
response length, and the seconds of rollout, scoring and update.

Several processes (`jax.distributed`) run it as one process does: each samples, scores and lays
out the whole rollout alike (the same prompts and keys; the sampler's and forward passes' results
are whole on every process), each device takes its rows of it (`sharding.put_shared_batch`), and
process 0 alone writes metrics; a SIGTERM to any process stops all after the same iteration.
"""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import distributed, model, runs, sharding
from jaxlm.checkpoint import Checkpointer, NonFiniteState, steps
from jaxlm.config import Config, ConfigError
from jaxlm.data.examples import chat, preference
from jaxlm.data.tokenizers import load_tokenizer
from jaxlm.errors import RunFailed
from jaxlm.evaluate import task_accuracy
from jaxlm.generate import default_stops
from jaxlm.objectives import advantages as adv
from jaxlm.objectives.lm import token_log_probs
from jaxlm.objectives.ppo import adaptive_kl_coef, entropy, policy_loss, value_loss
from jaxlm.train import rejection, rollout
from jaxlm.train.loop import Interrupted, catch_stop_signals, restore_newest
from jaxlm.train.metrics import means
from jaxlm.train.sft import run_accuracy
from jaxlm.train.state import Role, compile_stage, role_params, trained
from jaxlm.train.step import Objective

def ppo_roles(cfg: Config) -> tuple[Role, ...]:
    """The trained roles (the policy; ppo: the critic too) and the frozen reference, last."""
    p, t = cfg.ppo, cfg.train
    roles = [Role("policy", cfg.model, init_from=t.init_from)]
    if p.algorithm == "ppo":
        optim = dataclasses.replace(cfg.optim, lr=p.value_lr) if p.value_lr else None
        key = "ppo.value_from" if p.value_from else "train.init_from"
        roles.append(Role("value", dataclasses.replace(cfg.model, value_head=True),
                          init_from=p.value_from or t.init_from, init_from_key=key, optim=optim))
    roles.append(Role("reference", cfg.model, trained=False, init_from=t.init_from))
    return tuple(roles)


# --- pure pieces ----------------------------------------------------------------------------------


def advantages(p, scores_B, logp_BT, ref_logp_BT, values_BT, mask_BT, kl_coef):
    """{advantages, returns, kl [B, T]} of a rollout for `p` = the config's ppo section (module
    docstring, step 4); jit-able with `p` static. kl is k1 per token (the reported KL)."""
    kl_BT = adv.kl_penalty(logp_BT, ref_logp_BT, "k1") * mask_BT
    if p.algorithm == "ppo":
        penalty = 0.0 if p.kl_in_loss else kl_coef
        rewards_BT, _ = adv.token_rewards(scores_B, logp_BT, ref_logp_BT, mask_BT, penalty, p.kl_kind)
        a_BT, returns_BT = adv.gae(rewards_BT, values_BT, mask_BT, p.gamma, p.lam)
    else:
        seq_kl_B = jnp.sum(adv.kl_penalty(logp_BT, ref_logp_BT, p.kl_kind) * mask_BT, axis=1)
        rewards_B = scores_B if p.kl_in_loss else scores_B - kl_coef * seq_kl_B
        a_BT = adv.group_advantages(rewards_B, p.group_size, p.algorithm)[:, None] * mask_BT
        returns_BT = jnp.zeros_like(a_BT)
    if p.whiten_advantages and p.algorithm != "grpo":  # grpo's are normalised per group already
        a_BT = adv.whiten(a_BT, mask_BT)
    return {"advantages": a_BT, "returns": returns_BT, "kl": kl_BT}


def ppo_objective(cfg: Config) -> Objective:
    """The minibatch loss (module docstring, step 5), summed over response tokens; the loop divides
    by the response tokens of the whole minibatch."""
    p = cfg.ppo
    value_cfg = dataclasses.replace(cfg.model, value_head=True)

    def loss(params, frozen, batch):
        del frozen
        mask = batch["mask"]
        args = (batch["tokens"], batch["segment_ids"], batch["positions"])
        logits = model.apply(cfg.model, params["policy"], *args).astype(jnp.float32) / p.temperature
        logp = token_log_probs(logits, batch["targets"])
        _, metrics = policy_loss(logp, batch["old_logp"], batch["advantages"], mask, p.clip_eps)
        _, ent = entropy(logits, mask)
        metrics.update(ent)
        total = metrics["policy_loss"][0] - p.ent_coef * ent["entropy"][0]
        if p.kl_in_loss:
            kl = jnp.sum(adv.kl_penalty(logp, batch["ref_logp"], "k3") * mask)
            metrics["kl_loss"] = (kl, jnp.sum(mask))
            total = total + p.kl_coef * kl
        if "value" in params:
            values = model.apply(value_cfg, params["value"], *args, head="value")
            _, vm = value_loss(values, batch["old_values"], batch["returns"], mask, p.value_clip)
            metrics.update(vm)
            total = total + p.vf_coef * vm["value_loss"][0]
        metrics["loss"] = (total, jnp.sum(mask))
        return total, metrics

    return Objective(loss, lambda batch: jnp.sum(batch["mask"]))


def update(c, state: dict, batch: dict, epochs: int, minibatches: int, accum: int, key):
    """`epochs` passes of `minibatches` steps of `c.train_step` over the rollout's rows (shuffled
    per pass by fold_in(key, epoch)); returns (state, metric sums {name: (sum, count)}, the count
    of updates dropped as not finite)."""
    B = len(batch["mask"])
    sums: dict = {}
    dropped = 0
    for epoch in range(epochs):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), B))
        for rows in np.split(perm, minibatches):
            mb = {k: v[rows].reshape(accum, len(rows) // accum, *v.shape[1:]) for k, v in batch.items()}
            state, out = c.train_step(state, {}, sharding.put_shared_batch(c.mesh, mb, leading=1))
            out = jax.device_get(out)
            dropped += int(not out["update_ok"])
            for k, (total, n) in out["metrics"].items():
                s0, n0 = sums.get(k, (0.0, 0.0))
                sums[k] = (s0 + total, n0 + n)
    return state, sums, dropped


def explained_variance(values, returns, mask) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked entries (numpy)."""
    m = np.asarray(mask) > 0
    r, v = np.asarray(returns)[m], np.asarray(values)[m]
    var = r.var()
    return float(1 - (r - v).var() / var) if var > 0 else float("nan")


# --- the shell ------------------------------------------------------------------------------------


def _prompt_ids(cfg: Config, tok, prompts) -> list[list[int]]:
    r = chat.Renderer.from_tokenizer(tok, cfg.sft.template)
    return [list(chat.prompt_ids(r, preference.sft_record(p["prompt"], ""))) for p in prompts]


def _check(cfg: Config, mesh, width: int) -> None:
    p, t = cfg.ppo, cfg.train
    rows = p.prompts_per_iteration * p.group_size // p.minibatches
    parts = t.grad_accum_steps * sharding.batch_shards(mesh)
    if rows % parts:
        raise ConfigError(f"a minibatch of {rows} responses (ppo.prompts_per_iteration x ppo.group_size / "
                          f"ppo.minibatches) must be a multiple of train.grad_accum_steps x the mesh's batch "
                          f"shards ({parts})")
    if width > cfg.model.max_seq_len:
        raise ConfigError(f"the longest prompt + ppo.max_new_tokens is {width} tokens, more than "
                          f"model.max_seq_len={cfg.model.max_seq_len}")


def _cast(params, dtype: str):
    return params if dtype == "float32" else jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)


def main(cfg: Config, log=print) -> dict:
    """Run train.steps iterations from train.init_from; returns the summary: the last iteration's
    row, final_step, and with built-in tasks exact match per task before (on a fresh start) and after."""
    p, t = cfg.ppo, cfg.train
    if not t.init_from:
        raise ConfigError("ppo trains a model: set train.init_from (an SFT run)")
    roles = ppo_roles(cfg)
    for role in roles:
        runs.check_init_from(role.model, cfg.data.tokenizer, role.init_from, role.init_from_key)
    resuming = bool(steps(t.run_dir))
    before = run_accuracy(cfg, t.init_from, p.tasks) if p.tasks and not resuming else {}
    cfg = runs.start(cfg, jax.process_index() == 0)  # refuses another run's directory before writing
    run_dir = Path(cfg.train.run_dir)
    prompts, counts = rejection.load_prompts(cfg, "ppo")
    scorer = rejection.Scorer(cfg, "ppo")
    if not scorer.checker:
        scorer.run.params = _cast(scorer.run.params, p.frozen_dtype)
    tok = load_tokenizer(cfg.data.tokenizer)
    prompt_ids = _prompt_ids(cfg, tok, prompts)
    width = max(map(len, prompt_ids)) + p.max_new_tokens

    # the optimizers' schedules run over every update of the run
    updates = t.steps * p.epochs * p.minibatches
    # the reference is not an input of the update: its log-probs are computed once per rollout
    c = compile_stage(dataclasses.replace(cfg, train=dataclasses.replace(t, steps=updates)), trained(roles),
                      ppo_objective(cfg))
    mesh, rules = c.mesh, cfg.mesh.rules
    _check(cfg, mesh, width)
    train_roles = [r.name for r in trained(roles)]
    ckpt = Checkpointer(run_dir / "checkpoints", roles=train_roles, keep=t.keep_checkpoints,
                        async_save=t.async_checkpoint)
    writer = runs.MetricsWriter(run_dir, enabled=jax.process_index() == 0, group="ppo", cfg=cfg)
    seed_key = jax.random.key(t.seed)
    state, meta = restore_newest(ckpt, c.abstract_state, writer)
    if meta is None:
        state, iteration, kl_coef, skipped = c.init_state(seed_key), 0, p.kl_coef, 0
        for role in trained(roles):
            state["params"][role.name], from_step = role_params(role, seed_key, mesh, rules)
            writer.event("init_from", role=role.name, run_dir=role.init_from, step=from_step)
    else:
        iteration, kl_coef, skipped = meta["step"], meta["kl_coef"], meta["skipped"]
        writer.event("resume", step=iteration)
    reference = _cast(role_params(roles[-1], seed_key, mesh, rules)[0], p.frozen_dtype)
    writer.event("start", stage="ppo", step=iteration, algorithm=p.algorithm, prompts=len(prompts),
                 prompt_files=dict(counts), roles={r.name: "trained" if r.trained else "frozen" for r in roles},
                 devices=jax.device_count(), processes=jax.process_count(), mesh=dict(mesh.shape))
    forward = rollout.Forward(cfg.model, p.temperature, mesh, rules)
    stops = default_stops(tok)
    order = np.random.default_rng(cfg.data.seed).permutation(len(prompts))
    P, G = p.prompts_per_iteration, p.group_size
    advantages_fn = jax.jit(lambda *a: advantages(p, *a))
    summary: dict = {}
    saved, finished = set(ckpt.all_steps()), False

    def save(iteration):
        if iteration in saved:
            return
        meta = {"step": iteration, "updates": int(jax.device_get(state["step"])), "cursor": 0, "skipped": skipped,
                "kl_coef": kl_coef}
        if meta["updates"] == 0:  # nothing learned: a rerun must not resume it as done
            raise RunFailed(f"no update of the run's first {iteration} iterations was finite ({skipped} dropped): "
                            "nothing learned and nothing saved; lower optim.lr")
        try:
            ckpt.save(iteration, state["params"], state["opt_state"], meta)
        except NonFiniteState as e:
            raise RunFailed(f"iteration {iteration}: the state is not finite and was not saved ({e}); the latest "
                            f"checkpoint is {ckpt.latest_step()}; lower optim.lr") from None
        saved.add(iteration)

    # SIGTERM / SIGINT only set a flag: the run stops after the iteration in flight and saves there.
    # Several processes: JAX's preemption sync manager owns SIGTERM, and `distributed.preempted`
    # turns True on every process after the same iteration; a process that dies stops the others.
    stop, release_signals = catch_stop_signals(jax.process_count() == 1)
    peers = distributed.watch_peers(run_dir, cfg.distributed.peer_timeout_s)
    try:
        while iteration < t.steps:
            t0 = time.perf_counter()
            picked = order[(iteration * P + np.arange(P)) % len(prompts)]
            sample_key, shuffle_key = jax.random.split(jax.random.fold_in(seed_key, iteration))
            ro = rollout.sample(cfg.model, state["params"]["policy"], [prompt_ids[i] for i in picked], G, sample_key,
                                width=width, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                                tokenizer=tok, stops=stops, mesh=mesh, rules=rules)
            t1 = time.perf_counter()
            texts = [ro.texts[i * G:(i + 1) * G] for i in range(P)]
            raw = np.asarray(scorer([prompts[i] for i in picked], texts), np.float32).reshape(P * G)
            scores = raw - p.missing_stop_penalty * ~ro.stopped
            t2 = time.perf_counter()
            batch, on_mesh = ro.batch, forward.put(ro.batch)
            batch["old_logp"] = np.asarray(forward.logp(state["params"]["policy"], on_mesh))
            batch["ref_logp"] = np.asarray(forward.logp(reference, on_mesh))
            batch["old_values"] = (np.asarray(forward.values(state["params"]["value"], on_mesh))
                                   if "value" in state["params"] else np.zeros_like(batch["mask"]))
            extra = jax.device_get(advantages_fn(scores, batch["old_logp"], batch["ref_logp"], batch["old_values"],
                                                 batch["mask"], np.float32(kl_coef)))
            batch.update(advantages=extra["advantages"], returns=extra["returns"])
            t3 = time.perf_counter()
            state, sums, bad = update(c, state, batch, p.epochs, p.minibatches, t.grad_accum_steps, shuffle_key)
            skipped += bad
            t4 = time.perf_counter()
            iteration += 1
            if distributed.preempted(iteration) and not stop:
                stop.append(signal.SIGTERM)
            seq_kl = extra["kl"].sum(axis=1)
            row = {"step": iteration, **means(sums), "score": float(scores.mean()), "score_raw": float(raw.mean()),
                   "kl": float(seq_kl.mean()), "kl_coef": float(kl_coef),
                   "response_len": float(ro.lengths.mean()), "stopped": float(ro.stopped.mean()),
                   "time_rollout": (t1 - t0) + (t3 - t2), "time_score": t2 - t1, "time_update": t4 - t3,
                   "skipped": skipped}
            if scorer.checker:
                row["correct"] = float(raw.mean())
            if "value" in state["params"]:
                row["explained_var"] = explained_variance(batch["old_values"], batch["returns"], batch["mask"])
            if p.kl_target > 0 and not p.kl_in_loss:
                kl_coef = adaptive_kl_coef(kl_coef, row["kl"], P * G, p.kl_target, p.kl_horizon)
            writer.scalars(row)
            log(f"iteration {iteration}: score {row['score']:.3f}, kl {row['kl']:.4f}, entropy "
                f"{row.get('entropy', 0):.3f}, clip {row.get('clip_frac', 0):.3f}, {t4 - t0:.1f}s")
            summary = row
            if iteration % t.save_every == 0 or iteration == t.steps or stop:
                save(iteration)
            if stop and iteration < t.steps:
                writer.event("interrupted", step=iteration, signal=signal.Signals(stop[0]).name)
                ckpt.wait()
                ckpt.check()
                raise Interrupted(stop[0], iteration, ckpt.latest_step())
            if p.tasks and p.eval_every and iteration % p.eval_every == 0 and iteration != t.steps:
                acc = task_accuracy(cfg, state["params"]["policy"], tok, p.tasks, mesh=mesh)
                writer.scalars({"step": iteration, **{f"exact_match/{k}": v["exact_match"] for k, v in acc.items()}})
        ckpt.wait()
        ckpt.check()
        finished = True
    finally:
        release_signals()
        if peers is not None:  # the others skip a process that is done, and leave when one failed
            peers.close(failed=not finished and not stop)
        with contextlib.suppress(Exception):  # a failed background save: reported by `check`, or the error in flight
            ckpt.close()
        if not finished:
            writer.close()
    summary["final_step"] = iteration
    if p.tasks:
        summary["task_accuracy"] = run_accuracy(cfg, cfg.train.run_dir, p.tasks)
        writer.scalars({"step": iteration, **{f"exact_match/{k}": v for k, v in summary["task_accuracy"].items()}})
        if before:
            summary["task_accuracy_before"] = before
    writer.event("end", **{k: v for k, v in summary.items() if not isinstance(v, dict)})
    writer.close()
    return summary
