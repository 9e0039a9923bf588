"""One process of the data-shard check in test_multiprocess.py (not a test module itself).

usage: python multiprocess_worker.py CONFIG OUT_DIR   (with the JAXLM_* multi-process env)

Joins the run, then for a few cursors takes this process's rows of the global batch
(`Stage.train_data.batch`), assembles the global array from every process's rows
(`sharding.put_batch` on the run's mesh), gathers it back, and writes both to OUT_DIR/rows_<process>.json.
"""
import json
import sys

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


if __name__ == "__main__":
    main(*sys.argv[1:])
