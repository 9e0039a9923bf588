"""Orbax checkpoints of a run: each trained role's params, the optimizer states, and a JSON `meta`.

A checkpoint `RUN_DIR/checkpoints/STEP/` holds one item per trained role, named by the role
(`policy/`, `value/`: that role's params), `opt_state/` ({role: optimizer state}) and `meta/`:
the step, the data cursor (examples consumed), the RNG seed key, the run's counters and a
digest of every array, so a resumed run continues with exactly the batches it would have
seen, from exactly the state that was saved. A role's params can be read alone
(`restore_params`), which is how another run starts from them (`train.init_from`).

What can go wrong, and what happens:
- An interrupted or failed write never replaces the last good checkpoint: Orbax writes each
  step to a temporary directory and renames it when complete.
- A save that fails in the background (a full disk) is reported at the next `check` (the loop
  calls it every step), and a save that would not fit is refused before it starts.
- Only a finite state is saved (`NonFiniteState` otherwise).
- `restore` recomputes the digest of what it read and refuses a checkpoint whose files were
  damaged after the write (`CheckpointCorrupt`); `set_aside` renames such a step's directory
  to `STEP.broken`, which Orbax no longer lists, so the next older checkpoint is the latest.

The digest of an array is a sum modulo 2^32 of its elements' bits, each mixed with its position:
exact and independent of the sharding and the order of the sum, so it is the same whatever the
mesh a checkpoint is restored onto.

In a multi-process run every process calls `save` and `restore` (they are collective): each
writes and reads the shards of its own devices, process 0 the metadata and the final rename,
so the directory must be one that every host mounts. `restore` places arrays by the
targets' shardings, so a checkpoint reshards onto any mesh, process count or device count.
"""
from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxlm.config import ConfigError
from jaxlm.errors import RunFailed


class CheckpointCorrupt(RuntimeError):
    """A checkpoint that cannot be read, or whose contents do not match the digest written with them."""


class NonFiniteState(RuntimeError):
    """The state to save holds a NaN or an infinity: it is not saved."""


def _leaf_digest(x):
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32))
    words = bits.astype(jnp.uint32).reshape(-1)
    position = jnp.arange(words.shape[0], dtype=jnp.uint32)
    return jnp.sum((words ^ (position * jnp.uint32(2654435761))) * jnp.uint32(2246822519), dtype=jnp.uint32)


def _digest_fn(tree):
    leaves = jax.tree.leaves(tree)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves
                                if jnp.issubdtype(x.dtype, jnp.floating)] or [jnp.bool_(True)]))
    return jnp.stack([_leaf_digest(x) for x in leaves]), finite


@functools.lru_cache(maxsize=8)
def _digest_jit(mesh):
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None else None
    return jax.jit(_digest_fn, out_shardings=replicated)


