"""Peak bytes of one train step, with and without the chunked loss and remat (compile only).

    python benchmarks/memory_bench.py [--preset 125m] [--batch 8] [--seq 2048] [--dtype bfloat16]

For each (remat, train.loss_chunk) the train step of the preset is lowered and compiled on
one device of the default backend, nothing is run, and XLA's memory analysis of the compiled
step gives arguments + outputs + temporaries (`jaxlm.perf.peak_bytes`). On CPU that is the
buffer assignment of XLA:CPU; a GPU's differs in detail, not in what the options save.
"""
from __future__ import annotations

import argparse
import time

import jax

from jaxlm import perf
from jaxlm.config import from_dict
from jaxlm.train.loop import compile_stage
from jaxlm.train.pretrain import lm_loss_fn, token_count


def step_bytes(preset: str, batch: int, seq: int, dtype: str, remat: str, chunk: int) -> tuple[int, float]:
    cfg = from_dict({"model": {"preset": preset, "remat": remat, "dtype": dtype},
                     "mesh": {"fsdp": 1}, "train": {"batch_size": batch, "seq_len": seq, "loss_chunk": chunk}})
    c = compile_stage(cfg, lm_loss_fn(cfg.model, chunk), token_count, devices=jax.devices()[:1])
    S = jax.ShapeDtypeStruct
    batch_spec = {"tokens": S((1, batch, seq), "int32"), "targets": S((1, batch, seq), "int32"),
                  "loss_mask": S((1, batch, seq), "float32")}
    t0 = time.perf_counter()
    compiled = c.train_step.lower(c.abstract_state, batch_spec).compile()
    return perf.peak_bytes(compiled), time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="125m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--remat", nargs="+", default=["none", "dots", "full"])
    args = p.parse_args()
    print(f"{args.preset}, batch {args.batch} x seq {args.seq}, compute {args.dtype}, fp32 params + AdamW, "
          f"{jax.devices()[0].platform}")
    print(f"{'remat':<6} {'loss':<12} {'peak GiB':>9} {'compile s':>9}")
    for remat in args.remat:
        for chunk in (0, args.chunk):
            peak, secs = step_bytes(args.preset, args.batch, args.seq, args.dtype, remat, chunk)
            loss = f"chunk {chunk}" if chunk else "full logits"
            print(f"{remat:<6} {loss:<12} {peak / 2**30:>9.2f} {secs:>9.1f}")


if __name__ == "__main__":
    main()
