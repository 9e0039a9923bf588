"""Orbax checkpoints of a run: each trained role's params, the optimizer states, and a JSON `meta`.

A checkpoint `RUN_DIR/checkpoints/STEP/` holds one item per trained role, named by the role
(`policy/`, `value/`: that role's params), `opt_state/` ({role: optimizer state}) and `meta/`:
the step, the updates applied, the data cursor (examples consumed), the RNG seed key, the run's
counters and the bad-step guard's state, and a digest of every item, so a resumed run continues
with exactly the batches it would have seen, from exactly the state that was saved. A role's
params can be read alone (`restore_params`, checked against its own digest), which is how
another run starts from them (`train.init_from`).

What can go wrong, and what happens:
- An interrupted or failed write never replaces the last good checkpoint: Orbax writes each
  step to a temporary directory and renames it when complete.
- A save that fails in the background (a full disk) is reported at the next `check` (the loop
  calls it every step), and a save that would not fit is refused before it starts.
- Only a finite state is saved (`NonFiniteState` otherwise).
- A checkpoint of another layout than the one asked for (another optimizer or model) is refused
  before it is read (`ConfigError`, naming what differs); nothing is changed on disk.
- `restore` refuses a checkpoint whose files are damaged: data that cannot be decoded, missing
  files, or contents that do not match the digest written with them (`CheckpointCorrupt`);
  `set_aside` renames such a step's directory to `STEP.broken`, which Orbax no longer lists, so
  the next older checkpoint is the latest. Any other failure to read (the device out of memory,
  a passing I/O error) is `RunFailed`, and the checkpoint is kept.

The digest of an array is a sum modulo 2^32 of its elements' bits, each mixed with its position:
exact and independent of the sharding and the order of the sum, so it is the same whatever the
mesh a checkpoint is restored onto.

In a multi-process run every process calls `save` and `restore` (they are collective): each
writes and reads the shards of its own devices, process 0 the metadata and the final rename,
so the directory must be one that every host mounts. The processes agree on the outcome of a
read before they go on (one failing process makes all raise the same error). `restore` places
arrays by the targets' shardings, so a checkpoint reshards onto any mesh, process count or
device count.
"""
from __future__ import annotations

import errno
import functools
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxlm.config import ConfigError
from jaxlm.errors import RunFailed


class CheckpointCorrupt(RunFailed):
    """A checkpoint whose files are damaged: data that cannot be read back, or contents that do
    not match the digest written with them."""


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
    if not leaves:
        return [], True
    mesh = next((x.sharding.mesh for x in leaves if isinstance(x.sharding, jax.sharding.NamedSharding)), None)
    if mesh is not None:  # one computation: leaves elsewhere (a single device) join the mesh, replicated
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        tree = jax.tree.map(lambda x: x if getattr(x.sharding, "mesh", None) == mesh else
                            jax.device_put(x, replicated), tree)
    values, finite = _digest_jit(mesh)(tree)
    return [int(v) for v in np.asarray(values)], bool(finite)


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


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
        items = {role: params[role] for role in self.roles}
        if opt_state is not None:
            items["opt_state"] = opt_state
        digests, finite = {}, True
        for name, tree in items.items():  # one digest per item: a role's params are checked when read alone
            digests[name], item_finite = digest(tree)
            finite = finite and item_finite
        if not finite:
            raise NonFiniteState(f"the state of step {step} is not finite; not saved")
        self.wait()  # the previous save's files are on disk: the free space is what is left for this one
        needed, free = _nbytes(items), shutil.disk_usage(self.directory).free
        if free < 1.1 * needed:
            raise RunFailed(f"no room for checkpoint {step} in {self.directory}: it needs ~{_size(needed)} and "
                            f"{_size(free)} are free; the latest checkpoint is {self.latest_step()}")
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        meta = {**meta, "digests": digests}
        self.manager.save(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonSave(meta)), force=True)

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
        """(params, opt_state, meta) at `step`, placed like the targets (arrays or abstract).

        Raises `ConfigError` if the checkpoint's arrays are not the targets' (written with another
        optimizer or model), `CheckpointCorrupt` if its files are damaged (set it aside), and
        `RunFailed` if it cannot be read for another reason (the device is out of memory, a passing
        I/O error): a checkpoint that may well be intact, to keep."""
        targets = {**{role: params_target[role] for role in self.roles}, "opt_state": opt_state_target}
        items, meta = _read(self.directory, step, targets, exact=True,
                            hint="use the run's config, or a new train.run_dir")
        return {role: items[role] for role in self.roles}, items["opt_state"], meta

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
            multihost_utils.sync_global_devices(f"jaxlm set aside checkpoint {step}")
        self.manager.reload()
        return target

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _read(directory: Path, step: int, targets: dict, exact: bool, hint: str) -> tuple[dict, dict]:
    """({item: tree}, meta) of checkpoint `step` in `directory`: each item of `targets` placed like
    its target and checked against its digest. exact: the stored dtypes must be the targets' (else
    they are read as stored, checked, then cast). `hint` ends the error for another layout."""
    # This process reads its own shards with no barrier of Orbax's: a process that fails to read
    # would leave the others waiting in one. They agree on the outcome afterwards instead.
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                               active_processes={jax.process_index()})
    out, error = None, None
    try:
        options = ocp.CheckpointManagerOptions(read_only=True, multiprocessing_options=alone)
        with (ocp.CheckpointManager(directory, options=options) as manager,
              ocp.StandardCheckpointer(multiprocessing_options=alone) as reader):
            layouts = _layouts(manager, reader, step, targets, exact, hint)
            args = {name: ocp.args.StandardRestore(_restore_args(target, layouts[name]))
                    for name, target in targets.items()}
            out = manager.restore(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonRestore()))
        if not isinstance(out.meta, dict):
            raise CheckpointCorrupt(f"checkpoint {step} has no meta")
    except (ConfigError, RunFailed) as e:
        error = e
    except Exception as e:  # whatever the reader raises: damaged files, or a passing failure
        error = _read_error(step, e)
    error = _agreed(step, error)
    if error is not None:
        raise error
    items, meta = {name: out[name] for name in targets}, out.meta
    _verify(step, items, meta)
    return {name: _cast(items[name], targets[name]) for name in items}, meta


