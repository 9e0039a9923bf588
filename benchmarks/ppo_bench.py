"""One reinforcement-learning iteration of `jaxlm ppo` (ppo.algorithm=grpo) against TRL's
`GRPOTrainer` on the same tiny model, prompts, batch and response length, on CPU.

    PYTHONPATH=/tmp/trl_pkgs python benchmarks/ppo_bench.py --prompts 16 --group 4 --prompt 32 --new 16 \
        --minibatches 2 --warmup 2 --iterations 5 [--single-thread] [--natural-stop] [--sides jaxlm trl]

(TRL 1.16 has no PPOTrainer; GRPO is its closest trainer. Without `trl` importable, the TRL rows
are left out.)

Both sides: the `tiny` preset, float32, random init (`jaxlm.model.init`, seed 0; exported to a
transformers LlamaForCausalLM with `jaxlm.interop.save_hf` for TRL), a frozen reference of the
same weights; (warmup + iterations) x P distinct prompts "Reverse: <letters>" of exactly
`--prompt` bytes, tokenized by jaxlm's byte tokenizer (TRL: a `PreTrainedTokenizerFast` with the
same ids, id = byte + 3, pad 0, bos 1, eos 2; no template, no bos: the prompt is its bytes); per
iteration P prompts x G samples at temperature 1 (no top-k / top-p) of K new tokens; scored by the
built-in `reverse` checker (`jaxlm.data.tasks.check`, 1 or 0: on TRL's side the same call inside a
Python reward function); group-normalised advantages; one epoch (TRL num_iterations=1) of M
optimizer steps over the rollout (jaxlm ppo.minibatches=M; TRL steps_per_generation=M with
gradient_accumulation_steps=1, per_device_train_batch_size=P*G/M); the clipped policy loss
(eps 0.2) + beta x the k3 KL to the reference in the loss (jaxlm ppo.kl_in_loss=true,
ppo.kl_coef=beta; TRL beta); AdamW (b2 0.999, weight decay 0), lr 1e-6 decaying linearly to 0,
no warmup, gradient clipping at norm 1; no gradient checkpointing / remat (TRL's default is on:
turned off here, as jaxlm's model.remat=none); no checkpoint saved inside the timed iterations.
Left unequal: TRL's defaults for the loss (loss_type=dapo, its KL multiplied by the importance
ratio: use_bias_correction_kl) and, with M=1 only, TRL skips the old log-prob pass (on-policy:
it reuses the update's own) where jaxlm always runs it.

Generation length: by default both sides generate exactly K tokens: TRL through
`generation_kwargs={"min_new_tokens": K}` (transformers masks the stop ids until K), jaxlm by
running `jaxlm.train.ppo.main` with its stop list emptied (the module's `default_stops` patched in
this process only) and ppo.missing_stop_penalty=0, so the score stays 0/1 as TRL's. With
`--natural-stop` both stop on the same ids (eos and <|end_turn|>) and the mean response lengths
show how far apart they ended up.

What is timed, per side, after `--warmup` iterations (jaxlm's compile included there), median over
`--iterations` iterations: seconds per iteration, wall clock from the end of one iteration to the
end of the next (jaxlm: between the calls of `main`'s per-iteration `log`, after its metrics row is
written; TRL: between `on_step_end` callbacks at every M-th optimizer step, so logging and the
data loader count). The split: jaxlm from RUN_DIR/metrics.jsonl (time_rollout = sampling + the
policy's and reference's log-prob passes + advantages; time_score; time_update); TRL from a
subclass that times `_generate_and_score_completions` (= rollout + score: sampling, the old and
reference log-prob passes, rewards, advantages) and, within it, `_calculate_rewards` (score);
update = the rest of the iteration. "other" = the iteration less the split (jaxlm: metrics and
logging; TRL: nothing, its update column holds the rest). The sides run one after the other (all
of jaxlm, then all of TRL) in one process, so a noisy machine shows in the ranges.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

if "--single-thread" in sys.argv:  # before JAX starts: one compute thread for XLA, as for torch
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                               "intra_op_parallelism_threads=1").strip()

import logging  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxlm import model  # noqa: E402
from jaxlm.config import from_dict, model_preset  # noqa: E402
from jaxlm.data import tasks  # noqa: E402
from jaxlm.data.tokenizers import ByteTokenizer  # noqa: E402

PREFIX = "Reverse: "


@dataclasses.dataclass(frozen=True)
class Setup:
    P: int  # prompts per iteration
    G: int  # samples per prompt
    L: int  # prompt bytes (= tokens)
    K: int  # new tokens
    M: int  # optimizer steps per iteration
    warmup: int
    iterations: int
    beta: float
    lr: float
    natural_stop: bool

    @property
    def total(self) -> int:
        return self.warmup + self.iterations


def make_prompts(n: int, length: int, seed: int = 0) -> list[dict]:
    """`n` checkable `reverse` records whose prompt is exactly `length` ASCII bytes."""
    if length <= len(PREFIX):
        raise SystemExit(f"--prompt must be more than {len(PREFIX)} bytes")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        word = "".join(rng.choice(list(string.ascii_lowercase), length - len(PREFIX)))
        out.append({"prompt": PREFIX + word, "task": "reverse", "answer": word[::-1]})
    return out


def stop_ids() -> list[int]:
    tok = ByteTokenizer()
    return [i for i in (tok.eos_id, tok.special_ids.roles.get("end_turn")) if i is not None]


def _median_range(xs):
    return statistics.median(xs), min(xs), max(xs)


# --- jaxlm ----------------------------------------------------------------------------------------


def run_jaxlm(s: Setup, mcfg, params, records, tmp: Path) -> dict:
    from jaxlm.testing import write_run
    from jaxlm.train import ppo

    prompt_file = tmp / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    tree = {
        "model": dataclasses.asdict(mcfg),
        "data": {"tokenizer": "byte"},
        "sft": {"template": "{prompt}"},
        "optim": {"name": "adamw", "lr": s.lr, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
                  "warmup_steps": 0, "decay": "linear", "final_lr_fraction": 0.0, "clip_norm": 1.0},
        "train": {"steps": s.total, "grad_accum_steps": 1, "seed": 0, "save_every": 10**6, "progress": False,
                  "run_dir": str(tmp / "jaxlm_init")},
        "ppo": {"algorithm": "grpo", "prompt_files": [str(prompt_file)], "checker": True,
                "prompts_per_iteration": s.P, "group_size": s.G, "max_new_tokens": s.K, "temperature": 1.0,
                "missing_stop_penalty": 0.0, "epochs": 1, "minibatches": s.M,
                "kl_coef": s.beta, "kl_in_loss": True, "frozen_dtype": "float32"},
    }
    cfg = from_dict(tree)
    init = write_run(tmp / "jaxlm_init", cfg, params, step=1)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(tmp / "jaxlm_run"),
                                                             init_from=str(init)))
    marks = []

    def log(line):
        marks.append(time.perf_counter())

    patched = not s.natural_stop and hasattr(ppo, "default_stops")
    original = getattr(ppo, "default_stops", None)
    if patched:
        ppo.default_stops = lambda tok: []  # no stop token: every response is K tokens
    try:
        start = time.perf_counter()
        ppo.main(cfg, log=log)
    finally:
        if patched:
            ppo.default_stops = original
    rows = [json.loads(line) for line in (tmp / "jaxlm_run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time_rollout" in r and "event" not in r]
    assert len(rows) == s.total == len(marks), (len(rows), len(marks))
    ends = [start] + marks
    timed = range(s.warmup, s.total)
    iters = [ends[i + 1] - ends[i] for i in timed]
    split = {k: [rows[i][f"time_{k}"] for i in timed] for k in ("rollout", "score", "update")}
    other = [t - sum(split[k][j] for k in split) for j, t in enumerate(iters)]
    return {"side": "jaxlm", "iteration": iters, **split, "other": other,
            "first_iterations_s": [ends[i + 1] - ends[i] for i in range(s.warmup)],
            "response_len": statistics.mean(rows[i]["response_len"] for i in timed),
            "optimizer_steps": s.M,
            "note": f"jax {jax.__version__}" + ("" if patched or s.natural_stop else ", stop list NOT emptied")}


# --- TRL ------------------------------------------------------------------------------------------


def byte_tokenizer_hf():
    """A transformers tokenizer with jaxlm's byte ids (byte b -> b + 3; pad 0, bos 1, eos 2) and no
    added bos/eos: equal to `ByteTokenizer.encode` on any text; ids past the bytes decode to nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{b2u[b]: b + ByteTokenizer.offset for b in range(256)}}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   padding_side="left")


