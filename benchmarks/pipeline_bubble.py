"""Step time of each layout on 8 fake CPU devices, and the pipeline's bubble measured against its formula.

    python benchmarks/pipeline_bubble.py [--layouts fsdp zero1 ... gpipe4x16] [--rounds 3] [--steps 2]
                                         [--d-model 256 --layers 8 --vocab 8192 --seq 128 --batch 32]

Every layout trains the same model on the same batch (one micro-batch of --batch x --seq tokens,
float32, AdamW): `fsdp`, `dp`, `zero1`, `zero2` (fsdp / data = 8), `fsdp_tp` (fsdp 4 x tensor 2),
and `gpipeSxM`: S GPipe stages under fsdp over the other 8 / S devices, M microbatches. Each
iteration of jaxlm's pipeline runs every stage on its slot, a bubble slot included (the
scan-over-stages pattern, jaxlm/model/pipeline.py), so on fake devices that share the host's cores
a pipelined step costs (M + S - 1) / M of the work of an unpipelined one plus the pipeline's own
overheads: `measured bubble` = 1 - t(fsdp) / t(pipeline), beside the schedule's (S - 1) / (M + S - 1).
On S accelerators the bubble is idle time instead, the same fraction.

Timing: after one warm-up step per layout, --rounds rounds each time --steps steps of every layout in
turn (side by side, so a busy machine slows all alike); the minimum per step is reported. CPU step
times are for shape, not speed: fake devices share the host's cores and their collectives are copies.
"""
from __future__ import annotations

import argparse
import os
import re
import time

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm import sharding  # noqa: E402
from jaxlm.config import from_dict  # noqa: E402
from jaxlm.model.pipeline import Schedule  # noqa: E402
from jaxlm.train.pretrain import lm_objective, policy_role  # noqa: E402
from jaxlm.train.state import compile_stage  # noqa: E402

MESH = {"fsdp_tp": {"fsdp": 4, "tensor": 2}}  # every other unpipelined layout: fsdp = 8


def layout_config(name: str, args) -> dict:
    """The config tree of a layout name: a rules preset, or gpipeSxM."""
    model = {"preset": "tiny", "d_model": args.d_model, "n_layers": args.layers, "n_heads": args.d_model // 64,
             "n_kv_heads": args.d_model // 64, "d_ff": 4 * args.d_model, "vocab_size": args.vocab,
             "max_seq_len": args.seq, "dtype": "float32"}
    train = {"batch_size": args.batch, "seq_len": args.seq, "steps": 1000}
    pipe = re.fullmatch(r"gpipe(\d+)x(\d+)", name)
    if pipe:
        stages, micro = map(int, pipe.groups())
        mesh = {"rules": "fsdp", "stage": stages, "fsdp": 8 // stages}
        return {"model": model, "mesh": mesh, "train": {**train, "microbatches": micro}}
    return {"model": model, "mesh": {"rules": name, **MESH.get(name, {"fsdp": 8})}, "train": train}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", nargs="+", default=["fsdp", "dp", "zero1", "zero2", "fsdp_tp", "gpipe2x2",
                                                    "gpipe2x4", "gpipe2x8", "gpipe4x4", "gpipe4x8", "gpipe4x16"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    if "fsdp" not in args.layouts:
        p.error("--layouts needs fsdp: the measured bubble is relative to it")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab, (1, args.batch, args.seq + 1), dtype=np.int32)
    runs = {}
    for name in args.layouts:
        cfg = from_dict(layout_config(name, args))
        c = compile_stage(cfg, policy_role(cfg), lm_objective(cfg.model))
        rows = sharding.batch_sharding(c.mesh, 2, leading=1)
        batch = {"tokens": jax.device_put(tokens[..., :-1], rows), "targets": jax.device_put(tokens[..., 1:], rows),
                 "loss_mask": jax.device_put(np.ones(tokens[..., 1:].shape, np.float32), rows)}
        state = c.init_state(jax.random.key(0))
        t0 = time.perf_counter()
        state, metrics = c.train_step(state, {}, batch)  # compile and warm up
        total, count = jax.device_get(metrics["metrics"]["loss"])
        loss = float(total / count)
        runs[name] = {"step": c.train_step, "state": state, "batch": batch, "loss": loss, "best": float("inf"),
                      "first_s": time.perf_counter() - t0, "cfg": cfg}
        print(f"{name}: compiled and ran one step in {runs[name]['first_s']:.1f} s, loss {loss:.4f}", flush=True)
    for _ in range(args.rounds):
        for r in runs.values():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                r["state"], metrics = r["step"](r["state"], {}, r["batch"])
            jax.block_until_ready(metrics)
            r["best"] = min(r["best"], (time.perf_counter() - t0) / args.steps)
    n_params = sum(x.size for x in jax.tree.leaves(runs["fsdp"]["state"]["params"]))
    flat = runs["fsdp"]["best"]
    print(f"\n{n_params / 1e6:.1f}M params, {args.batch} x {args.seq} tokens per step, float32, AdamW, 8 fake CPU "
          f"devices (jax {jax.__version__}); min of {args.rounds} rounds x {args.steps} steps")
    print(f"{'layout':>10} {'s/step':>8} {'x fsdp':>7} {'measured bubble':>16} {'formula':>8} {'first loss':>11}")
    for name, r in runs.items():
        m = r["cfg"].mesh
        formula = Schedule(m.stage, r["cfg"].train.microbatches, m.repeats).bubble if m.stage > 1 else None
        bubble, formula = ((f"{1 - flat / r['best']:16.3f}", f"{formula:8.3f}") if formula
                           else (f"{'-':>16}", f"{'-':>8}"))
        print(f"{name:>10} {r['best']:8.3f} {r['best'] / flat:7.2f} {bubble} {formula} {r['loss']:11.4f}")


if __name__ == "__main__":
    main()