def _layouts(manager, reader, step: int, targets: dict, exact: bool, hint: str) -> dict:
    """{item: layout} of checkpoint `step`'s items (`reader` reads an item's metadata), once each is
    known to be the target's layout: `ConfigError` naming what differs, `CheckpointCorrupt` if its
    metadata is missing."""
    written = manager.metadata(step).item_handlers or {}
    if not written:
        raise CheckpointCorrupt(f"checkpoint {step} has no metadata (its files are missing)")
    layouts = {}
    for name, target in targets.items():
        if name not in written:
            raise ConfigError(f"checkpoint {step} holds no {name!r}; {hint}")
        metadata = reader.metadata(Path(manager.directory) / str(step) / name).item_metadata
        if metadata is None:
            raise CheckpointCorrupt(f"checkpoint {step} has no readable {name!r} metadata (files missing or damaged)")
        layouts[name] = _layout(metadata)
        difference = _difference(layouts[name], _layout(target), exact)
        if difference:
            raise ConfigError(f"checkpoint {step} was written with a different optimizer or model ({name}: "
                              f"{difference}); {hint}")
    return layouts


def _name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _layout(tree) -> dict:
    """{'policy/0/mu/w': (shape, dtype)} of a tree of arrays, abstract arrays or Orbax array metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_name(path): (tuple(x.shape), np.dtype(x.dtype)) for path, x in leaves}


def _difference(stored: dict, wanted: dict, exact: bool) -> str:
    """What differs between a stored layout and the wanted one, in a few words ("": nothing)."""
    extra, missing = sorted(stored.keys() - wanted.keys()), sorted(wanted.keys() - stored.keys())
    parts = [f"{len(names)} {what} (e.g. {names[0]!r})" for names, what in
             ((extra, "stored arrays this run lacks"), (missing, "arrays of this run not stored")) if names]
    if parts:
        return ", ".join(parts)
    for path in sorted(stored):
        (shape, dtype), (want_shape, want_dtype) = stored[path], wanted[path]
        if shape != want_shape or exact and dtype != want_dtype:
            return f"{path!r} is {dtype}{list(shape)} there, {want_dtype}{list(want_shape)} here"
    return ""


def _restore_args(target: Any, layout: dict):
    """Abstract arrays with the targets' shapes and shardings (so restored arrays land sharded) and
    the stored dtypes (the digest is of those)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.ShapeDtypeStruct(x.shape, layout[_name(path)][1], sharding=x.sharding), target)


def _cast(tree, target):
    return jax.tree.map(lambda x, t: x if x.dtype == t.dtype else x.astype(t.dtype), tree, target)


