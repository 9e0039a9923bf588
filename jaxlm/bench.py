"""`jaxlm bench`: time the train step of a config on random tokens.

Reports step time, tokens/s, model FLOPs per token (`jaxlm.perf`), achieved TFLOP/s,
MFU against a given or measured peak, compile time and peak device bytes. With
`--compare DIR`, runs the plain-JAX and PyTorch reference steps in DIR (../shared/bench)
on identical shapes, alternating with jaxlm for `--rounds` rounds, and reports the median
over rounds of jaxlm's tokens/s over each (shared machines are noisy: the ratio of runs
taken side by side is what holds). Then times the KV-cache sampler (`sampler_report`):
prefill and decode tokens/s, and decode against the memory-bandwidth bound of
`jaxlm.perf.decode_bytes` (skip with --no-sampler).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxlm import perf, sharding
from jaxlm.config import Config, ConfigError
from jaxlm.train.pretrain import lm_objective, policy_role
from jaxlm.train.state import compile_stage


def _random_batch(cfg: Config, rng: np.random.Generator) -> dict:
    t = cfg.train
    A, b = t.grad_accum_steps, t.batch_size // t.grad_accum_steps
    tokens = rng.integers(0, cfg.model.vocab_size, (A, b, t.seq_len + 1), dtype=np.int32)
    return {"tokens": tokens[..., :-1], "targets": tokens[..., 1:],
            "loss_mask": np.ones((A, b, t.seq_len), np.float32)}


def train_step_timer(cfg: Config, warmup: int = 2):
    """Compile the train step on random tokens; returns (time_steps(n) -> mean step seconds, info)."""
    c = compile_stage(cfg, policy_role(cfg), lm_objective(cfg.model, cfg.train.loss_chunk))
    batch = sharding.put_batch(c.mesh, _random_batch(cfg, np.random.default_rng(0)), leading=1)
    box = {"state": c.init_state(jax.random.key(0))}
    t0 = time.perf_counter()
    compiled = c.train_step.lower(box["state"], {}, batch).compile()
    info = {"compile_s": time.perf_counter() - t0, "peak_bytes": perf.peak_bytes(compiled),
            "params": sum(x.size for x in jax.tree.leaves(box["state"]["params"]))}

    def time_steps(n: int) -> float:
        box["state"], out = compiled(box["state"], {}, batch)
        jax.block_until_ready(out)
        t0 = time.perf_counter()
        for _ in range(n):
            box["state"], out = compiled(box["state"], {}, batch)
        jax.block_until_ready(out)
        loss_sum, tokens = out["metrics"]["loss"]
        info["loss"] = float(loss_sum / tokens)
        return (time.perf_counter() - t0) / n

    for _ in range(warmup):
        time_steps(1)
    return time_steps, info


def run(cfg: Config, steps: int, rounds: int = 1, compare=None, sampler: bool = True, log=print) -> dict:
    """`jaxlm bench`: time `steps` train steps, `rounds` times; with `compare` (a directory holding
    jax_llama_ref.py and torch_llama_ref.py), each reference step on the same shapes after each
    round. Returns `report` of the median step, the median ratios `vs_jaxref` and `vs_torch`
    (reference step time over jaxlm's: > 1 is jaxlm faster), and `sampler_report` unless off."""
    import statistics

    if cfg.model.arch != "decoder":
        raise ConfigError(f"jaxlm bench times the decoder's train step; model.arch={cfg.model.arch} is not "
                          "benchmarked yet (its throughput: tokens_per_s in a run's metrics.jsonl)")
    time_steps, info = train_step_timer(cfg)
    ratios: dict[str, list[float]] = {}
    step_times = []
    for r in range(rounds):
        step_times.append(time_steps(steps))
        if not compare:
            continue
        for name, script in (("jaxref", "jax_llama_ref.py"), ("torch", "torch_llama_ref.py")):
            ref = run_reference(Path(compare) / script, reference_args(cfg, steps))
            log(f"round {r + 1} {name}: {ref}")
            if "step_s" in ref:
                ratios.setdefault(f"vs_{name}", []).append(ref["step_s"] / step_times[-1])
        log(f"round {r + 1} jaxlm: step_s={step_times[-1]:.4f} "
            + " ".join(f"{k}={v[-1]:.3f}" for k, v in ratios.items()))
    result = report(cfg, statistics.median(step_times), info)
    result.update({k: statistics.median(v) for k, v in ratios.items()})
    if sampler:
        result.update(sampler_report(cfg, rounds))
    return result


def report(cfg: Config, step_s: float, info: dict) -> dict:
    """The named numbers of one timing: tokens/s, TFLOP/s, MFU, memory, and the attention kernel
    that the step's plain causal mask ran through (`jaxlm.model.attention.kernel`; "rows" under
    context parallelism, mesh.sequence > 1: `attention_rows` in each sequence shard)."""
    from jaxlm.model import attention

    m, T = cfg.model, cfg.train.seq_len
    kernel = "rows" if cfg.mesh.sequence > 1 else attention.kernel(
        m.attention, attention.Mask(None), T, T, m.compute_dtype, m.head_dim)
    tokens = cfg.train.batch_size * T
    fpt = perf.flops_per_token(m, T)
    peak = cfg.train.peak_tflops * 1e12 or perf.peak_flops(measure=True)
    achieved = fpt * tokens / step_s
    return {"params": info["params"], "devices": jax.device_count(),
            "platform": jax.devices()[0].platform, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "flops_per_token": fpt, "tflops": achieved / 1e12, "peak_tflops": peak / 1e12,
            "mfu": achieved / peak, "compile_s": info["compile_s"], "peak_bytes": info["peak_bytes"],
            "loss": info["loss"], "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "unset"),
            "attention": kernel}


def reference_args(cfg: Config, steps: int) -> list[str]:
    m, t = cfg.model, cfg.train
    return [f"--layers={m.n_layers}", f"--d={m.d_model}", f"--heads={m.n_heads}",
            f"--kv_heads={m.n_kv_heads}", f"--ffn={m.d_ff}", f"--vocab={m.vocab_size}",
            f"--seq={t.seq_len}", f"--batch={t.batch_size}", f"--steps={steps}"]


def run_reference(script: Path, args: list[str]) -> dict:
    """Run one reference script; parse its `key=value` line."""
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    line = out.stdout.strip().splitlines()[-1]
    return {k: float(v) for k, v in re.findall(r"(\w+)=([-\d.e+]+)", line)}


def sampler_report(cfg: Config, rounds: int = 1, prompt_len: int = 0, new_tokens: int = 0) -> dict:
    """Prefill and decode tokens/s of the KV-cache sampler (greedy, `jaxlm.generate`) on random
    prompts: train.batch_size rows of prompt_len tokens (default seq_len / 2) then new_tokens
    (default the rest of seq_len). Prefill time is that of a 1-token generation; decode time is
    the rest of a full generation, over its new_tokens - 1 decode steps. Medians over rounds.

    decode_limit_tokens_per_s: B * bandwidth / `perf.decode_bytes` at the decode steps' mean
    context, P + N / 2 (train.peak_bandwidth_gbs, or measured); decode_of_limit: the fraction
    of it reached."""
    import statistics

    from jaxlm import generate, model

    m, B = cfg.model, cfg.train.batch_size
    P = prompt_len or max(cfg.train.seq_len // 2, 1)
    N = new_tokens or max(min(cfg.train.seq_len, m.max_seq_len) - P, 2)
    mesh = sharding.make_mesh(cfg.mesh)
    params = model.init_sharded(m, jax.random.key(0), mesh, cfg.mesh.rules)
    prompts = np.random.default_rng(0).integers(0, m.vocab_size, (B, P), dtype=np.int32)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(generate.generate(m, params, prompts, None, n, mesh=mesh, rules=cfg.mesh.rules))
        return time.perf_counter() - t0

    warmup_s = run(1) + run(N)  # compiles (and one run) of both shapes
    prefill, decode = [], []
    for _ in range(rounds):
        first, full = run(1), run(N)
        prefill.append(B * P / first)
        decode.append(B * (N - 1) / max(full - first, 1e-9))
    bandwidth = cfg.train.peak_bandwidth_gbs * 1e9 or perf.measure_bandwidth()
    limit = B * bandwidth / perf.decode_bytes(m, B, P + N / 2)
    decode_tps = statistics.median(decode)
    return {"prefill_tokens_per_s": statistics.median(prefill), "decode_tokens_per_s": decode_tps,
            "decode_limit_tokens_per_s": limit, "decode_of_limit": decode_tps / limit,
            "bandwidth_gbs": bandwidth / 1e9, "sampler_batch": B, "sampler_prompt": P, "sampler_new": N,
            "sampler_warmup_s": warmup_s}
