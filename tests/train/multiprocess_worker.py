"""One process of the multi-process checks in test_multiprocess.py (not a test module itself).

usage: python multiprocess_worker.py CONFIG OUT_DIR          (with the JAXLM_* multi-process env)
       python multiprocess_worker.py --damaged-shard OUT_DIR

CONFIG OUT_DIR: joins the run, then for a few cursors takes this process's rows of the global
batch (`Stage.train_data.batch`), assembles the global array from every process's rows
(`sharding.put_batch` on the run's mesh), gathers it back, and writes both to OUT_DIR/rows_<process>.json.

--damaged-shard OUT_DIR: saves a checkpoint of arrays split over every process's devices; process 1
then damages the data files of the shards it wrote (which it alone reads back), and every
process restores the checkpoint. Each writes what the restore raised to OUT_DIR/restore_<process>.txt.
"""
import json
import sys
from pathlib import Path

import numpy as np


def main(config_path: str, out_dir: str) -> None:
    from jaxlm import distributed, sharding
    from jaxlm.config import load_config
    from jaxlm.train import pretrain

    cfg = load_config(config_path)
    distributed.initialize(cfg.distributed)
    import jax
    from jax.experimental import multihost_utils

    stage = pretrain.build(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    pidx, pcount = jax.process_index(), jax.process_count()
    B = cfg.train.batch_size
    batches = []
    for cursor in (0, B, 7 * B):
        local = stage.train_data.batch(cursor, B, pidx, pcount)
        glob = sharding.put_batch(mesh, local)
        gathered = multihost_utils.process_allgather(glob["tokens"], tiled=True)
        batches.append({"cursor": cursor, "local": local["tokens"].tolist(),
                        "global": np.asarray(gathered).tolist(), "global_shape": list(glob["tokens"].shape)})
    with open(f"{out_dir}/rows_{pidx}.json", "w") as f:
        json.dump({"process": pidx, "count": pcount, "mesh": dict(mesh.shape), "batches": batches}, f)


def damaged_shard(out_dir: str) -> None:
    from jaxlm import distributed
    from jaxlm.config import DistributedConfig

    distributed.initialize(DistributedConfig())
    import jax
    from jax.experimental import multihost_utils

    from jaxlm.checkpoint import Checkpointer

    split = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("d",)),
                                       jax.sharding.PartitionSpec("d"))
    full = np.arange(8 * 1000, dtype=np.float32)
    w = jax.make_array_from_callback(full.shape, split, lambda index: full[index])
    ckpt = Checkpointer(Path(out_dir) / "checkpoints", async_save=False)
    ckpt.save(1, {"policy": {"w": w}}, {"policy": {"mu": w}}, {"step": 1})
    ckpt.wait()
    if jax.process_index() == 1:
        for path in (ckpt.directory / "1").glob("*/ocdbt.process_1/d/*"):
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    multihost_utils.sync_global_devices("jaxlm test: shards damaged")
    target = jax.ShapeDtypeStruct(full.shape, full.dtype, sharding=split)
    try:
        ckpt.restore(1, {"policy": {"w": target}}, {"policy": {"mu": target}})
        outcome = "restored"
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
    Path(out_dir, f"restore_{jax.process_index()}.txt").write_text(outcome)


if __name__ == "__main__":
    if sys.argv[1] == "--damaged-shard":
        damaged_shard(sys.argv[2])
    else:
        main(*sys.argv[1:])
