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

import collections
import dataclasses
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import checkpoint, distributed, model, perf, runs, sharding
from jaxlm.checkpoint import Checkpointer, CheckpointCorrupt, NonFiniteState
from jaxlm.config import Config, ConfigError
from jaxlm.data.prefetch import Prefetcher
from jaxlm.errors import RunFailed
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


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal, at a step boundary. `saved`: the step saved there, or None when
    it was not (a bad step pending, or a state that is not finite); `latest`: the newest checkpoint
    (None: there is none); `code`: the exit status a requeue script reads, 128 + the signal (143 for
    SIGTERM, 130 for SIGINT)."""

    def __init__(self, signum: int, saved: Optional[int] = None, latest: Optional[int] = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.code = signum, 128 + signum
        self.saved, self.latest = saved, latest


def _stack_micro(local: dict, accum: int) -> dict:
    """[b, ...] -> [A, b/A, ...] so the step scans over micro-batches."""
    return {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in local.items()}


def _flops_per_token(roles, seq_len: int) -> float:
    return sum(perf.flops_per_token(r.model, seq_len) * (1.0 if r.trained else 1 / 3) for r in roles)


def restore_newest(ckpt: Checkpointer, abstract_state: dict, log) -> tuple[Optional[dict], Optional[dict]]:
    """(state, meta) of the newest checkpoint that reads back intact ((None, None) if there is none);
    a checkpoint whose files are damaged is set aside (logged), and the next older tried. One of
    another layout, or that fails to read for another reason, stops the run (ConfigError,
    RunFailed) and is kept."""
    steps = ckpt.all_steps()
    set_aside = sorted(p.name for p in ckpt.directory.glob("*.broken*"))
    if not steps and set_aside:  # never start over where checkpoints were
        raise RunFailed(f"{ckpt.directory} holds no intact checkpoint, only ones set aside as damaged "
                        f"({', '.join(set_aside)}); rename one back to retry it, or remove them to start over")
    for i, s in reversed(list(enumerate(steps))):
        try:
            params, opt_state, meta = ckpt.restore(s, abstract_state["params"], abstract_state["opt_state"])
        except CheckpointCorrupt as e:
            moved = ckpt.set_aside(s)
            log.event("set_aside", step=s, reason=str(e), moved_to=moved.name, instead=steps[i - 1] if i else "none")
            continue
        # The updates applied, not the loop step: steps whose update was dropped do not count.
        state = {"params": params, "opt_state": opt_state,
                 "step": jnp.asarray(meta.get("updates", meta["step"]), jnp.int32),
                 "skipped": jnp.asarray(meta["skipped"], jnp.int32)}
        return state, meta
    if steps:
        raise RunFailed(f"no checkpoint in {ckpt.directory} could be read (set aside as STEP.broken: "
                        f"{', '.join(map(str, steps))}); rename one back to retry it, or remove them to start over")
    return None, None


def catch_stop_signals(enabled: bool = True):
    """(stop, release): from now on SIGTERM and SIGINT only append their number to the list `stop`,
    for the caller to stop at its next step boundary and save there; a second SIGINT raises
    KeyboardInterrupt at once, without the save. `release()` puts the old handlers back. Handlers are
    set only when `enabled` and in the main thread (where Python allows them)."""
    stop: list[int] = []

    def on_signal(signum, frame):
        if stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.append(signum)

    in_main_thread = threading.current_thread() is threading.main_thread()
    handled = (signal.SIGTERM, signal.SIGINT) if enabled and in_main_thread else ()
    old = {s: signal.signal(s, on_signal) for s in handled}

    def release():
        for s, h in old.items():
            signal.signal(s, h)

    return stop, release


def run(cfg: Config, stage: Stage, devices=None) -> dict:
    """Train `stage` under `cfg` (on `devices`, default all); resume from RUN_DIR's latest
    checkpoint if there is one. Returns the summary: the last logged row, the last evaluation,
    the final step and the run's counters."""
    t = cfg.train
    main = jax.process_index() == 0
    pcount = jax.process_count()
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
    slot, slots = sharding.batch_slot(mesh)  # processes holding the same rows (pipeline stages) share a slot
    if t.batch_size % (accum * shards) or (t.batch_size // accum) % slots:
        raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of train.grad_accum_steps "
                          f"({accum}) x the batch shards of the mesh ({shards})")
    if shards % slots:
        raise ConfigError(f"the mesh splits the batch {shards} ways (mesh.data*mesh.fsdp), not a multiple of "
                          f"the {slots} processes; each process must load rows of its own")
    ramp = BatchRamp(t, accum * shards)
    # The learning rate of every step, computed once: an eager jnp op at each log row would wait
    # for the step in flight and cost the loop its one step of lead over the device.
    lr_by_step = np.asarray(lr_schedule(cfg.optim, t.steps)(jnp.arange(t.steps)))

    train_roles = [r.name for r in trained(stage.roles)]
    ckpt = Checkpointer(run_dir / "checkpoints", roles=train_roles, keep=t.keep_checkpoints,
                        async_save=t.async_checkpoint)
    log = runs.MetricsWriter(run_dir, enabled=main, cfg=cfg)
    seed_key = jax.random.key(t.seed)
    counters = {"skipped": 0, "restores": 0, "skipped_examples": 0}
    restores_of: collections.Counter = collections.Counter()  # restores of each checkpoint step
    guard = Guard(t.spike_factor, t.max_bad_steps)

    state, meta = restore_newest(ckpt, abstract_state, log)
    saved_steps = set(ckpt.all_steps())  # Orbax refuses to write a step twice (those set aside are gone)
    if meta is not None:
        step, cursor = meta["step"], meta["cursor"]
        seed_key = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32))
        counters.update({k: meta[k] for k in counters})
        if "guard" in meta:
            guard.load(meta["guard"])
        restores_of.update({int(k): v for k, v in meta.get("restores_of", {}).items()})
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
    n_params = model.param_count(stage.roles[0].model)
    log.event("start", stage=stage.name, step=step, params=n_params,
              roles={r.name: "trained" if r.trained else "frozen" for r in stage.roles},
              devices=jax.device_count(), processes=pcount, mesh=dict(mesh.shape), **stage.info)
    if main and t.progress:
        mesh_text = " ".join(f"{k}={v}" for k, v in mesh.shape.items())
        n_dev = jax.device_count()
        print(f"[jaxlm] {stage.name}: {n_params / 1e6:.1f}M parameters; {n_dev} {jax.devices()[0].platform} "
              f"device{'s' * (n_dev > 1)} (mesh {mesh_text}); {t.steps} steps of {t.batch_size} x "
              f"{t.seq_len} tokens; run directory {run_dir}" + (f"; resuming at step {step}" if step else ""),
              flush=True)

    flops_tok = _flops_per_token(stage.roles, t.seq_len)
    peak = t.peak_tflops * 1e12 or perf.peak_flops()
    counted_until = cursor  # examples before this cursor are counted as skipped already (or trained)

    def save(step, cursor) -> bool:
        """Save the state at `step` unless it is saved already; False if it is not finite."""
        if step in saved_steps:  # e.g. a stop right after a periodic save: that checkpoint is it
            return True
        meta = {"step": step, "updates": int(jax.device_get(state["step"])), "cursor": cursor,
                "rng": jax.random.key_data(seed_key).tolist(), **counters, "guard": guard.state(),
                "restores_of": {str(k): v for k, v in restores_of.items()}}
        try:
            ckpt.save(step, state["params"], state["opt_state"], meta)
        except NonFiniteState as e:
            log.event("not_saved", step=step, reason=str(e))
            return False
        saved_steps.add(step)
        return True

    def evaluate():
        if stage.eval_data is None or t.eval_batches == 0:
            return {}
        B = max(t.batch_size // accum // shards, 1) * shards
        sums = None
        for i in range(t.eval_batches):
            local = stage.eval_data.batch(i * B, B, slot, slots)
            m = eval_step(state["params"], frozen_params, sharding.put_batch(mesh, local))
            sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
        return {f"eval_{name}": value for name, value in means(jax.device_get(sums)).items()}

    # One-step-late bookkeeping: `pending` is the last dispatched step's (step, cursor, out, rows).
    window = Window()
    progress = _progress(t.steps, step, enabled=main and t.progress)
    plain_every = max(t.steps // 10, t.log_every)  # without the bar: a line per tenth of the run
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
            row = {"step": done_step, **window.means(out["metrics"]), "grad_norm": float(out["grad_norm"]),
                   **{k: float(v) for k, v in out.items() if k.startswith("grad_norm/")},
                   "lr": float(lr_by_step[done_step - 1]), "tokens_per_s": tok_s, "mfu": flops_tok * tok_s / peak,
                   "skipped": counters["skipped"], "cursor": start_cursor}
            log.scalars(row)
            if row.get("loss") is not None:
                progress.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tok_s:.0f}")
            if progress.disable and main and t.progress and (done_step % plain_every == 0 or done_step == t.steps):
                print(f"[jaxlm] step {done_step}/{t.steps}: loss {row.get('loss') or float('nan'):.3f}, "
                      f"{tok_s:.0f} tokens/s", flush=True)  # the bar's plain form, where it would flood a log
            summary.update(row)
            window.reset()
        for hook in step_hooks:
            hook(done_step)
        return guard.must_restore

    def check_learned():
        """RunFailed if no update was applied: nothing to save, nothing learned."""
        if int(jax.device_get(state["step"])) == 0:
            raise RunFailed(f"no step of the run was finite ({counters['skipped']} skipped): nothing was learned "
                            "and nothing saved; lower optim.lr and check the data")

    def restore_last_good(bad_step):
        """Go back to the newest good checkpoint, keep the data cursor: the offending batches are
        skipped. Restores of one checkpoint, and in all, are bounded: past them the run stops."""
        nonlocal state, step, counted_until
        ckpt.wait()
        ckpt.check()
        restored, meta = restore_newest(ckpt, abstract_state, log)
        if meta is not None:
            state = restored
        saved_steps.intersection_update(ckpt.all_steps())  # so a save passing a step set aside writes it
        back_to = 0 if meta is None else meta["step"]  # 0: no checkpoint, only the initial state
        restores_of[back_to] += 1
        if restores_of[back_to] > t.max_restores_per_step:
            where = f"checkpoint {back_to}" if meta is not None else "the start (there is no checkpoint yet)"
            raise RunFailed(f"training diverges: bad steps followed {where} {restores_of[back_to]} times (the last "
                            f"at step {bad_step}, train.max_restores_per_step={t.max_restores_per_step}); lower "
                            "optim.lr, raise optim.warmup_steps or train.spike_factor")
        if meta is None:
            log.event("restore_failed", bad_step=bad_step, reason="no checkpoint yet")
            guard.reset()
            return
        counters["restores"] += 1
        if counters["restores"] > t.max_restores:
            raise RunFailed(f"training keeps going bad: {counters['restores']} restores (train.max_restores="
                            f"{t.max_restores}), the last to checkpoint {back_to} after step {bad_step}")
        counters["skipped_examples"] += cursor - max(meta["cursor"], counted_until)
        counted_until = cursor
        log.event("restore", bad_step=bad_step, restored_step=back_to, skipped_examples=[meta["cursor"], cursor],
                  skipped_total=counters["skipped_examples"])
        step = meta["step"]
        guard.reset()
        progress.n = step

    # A signal only sets a flag; the loop stops at the next step boundary and saves there, never
    # inside a save. With several processes JAX's preemption sync manager owns SIGTERM and
    # `distributed.preempted` turns True on every process at the same iteration: all save together.
    stop, release_signals = catch_stop_signals(pcount == 1)
    # Several processes: if one dies, the others leave within distributed.peer_timeout_s.
    peers = distributed.watch_peers(run_dir, cfg.distributed.peer_timeout_s)
    train_data = Prefetcher(stage.train_data)
    pending, finished, interrupted = None, False, None
    iteration = step  # counts up, never back after a restore: the sync point needs a monotone id
    try:
        while step < t.steps:
            if distributed.preempted(iteration) and not stop:
                stop.append(signal.SIGTERM)
            if stop:
                break
            iteration += 1
            ckpt.check()  # a save that failed in the background stops the run now, not a save later
            B = ramp(step)
            local = train_data.batch(cursor, B, slot, slots)
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
            if step == t.steps:
                check_learned()  # before any save: a rerun must not resume an untrained state as done
            if step % t.save_every == 0 and guard.bad_run == 0:
                save(step, cursor)  # a save waits for a good step, so a restore never lands on a spike
            if step == t.steps and not save(step, cursor):
                raise RunFailed(f"the final state (step {step}) is not finite and was not saved; the latest "
                                f"checkpoint is {ckpt.latest_step()}")
            if step % t.eval_every == 0 or step == t.steps:
                ev = evaluate()
                if ev:
                    log.scalars({"step": step, **ev})
                    summary.update(ev)
                    if main and t.progress:
                        _say(progress, f"[jaxlm] step {step}: held-out " + ", ".join(
                            f"{k[5:]} {v:.4g}" for k, v in ev.items() if isinstance(v, float)))
        if stop:
            log.event("interrupted", step=step, signal=signal.Signals(stop[0]).name)
            if pending is not None:
                handle(*pending)  # its row is logged
            # As for a periodic save: never a state right after a bad step (a spike, a dropped update).
            saved = step if guard.bad_run == 0 and save(step, cursor) else None
            ckpt.wait()
            ckpt.check()
            interrupted = Interrupted(stop[0], saved, ckpt.latest_step())
            raise interrupted
        ckpt.wait()
        ckpt.check()
        check_learned()  # a run resumed at its last step
        finished = True
    finally:
        release_signals()
        if peers is not None:  # the others skip a process that is done, and leave when one failed
            peers.close(failed=not finished and interrupted is None)
        train_data.close()
        progress.close()
        try:
            ckpt.close()
        except Exception:  # a failed background save: reported by `check` above, or the error in flight
            pass
        if not finished:
            log.close()  # on the way out with an error; a finished run logs its end first
    summary.update(final_step=step, **counters)
    log.event("end", **summary)
    log.close()
    return summary


def _progress(total: int, initial: int, enabled: bool):
    """A progress bar on a terminal; none (disabled) where stderr is a file, which it would flood."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not (enabled and sys.stderr.isatty()), unit="step",
                dynamic_ncols=True)


def _say(progress, text: str) -> None:
    """A line above the progress bar (or plain, without one)."""
    if progress.disable:
        print(text, flush=True)
    else:
        progress.write(text)