def digest(tree) -> tuple[list[int], bool]:
    """(one uint32 per array of `tree`, whether every float in it is finite), computed where the
    arrays are (a global reduction: the same on every process)."""
    leaves = jax.tree.leaves(tree)
    mesh = next((x.sharding.mesh for x in leaves if isinstance(x.sharding, jax.sharding.NamedSharding)), None)
    if mesh is not None:  # one computation: leaves elsewhere (a single device) join the mesh, replicated
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        tree = jax.tree.map(lambda x: x if getattr(x.sharding, "mesh", None) == mesh else
                            jax.device_put(x, replicated), tree)
    values, finite = _digest_jit(mesh)(tree)
    return [int(v) for v in np.asarray(values)], bool(finite)


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _restore_args(target: Any):
    """Abstract arrays with shardings, so restored arrays land sharded."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)


class Checkpointer:
    """One run's checkpoint directory (`RUN_DIR/checkpoints`) for the given trained roles."""

    def __init__(self, directory: str | Path, roles=("policy",), keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.directory = Path(directory).absolute()
        self.roles = tuple(roles)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=(*self.roles, "opt_state", "meta"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, params: dict, opt_state: Optional[dict], meta: dict) -> None:
        """params: {role: params}; opt_state: {role: optimizer state}, or None (params only, e.g. a
        converted checkpoint that starts other runs and is never resumed). Raises `NonFiniteState`
        (nothing written) or `RunFailed` (no room for it) before anything is written."""
        state = {"params": {role: params[role] for role in self.roles}, "opt_state": opt_state}
        digests, finite = digest(state)
        if not finite:
            raise NonFiniteState(f"the state of step {step} is not finite; not saved")
        self.wait()  # the previous save's files are on disk: the free space is what is left for this one
        needed, free = _nbytes(state), shutil.disk_usage(self.directory).free
        if free < 1.1 * needed:
            raise RunFailed(f"no room for checkpoint {step} in {self.directory}: it needs ~{_size(needed)} and "
                            f"{_size(free)} are free; the latest checkpoint is {self.latest_step()}")
        items = {role: ocp.args.StandardSave(params[role]) for role in self.roles}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        meta = {**meta, "digest": digests}
        self.manager.save(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta)), force=True)

    def check(self) -> None:
        """Raise `RunFailed` if a save running in the background has failed (a full disk)."""
        self._surface(self.manager.check_for_errors)

    def wait(self) -> None:
        """Wait for the save in flight; `RunFailed` if it failed."""
        self._surface(self.manager.wait_until_finished)

    def _surface(self, call) -> None:
        try:
            call()
        except Exception as e:  # Orbax re-raises whatever the background write met
            self.manager.reload()
            raise RunFailed(f"writing a checkpoint to {self.directory} failed: {_first_line(e)}; "
                            f"the latest complete checkpoint is {self.latest_step()}") from None

    def restore(self, step: int, params_target: dict, opt_state_target: dict):
        """(params, opt_state, meta) at `step`, placed like the targets (arrays or abstract), checked
        against the digest written with them; `CheckpointCorrupt` if unreadable or not matching."""
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                **{role: ocp.args.StandardRestore(_restore_args(params_target[role])) for role in self.roles},
                opt_state=ocp.args.StandardRestore(_restore_args(opt_state_target)),
                meta=ocp.args.JsonRestore()))
            params, opt_state, meta = {role: out[role] for role in self.roles}, out.opt_state, out.meta
        except Exception as e:  # missing, truncated or garbled files: whatever the reader raises
            raise CheckpointCorrupt(f"checkpoint {step} cannot be read: {_first_line(e)}") from None
        if not isinstance(meta, dict):
            raise CheckpointCorrupt(f"checkpoint {step} has no meta")
        if "digest" in meta and digest({"params": params, "opt_state": opt_state})[0] != meta["digest"]:
            raise CheckpointCorrupt(f"checkpoint {step} does not match the digest written with it (its files "
                                    "changed after the write)")
        return params, opt_state, meta

    def set_aside(self, step: int) -> Path:
        """Rename checkpoint `step` to `STEP.broken` (kept for a look, no longer listed); returns the
        new path. In a multi-process run every process calls it (process 0 renames)."""
        target = self.directory / f"{step}.broken"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}.broken{n}"
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxlm set aside checkpoint {step}")
        self.manager.reload()
        return target

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _first_line(e: BaseException) -> str:
    text = str(e)
    if "No space left on device" in text or "RESOURCE_EXHAUSTED" in text:
        return "no space left on the device"
    return (text.strip().splitlines() or [type(e).__name__])[0][:300]


def _reader(run_dir: str | Path, what: str):
    directory = Path(run_dir).absolute() / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"{what}={str(run_dir)!r} has no checkpoints directory")
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))


def steps(run_dir: str | Path) -> list[int]:
    """The steps of a run's complete checkpoints, oldest first (none: [])."""
    directory = Path(run_dir) / "checkpoints"
    if not directory.is_dir():
        return []
    manager = _reader(run_dir, "run")
    out = sorted(manager.all_steps())
    manager.close()
    return out


def check_step(run_dir: str | Path, step: Optional[int], what: str = "run directory") -> int:
    """`step` (default: the latest) if the run has a complete checkpoint there, else one line saying
    which steps it has."""
    available = steps(run_dir)
    if not available:
        raise ConfigError(f"{what}={str(run_dir)!r} holds no complete checkpoint")
    if step is None:
        return available[-1]
    if step not in available:
        raise ConfigError(f"{what}={str(run_dir)!r} has no checkpoint at step {step}; it has steps "
                          f"{', '.join(map(str, available))}")
    return step


def param_names(run_dir: str | Path, step: int, role: str) -> set[str]:
    """The top-level names of a role's params in checkpoint `step` (e.g. whether it has a value head)."""
    metadata = ocp.StandardCheckpointer().metadata(Path(run_dir).absolute() / "checkpoints" / str(step) / role)
    return set(metadata.item_metadata.keys())


def restore_params(run_dir: str | Path, params_target, step: Optional[int] = None, role: str = "policy",
                   what: str = "train.init_from"):
    """(params, step): one role's params of a run (its latest checkpoint unless `step`), placed
    like `params_target`. `what` names the setting the run directory came from, for errors."""
    if not (Path(run_dir) / "checkpoints").is_dir():
        raise FileNotFoundError(f"{what}={str(run_dir)!r} has no checkpoints directory")
    step = check_step(run_dir, step, what)
    if not (Path(run_dir).absolute() / "checkpoints" / str(step) / role).is_dir():
        raise ConfigError(f"{what}={str(run_dir)!r}: checkpoint {step} holds no {role!r} params (a run of "
                          "another stage, or written by an older jaxlm)")
    manager = _reader(run_dir, what)
    out = manager.restore(step, args=ocp.args.Composite(**{role: ocp.args.StandardRestore(
        _restore_args(params_target))}))
    manager.close()
    return out[role], step