def _verify(step: int, items: dict, meta: dict) -> None:
    """`CheckpointCorrupt` unless `items` match the digests written with them: one per item, or in a
    checkpoint written before those, one over params and optimizer state (checked when both are read)."""
    if "digests" in meta:
        changed = [name for name, tree in items.items() if digest(tree)[0] != meta["digests"].get(name)]
    elif "digest" in meta and "opt_state" in items:
        whole = {"params": {name: tree for name, tree in items.items() if name != "opt_state"},
                 "opt_state": items["opt_state"]}
        changed = ["params and opt_state"] if digest(whole)[0] != meta["digest"] else []
    else:
        changed = []
    if changed:
        raise CheckpointCorrupt(f"checkpoint {step} does not match the digest written with it ({', '.join(changed)}: "
                                "its files changed after the write)")


def _agreed(step: int, error: Optional[Exception]) -> Optional[Exception]:
    """The error every process raises after a read: the gravest that any of them met. Each process
    reads the shards of its own devices, and all must leave a read together (to set a checkpoint
    aside, or to stop), never some of them going on into the next collective."""
    if jax.process_count() == 1:
        return error
    if error is not None:  # the others name this process: its log says why
        print(f"[jaxlm] process {jax.process_index()}: {error}", file=sys.stderr, flush=True)
    kinds = (RunFailed, ConfigError, CheckpointCorrupt)  # gravest last
    code = 0 if error is None else 1 + max(i for i, kind in enumerate(kinds) if isinstance(error, kind))
    codes = np.asarray(multihost_utils.process_allgather(np.int32(code)))
    if codes.max() == code:
        return error
    process = int(codes.argmax())
    return kinds[codes.max() - 1](f"checkpoint {step} could not be restored on process {process} (see its log)")


# What a reader says when the files themselves are damaged: TensorStore's codes for undecodable or
# short data and missing chunks, and a compressor that cannot decode a chunk. Anything else (out of
# memory, a passing I/O error) is no proof that the checkpoint is bad.
_DAMAGE = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "decompress", "corrupt")


def _read_error(step: int, e: BaseException) -> RunFailed:
    reason = _first_line(e)
    damaged = any(isinstance(c, (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError))
                  or any(marker in str(c) for marker in _DAMAGE) for c in _chain(e))
    if damaged:
        return CheckpointCorrupt(f"checkpoint {step} cannot be read: {reason}")
    return RunFailed(f"checkpoint {step} could not be read ({reason}); it is kept, not set aside: run again to retry")


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _chain(e: BaseException) -> list[BaseException]:
    """`e` and the errors behind it (raised from, or while handling), outermost first."""
    chain = []
    while e is not None and not any(e is c for c in chain):
        chain.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return chain


def _first_line(e: BaseException) -> str:
    """One readable line for an error and those behind it, without TensorStore's spec dumps."""
    chain = _chain(e)
    if any(getattr(c, "errno", None) == errno.ENOSPC or "No space left on device" in str(c) for c in chain):
        return "no space left on the device"
    lines = []
    for c in chain:
        text = re.sub(r"<bound method pybind11.*", "", str(c).split("See full TensorStore details")[0], flags=re.S)
        line = (text.strip().splitlines() or [type(c).__name__])[0].strip().rstrip(".")
        if line not in lines:
            lines.append(line)
    return ": ".join(lines)[:300]


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
    if metadata.item_metadata is None:
        raise CheckpointCorrupt(f"checkpoint {step} of {str(run_dir)!r} has no readable {role!r} metadata (files "
                                "missing or damaged)")
    return set(metadata.item_metadata.keys())


def restore_params(run_dir: str | Path, params_target, step: Optional[int] = None, role: str = "policy",
                   what: str = "train.init_from"):
    """(params, step): one role's params of a run (its latest checkpoint unless `step`), placed
    like `params_target` and checked against their digest (none in a checkpoint written before
    per-item digests). `what` names the setting the run directory came from, for errors."""
    if not (Path(run_dir) / "checkpoints").is_dir():
        raise FileNotFoundError(f"{what}={str(run_dir)!r} has no checkpoints directory")
    step = check_step(run_dir, step, what)
    if not (Path(run_dir).absolute() / "checkpoints" / str(step) / role).is_dir():
        raise ConfigError(f"{what}={str(run_dir)!r}: checkpoint {step} holds no {role!r} params (a run of "
                          "another stage, or written by an older jaxlm)")
    items, _ = _read(Path(run_dir).absolute() / "checkpoints", step, {role: params_target}, exact=False,
                     hint=f"check {what}={str(run_dir)!r}")
    return items[role], step
