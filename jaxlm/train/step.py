"""The generic train and eval steps: pure functions of (state, frozen params, batch), jitted by the loop.

A stage supplies an `Objective`: `loss(params, frozen, micro_batch) -> (loss_sum, metrics)`,
where `params` and `frozen` map role names to param trees, `loss_sum` adds over examples and
`metrics` is `{name: (sum, count)}`; and `count(batch)`, the global count that `loss_sum` is
divided by (e.g. the number of target tokens). Because the gradient is taken of
`loss_sum / count(whole batch)` for every micro-batch, the accumulated gradient equals the
gradient of one big batch, and a sharded batch gives the same numbers as an unsharded one.
Only `params` (the trained roles) are differentiated; `frozen` (reference, reward) never is.

The state is a dict: `params` and `opt_state` ({role: ...} for the trained roles), and int32
counters `step` (updates applied) and `skipped` (updates dropped because the loss or gradient
was not finite). Each trained role has its own optimizer.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[dict, dict, dict], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a stage's step computes (module docstring). `metrics` must include "loss"."""

    loss: LossFn
    count: Callable[[dict], jax.Array]


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def init_state(params: dict, optimizers: dict) -> dict:
    """The train state of `params` ({role: tree}) under `optimizers` ({role: optax transform})."""
    return {"params": params, "opt_state": {r: optimizers[r].init(p) for r, p in params.items()},
            "step": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32)}


def _constrain(tree, shardings):
    """`tree` pinned to `shardings` (same tree, or None: left to XLA)."""
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


def make_train_step(objective: Objective, optimizers: dict, grad_shardings=None, update_shardings=None):
    """step(state, frozen, batch) -> (state, out); batch arrays are [A, b, ...] (A micro-batches).

    `grad_shardings` ({role: tree}, or None: XLA's choice) is where each micro-batch's gradients
    are reduced to: whole (an all-reduce: dp, zero1) or split like the optimizer state (a
    reduce-scatter: zero2, fsdp); their sum over micro-batches is XLA's to place. `update_shardings`
    is where the optimizer update runs: the optimizer state's layout, from which the out-shardings
    all-gather the params back (zero1, zero2).

    out: {"metrics": {name: (sum, count)}, "grad_norm", "update_ok"}, plus "grad_norm/ROLE" per
    trained role when there are several.
    """

    def step(state, frozen, batch):
        params = state["params"]
        total = jnp.maximum(objective.count(batch).astype(jnp.float32), 1.0)

        def grads_of(mb):
            def scaled(p):
                loss_sum, metrics = objective.loss(p, frozen, mb)
                return loss_sum / total, metrics

            (_, metrics), grads = jax.value_and_grad(scaled, has_aux=True)(params)
            return _constrain(grads, grad_shardings), metrics

        A = jax.tree.leaves(batch)[0].shape[0]
        if A == 1:
            grads, metrics = grads_of(jax.tree.map(lambda x: x[0], batch))
        else:
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(grads_of, jax.tree.map(lambda x: x[0], batch)))
            (grads, metrics), _ = jax.lax.scan(lambda c, mb: (_add(c, grads_of(mb)), None), zeros, batch)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss"][0])
        new = {"params": {}, "opt_state": {}}
        for role, optimizer in optimizers.items():
            at = None if update_shardings is None else update_shardings[role]
            g, p = _constrain(grads[role], at), _constrain(params[role], at)
            updates, new["opt_state"][role] = optimizer.update(g, state["opt_state"][role], p)
            new["params"][role] = optax.apply_updates(p, updates)
        # A non-finite loss or gradient leaves params and optimizer state as they were.
        new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new,
                           {"params": params, "opt_state": state["opt_state"]})
        new["step"] = state["step"] + ok.astype(jnp.int32)
        new["skipped"] = state["skipped"] + (~ok).astype(jnp.int32)
        out = {"metrics": metrics, "grad_norm": grad_norm, "update_ok": ok.astype(jnp.float32)}
        if len(grads) > 1:
            out.update({f"grad_norm/{role}": optax.tree.norm(g) for role, g in grads.items()})
        return new, out

    return step


def make_eval_step(objective: Objective):
    """eval(params, frozen, batch) -> {name: (sum, count)} for one (unaccumulated) batch."""

    def evaluate(params, frozen, batch):
        return objective.loss(params, frozen, batch)[1]

    return evaluate
