"""Tiny configs, random params, batches and run directories, for tests and for trying things out.

Sizes are odd where the shapes allow (a vocabulary of 37, width 24, 6 query and 2 kv heads), so
that a transposed or swapped axis cannot hide behind an equal size. `BYTE` has the byte
tokenizer's vocabulary, to train on the embedded corpus.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import Config, ModelConfig, from_dict, save_config

ODD = ModelConfig(vocab_size=37, d_model=24, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=40, max_seq_len=64,
                  rope_theta=100.0, dtype="float32")
BYTE = ModelConfig(vocab_size=369, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128,
                   dtype="float32")

# A run of BYTE on 60 documents of the embedded corpus: 20 steps of 8 x 32 tokens, every step logged.
TINY_RUN = {
    "model": dict(vocab_size=369, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32),
    "data": dict(max_documents=60, heldout_fraction=0.1),
    "optim": dict(lr=3e-3, warmup_steps=2),
    "train": dict(steps=20, batch_size=8, seq_len=32, log_every=1, eval_every=10, eval_batches=2, save_every=5,
                  progress=False, peak_tflops=1.0),
}


def merge(tree: dict, **sections) -> dict:
    """A copy of a config tree with each section's keys updated."""
    out = copy.deepcopy(tree)
    for name, values in sections.items():
        out.setdefault(name, {}).update(values)
    return out


def tiny_config(**sections) -> Config:
    """`TINY_RUN` with overrides per section, e.g. `tiny_config(train=dict(steps=4, run_dir=...))`."""
    return from_dict(merge(TINY_RUN, **sections))


def random_params(cfg: ModelConfig, seed: int = 0, scale: float = 0.25, norm_scale: float = 0.3,
                  norm_base: float = 1.0) -> dict:
    """Params with every entry random: kernels ~N(0, scale^2), norm scales ~norm_base + N(0,
    norm_scale^2), so next-token laws are peaked but not one-hot, and any misplaced entry shows."""
    rng = np.random.default_rng(seed)
    from jaxlm import model

    def draw(path, a):
        is_norm = "scale" in jax.tree_util.keystr(path)
        base, s = (norm_base, norm_scale) if is_norm else (0.0, scale)
        return jnp.asarray(base + s * rng.standard_normal(a.shape), a.dtype)

    return jax.tree_util.tree_map_with_path(draw, model.abstract_params(cfg))


def random_batch(rng: np.random.Generator, A: int, b: int, T: int, V: int, keep: float = 0.8) -> dict:
    """A token batch [A, b, T] (A micro-batches of b rows): tokens, targets (tokens shifted by one)
    and a loss mask keeping a `keep` share of the positions."""
    tokens = rng.integers(0, V, (A, b, T + 1), dtype=np.int32)
    return {"tokens": tokens[..., :-1], "targets": tokens[..., 1:],
            "loss_mask": (rng.random((A, b, T)) < keep).astype(np.float32)}


def write_run(run_dir, cfg: Config, params: Optional[dict] = None, *, step: int = 5, role: str = "policy",
              seed: int = 0) -> Path:
    """A run directory as training leaves it (config.yaml, tokenizer copy, a checkpoint of `params`,
    random ones by default, as `role` at `step`, with no optimizer state) for `init_from`,
    `jaxlm generate` and `jaxlm eval`. Returns the directory."""
    from jaxlm import runs
    from jaxlm.checkpoint import Checkpointer

    run_dir = Path(run_dir)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(run_dir)))
    params = random_params(cfg.model, seed) if params is None else params
    cfg = runs.start(cfg)
    ckpt = Checkpointer(run_dir / "checkpoints", roles=(role,), async_save=False)
    ckpt.save(step, {role: params}, None, {"step": step})
    ckpt.close()
    save_config(cfg, run_dir / "config.yaml")
    return run_dir