def run_trl(s: Setup, mcfg, params, records, tmp: Path, threads: int) -> dict:
    try:
        import datasets
        import pyarrow
        import torch
        import transformers
        import trl
        from transformers import GenerationConfig, TrainerCallback
        from transformers.trainer_callback import PrinterCallback, ProgressCallback
        from trl import GRPOConfig, GRPOTrainer

        from jaxlm.interop import save_hf
    except ImportError as e:
        return {"side": "trl", "note": f"not available ({e.name}); run with PYTHONPATH=/tmp/trl_pkgs"}

    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    hf_dir = tmp / "hf"
    save_hf(mcfg, params, str(hf_dir), family="llama", dtype="float32")
    GenerationConfig(bos_token_id=1, eos_token_id=stop_ids(), pad_token_id=0).save_pretrained(hf_dir)
    tok = byte_tokenizer_hf()
    for r in records[:3]:
        assert tok(text=[r["prompt"]])["input_ids"][0] == ByteTokenizer().encode(r["prompt"]).tolist()

    def reverse_checker(prompts, completions, task, answer, **kw):
        return [float(tasks.check({"task": t, "answer": a}, c)) for c, t, a in zip(completions, task, answer)]

    clock = {"gen_score": 0.0, "score": 0.0, "lengths": []}

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            clock["gen_score"] += time.perf_counter() - t0
            return out

        def _calculate_rewards(self, *a, **k):
            t0 = time.perf_counter()
            out = super()._calculate_rewards(*a, **k)
            clock["score"] += time.perf_counter() - t0
            return out

        def _generate_single_turn(self, *a, **k):
            completion_ids, logprobs = super()._generate_single_turn(*a, **k)
            clock["lengths"] += [len(c) for c in completion_ids]
            return completion_ids, logprobs

    per_iteration = []

    class Marks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock["last"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % s.M == 0:
                now = time.perf_counter()
                lengths = clock["lengths"]
                per_iteration.append({"iteration": now - clock["last"], "gen_score": clock["gen_score"],
                                      "score": clock["score"], "response_len": float(np.mean(lengths)),
                                      "steps": state.global_step})
                clock.update(last=now, gen_score=0.0, score=0.0, lengths=[])

    # a fixed fingerprint: `Dataset.from_list` hashes the table with dill, which fails on this install
    # (datasets 5.2 + dill 0.4.1 + pyarrow 26: "Can't pickle <class 'MonthDayNano'>")
    dataset = datasets.Dataset(pyarrow.Table.from_pylist(records), fingerprint="ppo_bench")
    generation_kwargs = None if s.natural_stop else {"min_new_tokens": s.K}
    args = GRPOConfig(
        output_dir=str(tmp / "trl"), use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0,
        max_steps=s.total * s.M, per_device_train_batch_size=s.P * s.G // s.M, gradient_accumulation_steps=1,
        steps_per_generation=s.M, num_generations=s.G, num_iterations=1, max_completion_length=s.K,
        temperature=1.0, top_p=1.0, top_k=0, generation_kwargs=generation_kwargs, beta=s.beta,
        epsilon=0.2, scale_rewards="group", loss_type="dapo",
        learning_rate=s.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, activation_checkpointing=False,
        model_init_kwargs={"dtype": torch.float32})
    trainer = Timed(model=str(hf_dir), reward_funcs=reverse_checker, args=args, processing_class=tok,
                    train_dataset=dataset, callbacks=[Marks()])
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    checkpointing = getattr(trainer.model, "is_activation_checkpointing", None)
    assert not checkpointing, "TRL's activation (gradient) checkpointing is on"
    trainer.train()
    assert len(per_iteration) == s.total, per_iteration
    timed = per_iteration[s.warmup:]
    iters = [r["iteration"] for r in timed]
    return {"side": "trl", "iteration": iters, "rollout": [r["gen_score"] - r["score"] for r in timed],
            "score": [r["score"] for r in timed], "update": [r["iteration"] - r["gen_score"] for r in timed],
            "other": [0.0] * len(timed), "first_iterations_s": [r["iteration"] for r in per_iteration[:s.warmup]],
            "response_len": statistics.mean(r["response_len"] for r in timed), "optimizer_steps": s.M,
            "note": f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
                    f"{threads} threads"}


# --- main -----------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16, help="P: prompts per iteration")
    p.add_argument("--group", type=int, default=4, help="G: samples per prompt")
    p.add_argument("--prompt", type=int, default=32, help="prompt length in bytes (= tokens)")
    p.add_argument("--new", type=int, default=16, help="K: new tokens per sample")
    p.add_argument("--minibatches", type=int, default=2, help="M: optimizer steps per iteration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--beta", type=float, default=0.04, help="the KL coefficient (in the loss, both sides)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--natural-stop", action="store_true",
                   help="stop on eos / <|end_turn|> on both sides instead of forcing K tokens")
    p.add_argument("--sides", nargs="+", default=["jaxlm", "trl"], choices=["jaxlm", "trl"])
    p.add_argument("--single-thread", action="store_true",
                   help="one compute thread on both sides (XLA flags; torch.set_num_threads(1))")
    args = p.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on every checkpoint read
    s = Setup(args.prompts, args.group, args.prompt, args.new, args.minibatches, args.warmup, args.iterations,
              args.beta, args.lr, args.natural_stop)
    if (s.P * s.G) % s.M:
        raise SystemExit(f"--minibatches={s.M} must divide prompts x group = {s.P * s.G}")
    if s.iterations < 1:
        raise SystemExit("--iterations must be at least 1")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    threads = 1 if args.single_thread else os.cpu_count() or 1
    mcfg = dataclasses.replace(model_preset("tiny"), dtype="float32")
    params = model.init(mcfg, jax.random.key(0))
    records = make_prompts(s.P * s.total, s.L)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sides:
            t0 = time.perf_counter()
            if side == "jaxlm":
                r = run_jaxlm(s, mcfg, params, records, Path(tmp))
            else:
                r = run_trl(s, mcfg, params, records, Path(tmp), threads)
            r["run_s"] = time.perf_counter() - t0
            results.append(r)
            print({k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v] if isinstance(v, list)
                       else v) for k, v in r.items()}, flush=True)
    print(f"\nmodel tiny ({model.param_count(mcfg) / 1e6:.2f}M params, float32), P={s.P} prompts x G={s.G}, "
          f"prompt {s.L} + K={s.K} new tokens ({'natural stop' if s.natural_stop else 'forced to K'}), "
          f"M={s.M} optimizer steps / iteration, beta={s.beta}; medians over {s.iterations} iterations after "
          f"{s.warmup} warm-up (range in brackets)")
    print("\n| side | s / iteration | rollout s | score s | update s | other s | mean response tokens | "
          "warm-up iterations s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    medians = {}
    for r in results:
        if "iteration" not in r:
            print(f"| {r['side']} | n/a ({r['note']}) | | | | | | |")
            continue
        m, lo, hi = _median_range(r["iteration"])
        medians[r["side"]] = m
        cells = " | ".join(f"{statistics.median(r[k]):.3f}" for k in ("rollout", "score", "update", "other"))
        warm = ", ".join(f"{x:.2f}" for x in r["first_iterations_s"])
        print(f"| {r['side']} | {m:.3f} ({lo:.3f}-{hi:.3f}) | {cells} | {r['response_len']:.2f} | {warm} |")
    if len(medians) == 2:
        print(f"\njaxlm / TRL seconds per iteration: {medians['jaxlm'] / medians['trl']:.2f} "
              f"(TRL / jaxlm: {medians['trl'] / medians['jaxlm']:.2f}x)")


if __name__ == "__main__":
    main()
