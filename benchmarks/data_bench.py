"""Data-stage throughput: the filter chain, tokenization per core, and the loader.

    python benchmarks/data_bench.py [--docs 2000] [--tokenizer data/stdlib/tokenizer.model]

1. Filter chain: documents/s through prepare's default prose rules (html, gopher_quality,
   gopher_repetition, c4, pii), on synthetic English-like documents of ~350 words (real
   stop words, sentences, a few paragraphs; most pass every rule, so every rule runs).
2. Tokenize: tokens/s of one core encoding the embedded corpus with the given SentencePiece
   model (`jaxlm data tokenize` runs one such worker per core).
3. Loader: batches/s of `Loader.batch` for concat-packed CLM (16 x 256, the tiny config's
   batch) and first-fit UL2 (8 x 2048), next to the batches/s the training step consumes:
   tiny measured here on CPU, 1B (seq 2048) derived from a stated H100 throughput.
Each figure is the best of `--repeats` timings.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

STOP = "the be to of and that have with a in is it for on as was at by".split()
CONTENT = ("model data train loss token layer network value result paper method system "
           "people city river music history science language number water light energy "
           "market school family animal season garden window market letter").split()


def english_like(rng: np.random.Generator, words: int) -> str:
    sentences, n = [], 0
    while n < words:
        k = int(rng.integers(8, 20))
        ws = [STOP[i] if rng.random() < 0.45 else CONTENT[j]
              for i, j in zip(rng.integers(0, len(STOP), k), rng.integers(0, len(CONTENT), k))]
        sentences.append(" ".join(ws).capitalize() + ".")
        n += k
    paras = [" ".join(sentences[i:i + 4]) for i in range(0, len(sentences), 4)]
    return "\n\n".join(paras)


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def filter_chain(n_docs: int, repeats: int) -> dict:
    from jaxlm.config import PrepareConfig
    from jaxlm.prepare import build_rules

    rules = build_rules(PrepareConfig().rules)
    rng = np.random.default_rng(0)
    docs = [english_like(rng, 350) for _ in range(n_docs)]
    kept = 0

    def run():
        nonlocal kept
        kept = 0
        for text in docs:
            for rule in rules:
                text = rule(text).text
                if text is None:
                    break
            kept += text is not None

    s = best(run, repeats)
    return {"docs_per_s": n_docs / s, "kept_fraction": kept / n_docs, "rules": [type(r).__name__ for r in rules]}


def tokenize(tokenizer_path: str, n_docs: int, repeats: int) -> dict:
    from jaxlm.data.corpus import stdlib_documents
    from jaxlm.data.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    texts = [t for _, t in stdlib_documents(n_docs).documents]
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    s = best(lambda: [tok.encode(t) for t in texts], repeats)
    return {"tokens_per_s_per_core": n_tokens / s, "bytes_per_token": sum(len(t.encode()) for t in texts) / n_tokens}


def loader(repeats: int) -> dict:
    from jaxlm.config import DataConfig
    from jaxlm.data.pipeline import build_lm_data

    out = {}
    for name, objective, B, T in (("concat_clm_16x256", {"clm": 1.0}, 16, 256),
                                  ("first_fit_ul2_8x2048", {"ul2": 1.0}, 8, 2048)):
        train, _, _ = build_lm_data(DataConfig(heldout_fraction=0.0, objective=objective), T)
        train.batch(1024, B)  # past the rows build_lm_data sampled; builds the first_fit groups before
        steps = 50
        cursor = [1024 + B]  # then every timed batch is new rows

        def run():
            for _ in range(steps):
                train.batch(cursor[0], B)
                cursor[0] += B

        out[name] = steps / best(run, repeats)
    return out


def tiny_step_batches_per_s() -> float:
    from jaxlm.bench import train_step_timer
    from jaxlm.config import load_config

    cfg = load_config("configs/pretrain/tiny.yaml", ["mesh.fsdp=1", "train.progress=false"])
    time_steps, _ = train_step_timer(cfg)
    return 1.0 / time_steps(5)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=2000)
    p.add_argument("--tokenizer", default="data/stdlib/tokenizer.model")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    f = filter_chain(args.docs, args.repeats)
    print(f"filter chain ({', '.join(f['rules'])}): {f['docs_per_s']:.0f} docs/s "
          f"({f['kept_fraction']:.0%} kept)")
    t = tokenize(args.tokenizer, 200, args.repeats)
    print(f"tokenize ({args.tokenizer}): {t['tokens_per_s_per_core'] / 1e6:.2f} M tokens/s per core "
          f"({t['bytes_per_token']:.2f} bytes/token)")
    ld = loader(args.repeats)
    tiny = tiny_step_batches_per_s()
    # 1B at seq 2048 on one H100: 6N + 6LTD FLOPs/token at 50% MFU of 989 TFLOP/s.
    from jaxlm.config import model_preset
    from jaxlm.perf import flops_per_token

    fpt = flops_per_token(model_preset("1b"), 2048)
    h100_rows = 0.5 * 989e12 / fpt / 2048
    print(f"loader concat CLM 16x256: {ld['concat_clm_16x256']:.0f} batches/s; the tiny step here "
          f"consumes {tiny:.1f} batches/s")
    print(f"loader first-fit UL2 8x2048: {ld['first_fit_ul2_8x2048']:.0f} batches/s = "
          f"{8 * ld['first_fit_ul2_8x2048']:.0f} rows/s per process; a 1B step on one H100 at 50% "
          f"MFU consumes {h100_rows:.1f} rows/s of 2048 (per GPU, so per host x8)")


if __name__ == "__main__":
    main()
