"""Infill loss of trained runs on held-out documents: does FIM training teach infilling?

For each of N held-out documents (the runs' own held-out split of their shards source), a
chunk of `--chunk` tokens at a random offset is cut at FIM's random points into prefix,
middle and suffix. Each run is scored, causally, on:

  infill   PSM input `<pre> prefix <suf> suffix <mid>`, target `middle eos`
  left     the same middle given only the prefix, left to right (no suffix, no sentinels)

and the script prints the mean NLL per target token (nats) of both. A model that learned to
use the suffix has infill < left; a CLM-only model has never seen the sentinels.

    python benchmarks/fim_infill.py runs/tiny runs/tiny_fim --docs 200
"""
from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import model, runs
from jaxlm.config import load_config
from jaxlm.data.pipeline import build_lm_data
from jaxlm.data.examples import fim
from jaxlm.objectives import lm_loss


def examples(cfg, n_docs: int, chunk: int, seed: int):
    """(infill batch, left-to-right batch) of numpy arrays [n, T], T = chunk + 4."""
    _, heldout, _ = build_lm_data(cfg.data, cfg.train.seq_len)
    docs = [d for s in heldout.sources for d in (s.docs[i] for i in range(len(s.docs)))]
    sp = heldout.specials or _specials(cfg)
    rng = np.random.default_rng(seed)
    T = chunk + 4
    infill, left = [], []
    while len(infill) < n_docs:
        doc = np.asarray(docs[len(infill) % len(docs)], np.int32)[:-1]  # without its eos
        if len(doc) < chunk:
            doc = np.pad(doc, (0, chunk - len(doc)), constant_values=sp.eos)
        start = int(rng.integers(0, len(doc) - chunk + 1))
        piece = doc[start:start + chunk]
        i, j = fim.fim_split(chunk, rng)
        infill.append(fim.fim_infill_example(piece, i, j, T, sp))
        seq = piece[:j]  # prefix then middle, left to right; scored on the middle
        ex = {k: np.full(T, sp.pad, np.int32) for k in ("tokens", "targets")}
        ex["loss_mask"] = np.zeros(T, np.float32)
        n = max(len(seq) - 1, 0)
        ex["tokens"][:n], ex["targets"][:n] = seq[:-1], seq[1:]
        ex["loss_mask"][max(i - 1, 0):n] = 1  # position t predicts seq[t + 1]: targets piece[i:j]
        left.append(ex)
    stack = lambda exs: {k: np.stack([e[k] for e in exs]) for k in ("tokens", "targets", "loss_mask")}
    return stack(infill), stack(left)


def _specials(cfg):
    from jaxlm.data.pipeline import _specials as from_tokenizer
    from jaxlm.data.tokenizers import load_tokenizer

    return from_tokenizer(load_tokenizer(cfg.data.tokenizer), {"fim": 1.0})


def nll(cfg, params, batch, bs: int = 16) -> float:
    fn = jax.jit(lambda p, b: lm_loss(model.apply(cfg.model, p, b["tokens"]), b["targets"],
                                      b["loss_mask"])[1])
    total = count = 0.0
    for a in range(0, len(batch["tokens"]), bs):
        m = fn(params, {k: jnp.asarray(v[a:a + bs]) for k, v in batch.items()})
        loss_sum, tokens = m["loss"]
        total += float(loss_sum)
        count += float(tokens)
    return total / count


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--docs", type=int, default=200)
    p.add_argument("--chunk", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    first = load_config(Path(args.runs[0]) / "config.yaml")
    infill, left = examples(first, args.docs, args.chunk, args.seed)
    print(f"{args.docs} held-out chunks of {args.chunk} tokens; "
          f"{int(infill['loss_mask'].sum())} infill targets")
    print(f"{'run':<20} {'step':>5} {'objective':<22} {'infill nats/tok':>15} {'left-to-right':>14}")
    for run in args.runs:
        loaded = runs.load_run(run)
        cfg, params, step = loaded.cfg, loaded.params, loaded.step
        print(f"{run:<20} {step:>5} {str(cfg.data.objective):<22} {nll(cfg, params, infill):>15.3f} "
              f"{nll(cfg, params, left):>14.3f}")


if __name__ == "__main__":
    main()
