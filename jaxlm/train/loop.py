"""The training loop shared by every stage: the imperative shell around a pure step.

A `Stage` brings its roles, its objective and its data; the loop brings everything else: the
run directory, the mesh and shardings, sharded init or resume, the jitted step (state
donated, frozen roles beside it), gradient accumulation and the batch-size ramp, evaluation,
checkpoints, metrics and recovery from bad steps.

Metrics are fetched one step late, so the host never waits for the device between steps, and
the next batch is built on a background thread meanwhile (`Prefetcher`). MFU = (FLOPs per
token x tokens/s) / peak FLOP/s, with FLOPs per token from `jaxlm.perf.flops_per_token`:
6N + 6LTD (causal attention at half) for a trained role, a third of it for a frozen one
(forward only).
"""
from __future__ import annotations

import dataclasses
import signal
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import checkpoint, distributed, model, perf, runs, sharding
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import Config, ConfigError
from jaxlm.data.prefetch import Prefetcher
from jaxlm.optim import BatchRamp, lr_schedule
from jaxlm.train.guard import Guard
from jaxlm.train.metrics import Window, means
from jaxlm.train.state import Role, compile_stage, frozen, role_params, trained
from jaxlm.train.step import Objective

# Called with each finished step (after it is logged): a test hook, e.g. to kill the process there.
step_hooks: list[Callable[[int], None]] = []


@dataclasses.dataclass
class Stage:
    """What a training stage brings to the loop.

    `train_data.batch(cursor, global_batch, process_index, process_count)` returns this
    process's rows of the global batch starting at example `cursor` of the stream (numpy
    dict); `eval_data` likewise, or None.
    """

    name: str
    roles: tuple[Role, ...]
    objective: Objective
    train_data: Any
    eval_data: Any = None
    info: dict = dataclasses.field(default_factory=dict)


class _Interrupted(Exception):
    pass


class _Preempted(_Interrupted):
    """SIGTERM reached some process of a multi-process run; all stop at the same step."""


def _raise_interrupt(signum, frame):
    raise _Interrupted(f"signal {signum}")


def _stack_micro(local: dict, accum: int) -> dict:
    """[b, ...] -> [A, b/A, ...] so the step scans over micro-batches."""
    return {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in local.items()}


def _flops_per_token(roles, seq_len: int) -> float:
    return sum(perf.flops_per_token(r.model, seq_len) * (1.0 if r.trained else 1 / 3) for r in roles)


