"""Per-device bytes of params, gradients and optimizer state under each layout (ZeRO stages, pipelines).

    python benchmarks/zero_memory.py [--preset 125m] [--rules dp zero1 zero2 fsdp fsdp_tp gpipe2 gpipe4]
                                     [--measure PRESET ...] [--compile] [--seq 128 --batch 8]

On 8 fake CPU devices (mesh fsdp = 8; fsdp_tp: fsdp 4 x tensor 2; gpipe2 and gpipe4: 2 or 4 GPipe
stages under fsdp over the other 4 or 2 devices, train.microbatches = 2 x stages), float32
params, AdamW. For each layout, per device:

- stored: the train state as held between steps. `params` and `optimizer` from the state's
  shardings alone (each leaf's shard shape, from `jax.eval_shape`: no memory); `measured` from a
  state really initialised on the 8 devices, `addressable_shards[0].data.nbytes` summed, for the
  presets in --measure (default: all; dp's 12 bytes x Ψ on each of 8 devices peaked at 15 GB of
  host memory for 125m: `--measure zero1 zero2 fsdp fsdp_tp` leaves it out on a small machine).
- plan: `jaxlm plan`'s params, gradients and optimizer bytes for the same config.
- --compile: the train step of one micro-batch of --batch x --seq is compiled (not run) and
  XLA's temporaries per device are printed: gradients live only there, so zero1 - zero2 is
  about (1 - 1/N) x 4Ψ (XLA:CPU all-reduces then slices where GPU and TPU reduce-scatter).

CPU figures are for shape, not speed.
"""
from __future__ import annotations

import argparse
import math
import os
import time

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from jaxlm import sharding  # noqa: E402
from jaxlm.config import from_dict  # noqa: E402
from jaxlm.plan import plan  # noqa: E402
from jaxlm.train.pretrain import lm_objective, policy_role  # noqa: E402
from jaxlm.train.state import compile_stage  # noqa: E402

MESH = {"fsdp_tp": {"fsdp": 4, "tensor": 2}, "gpipe2": {"stage": 2, "fsdp": 4},
        "gpipe4": {"stage": 4, "fsdp": 2}}  # every other preset: fsdp = 8
RULES = {"gpipe2": "fsdp", "gpipe4": "fsdp"}  # a pipeline layout's rules preset (others: its own name)


def shard_bytes(tree) -> int:
    """Per device, from the shardings the leaves carry (0-d step counters left out, as plan does)."""
    return sum(math.prod(sharding.shard_shape(a.sharding.mesh, a.sharding.spec, a.shape)) * a.dtype.itemsize
               for a in jax.tree.leaves(tree) if a.ndim)


def stored_bytes(tree) -> int:
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree) if x.ndim)


def preset_memory(preset: str, rules: str, measure: bool, compile_step: bool, seq: int, batch: int) -> dict:
    cfg = from_dict({"model": {"preset": preset, "max_seq_len": seq, "dtype": "float32"},
                     "mesh": {"rules": RULES.get(rules, rules), **MESH.get(rules, {"fsdp": 8})},
                     "train": {"batch_size": batch, "seq_len": seq}})
    c = compile_stage(cfg, policy_role(cfg), lm_objective(cfg.model))
    a = c.abstract_state
    out = {"psi": sum(x.size for x in jax.tree.leaves(a["params"])),
           "params": shard_bytes(a["params"]), "opt": shard_bytes(a["opt_state"]), "plan": plan(cfg, devices=8)}
    if measure:
        t0 = time.perf_counter()
        state = c.init_state(jax.random.key(0))
        out["measured"] = (stored_bytes(state["params"]), stored_bytes(state["opt_state"]))
        out["init_s"] = time.perf_counter() - t0
        del state
    if compile_step:
        rows = sharding.batch_sharding(c.mesh, 3, leading=1)
        spec = {k: jax.ShapeDtypeStruct((1, batch, seq), dt, sharding=rows)
                for k, dt in (("tokens", "int32"), ("targets", "int32"), ("loss_mask", "float32"))}
        t0 = time.perf_counter()
        out["temp"] = c.train_step.lower(a, {}, spec).compile().memory_analysis().temp_size_in_bytes
        out["compile_s"] = time.perf_counter() - t0
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="125m")
    p.add_argument("--rules", nargs="+", default=["dp", "zero1", "zero2", "fsdp", "fsdp_tp", "gpipe2", "gpipe4"])
    p.add_argument("--measure", nargs="*", default=None,
                   help="presets whose state is really initialised on the devices and measured (default: all)")
    p.add_argument("--compile", action="store_true", help="also compile each train step: XLA's temporaries")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    measure = args.rules if args.measure is None else args.measure
    mib = lambda x: f"{x / 2**20:9.1f}" if x is not None else f"{'-':>9}"
    print(f"{args.preset}, float32 params, AdamW, 8 fake CPU devices; MiB per device (jax {jax.__version__})")
    print(f"{'preset':>8} {'params':>9} {'optimizer':>9} {'measured':>19} {'plan p':>9} {'plan g':>9} "
          f"{'plan opt':>9}" + (f" {'step temp':>9} {'compile s':>9}" if args.compile else ""))
    for rules in args.rules:
        r = preset_memory(args.preset, rules, rules in measure, args.compile, args.seq, args.batch)
        pl = r["plan"]
        measured = "/".join(mib(x).strip() for x in r["measured"]) if "measured" in r else "-"
        print(f"{rules:>8} {mib(r['params'])} {mib(r['opt'])} {measured:>19} {mib(pl['bytes_params'])} "
              f"{mib(pl['bytes_grads'])} {mib(pl['bytes_optimizer'])}"
              + (f" {mib(r['temp'])} {r['compile_s']:9.1f}" if args.compile else ""), flush=True)
    print(f"Ψ = {r['psi']:,} parameters")


if __name__ == "__main__":
    main()
