"""Three architectures at equal parameters and equal training FLOPs, on span corruption and on prefix
LM, scored on the same held-out targets (#28 item 5).

    causal decoder    configs/pretrain/tiny.yaml, data.bidirectional_prefix=false: L blocks
    prefix decoder    configs/pretrain/tiny.yaml: the same rows, each example's inputs both ways
    encoder-decoder   configs/pretrain/tiny_encdec.yaml: L/2 encoder + L/2 decoder blocks (the
                      decoder's add cross-attention: the parameters' small excess)

All three read the same examples of the embedded corpus (the loader draws example q from
(seed, q) whatever the architecture; the encoder-decoder takes an example's inputs on its encoder
and its target on its decoder). Training FLOPs are `jaxlm.perf`'s formulas over the real tokens
of the rows a run trains on (padding not counted): 6N + 6LTD per decoder token, and per encoder
and per decoder token `perf.encoder_decoder_flops`. The loaders are deterministic, so these rows
are known before training: the decoders train --steps steps, the encoder-decoder the number of
steps whose rows come closest to the same FLOPs (an encoder-decoder example costs about half, so
it sees about twice the examples). Each run is `jaxlm pretrain` in a subprocess (timed), then
scored on the first --eval-examples examples of the held-out stream (whole packing groups:
`Loader.rows_for_examples`), under the masks it was trained with; the script checks that the three
score the very same target tokens. Finished runs are not trained again (their time is kept in
OUT/OBJECTIVE/ARCH/wall.json).

    python benchmarks/compare_architectures.py --data data/stdlib --steps 300
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import model, perf, runs
from jaxlm.config import from_dict, override, read_tree, save_config
from jaxlm.data.pipeline import build_lm_data
from jaxlm.train.pretrain import lm_objective

OBJECTIVES = {"span_corruption": "span corruption", "prefix_lm": "prefix LM"}
ARCHS = {  # name -> (config file, what differs from it)
    "causal decoder": ("configs/pretrain/tiny.yaml", {"data.bidirectional_prefix": False}),
    "prefix decoder": ("configs/pretrain/tiny.yaml", {}),
    "encoder-decoder": ("configs/pretrain/tiny_encdec.yaml", {}),
}


def config(arch: str, objective: str, args, **train):
    """The run's config: its file, the objective, the data under args.data, the depth, `train.*` keys."""
    path, changes = ARCHS[arch]
    tree = read_tree(path)
    tree["data"] = {**tree["data"], "objective": {objective: 1.0}}  # this objective alone
    L = args.layers
    depth = {"model.n_layers": L} if arch != "encoder-decoder" else {"model.n_layers": L // 2,
                                                                      "model.n_encoder_layers": L // 2}
    sources = [{"name": "stdlib", "path": f"{args.data}/tokens"}]
    return from_dict(override(tree, {"data.tokenizer": f"{args.data}/tokenizer.model", "data.sources": sources,
                                     "train.eval_batches": 0, **changes, **depth,
                                     **{f"train.{k}": v for k, v in train.items()}}))


def row_flops(cfg, batch: dict) -> np.ndarray:
    """Training FLOPs of each row [R]: jaxlm.perf's per-token formulas over its real tokens."""
    T = cfg.train.seq_len
    if cfg.model.arch == "encoder_decoder":
        per_encoder, per_decoder = perf.encoder_decoder_flops(cfg.model, T)
        return ((batch["encoder_segment_ids"] > 0).sum(1) * per_encoder
                + (batch["segment_ids"] > 0).sum(1) * per_decoder)
    return (batch["segment_ids"] > 0).sum(1) * perf.flops_per_token(cfg.model, T)


def training_rows(cfg, steps: int | None = None, flops: float | None = None):
    """(steps, FLOPs, target tokens, real share of the columns) of the first `steps` batches, or of
    the number of batches whose FLOPs come closest to `flops`."""
    train = build_lm_data(cfg.data, cfg.train.seq_len, arch=cfg.model.arch)[0]
    B, total, targets, real, columns, step = cfg.train.batch_size, 0.0, 0.0, 0, 0, 0
    while (steps is not None and step < steps) or (flops is not None and total < flops):
        batch = train.batch(step * B, B)
        f = float(row_flops(cfg, batch).sum())
        if flops is not None and total + f - flops > flops - total:  # one batch fewer is closer
            break
        total, targets, step = total + f, targets + float(batch["loss_mask"].sum()), step + 1
        sides = [k for k in ("segment_ids", "encoder_segment_ids") if k in batch]
        real += sum(int((batch[k] > 0).sum()) for k in sides)
        columns += sum(batch[k].size for k in sides)
    return step, total, targets, real / columns


def train(cfg, run_dir: Path) -> float:
    """`jaxlm pretrain` of `cfg` (written beside the run directory as RUN_DIR.yaml) in a subprocess (a
    fresh process: huge pages, no shared caches); minutes."""
    done = run_dir / "wall.json"
    if done.is_file():
        return json.loads(done.read_text())["minutes"]
    path = run_dir.with_suffix(".yaml")
    save_config(cfg, path)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jaxlm", "pretrain", str(path)], check=True, stdout=subprocess.DEVNULL)
    minutes = (time.perf_counter() - t0) / 60
    done.write_text(json.dumps({"minutes": minutes}))
    return minutes


def heldout_loss(run_dir: Path, examples: int, step: int | None = None, bs: int = 16):
    """(mean NLL per target token, the scored targets sorted) of a run's checkpoint on the held-out
    stream's first `examples` examples (whole packing groups), with the masks it trained with."""
    cfg, params = (lambda r: (r.cfg, r.params))(runs.load_run(run_dir, step=step))
    heldout = build_lm_data(cfg.data, cfg.train.seq_len, arch=cfg.model.arch)[1]
    rows, _ = heldout.rows_for_examples(examples)
    batch = heldout.batch(0, rows)
    pad = -rows % bs  # rows of zeros: no segment, no loss
    batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
    loss = jax.jit(lambda p, b: lm_objective(cfg.model).loss({"policy": p}, None, b)[1]["loss"])
    total = count = 0.0
    for a in range(0, rows + pad, bs):
        s, n = loss(params, {k: jnp.asarray(v[a:a + bs]) for k, v in batch.items()})
        total, count = total + float(s), count + float(n)
    return total / count, np.sort(batch["targets"][batch["loss_mask"] > 0])


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/stdlib", help="the data stage of configs/pretrain/tiny.yaml")
    p.add_argument("--steps", type=int, default=300, help="the decoders' steps")
    p.add_argument("--layers", type=int, default=4, help="the decoders' blocks (the encoder-decoder: half a side)")
    p.add_argument("--eval-examples", type=int, default=512, help="held-out examples scored (whole groups)")
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    p.add_argument("--out", default="runs/architectures")
    args = p.parse_args()
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on every checkpoint read
    out = Path(args.out)
    results = {}
    for objective in args.objectives:
        cfgs = {arch: config(arch, objective, args) for arch in ARCHS}
        steps, flops, _, _ = training_rows(cfgs["prefix decoder"], steps=args.steps)
        targets = None
        for arch, cfg in cfgs.items():
            if arch == "encoder-decoder":
                n, f, t, real = training_rows(cfg, flops=flops)
            else:
                n, f, t, real = training_rows(cfg, steps=steps)
            run_dir = out / objective / arch.replace(" ", "_")
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg = config(arch, objective, args, steps=n, save_every=-(-n // 2), run_dir=str(run_dir))
            minutes = train(cfg, run_dir)
            curve = {}
            for step in checkpoint_steps(run_dir):
                curve[step], scored = heldout_loss(run_dir, args.eval_examples, step)
                if targets is None:
                    targets = scored
                assert np.array_equal(scored, targets), f"{arch} scores other targets than the others"
            results.setdefault(arch, {})[objective] = {
                "params": model.param_count(cfg.model), "steps": n, "train_flops": f, "train_targets": t,
                "flops_per_target": f / t, "real_share": real, "heldout": curve, "loss": curve[n],
                "minutes": minutes}
            print(f"{objective} {arch}: {n} steps, {f:.3g} FLOPs ({f / t:.3g} per target token, "
                  f"{real:.0%} of the columns real), held-out {curve} ({len(targets)} targets), "
                  f"{minutes:.1f} min", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results, args.objectives))


def table(results: dict, objectives: list[str]) -> str:
    both = lambda arch, key, fmt: " / ".join(fmt(results[arch][o][key]) for o in objectives)
    names = " / ".join(OBJECTIVES[o] for o in objectives)
    lines = [f"| architecture | parameters | training FLOPs per target token ({names}) | steps | "
             + " | ".join(f"held-out loss, {OBJECTIVES[o]}" for o in objectives) + " | minutes |",
             "| --- " * (5 + len(objectives)) + "|"]
    for arch in results:
        first = results[arch][objectives[0]]
        lines.append(f"| {arch} | {first['params'] / 1e6:.2f}M | {both(arch, 'flops_per_target', lambda x: f'{x:.3g}')}"
                     f" | {both(arch, 'steps', str)} | "
                     + " | ".join(f"{results[arch][o]['loss']:.3f}" for o in objectives)
                     + f" | {both(arch, 'minutes', lambda x: f'{x:.1f}')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
