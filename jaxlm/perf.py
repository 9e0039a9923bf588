"""FLOP counting, the device's peak, and compiled memory: the numbers behind MFU; and the
bytes a decode step must read, against the device's memory bandwidth.

Model FLOPs per trained token (forward + backward) = 6 * N + 6 * L * T * D, where
N counts every parameter that takes part in a matmul (all parameters but the input
embedding table, which is a gather; with tied embeddings the table is the output
projection and is counted once), and 6 * L * T * D is attention's score and value
matmuls (12 * L * T * D) halved because the mask is causal. T is the sequence length.

An encoder-decoder (`encoder_decoder_flops`) splits N into the encoder's blocks and final norm
(N_enc, L_enc blocks) and the rest (N_dec: the decoder's blocks with their cross-attention, its
final norm and the head), each side's tokens running through its own: an encoder token costs
6 * N_enc + 12 * L_enc * T * D (bidirectional attention: the whole square), a decoder token
6 * N_dec + 6 * L * T * D (causal self-attention) + 12 * L * T * D (cross-attention to all T
encoder columns). Its rows have T columns a side, so per column of a row (what the loop and
`jaxlm bench` count as a token) it costs the two together.

A decode step (one new token for each of B rows) reads at least every weight once, in the
compute dtype, and the keys and values of every cached position of every row: at a memory
bandwidth of W bytes/s, decoding cannot pass B * W / bytes tokens/s.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxlm.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    from jaxlm import model

    n = model.param_count(cfg)
    return n if cfg.tie_embeddings else n - cfg.vocab_size * cfg.d_model


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 6LTD (causal attention counted at half); an encoder-decoder's
    per row column, one encoder and one decoder token (`encoder_decoder_flops`)."""
    if cfg.arch == "encoder_decoder":
        return sum(encoder_decoder_flops(cfg, seq_len))
    return 6.0 * matmul_params(cfg) + 6.0 * cfg.n_layers * seq_len * cfg.d_model


def encoder_decoder_flops(cfg: ModelConfig, seq_len: int) -> tuple[float, float]:
    """Training FLOPs (per encoder token, per decoder token) of an encoder-decoder with seq_len
    columns a side (the module docstring's formula)."""
    from jaxlm import model

    shapes = model.abstract_params(cfg)
    n_enc = sum(math.prod(x.shape) for x in jax.tree.leaves((shapes["encoder"], shapes["encoder_norm"])))
    n_dec = matmul_params(cfg) - n_enc
    TD = seq_len * cfg.d_model
    return (6.0 * n_enc + 12.0 * (cfg.n_encoder_layers or cfg.n_layers) * TD,
            6.0 * n_dec + 18.0 * cfg.n_layers * TD)


def measure_peak_flops(dtype: str | None = None, n: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul on the default device: the 'measured peak'."""
    platform = jax.devices()[0].platform
    dtype = dtype or ("float32" if platform == "cpu" else "bfloat16")
    n = n or (2048 if platform == "cpu" else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def peak_flops(measure: bool = False) -> float:
    """The device's measured peak (`measure_peak_flops`), measured once per machine, device kind and
    JAX version and kept in CACHE/peak_flops.json (`cache_dir`), so a run does not spend its start-up
    on it. `measure`: measure afresh (as `jaxlm bench` does) and return that; the file keeps the
    highest value measured, so one slow measurement on a busy machine does not stay."""
    path = cache_dir() / "peak_flops.json"
    device = jax.devices()[0]
    key = f"{platform.node()} {device.platform} {device.device_kind} jax {jax.__version__}"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or damaged: measured (and written whole) again
        known = {}
    known = known if isinstance(known, dict) else {}
    kept = known.get(key) if isinstance(known.get(key), (int, float)) else 0.0
    if kept > 0 and not measure:
        return float(kept)
    value = measure_peak_flops()
    known[key] = max(value, kept)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1) + "\n")
        tmp.replace(path)
    except OSError:  # a read-only home: measured on every run instead
        pass
    return value


def cache_dir() -> Path:
    """Where jaxlm keeps what it measures of this machine: $JAXLM_CACHE_DIR, else
    $XDG_CACHE_HOME/jaxlm, else ~/.cache/jaxlm."""
    if os.environ.get("JAXLM_CACHE_DIR"):
        return Path(os.environ["JAXLM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxlm"


def measure_bandwidth(n_bytes: int | None = None, repeats: int = 5) -> float:
    """Bytes/s of a large elementwise pass (reads n_bytes, writes n_bytes) on the default device:
    the 'measured bandwidth'. Default size: 256 MiB on CPU (past the caches), 2 GiB elsewhere."""
    n_bytes = n_bytes or ((256 if jax.devices()[0].platform == "cpu" else 2048) << 20)
    f = jax.jit(lambda a: a + 1.0, donate_argnums=0)  # in place: no fresh pages to fault in
    x = f(jnp.zeros((n_bytes // 4,), jnp.float32)).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * x.nbytes / best


def decode_bytes(cfg: ModelConfig, batch: int, context: float) -> float:
    """The fewest bytes one decode step can read: every weight but the input embedding table
    (it gives only `batch` rows; a tied table is read whole as the output projection) once in
    the compute dtype, and the keys and values of `context` cached positions for each row."""
    item = jnp.dtype(cfg.compute_dtype).itemsize
    kv = 2 * cfg.n_layers * batch * context * cfg.n_kv_heads * cfg.head_dim
    return (matmul_params(cfg) + kv) * item


def peak_bytes(compiled) -> int | None:
    """Peak device bytes of a compiled executable, from XLA's memory analysis when available."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if m is None:
        return None
    # XLA:CPU's peak_memory_in_bytes counts arguments and outputs only, so take the larger of
    # it and arguments + outputs + temporaries (less what outputs alias from arguments).
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return int(max(getattr(m, "peak_memory_in_bytes", 0) or 0, total))
