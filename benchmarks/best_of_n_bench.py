"""Best-of-N sampling throughput: the sampler call of `jaxlm rejection-sample` against the same
loop over Hugging Face `transformers` `generate` on the same weights, on CPU, in alternating rounds.

    python benchmarks/best_of_n_bench.py --presets tiny 125m --prompts 4 --samples 8 --prompt 32 --new 16 \
        --rounds 3 [--single-thread]

For each preset: random-init params (seed 0), float32 on both sides, M random prompts of P
tokens, each sampled N times at temperature 1 (no top-k, no top-p), K new tokens, no stop token.
jaxlm: one `generate` call on the M x N rows with a key per row (as `jaxlm.train.rejection`
samples through `generate_texts`); transformers: `generate(do_sample=True,
num_return_sequences=N)`. Each round times jaxlm then transformers back to back; the table gives
medians of samples/s and of the per-round ratio jaxlm / transformers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

if "--single-thread" in sys.argv:  # before JAX starts: one compute thread for XLA, as for torch
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                               "intra_op_parallelism_threads=1").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate_bench import _hf_model, _timer  # noqa: E402

from jaxlm import generate as gen  # noqa: E402
from jaxlm import model  # noqa: E402
from jaxlm.config import model_preset  # noqa: E402


def bench(name: str, M: int, N: int, P: int, K: int, rounds: int, torch_threads: int) -> dict:
    cfg = model_preset(name)
    cfg = type(cfg)(**{**cfg.__dict__, "dtype": "float32", "max_seq_len": max(cfg.max_seq_len, P + K)})
    params = model.init(cfg, jax.random.key(0))
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (M, P), dtype=np.int32)
    rows = np.repeat(prompts, N, axis=0)  # prompt i's N samples side by side, as rejection sampling lays them
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), np.arange(M * N))
    jx = _timer(lambda _: np.asarray(jax.block_until_ready(
        gen.generate(cfg, params, rows, None, K, temperature=1.0, key=keys)).tokens))
    with tempfile.TemporaryDirectory() as tmp:
        hf, hf_note = _hf_model(cfg, params, tmp, torch_threads)
        sides = {"jaxlm": jx}
        if hf is not None:
            import torch

            ids = torch.from_numpy(prompts.astype(np.int64))
            mask = torch.ones_like(ids)

            def hf_sample(_):
                with torch.no_grad():
                    return hf.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                       top_p=1.0, num_return_sequences=N, max_new_tokens=K,
                                       min_new_tokens=K)[:, P:].numpy()

            sides["hf"] = _timer(hf_sample)
        compile_s = jx(None)[0]
        if hf is not None:
            sides["hf"](None)  # warm-up
        rates = {side: [] for side in sides}
        for _ in range(rounds):
            for side, fn in sides.items():
                seconds, tokens = fn(None)
                assert tokens.shape == (M * N, K), tokens.shape
                rates[side].append(M * N / seconds)
    result = {"preset": name, "params": model.param_count(cfg), "M": M, "N": N, "P": P, "K": K,
              "jaxlm_compile_s": compile_s}
    for side, r in rates.items():
        result[f"{side}_samples_per_s"] = statistics.median(r)
    if hf is not None:
        ratios = [a / b for a, b in zip(rates["jaxlm"], rates["hf"])]
        result["ratio"], result["ratio_range"] = statistics.median(ratios), (min(ratios), max(ratios))
    result["hf"] = hf_note
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "125m"])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--single-thread", action="store_true",
                   help="one compute thread on both sides (XLA flags; torch.set_num_threads(1))")
    args = p.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    threads = 1 if args.single_thread else os.cpu_count() or 1
    results = [bench(name, args.prompts, args.samples, args.prompt, args.new, args.rounds, threads)
               for name in args.presets]
    for r in results:
        print(r)
    print("\n| preset | params | prompts x N, P + K | jaxlm samples/s | HF samples/s | jaxlm/HF |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        hf = f"{r['hf_samples_per_s']:.1f}" if "hf_samples_per_s" in r else "n/a"
        ratio = f"{r['ratio']:.2f} ({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f})" if "ratio" in r else "n/a"
        print(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['M']} x {r['N']}, {r['P']} + {r['K']} | "
              f"{r['jaxlm_samples_per_s']:.1f} | {hf} | {ratio} |")


if __name__ == "__main__":
    main()
