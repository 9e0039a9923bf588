"""The training loop shared by every stage: the imperative shell around a pure step.

A `Stage` brings the loss and the data; the loop brings everything else: the mesh and
shardings, sharded init or resume, the jitted step (state donated), gradient accumulation
and the batch-size ramp, evaluation, checkpoints, metrics and recovery from bad steps.

Metrics are fetched one step late, so the host never waits for the device between steps.
MFU = (FLOPs per token x tokens/s) / peak FLOP/s, with FLOPs per token from
`jaxlm.perf.flops_per_token`: 6N + 6LTD (causal attention at half).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import distributed, model, perf, sharding
from jaxlm.checkpoint import Checkpointer, restore_params
from jaxlm.config import Config, ConfigError, save_config
from jaxlm.optim import BatchRamp, lr_schedule, make_optimizer
from jaxlm.train.metrics import MetricsWriter
from jaxlm.train.step import init_state, make_eval_step, make_train_step


@dataclasses.dataclass
class Stage:
    """What a training stage brings to the loop.

    `train_data.batch(cursor, global_batch, process_index, process_count)` returns this
    process's rows of the global batch starting at example `cursor` of the stream (numpy
    dict); `eval_data` likewise, or None.
    """

    name: str
    loss_fn: Callable
    normalizer: Callable
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


def state_shardings(mesh, abstract_state, p_shardings, abstract_params):
    """Shard every state leaf like the parameter it mirrors (Adam moments); replicate the rest."""
    by_path = {}
    for path, a in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        by_path[tuple(str(k.key) for k in path)] = a.shape
    shard_by_path = {tuple(str(k.key) for k in path): s
                     for path, s in jax.tree_util.tree_flatten_with_path(p_shardings)[0]}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def pick(path, leaf):
        names = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        for i in range(len(names)):
            if by_path.get(names[i:]) == leaf.shape:
                return shard_by_path[names[i:]]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


@dataclasses.dataclass
class Compiled:
    """The mesh, shardings and jitted functions of a run (shared with `jaxlm bench`)."""

    mesh: Any
    optimizer: Any
    abstract_state: dict  # ShapeDtypeStructs carrying their shardings (restore targets)
    state_shardings: Any
    train_step: Callable  # (state, batch [A, b, ...]) -> (state, metrics); state donated
    eval_step: Callable  # (params, batch [b, ...]) -> metric sums
    init_state: Callable  # key -> sharded state


def compile_stage(cfg: Config, loss_fn: Callable, normalizer: Callable, devices=None) -> Compiled:
    """Mesh, shardings and jitted step functions for a config (nothing is traced yet)."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = cfg.mesh.rules
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    abstract_params = model.abstract_params(cfg.model)
    p_shard = sharding.param_shardings(mesh, rules, abstract_params, model.logical_axes(cfg.model))
    new_state = lambda key: init_state(model.init(cfg.model, key), optimizer)
    abstract_state = jax.eval_shape(new_state, jax.random.key(0))
    s_shard = state_shardings(mesh, abstract_state, p_shard, abstract_params)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_state, s_shard)

    def traced_in_mesh(f):
        def wrapped(*args):
            with sharding.activate(mesh, rules):
                return f(*args)
        return wrapped

    train_step = jax.jit(traced_in_mesh(make_train_step(loss_fn, normalizer, optimizer)),
                         in_shardings=(s_shard, sharding.batch_sharding(mesh, 2, leading=1)),
                         out_shardings=(s_shard, None), donate_argnums=0)
    eval_step = jax.jit(traced_in_mesh(make_eval_step(loss_fn)),
                        in_shardings=(p_shard, sharding.batch_sharding(mesh, 2)))
    init_fn = jax.jit(traced_in_mesh(new_state), out_shardings=s_shard)
    return Compiled(mesh, optimizer, abstract_state, s_shard, train_step, eval_step, init_fn)


