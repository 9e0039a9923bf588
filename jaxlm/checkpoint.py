"""Orbax checkpoints of a run: params, optimizer state, and a JSON `meta` item.

`meta` holds the step, the data cursor (examples consumed), the RNG seed key and the
run's counters, so a resumed run continues with exactly the batches it would have seen.
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


def _restore_args(target: Any):
    """Abstract arrays with shardings, so restored arrays land sharded."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)


class Checkpointer:
    """One run's checkpoint directory (`RUN_DIR/checkpoints`)."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("params", "opt_state", "meta"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, params_target, opt_state_target):
        """(params, opt_state, meta) at `step`, placed like the targets (arrays or abstract)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_restore_args(params_target)),
            opt_state=ocp.args.StandardRestore(_restore_args(opt_state_target)),
            meta=ocp.args.JsonRestore()))
        return out.params, out.opt_state, out.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(run_dir: str | Path, params_target, step: Optional[int] = None):
    """Params of another run (its latest checkpoint unless `step`), for `init_from`."""
    directory = Path(run_dir).absolute() / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"train.init_from={str(run_dir)!r} has no checkpoints directory")
    manager = ocp.CheckpointManager(directory, item_names=("params", "opt_state", "meta"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"train.init_from={str(run_dir)!r} holds no complete checkpoint")
    out = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_restore_args(params_target))))
    manager.close()
    return out.params, step
