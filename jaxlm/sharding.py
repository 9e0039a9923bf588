"""All sharding in one place: the mesh, the logical-axis table, param and batch shardings.

Mesh axes are ("stage", "data", "fsdp", "sequence", "tensor"). Parameters and activations carry logical
axis names (weights: embed, vocab, q_heads, kv_heads, head_dim, mlp, ...; activations: act_*);
`RULES` maps them to mesh axes for each preset. A dimension that a mesh axis does not
divide stays replicated rather than failing. Every preset splits activations along the sequence
over "sequence" (context parallelism, `jaxlm.model.context_parallel`; size 1: no split), and the
stacked layers over "stage" (pipeline parallelism, `jaxlm.model.pipeline`, when `activate` is given a
schedule; size 1: no split).

The ZeRO stages by name (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models"), for Ψ parameters over N = data x fsdp batch shards, float32 params
and AdamW (K = 8 bytes of moments per parameter), bytes per device:

    preset          params   gradients   optimizer state
    dp              4Ψ       4Ψ          8Ψ
    zero1           4Ψ       4Ψ          8Ψ / N
    zero2           4Ψ       4Ψ / N      8Ψ / N
    zero3 = fsdp    4Ψ / F   4Ψ / F      8Ψ / F        (F = mesh.fsdp: replicated over "data")

zero1 and zero2 lay out params and activations as dp does; `optimizer_spec` splits the state
(and under zero2 the gradients) over the batch axes.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlm.config import ConfigError, MeshConfig

AXES = ("stage", "data", "fsdp", "sequence", "tensor")
BATCH = ("data", "fsdp")
SEQUENCE = "sequence"
STAGE = "stage"

# logical name -> mesh axis (or axes) under each preset; absent means replicated.
RULES: dict[str, dict[str, object]] = {
    "dp": {"act_batch": BATCH, "act_seq": SEQUENCE, "layers": STAGE},
    "fsdp": {"act_batch": BATCH, "act_seq": SEQUENCE, "layers": STAGE, "embed": "fsdp"},
    "fsdp_tp": {"act_batch": BATCH, "act_seq": SEQUENCE, "layers": STAGE, "embed": "fsdp", "vocab": "tensor",
                "q_heads": "tensor",
                "kv_heads": "tensor", "mlp": "tensor", "act_heads": "tensor", "act_mlp": "tensor",
                "act_vocab": "tensor"},
}
# zero3 is fsdp under its ZeRO name (fsdp stays the default and the name runs and configs use);
# zero1 and zero2 place params and activations as dp, and their optimizer state by `optimizer_spec`.
RULES.update(zero1=RULES["dp"], zero2=RULES["dp"], zero3=RULES["fsdp"])
# The presets that split more than their params over the batch axes, by ZeRO stage:
# 1 the optimizer state, 2 the gradients as well.
ZERO = {"zero1": 1, "zero2": 2}


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A (stage, data, fsdp, sequence, tensor) mesh over all devices; one size may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [cfg.stage, cfg.data, cfg.fsdp, cfg.sequence, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"mesh sizes {dict(zip(AXES, sizes))} do not divide the {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"mesh.stage*mesh.data*mesh.fsdp*mesh.sequence*mesh.tensor = {'*'.join(map(str, sizes))} = "
                          f"{math.prod(sizes)}, but there are {len(devices)} devices; "
                          "the product must equal the device count (or set one size to -1)")
    return Mesh(device_grid(sizes, devices), AXES)


def device_grid(sizes: list[int], devices: list) -> np.ndarray:
    """Devices laid out as the (stage, data, fsdp, sequence, tensor) `sizes`.

    Across several hosts (GPU, CPU: each process a granule) or TPU slices (granules by
    `slice_index`) the mesh is hybrid: the granules split the data axis, or else fsdp, or else
    stage (whichever first divides by their number; if none does, data, stage and fsdp share them
    in that order), over the slow network (DCN), and each granule holds
    the rest of the mesh on its fast one (ICI, NVLink): sequence and tensor, whose collectives
    run inside every layer, never cross it. Within one TPU slice the layout
    follows the torus (`mesh_utils.create_device_mesh`); otherwise devices go in order.
    """
    from jax.experimental import mesh_utils

    slices = {getattr(d, "slice_index", 0) for d in devices}
    by_slice = devices[0].platform == "tpu" or len(slices) > 1  # a TPU slice is one ICI domain
    granules = len(slices) if by_slice else len({d.process_index for d in devices})
    if granules == 1:
        if devices[0].platform == "tpu":
            try:
                return mesh_utils.create_device_mesh(sizes, devices)
            except (ValueError, NotImplementedError):  # a shape the torus cannot host: plain order
                pass
        return np.array(devices).reshape(sizes)
    dcn = [1] * len(sizes)
    axis = next((i for i in (1, 2, 0) if sizes[i] % granules == 0), None)
    if axis is not None:
        dcn[axis] = granules
    else:  # several axes share the granules: data outermost, then stage, then fsdp
        left = granules
        for i in (1, 0, 2):
            dcn[i] = math.gcd(sizes[i], left)
            left //= dcn[i]
        if left > 1:
            raise ConfigError(f"the mesh {dict(zip(AXES, sizes))} spans {granules} "
                              f"{'slices' if by_slice else 'processes'}; mesh.data, mesh.fsdp or mesh.stage (or "
                              f"their product) must be a multiple of {granules} (set mesh.data={granules} for "
                              "data parallelism across them)")
    ici = [s // d for s, d in zip(sizes, dcn)]
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not by_slice)


def _mesh_axes(rules: str, name) -> tuple:
    """The mesh axes that `rules` maps the logical axis `name` to (none: replicated)."""
    axes = RULES[rules].get(name)
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def spec(mesh, rules: str, shape, names) -> P:
    """PartitionSpec for an array of `shape` with logical axis `names`; `mesh` is a Mesh or its
    {axis: size} (`jaxlm plan` lays out a mesh it does not have)."""
    sizes = mesh.shape if isinstance(mesh, Mesh) else mesh
    out, used = [], set()
    for dim, name in zip(shape, names):
        axes = tuple(a for a in _mesh_axes(rules, name) if a not in used and sizes[a] > 1)
        size = math.prod(sizes[a] for a in axes)
        if not axes or dim % size:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def param_shardings(mesh: Mesh, rules: str, abstract_params: dict, axes: dict) -> dict:
    """NamedSharding per parameter (same tree as the params)."""
    return jax.tree.map(lambda a, names: NamedSharding(mesh, spec(mesh, rules, a.shape, names)),
                        abstract_params, axes, is_leaf=lambda x: isinstance(x, tuple))


def optimizer_spec(mesh, rules: str, shape, param_spec: P) -> P:
    """PartitionSpec of an optimizer-state leaf that mirrors a parameter of `shape` laid out as
    `param_spec` (Adam's mu and nu); under zero2 the gradients' too. zero1 and zero2 split it over
    the batch axes (data, fsdp) of size > 1 that `param_spec` does not use, along the first dimension
    that is whole and that their product divides (none: as the parameter); every other preset keeps
    the parameter's layout. `mesh`: a Mesh or its {axis: size}."""
    if rules not in ZERO:
        return param_spec
    full = tuple(param_spec) + (None,) * (len(shape) - len(param_spec))
    sizes = mesh.shape if isinstance(mesh, Mesh) else mesh
    used = {a for s in full if s is not None for a in ((s,) if isinstance(s, str) else s)}
    axes = tuple(a for a in BATCH if a not in used and sizes[a] > 1)
    n = math.prod(sizes[a] for a in axes)
    for i, (dim, s) in enumerate(zip(shape, full)):
        if axes and s is None and dim % n == 0:
            return P(*full[:i], axes[0] if len(axes) == 1 else axes, *full[i + 1:])
    return P(*full)


def optimizer_shardings(mesh: Mesh, rules: str, abstract_params: dict, p_shardings: dict) -> dict:
    """NamedSharding of the optimizer state that mirrors each parameter (same tree as the params)."""
    return jax.tree.map(lambda a, s: NamedSharding(mesh, optimizer_spec(mesh, rules, a.shape, s.spec)),
                        abstract_params, p_shardings)


def shard_shape(mesh, spec_: P, shape) -> tuple:
    """The shape of one device's block of an array of `shape` split by `spec_`; `mesh`: a Mesh or
    its {axis: size}."""
    sizes = mesh.shape if isinstance(mesh, Mesh) else mesh
    split = [math.prod(sizes[a] for a in ((s,) if isinstance(s, str) else s)) if s is not None else 1
             for s in spec_]
    return tuple(d // n for d, n in zip(shape, split + [1] * (len(shape) - len(split))))


def batch_sharding(mesh: Mesh, ndim: int = 2, leading: int = 0) -> NamedSharding:
    """Batch arrays: `leading` unsharded axes (e.g. accumulation), then the batch axis."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH, *([None] * (ndim - leading - 1))))


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch axis is split."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_slot(mesh: Mesh) -> tuple[int, int]:
    """(slot, slots): which rows of each batch this process loads. Processes whose devices hold the
    same (data, fsdp) coordinates, differing only along stage, sequence or tensor (pipeline stages
    on different hosts), load the same rows; the others split the batch in order of their first
    coordinate. Without such sharing, (process index, process count)."""
    held = {}
    for position, device in np.ndenumerate(mesh.devices):
        held.setdefault(device.process_index, set()).add((position[AXES.index("data")],
                                                         position[AXES.index("fsdp")]))
    groups = sorted({frozenset(c) for c in held.values()}, key=min)
    return groups.index(frozenset(held[jax.process_index()])), len(groups)


def put_batch(mesh: Mesh, local_batch: dict, leading: int = 0) -> dict:
    """Assemble global arrays from this process's rows (`make_array_from_process_local_data`)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v), leading), v)
            for k, v in local_batch.items()}


def put_shared_batch(mesh: Mesh, batch: dict, leading: int = 0) -> dict:
    """Global arrays from a batch that every process holds whole, with the same values (a rollout
    sampled alike on each): each device takes its own rows of it."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v), leading), v, np.shape(v))
            for k, v in batch.items()}


def to_host(x) -> np.ndarray:
    """An array's whole value as numpy on every process: gathered from the others' devices where
    it is split over several processes (`jax.device_get` cannot read those)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def replicate(tree, mesh: Mesh):
    """Inside jit: `tree` gathered whole onto every device of `mesh`, so that every process can
    read it (`np.asarray` of a result sharded over other processes' devices fails)."""
    return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, P()))