def run(cfg: Config, stage: Stage) -> dict:
    """Train `stage` under `cfg`; resume from RUN_DIR's latest checkpoint if there is one."""
    t = cfg.train
    run_dir = Path(t.run_dir)
    main = jax.process_index() == 0
    pidx, pcount = jax.process_index(), jax.process_count()
    c = compile_stage(cfg, stage.loss_fn, stage.normalizer)
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

    ckpt = Checkpointer(run_dir / "checkpoints", keep=t.keep_checkpoints, async_save=t.async_checkpoint)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    log = MetricsWriter(run_dir, enabled=main)
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
        if t.init_from:
            params, from_step = restore_params(t.init_from, abstract_state["params"])
            state["params"] = params
            log.event("init_from", run_dir=t.init_from, step=from_step)
    log.event("start", stage=stage.name, step=step, params=model.param_count(cfg.model),
              devices=jax.device_count(), processes=pcount, mesh=dict(mesh.shape), **stage.info)

    flops_tok = perf.flops_per_token(cfg.model, t.seq_len)
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
            m = eval_step(state["params"], sharding.put_batch(mesh, local))
            sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
        sums = jax.device_get(sums)
        return {"eval_loss": float(sums["loss_sum"] / max(sums["tokens"], 1)),
                "eval_tokens": float(sums["tokens"])}

    # One-step-late bookkeeping: `pending` is the last dispatched step's (step, cursor, metrics).
    loss_mean: Optional[float] = None
    bad_run = 0
    window = {"loss_sum": 0.0, "tokens": 0.0, "correct": 0.0, "t0": time.perf_counter(),
              "seqs": 0}
    fault_step = int(os.environ.get("JAXLM_FAULT_KILL_AT_STEP", "0"))
    fault_signal = getattr(signal, "SIG" + os.environ.get("JAXLM_FAULT_SIGNAL", "KILL"))
    progress = _progress(t.steps, step, enabled=main and t.progress)
    summary: dict = {}

    def handle(done_step, start_cursor, metrics, seqs) -> bool:
        """Log one finished step (of `seqs` sequences); True if the run must restore its last checkpoint."""
        nonlocal loss_mean, bad_run
        m = jax.device_get(metrics)
        loss = float(m["loss_sum"] / max(m["tokens"], 1))
        ok = bool(m["update_ok"])
        spike = (ok and t.spike_factor and loss_mean is not None and loss > t.spike_factor * loss_mean)
        if not ok:
            counters["skipped"] += 1
            log.event("nonfinite", step=done_step, cursor=start_cursor)
        if spike:
            log.event("spike", step=done_step, loss=loss, running_mean=loss_mean)
        if ok:  # spikes are logged as they are; non-finite steps only as counts
            for k in ("loss_sum", "tokens", "correct"):
                window[k] += float(m[k])
        if ok and not spike:
            bad_run = 0
            loss_mean = loss if loss_mean is None else 0.9 * loss_mean + 0.1 * loss
        else:
            bad_run += 1
        progress.update(1)
        window["seqs"] += seqs
        if done_step % t.log_every == 0 or done_step == t.steps:
            dt = time.perf_counter() - window["t0"]
            tok_s = window["seqs"] * t.seq_len / max(dt, 1e-9)
            row = {"step": done_step, "loss": window["loss_sum"] / max(window["tokens"], 1),
                   "accuracy": window["correct"] / max(window["tokens"], 1),
                   "grad_norm": float(m["grad_norm"]), "lr": float(lr_by_step[done_step - 1]),
                   "tokens_per_s": tok_s, "mfu": flops_tok * tok_s / peak,
                   "skipped": counters["skipped"], "cursor": start_cursor}
            log.scalars(row)
            progress.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tok_s:.0f}")
            summary.update(row)
            window.update(loss_sum=0.0, tokens=0.0, correct=0.0, seqs=0, t0=time.perf_counter())
        if fault_step and done_step == fault_step:
            os.kill(os.getpid(), fault_signal)  # fault injection for the resume tests (KILL or TERM)
        return bad_run >= t.max_bad_steps

    def restore_last_good(bad_step):
        """Go back to the last checkpoint, keep the data cursor: the offending batches are skipped."""
        nonlocal state, step, bad_run
        ckpt.wait()
        latest = ckpt.latest_step()
        if latest is None:
            log.event("restore_failed", bad_step=bad_step, reason="no checkpoint yet")
            bad_run = 0
            return
        state, meta = restore(latest)
        counters["restores"] += 1
        counters["skipped_examples"] += cursor - meta["cursor"]
        log.event("restore", bad_step=bad_step, restored_step=latest,
                  skipped_examples=[meta["cursor"], cursor])
        step, bad_run = meta["step"], 0
        progress.n = step

    # One process: SIGTERM raises here. Several: JAX's preemption sync manager owns SIGTERM and
    # `distributed.preempted` turns True on every process at the same iteration, so all save together.
    old_handler = signal.signal(signal.SIGTERM, _raise_interrupt) if main and pcount == 1 else None
    pending = None
    iteration = step  # counts up, never back after a restore: the sync point needs a monotone id
    try:
        while step < t.steps:
            if distributed.preempted(iteration):
                raise _Preempted("SIGTERM (preemption) on some process")
            iteration += 1
            B = ramp(step)
            local = stage.train_data.batch(cursor, B, pidx, pcount)
            batch = sharding.put_batch(mesh, _stack_micro(local, accum), leading=1)
            state, metrics = train_step(state, batch)
            previous, pending = pending, (step + 1, cursor, metrics, B)
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
            if step == t.steps or (step % t.save_every == 0 and bad_run == 0):
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
        progress.close()
        ckpt.close()
    summary.update(final_step=step, **counters)
    log.event("end", **summary)
    log.close()
    return summary


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
