"""Orbax checkpoints of a run: each trained role's params, the optimizer states, and a JSON `meta`.

A checkpoint `RUN_DIR/checkpoints/STEP/` holds one item per trained role, named by the role
(`policy/`, `value/`: that role's params), `opt_state/` ({role: optimizer state}) and `meta/`:
the step, the data cursor (examples consumed), the RNG seed key and the run's counters, so a
resumed run continues with exactly the batches it would have seen. A role's params can be read
alone (`restore_params`), which is how another run starts from them (`train.init_from`).
Orbax writes each step to a temporary directory and renames it when complete, so an
interrupted or failed write never replaces the last good checkpoint.

In a multi-process run every process calls `save` and `restore` (they are collective): each
writes and reads the shards of its own devices, process 0 the metadata and the final rename,
so the directory must be one that every host mounts. `restore` places arrays by the
targets' shardings, so a checkpoint reshards onto any mesh, process count or device count.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from jaxlm.config import ConfigError


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
        converted checkpoint that starts other runs and is never resumed)."""
        items = {role: ocp.args.StandardSave(params[role]) for role in self.roles}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self.manager.save(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, params_target: dict, opt_state_target: dict):
        """(params, opt_state, meta) at `step`, placed like the targets (arrays or abstract)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            **{role: ocp.args.StandardRestore(_restore_args(params_target[role])) for role in self.roles},
            opt_state=ocp.args.StandardRestore(_restore_args(opt_state_target)),
            meta=ocp.args.JsonRestore()))
        return {role: out[role] for role in self.roles}, out.opt_state, out.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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