def run(cfg: Config, stage: Stage, devices=None) -> dict:
    """Train `stage` under `cfg` (on `devices`, default all); resume from RUN_DIR's latest
    checkpoint if there is one. Returns the summary: the last logged row, the last evaluation,
    the final step and the run's counters."""
    t = cfg.train
    main = jax.process_index() == 0
    pidx, pcount = jax.process_index(), jax.process_count()
    resuming = bool(checkpoint.steps(t.run_dir))
    for role in stage.roles:  # a trained role starts from its run only on a fresh start; a frozen one every time
        if role.init_from and not (role.trained and resuming):
            runs.check_init_from(role.model, cfg.data.tokenizer, role.init_from, role.init_from_key)
    cfg = runs.start(cfg, main)  # refuses a run directory of another run before writing anything
    run_dir = Path(cfg.train.run_dir)
    c = compile_stage(cfg, stage.roles, stage.objective, devices)
    mesh, abstract_state, train_step, eval_step = c.mesh, c.abstract_state, c.train_step, c.eval_step
    accum = t.grad_accum_steps
    shards = sharding.batch_shards(mesh)
    if t.batch_size % (accum * shards) or (t.batch_size // accum) % pcount:
        raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of train.grad_accum_steps "
                          f"({accum}) x the batch shards of the mesh ({shards})")
    if shards % pcount:
        raise ConfigError(f"the mesh splits the batch {shards} ways (mesh.data*mesh.fsdp), not a multiple of "
                          f"the {pcount} processes; each process must load rows of its own")
    ramp = BatchRamp(t, accum * shards)
    # The learning rate of every step, computed once: an eager jnp op at each log row would wait
    # for the step in flight and cost the loop its one step of lead over the device.
    lr_by_step = np.asarray(lr_schedule(cfg.optim, t.steps)(jnp.arange(t.steps)))

    train_roles = [r.name for r in trained(stage.roles)]
    ckpt = Checkpointer(run_dir / "checkpoints", roles=train_roles, keep=t.keep_checkpoints,
                        async_save=t.async_checkpoint)
    log = runs.MetricsWriter(run_dir, enabled=main)
    seed_key = jax.random.key(t.seed)

    def restore(step):
        params, opt_state, meta = ckpt.restore(step, abstract_state["params"], abstract_state["opt_state"])
        return {"params": params, "opt_state": opt_state,
                "step": jnp.asarray(meta["step"], jnp.int32),
                "skipped": jnp.asarray(meta["skipped"], jnp.int32)}, meta

    latest = ckpt.latest_step()
    counters = {"skipped": 0, "restores": 0, "skipped_examples": 0}
    if latest is not None:
        state, meta = restore(latest)
        step, cursor = meta["step"], meta["cursor"]
        seed_key = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32))
        counters.update({k: meta[k] for k in counters})
        log.event("resume", step=step, cursor=cursor)
    else:
        state = c.init_state(seed_key)
        step, cursor = 0, 0
        for role in trained(stage.roles):
            if role.init_from:
                state["params"][role.name], from_step = role_params(role, seed_key, mesh, cfg.mesh.rules)
                log.event("init_from", role=role.name, run_dir=role.init_from, step=from_step)
    frozen_params = {}
    for role in frozen(stage.roles):  # loaded afresh on every start: a frozen role is never saved
        frozen_params[role.name], from_step = role_params(role, seed_key, mesh, cfg.mesh.rules)
        if role.init_from:
            log.event("init_from", role=role.name, run_dir=role.init_from, step=from_step)
    log.event("start", stage=stage.name, step=step, params=model.param_count(stage.roles[0].model),
              roles={r.name: "trained" if r.trained else "frozen" for r in stage.roles},
              devices=jax.device_count(), processes=pcount, mesh=dict(mesh.shape), **stage.info)

    flops_tok = _flops_per_token(stage.roles, t.seq_len)
    peak = t.peak_tflops * 1e12 or perf.measure_peak_flops()

    saved_steps = {latest}  # steps with a checkpoint already (Orbax refuses to write one twice)

    def save(step, cursor):
        if step in saved_steps:  # e.g. a stop right after a periodic save: that checkpoint is it
            return
        meta = {"step": step, "cursor": cursor, "rng": jax.random.key_data(seed_key).tolist(),
                **counters}
        ckpt.save(step, state["params"], state["opt_state"], meta)
        saved_steps.add(step)

    def evaluate():
        if stage.eval_data is None or t.eval_batches == 0:
            return {}
        B = max(t.batch_size // accum // shards, 1) * shards
        sums = None
        for i in range(t.eval_batches):
            local = stage.eval_data.batch(i * B, B, pidx, pcount)
            m = eval_step(state["params"], frozen_params, sharding.put_batch(mesh, local))
            sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
        return {f"eval_{name}": value for name, value in means(jax.device_get(sums)).items()}

    # One-step-late bookkeeping: `pending` is the last dispatched step's (step, cursor, out, rows).
    guard = Guard(t.spike_factor, t.max_bad_steps)
    window = Window()
    progress = _progress(t.steps, step, enabled=main and t.progress)
    summary: dict = {}

    def handle(done_step, start_cursor, out, seqs) -> bool:
        """Log one finished step (of `seqs` sequences); True if the run must restore its last checkpoint."""
        out = jax.device_get(out)
        loss_sum, loss_count = out["metrics"]["loss"]
        loss = float(loss_sum / max(loss_count, 1))
        ok = bool(out["update_ok"])
        verdict = guard.judge(loss, ok)
        if not ok:
            counters["skipped"] += 1
            log.event("nonfinite", step=done_step, cursor=start_cursor)
        if verdict == "spike":
            log.event("spike", step=done_step, loss=loss, running_mean=guard.loss_mean)
        if ok:  # spikes are logged as they are; non-finite steps only as counts
            window.add(out["metrics"])
        progress.update(1)
        window.seqs += seqs
        if done_step % t.log_every == 0 or done_step == t.steps:
            tok_s = window.seqs * t.seq_len / max(window.seconds(), 1e-9)
            row = {"step": done_step, **window.means(), "grad_norm": float(out["grad_norm"]),
                   **{k: float(v) for k, v in out.items() if k.startswith("grad_norm/")},
                   "lr": float(lr_by_step[done_step - 1]), "tokens_per_s": tok_s, "mfu": flops_tok * tok_s / peak,
                   "skipped": counters["skipped"], "cursor": start_cursor}
            log.scalars(row)
            if "loss" in row:
                progress.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tok_s:.0f}")
            summary.update(row)
            window.reset()
        for hook in step_hooks:
            hook(done_step)
        return guard.must_restore

    def restore_last_good(bad_step):
        """Go back to the last checkpoint, keep the data cursor: the offending batches are skipped."""
        nonlocal state, step
        ckpt.wait()
        latest = ckpt.latest_step()
        if latest is None:
            log.event("restore_failed", bad_step=bad_step, reason="no checkpoint yet")
            guard.reset()
            return
        state, meta = restore(latest)
        counters["restores"] += 1
        counters["skipped_examples"] += cursor - meta["cursor"]
        log.event("restore", bad_step=bad_step, restored_step=latest,
                  skipped_examples=[meta["cursor"], cursor])
        step = meta["step"]
        guard.reset()
        progress.n = step

    # One process: SIGTERM raises here. Several: JAX's preemption sync manager owns SIGTERM and
    # `distributed.preempted` turns True on every process at the same iteration, so all save together.
    old_handler = signal.signal(signal.SIGTERM, _raise_interrupt) if main and pcount == 1 else None
    train_data = Prefetcher(stage.train_data)
    pending = None
    iteration = step  # counts up, never back after a restore: the sync point needs a monotone id
    try:
        while step < t.steps:
            if distributed.preempted(iteration):
                raise _Preempted("SIGTERM (preemption) on some process")
            iteration += 1
            B = ramp(step)
            local = train_data.batch(cursor, B, pidx, pcount)
            batch = sharding.put_batch(mesh, _stack_micro(local, accum), leading=1)
            state, out = train_step(state, frozen_params, batch)
            previous, pending = pending, (step + 1, cursor, out, B)
            step, cursor = step + 1, cursor + B
            if previous is not None and handle(*previous):
                pending = None  # computed from the state being discarded
                restore_last_good(previous[0])
                continue
            if step % t.save_every and step % t.eval_every and step != t.steps:
                continue
            # Never save or evaluate past an unchecked step.
            previous, pending = pending, None
            if handle(*previous):
                restore_last_good(previous[0])
                continue
            if step == t.steps or (step % t.save_every == 0 and guard.bad_run == 0):
                save(step, cursor)  # a save waits for a good step, so a restore never lands on a spike
            if step % t.eval_every == 0 or step == t.steps:
                ev = evaluate()
                if ev:
                    log.scalars({"step": step, **ev})
                    summary.update(ev)
    except (_Interrupted, KeyboardInterrupt) as e:
        log.event("interrupted", step=step, reason=str(e) or "keyboard interrupt")
        # A save is collective: with several processes only an agreed stop may save.
        if (pcount == 1 or isinstance(e, _Preempted)) and (pending is None or not handle(*pending)):
            save(step, cursor)
        raise KeyboardInterrupt from None
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        train_data.close()
        progress.close()
        ckpt.close()
    summary.update(final_step=step, **counters)
    log.event("end", **summary)
    log.close()
    return summary


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
