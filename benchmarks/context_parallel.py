"""Memory per device of one train step with the sequence whole vs split over mesh.sequence (compile only).

    python benchmarks/context_parallel.py [--preset tiny] [--seq 8192] [--batch 1] [--shards 1 2 4]

For each s in --shards the pretraining step of the preset (float32, remat none, AdamW) is lowered
and compiled on s fake CPU devices with mesh.sequence = s (fsdp = data = 1: parameters and
optimizer state are replicated, so only what context parallelism splits changes), nothing is
run, and XLA's memory analysis of the compiled step gives, per device, its arguments (train
state and batch), temporaries (activations saved for the backward pass, the gathered keys and
values, workspace) and `jaxlm.perf.peak_bytes`. `jaxlm plan`'s estimate of the same config is
printed beside it.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from jaxlm import perf  # noqa: E402
from jaxlm.config import from_dict  # noqa: E402
from jaxlm.plan import plan  # noqa: E402
from jaxlm.train.pretrain import lm_objective, policy_role  # noqa: E402
from jaxlm.train.state import compile_stage  # noqa: E402


def step_memory(preset: str, seq: int, batch: int, shards: int) -> dict:
    cfg = from_dict({"model": {"preset": preset, "max_seq_len": seq, "dtype": "float32", "remat": "none"},
                     "mesh": {"data": 1, "fsdp": 1, "sequence": shards},
                     "train": {"batch_size": batch, "seq_len": seq}})
    c = compile_stage(cfg, policy_role(cfg), lm_objective(cfg.model), devices=jax.devices()[:shards])
    S = jax.ShapeDtypeStruct
    batch_spec = {"tokens": S((1, batch, seq), "int32"), "targets": S((1, batch, seq), "int32"),
                  "loss_mask": S((1, batch, seq), "float32")}
    t0 = time.perf_counter()
    compiled = c.train_step.lower(c.abstract_state, {}, batch_spec).compile()
    m = compiled.memory_analysis()
    p = plan(cfg, devices=shards)
    return {"args": m.argument_size_in_bytes, "temp": m.temp_size_in_bytes, "peak": perf.peak_bytes(compiled),
            "plan": p["bytes_total"], "plan_acts": p["bytes_activations"] + p["bytes_kv_gathered"] + p["bytes_logits"],
            "compile_s": time.perf_counter() - t0}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--shards", type=int, nargs="+", default=[1, 4])
    args = p.parse_args()
    mib = lambda x: f"{x / 2**20:10.1f}"
    print(f"{args.preset}, batch {args.batch} x seq {args.seq}, float32, remat none, AdamW; MiB per device "
          f"({jax.devices()[0].platform}, jax {jax.__version__})")
    print(f"{'sequence':>8} {'args':>10} {'temp':>10} {'args+temp':>10} {'peak':>10} {'plan acts':>10} "
          f"{'plan total':>10} {'compile s':>9}")
    for s in args.shards:
        r = step_memory(args.preset, args.seq, args.batch, s)
        print(f"{s:>8} {mib(r['args'])} {mib(r['temp'])} {mib(r['args'] + r['temp'])} {mib(r['peak'])} "
              f"{mib(r['plan_acts'])} {mib(r['plan'])} {r['compile_s']:9.1f}", flush=True)


if __name__ == "__main__":
    main()
