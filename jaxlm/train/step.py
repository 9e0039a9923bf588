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


def make_train_step(objective: Objective, optimizers: dict):
    """step(state, frozen, batch) -> (state, out); batch arrays are [A, b, ...] (A micro-batches).

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
            return grads, metrics

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
            updates, new["opt_state"][role] = optimizer.update(grads[role], state["opt_state"][role], params[role])
            new["params"][role] = optax.apply_updates(params[role], updates)
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
