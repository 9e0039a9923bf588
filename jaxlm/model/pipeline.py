"""Pipeline parallelism: the stacked layers split into stages over the mesh's "stage" axis, the
batch into microbatches that flow through them.

Written as one SPMD program (the scan-over-stages pattern of GSPMD, Xu et al. 2021, and
MaxText): the activations of all stages are one array [S, mb, T, D] whose leading axis lies on
"stage"; each iteration every stage runs its layers on its slot at once (`jax.vmap` over the stage
axis with `spmd_axis_name`, so each device computes only its own stage), then the slots shift one
stage on (`jnp.roll`, a collective permute between neighbouring stages) and stage 0 takes the next
microbatch. Autodiff of the iteration scan is the backward pipeline.

Schedules. GPipe (repeats R = 1): stage s holds layers [s L/S, (s+1) L/S); M microbatches take
M + S - 1 iterations of L/S layers, so each stage idles (S - 1) / (M + S - 1) of the time (the
bubble). Circular (R > 1, Narayanan et al. 2021's interleaving): stage s holds R chunks of L/(S R)
layers, chunk r being layers [(r S + s) L/(S R), ...); each microbatch goes round the stages R
times, R M + S - 1 iterations of L/(S R) layers, bubble (S - 1) / (R M + S - 1); it needs M >= S
(a microbatch's output comes back to stage 0 before its next round). The circular layout is not
the contiguous one the params are stored in: each step regathers the layers (an all-to-all of the
layer params over "stage").

What runs per stage is `layer(x, params, args)` of `jaxlm.model.transformer.run_stack`; `args`
(RoPE tables, masks) whose leading axis is the batch are split into microbatches with x, each stage
taking its own microbatch's. The embedding, the head and the loss run outside, on every stage's
devices alike.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

STAGE = "stage"


class Schedule(NamedTuple):
    """The pipeline: `stages` S (the mesh's "stage" size), `microbatches` M, `repeats` R (1: GPipe;
    more: circular)."""

    stages: int
    microbatches: int
    repeats: int = 1

    @property
    def iterations(self) -> int:
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def bubble(self) -> float:
        """The fraction of each stage's time spent idle: (S - 1) / (R M + S - 1)."""
        return (self.stages - 1) / self.iterations


def check(schedule: Schedule, n_layers: int, batch: int) -> None:
    """ValueError unless the layers and the batch split as the schedule needs."""
    S, M, R = schedule
    if n_layers % (S * R):
        raise ValueError(f"{n_layers} layers do not split into {S} stages x {R} repeats; the layer count must be "
                         f"a multiple of {S * R}")
    if batch % M:
        raise ValueError(f"a batch of {batch} rows does not split into {M} microbatches")
    if R > 1 and M < S:
        raise ValueError(f"the circular schedule needs at least as many microbatches as stages; got {M} < {S}")


def _split(a, M: int):
    """[B, ...] -> [M, B/M, ...]: microbatch m holds rows m, m + M, m + 2M, ... (so each keeps the
    batch's split over the data axes)."""
    return a.reshape(a.shape[0] // M, M, *a.shape[1:]).swapaxes(0, 1)


def _join(a):
    return a.swapaxes(0, 1).reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def _on_stage(mesh, a, axis: int):
    spec = [P.UNCONSTRAINED] * a.ndim
    spec[axis] = STAGE
    return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P(*spec)))


def run(layer: Callable, layer_params, x_BTD, args, *, mesh, schedule: Schedule, remat=None):
    """x_BTD through the stacked layers (`layer_params`, leading axis L) as a pipeline of
    `schedule` over `mesh`'s "stage" axis: the same result as running the layers in order.

    layer(x, one layer's params, args) -> x. remat: a `jax.checkpoint` policy for each stage's
    run of its layers per iteration (None: none).
    """
    S, M, R = schedule
    B = x_BTD.shape[0]
    L = jax.tree.leaves(layer_params)[0].shape[0]
    check(schedule, L, B)
    staged = jax.tree.map(lambda a: _on_stage(mesh, a.reshape(R, S, L // (S * R), *a.shape[1:]), 1), layer_params)
    leaves, treedef = jax.tree.flatten(args)
    batched = [hasattr(a, "shape") and a.ndim > 0 and a.shape[0] == B for a in leaves]
    args_M = [_split(a, M) for a, b in zip(leaves, batched) if b]

    def stage(x, params_R, r, m, *args_M):
        """One stage's layers of repeat r on its slot x, with microbatch m's args."""
        mine = iter(jax.lax.dynamic_index_in_dim(a, m, keepdims=False) for a in args_M)
        stage_args = jax.tree.unflatten(treedef, [next(mine) if b else a for a, b in zip(leaves, batched)])
        params = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, r, keepdims=False), params_R)
        return jax.lax.scan(lambda x, p: (layer(x, p, stage_args), None), x, params)[0]

    if remat is not None:
        stage = jax.checkpoint(stage, policy=remat, prevent_cse=False)
    stages = jax.vmap(stage, in_axes=(0, 1, 0, 0) + (None,) * len(args_M), spmd_axis_name=STAGE)
    xs_M = _split(x_BTD, M)
    first_S = (jnp.arange(S) == 0)[:, None, None, None]

    def iteration(carry, t):
        slots, done_M = carry  # slots: each stage's output of the last iteration; done_M: last stage's
        fresh = jnp.where(t < M, xs_M[t % M], done_M[t % M])  # a new microbatch, or one coming round
        slots = _on_stage(mesh, jnp.where(first_S, fresh[None], jnp.roll(slots, 1, axis=0)), 0)
        start_S = t - jnp.arange(S)  # the iteration each stage's microbatch entered stage 0
        slots = stages(slots, staged, jnp.clip(start_S // M, 0, R - 1), start_S % M, *args_M)
        out = t - (S - 1)  # the last stage finished the microbatch that entered at `out`
        kept = jnp.where(out >= 0, slots[S - 1], done_M[out % M])
        return (slots, done_M.at[out % M].set(kept)), None

    init = (jnp.zeros((S, *xs_M.shape[1:]), x_BTD.dtype), jnp.zeros_like(xs_M))
    (_, done_M), _ = jax.lax.scan(iteration, init, jnp.arange(schedule.iterations))
    return _join(done_M)