# The mesh, rules and pipeline schedule in force while tracing, for the model's activation constraints.
_active: Optional[tuple[Mesh, str]] = None
_schedule = None


@contextlib.contextmanager
def activate(mesh: Mesh, rules: str, schedule=None):
    """Within this block, `constrain` pins activations to the mesh by the rules, and with a
    `jaxlm.model.pipeline.Schedule` (a "stage" axis > 1) the layer stacks run as that pipeline."""
    global _active, _schedule
    previous, _active = (_active, _schedule), (mesh, rules)
    _schedule = schedule if schedule is not None and mesh.shape.get(STAGE, 1) > 1 else None
    try:
        yield
    finally:
        _active, _schedule = previous


def pipeline_schedule():
    """(the active mesh, its pipeline `Schedule`) while `activate` runs one, else None."""
    return None if _schedule is None else (_active[0], _schedule)


def sequence_mesh() -> tuple[Optional[Mesh], str]:
    """(the active mesh, its rules) where the rules split the sequence (`act_seq`) over a "sequence"
    axis of size > 1, else (None, ""): whether attention must run context-parallel."""
    if _active is None:
        return None, ""
    mesh, rules = _active
    split = SEQUENCE in _mesh_axes(rules, "act_seq") and mesh.shape.get(SEQUENCE, 1) > 1
    return (mesh, rules) if split else (None, "")


def splits(names) -> bool:
    """Whether the active mesh and rules split any of these logical axes across devices."""
    if _active is None:
        return False
    mesh, rules = _active
    return any(mesh.shape[a] > 1 for name in names for a in _mesh_axes(rules, name))


def constrain(x: jax.Array, names) -> jax.Array:
    """Sharding constraint by logical names; the identity outside `activate`."""
    if _active is None:
        return x
    mesh, rules = _active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(mesh, rules, x.shape, names)))
