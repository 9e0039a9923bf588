"""A stage's models as named roles, the train state they make, its shardings and the jitted steps.

A role is one model of a stage. Trained roles (`policy`, `value`) have params and an optimizer
state in the train state, which the jitted step takes and donates. Frozen roles (`reference`,
`reward`) have params only: the step takes them beside the state, never donated, never
differentiated. Each role has its own `ModelConfig` and starts from a run directory
(`init_from`, any role of that run) or from a fresh init with the run's seed; a role whose
model has a value head starts it fresh when the run it comes from has none (a reward model or
critic from an LM run).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax

from jaxlm import model, runs, sharding
from jaxlm.checkpoint import check_step, param_names, restore_params
from jaxlm.model import pipeline
from jaxlm.model.transformer import value_head_init
from jaxlm.config import Config, ConfigError, ModelConfig, OptimConfig, pipeline_microbatches
from jaxlm.optim import make_optimizer
from jaxlm.train.step import Objective, init_state, make_eval_step, make_train_step

ROLE_NAMES = ("policy", "value", "reference", "reward")


@dataclasses.dataclass(frozen=True)
class Role:
    name: str  # one of ROLE_NAMES
    model: ModelConfig
    trained: bool = True
    init_from: str = ""  # a run directory to start from; "": a fresh init from train.seed
    init_role: str = ""  # which role of that run: ""=its policy (or its only role)
    init_from_key: str = "train.init_from"  # the config key init_from came from, for errors
    optim: Optional[OptimConfig] = None  # trained roles: None is the config's `optim`

    def __post_init__(self):
        if self.name not in ROLE_NAMES:
            raise ConfigError(f"role {self.name!r} is not a role; allowed: {', '.join(ROLE_NAMES)}")


def trained(roles: Sequence[Role]) -> list[Role]:
    return [r for r in roles if r.trained]


def frozen(roles: Sequence[Role]) -> list[Role]:
    return [r for r in roles if not r.trained]


def state_shardings(mesh, abstract_state, p_shardings, abstract_params):
    """Shard every state leaf like the parameter it mirrors (`p_shardings`: for the optimizer state,
    `sharding.optimizer_shardings`); replicate the rest (counters, Adafactor's factored moments)."""
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


def _with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


@dataclasses.dataclass
class Compiled:
    """The mesh, shardings and jitted functions of a stage (shared with `jaxlm bench`)."""

    mesh: Any
    roles: tuple[Role, ...]
    optimizers: dict  # {trained role: optax transform}
    abstract_state: dict  # ShapeDtypeStructs carrying their shardings (restore targets)
    state_shardings: Any
    abstract_frozen: dict  # {frozen role: ShapeDtypeStructs with shardings}
    train_step: Callable  # (state, frozen, batch [A, b, ...]) -> (state, out); state donated
    eval_step: Callable  # (params, frozen, batch [b, ...]) -> {name: (sum, count)}
    init_state: Callable  # key -> sharded state (every trained role freshly initialised)


def compile_stage(cfg: Config, roles: Sequence[Role], objective: Objective, devices=None) -> Compiled:
    """Mesh, shardings and jitted step functions for a stage's roles (nothing is traced yet)."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = cfg.mesh.rules
    train_roles = trained(roles)
    if not train_roles:
        raise ConfigError("a stage needs at least one trained role")
    optimizers = {r.name: make_optimizer(r.optim or cfg.optim, cfg.train.steps) for r in train_roles}
    for r in train_roles:
        warmup, steps = (r.optim or cfg.optim).warmup_steps, cfg.train.steps
        if warmup > steps and jax.process_index() == 0:
            print(f"note: optim.warmup_steps={warmup} is more than the {steps} optimizer steps of this run: "
                  f"the learning rate of {r.name} rises to {steps / warmup:.0%} of its peak and never decays",
                  file=sys.stderr)
    abstract_params = {r.name: model.abstract_params(r.model) for r in train_roles}
    p_shard = {r.name: model.shardings(r.model, mesh, rules) for r in train_roles}
    new_state = lambda key: init_state({r.name: model.init(r.model, key) for r in train_roles}, optimizers)
    abstract_state = jax.eval_shape(new_state, jax.random.key(0))
    # ZeRO: the optimizer state (zero1, zero2) and the gradients (zero2) split apart from the params
    o_shard = {r: sharding.optimizer_shardings(mesh, rules, abstract_params[r], p_shard[r]) for r in p_shard}
    # pinned under the ZeRO presets only: elsewhere XLA's placement stands (and so do the numerics)
    zero = sharding.ZERO.get(rules, 0)
    g_shard = (o_shard if zero >= 2 else p_shard) if zero else None
    s_shard = {**state_shardings(mesh, abstract_state, p_shard, abstract_params),
               "opt_state": state_shardings(mesh, abstract_state["opt_state"], o_shard, abstract_params)}
    abstract_state = _with_shardings(abstract_state, s_shard)
    abstract_frozen = {r.name: model.abstract_params(r.model, mesh, rules) for r in frozen(roles)}
    f_shard = jax.tree.map(lambda a: a.sharding, abstract_frozen)

    schedule = pipeline.Schedule(cfg.mesh.stage, pipeline_microbatches(cfg), cfg.mesh.repeats)

    def traced_in_mesh(f):
        def wrapped(*args):
            with sharding.activate(mesh, rules, schedule):
                return f(*args)
        return wrapped

    train_step = jax.jit(traced_in_mesh(make_train_step(objective, optimizers, g_shard, o_shard if zero else None)),
                         in_shardings=(s_shard, f_shard, sharding.batch_sharding(mesh, 2, leading=1)),
                         out_shardings=(s_shard, None), donate_argnums=0)
    eval_step = jax.jit(traced_in_mesh(make_eval_step(objective)),
                        in_shardings=(s_shard["params"], f_shard, sharding.batch_sharding(mesh, 2)))
    init_fn = jax.jit(traced_in_mesh(new_state), out_shardings=s_shard)
    return Compiled(mesh, tuple(roles), optimizers, abstract_state, s_shard, abstract_frozen, train_step,
                    eval_step, init_fn)


def role_params(role: Role, seed_key, mesh, rules: str):
    """(params, source step or None): a role's starting params, sharded on `mesh` by `rules`: its
    `init_from` run's params (a value head it lacks freshly initialised), or a fresh init from
    `seed_key`."""
    if not role.init_from:
        return model.init_sharded(role.model, seed_key, mesh, rules), None
    what = role.init_from_key
    step = check_step(role.init_from, None, what)
    init_role = role.init_role or runs.primary_role(role.init_from, step)
    # a reward run's config does not say it has a value head (its stage adds one): its checkpoint does
    held = Path(role.init_from).absolute() / "checkpoints" / str(step) / init_role
    source = dataclasses.replace(role.model, value_head=held.is_dir() and "value_head" in param_names(
        role.init_from, step, init_role))
    params, step = restore_params(role.init_from, model.abstract_params(source, mesh, rules), step, role=init_role,
                                  what=what)
    if role.model.value_head and not source.value_head:
        head_sharding = model.shardings(role.model, mesh, rules)["value_head"]
        head = value_head_init(role.model, jax.random.fold_in(seed_key, 1))
        params = {**params, "value_head": jax.device_put(head, head_sharding)}
    elif source.value_head and not role.model.value_head:
        params = {k: v for k, v in params.items() if k != "value_head"}
    return params, step
