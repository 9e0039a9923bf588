"""Sampler throughput: jaxlm's KV-cache `generate` against Hugging Face `transformers` `generate`
on the same weights (exported with `jaxlm.interop.save_hf`), on CPU, in alternating rounds.

    python benchmarks/generate_bench.py --presets tiny 125m --batch 4 --prompt 128 --new 64 --rounds 3 \
        [--single-thread]

For each preset: random-init params (seed 0), float32 on both sides, greedy, B random prompts
of P tokens, N new tokens, no stop token. Prefill time is the time of a 1-token generation;
decode time is the rest of an N-token generation (N - 1 decode steps). Each round times
jaxlm then transformers back to back; the table gives medians of tokens/s and of the
per-round ratio jaxlm / transformers (a shared machine is noisy: ratios of runs taken side by
side are what holds). It also reports the largest logit difference of one forward pass and
whether the greedy tokens agree, as a check that both run the same model. Without
`transformers` or `jaxlm.interop`, the transformers columns are left out.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "--single-thread" in sys.argv:  # before JAX starts: one compute thread for XLA, as for torch
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                               "intra_op_parallelism_threads=1").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxlm import generate as gen  # noqa: E402
from jaxlm import model  # noqa: E402
from jaxlm.config import model_preset  # noqa: E402


def _hf_model(cfg, params, directory: str, threads: int):
    """The same weights as a transformers Llama model, or (None, why not)."""
    try:
        import torch
        import transformers

        from jaxlm.interop import save_hf
    except ImportError as e:
        return None, f"not available ({e.name})"
    save_hf(cfg, params, directory, family="llama", dtype="float32")
    torch.set_num_threads(threads)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf, f"transformers {transformers.__version__}, torch {torch.__version__}, {threads} threads"


def _timer(fn):
    def timed(n):
        t0 = time.perf_counter()
        out = fn(n)
        return time.perf_counter() - t0, out
    return timed


def bench(name: str, B: int, P: int, N: int, rounds: int, torch_threads: int) -> dict:
    cfg = model_preset(name)
    cfg = type(cfg)(**{**cfg.__dict__, "dtype": "float32", "max_seq_len": max(cfg.max_seq_len, P + N)})
    params = model.init(cfg, jax.random.key(0))
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (B, P), dtype=np.int32)

    jx = _timer(lambda n: np.asarray(jax.block_until_ready(gen.generate(cfg, params, prompts, None, n)).tokens))
    with tempfile.TemporaryDirectory() as tmp:
        hf, hf_note = _hf_model(cfg, params, tmp, torch_threads)
        if hf is not None:
            import torch

            ids = torch.from_numpy(prompts.astype(np.int64))
            mask = torch.ones_like(ids)

            def hf_generate(n):
                with torch.no_grad():
                    out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n)
                return out[:, P:].numpy()

            hft = _timer(hf_generate)
            with torch.no_grad():
                hf_logits = hf(ids[:1]).logits.numpy()[0]
            jax_logits = np.asarray(model.apply(cfg, params, prompts[:1]))[0]
            logit_diff = float(np.abs(hf_logits - jax_logits).max())
        warm = {"jaxlm": [jx(1)[0], jx(N)[0]]}  # compiles
        if hf is not None:
            warm["hf"] = [hft(1)[0], hft(N)[0]]
        rows = {k: {"prefill": [], "decode": []} for k in warm}
        tokens = {}
        for _ in range(rounds):
            for side, fn in (("jaxlm", jx), ("hf", hft if hf is not None else None)):
                if fn is None:
                    continue
                first, _ = fn(1)
                full, tokens[side] = fn(N)
                rows[side]["prefill"].append(B * P / first)
                rows[side]["decode"].append(B * (N - 1) / max(full - first, 1e-9))
    result = {"preset": name, "params": model.param_count(cfg), "B": B, "P": P, "N": N,
              "jaxlm_compile_s": sum(warm["jaxlm"])}
    for side, r in rows.items():
        for kind in ("prefill", "decode"):
            result[f"{side}_{kind}"] = statistics.median(r[kind])
    if hf is not None:
        for kind in ("prefill", "decode"):
            ratios = [a / b for a, b in zip(rows["jaxlm"][kind], rows["hf"][kind])]
            result[f"ratio_{kind}"] = statistics.median(ratios)
            result[f"ratio_{kind}_range"] = (min(ratios), max(ratios))
        result["max_logit_diff"] = logit_diff
        same = tokens["jaxlm"] == tokens["hf"]
        result["greedy_tokens_equal"] = f"{int(same.all(axis=1).sum())}/{B} rows, {same.mean():.3f} of tokens"
    result["hf"] = hf_note
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "125m"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--single-thread", action="store_true",
                   help="one compute thread on both sides (XLA flags; torch.set_num_threads(1)): on a "
                   "shared, loaded machine, torch's thread pool otherwise spins against other jobs")
    args = p.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    threads = 1 if args.single_thread else os.cpu_count() or 1
    results = [bench(name, args.batch, args.prompt, args.new, args.rounds, threads)
               for name in args.presets]
    for r in results:
        print(r)
    print("\n| preset | params | B x P + N | jaxlm prefill tok/s | jaxlm decode tok/s | HF prefill tok/s "
          "| HF decode tok/s | prefill jaxlm/HF | decode jaxlm/HF |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        hf = lambda k, r=r: f"{r[k]:.0f}" if k in r else "n/a"
        rng = lambda k, r=r: f"{r[k]:.2f} ({r[k + '_range'][0]:.2f}-{r[k + '_range'][1]:.2f})" if k in r else "n/a"
        print(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['B']} x {r['P']} + {r['N']} | "
              f"{r['jaxlm_prefill']:.0f} | {r['jaxlm_decode']:.0f} | {hf('hf_prefill')} | {hf('hf_decode')} | "
              f"{rng('ratio_prefill')} | {rng('ratio_decode')} |")


if __name__ == "__main__":
    main()
