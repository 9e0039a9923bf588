"""`jaxlm <command>`: the command line. Expected mistakes print one line and exit 2."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys

from jaxlm.config import ConfigError, load_config
from jaxlm.errors import RunFailed

COMMANDS = {
    "data": "prepare raw documents: filter, scrub and deduplicate (data prepare)",
    "pretrain": "train a decoder from scratch (or resume) on a config",
    "sft": "supervised fine-tuning on instruction / chat JSONL and built-in tasks (loss on responses)",
    "reward": "train a reward model (value head on an LM backbone) on preference pairs and rankings",
    "score": "the reward of every response of a JSONL file under a reward-model run",
    "dpo": "direct preference optimisation (DPO, IPO, cDPO, robust, SimPO) against a frozen reference",
    "rejection-sample": "best-of-N sampling scored by a checker or a reward model, then SFT on the best, in rounds",
    "ppo": "reinforcement learning on sampled responses (PPO, GRPO, RLOO) scored by a checker or a reward model",
    "bench": "time the train step of a config; optionally side by side with reference steps",
    "plan": "bytes per device, compute and training time of a config on N devices, before running it",
    "generate": "sample text from a run's checkpoint: one prompt streamed, or a JSONL of prompts",
    "eval": "perplexity and bits per byte on held-out text, exact match on question/answer files, "
            "long-context loss by position and passkey retrieval",
    "convert": "Hugging Face checkpoints (Llama, Qwen2, Mistral) into a jaxlm run, and back",
    "pipeline": "the whole road in one command: data, pretrain, sft, reward, rs, dpo, ppo, eval; resumable",
    "report": "draw what a run or a pipeline did (report.html and PNG figures)",
    "config": "the shipped configs (list), and a config resolved with every default (show)",
}
# The shipped configs (jaxlm/configs/KIND/) a command takes by name: `jaxlm pretrain tiny`.
KINDS = {"pretrain": ("pretrain",), "sft": ("sft",), "reward": ("reward",), "dpo": ("dpo",),
         "rejection-sample": ("rs",), "ppo": ("ppo",), "pipeline": ("pipeline",), "bench": ("bench",),
         "data": ("data", "pretrain"), "plan": ("pretrain",)}


def _common(p: argparse.ArgumentParser):
    p.add_argument("config", help="YAML file of overrides, e.g. configs/pretrain/tiny.yaml, or a shipped "
                   "config's name (jaxlm config list), e.g. tiny")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="overrides applied after the file, e.g. train.steps=100 model.n_layers=2 "
                   "(--train.steps=100 also works)")


def _training(p: argparse.ArgumentParser):
    _common(p)
    p.add_argument("--json", action="store_true",
                   help="print only the run's summary, as one JSON line at the end (for scripts)")
    _quiet(p, "no banner, progress, held-out lines or end summary: only warnings and errors (on stderr)")


def _quiet(p: argparse.ArgumentParser, what: str):
    p.add_argument("-q", "--quiet", action="store_true", help=what)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxlm", description="Train large language models end to end in JAX.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    pipe = sub.add_parser("pipeline", help=COMMANDS["pipeline"], description=COMMANDS["pipeline"] +
                          ". Each stage runs in PIPELINE_DIR/STAGE from the model of the stage before it; "
                          "re-running skips finished stages and resumes the interrupted one; "
                          "PIPELINE_DIR/report.html is refreshed after each stage (jaxlm/pipeline.py).")
    pipe.add_argument("config", help="pipeline YAML: dir, set, stages (e.g. configs/pipeline/tiny.yaml)")
    pipe.add_argument("overrides", nargs="*", metavar="key=value",
                      help="dir=PATH, or STAGE.section.key=value, e.g. pretrain.train.steps=100")
    which = pipe.add_mutually_exclusive_group()
    which.add_argument("--from", dest="start", metavar="STAGE", help="redo STAGE and every stage after it")
    which.add_argument("--only", metavar="STAGE", help="run STAGE alone (the stages before it must have run)")
    which.add_argument("--until", metavar="STAGE", help="run the stages up to STAGE")
    _quiet(pipe, "the training stages run with --quiet; the pipeline prints a line per stage, the data stage "
           "its counts")
    rep = sub.add_parser("report", help=COMMANDS["report"], description=COMMANDS["report"] +
                         ": DIR/report.html (self-contained) and DIR/figures/*.png.")
    rep.add_argument("dir", metavar="DIR", help="a run directory or a pipeline directory")
    cf = sub.add_parser("config", help=COMMANDS["config"], description=COMMANDS["config"] + ". The "
                        "configs ship inside the package: a command takes one by name from any directory.")
    cf_sub = cf.add_subparsers(dest="config_command", metavar="CONFIG_COMMAND", required=True)
    cf_sub.add_parser("list", help="the shipped configs, KIND/NAME (jaxlm KIND NAME runs one)")
    show = cf_sub.add_parser("show", help="a config with every default filled in, as YAML",
                             description="Print a config resolved with every default, as a run would use it "
                             "(docs/config.md says what each key means).")
    show.add_argument("items", nargs="*", metavar="[CONFIG] [SECTION ...] [key.sub=value ...]",
                      help="a config file or shipped name (default: no file, the defaults), the sections to "
                      "print (default: all), overrides")
    pre = sub.add_parser("pretrain", help=COMMANDS["pretrain"], description=COMMANDS["pretrain"] +
                         ". Resumes from RUN_DIR's latest checkpoint; writes RUN_DIR/config.yaml, "
                         "metrics.jsonl, tensorboard/ and checkpoints/.")
    _training(pre)
    sft = sub.add_parser("sft", help=COMMANDS["sft"], description=COMMANDS["sft"] +
                         ". Starts from train.init_from (a pretrained or converted run), resumes from "
                         "RUN_DIR's latest checkpoint; counts unusable records; with sft.tasks, reports "
                         "exact-match accuracy per task before and after training.")
    _training(sft)
    rw = sub.add_parser("reward", help=COMMANDS["reward"], description=COMMANDS["reward"] +
                        ". Starts the backbone from train.init_from (an SFT run), the value head fresh; reports "
                        "held-out pairwise accuracy per task and writes RUN_DIR/reward_stats.json.")
    _training(rw)
    dp = sub.add_parser("dpo", help=COMMANDS["dpo"], description=COMMANDS["dpo"] +
                        ". The policy from train.init_from, the reference from dpo.reference_from (default: the "
                        "same run); with dpo.tasks, reports exact-match accuracy per task before and after.")
    _training(dp)
    rs = sub.add_parser("rejection-sample", help=COMMANDS["rejection-sample"], description=COMMANDS["rejection-sample"]
                        + ". Round 0 samples from train.init_from; each round writes RUN_DIR/round_R/{samples,kept,"
                        "pairs}.jsonl and fine-tunes on the kept set (RUN_DIR/round_R/sft); with rs.tasks, reports "
                        "exact-match accuracy per task after each round.")
    _training(rs)
    pp = sub.add_parser("ppo", help=COMMANDS["ppo"], description=COMMANDS["ppo"] +
                        ". The policy and the frozen reference from train.init_from (an SFT run); train.steps "
                        "iterations of rollout, scoring and ppo.epochs x ppo.minibatches updates, resumable per "
                        "checkpoint; with ppo.tasks, reports exact-match accuracy per task before and after.")
    _training(pp)
    data = sub.add_parser("data", help=COMMANDS["data"], description="Data preparation commands.")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    prep = data_sub.add_parser("prepare", help="filter, scrub and deduplicate raw documents per source",
                               description="Stream the prepare.sources through the rules, exact and "
                               "MinHash dedup (and optionally suffix-array span removal); write "
                               "OUT_DIR/<source>.jsonl, report.json, report.txt and rejects.jsonl.")
    _common(prep)
    tok = data_sub.add_parser("tokenizer", help="train a SentencePiece tokenizer (specials reserved)",
                              description="Train SentencePiece on tokenizer.inputs with pad/bos/eos/unk, "
                              "FIM sentinels, UL2 mode tokens, span sentinels and chat role markers "
                              "reserved at fixed ids; writes tokenizer.out + '.model'.")
    _common(tok)
    toks = data_sub.add_parser("tokenize", help="tokenize documents into ArrayRecord shards",
                               description="Tokenize tokenize.inputs in worker processes, append eos, "
                               "write ArrayRecord shards and index.json to tokenize.out_dir.")
    _common(toks)
    b = sub.add_parser("bench", help=COMMANDS["bench"], description=COMMANDS["bench"] +
                       ". Ends with one line of name=value pairs.")
    _common(b)
    b.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    b.add_argument("--rounds", type=int, default=1,
                   help="repeat the timing (alternating with the references); medians are reported")
    b.add_argument("--compare", metavar="DIR", default=None,
                   help="directory holding jax_llama_ref.py and torch_llama_ref.py (e.g. ../shared/bench)")
    b.add_argument("--no-sampler", action="store_true",
                   help="skip timing the KV-cache sampler (prefill_tokens_per_s, decode_tokens_per_s)")
    pl = sub.add_parser("plan", help=COMMANDS["plan"], description=COMMANDS["plan"] +
                        ". Parameter, gradient, optimizer and activation bytes per device for the "
                        "config's mesh, C = 6 N D, the Chinchilla-optimal tokens (~20 N) and the time "
                        "to train at a given MFU. Uses no devices.")
    _common(pl)
    pl.add_argument("--devices", type=int, required=True, help="devices the run will have")
    pl.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume")
    pl.add_argument("--peak-tflops", type=float, default=0.0,
                    help="peak TFLOP/s per device (default: 989, an H100 SXM in bf16)")
    pl.add_argument("--tokens", type=float, default=0.0, help="training tokens (default: 20 N)")
    conv = sub.add_parser("convert", help=COMMANDS["convert"], description=COMMANDS["convert"] +
                          ". --from-hf DIR --out RUN_DIR writes RUN_DIR/config.yaml, a checkpoint that "
                          "train.init_from, generate and eval read, and RUN_DIR/hf/ (config and tokenizer "
                          "files); --to-hf RUN_DIR --out DIR writes the run's latest params as config.json "
                          "and safetensors. Takes no CONFIG.")
    way = conv.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="DIR", help="a Hugging Face checkpoint directory (safetensors)")
    way.add_argument("--to-hf", metavar="RUN_DIR", help="a jaxlm run directory")
    conv.add_argument("--out", required=True, help="the directory to write (must not hold a run or checkpoint)")
    conv.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32",
                      help="--from-hf: dtype the params are stored in (model.param_dtype)")
    conv.add_argument("--max-seq-len", type=int, default=None,
                      help="--from-hf: model.max_seq_len (default: the checkpoint's max_position_embeddings)")
    conv.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                      help="--to-hf: dtype of the written tensors (default: the params')")
    conv.add_argument("--family", choices=("llama", "qwen2", "mistral"), default=None,
                      help="--to-hf: architecture to write (default: the imported one, else qwen2 with "
                      "q/k/v biases, llama without)")
    _run_parsers(sub)
    return p


def _run_common(p: argparse.ArgumentParser):
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run's directory (config.yaml + checkpoints/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="overrides of RUN_DIR/config.yaml, e.g. mesh.fsdp=1 mesh.tensor=2")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per compiled batch")
    p.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt at most")
    p.add_argument("--raw", action="store_true",
                   help="feed prompts as written (default: lead with eos, the document separator of pretraining; "
                   "eval --qa on a fine-tuned run: its sft template)")
    _quiet(p, "only the result (eval's table, generate's text): no progress or timing lines")


def _run_parsers(sub):
    sc = sub.add_parser("score", help=COMMANDS["score"], description=COMMANDS["score"] +
                        '. Records: {"prompt", "chosen", "rejected"}, {"prompt", "responses": [...]} or '
                        '{"prompt", "response"}; each is written back with "rewards" added (JSONL).')
    sc.add_argument("run_dir", metavar="RUN_DIR", help="a `jaxlm reward` run")
    sc.add_argument("file", metavar="FILE.jsonl", help="records to score")
    sc.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides of RUN_DIR/config.yaml")
    sc.add_argument("--out", metavar="FILE.jsonl", default=None, help="write here (default: stdout)")
    sc.add_argument("--normalize", action="store_true",
                    help="(r - mean) / std with the run's training statistics (RUN_DIR/reward_stats.json)")
    g = sub.add_parser("generate", help=COMMANDS["generate"], description=COMMANDS["generate"] +
                       ". Special symbols written in a prompt (e.g. <|fim_prefix|>) are text unless --specials. "
                       "Stops at eos (or <|end_turn|>) or --max-new-tokens.")
    _run_common(g)
    what = g.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one prompt; its continuation streams to stdout")
    what.add_argument("--prompts", metavar="FILE.jsonl",
                      help='JSONL of {"prompt": ...} or {"prefix": ..., "suffix": ...} (infill) records')
    what.add_argument("--infill", nargs=2, metavar=("PREFIX", "SUFFIX"),
                      help="fill in the middle between PREFIX and SUFFIX (FIM-trained models)")
    g.add_argument("--fim-mode", choices=("psm", "spm"), default="psm", help="infill prompt layout")
    g.add_argument("--out", metavar="FILE.jsonl", default=None, help="--prompts: write here (default: stdout)")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    g.add_argument("--prefix-lm", action="store_true", help="the prompt is a bidirectional prefix (prefix-LM models)")
    g.add_argument("--specials", action="store_true",
                   help="special symbols written in a prompt (<|fim_prefix|>, <|user|>, ...) become their ids")
    e = sub.add_parser("eval", help=COMMANDS["eval"], description=COMMANDS["eval"] +
                       ". Without --text, --qa, --tasks, --by-position or --passkey, scores the run's held-out "
                       "documents. Prints a table; appends the numbers to RUN_DIR/metrics.jsonl.")
    _run_common(e)
    e.add_argument("--text", action="append", default=[], metavar="FILE",
                   help="text, JSONL or Parquet documents to score (repeatable; globs allowed)")
    e.add_argument("--text-field", default="text", help="field holding the text in JSONL/Parquet")
    e.add_argument("--qa", action="append", default=[], metavar="FILE.jsonl",
                   help='exact match (greedy; repeatable) on {"prompt", "answer"} records, or {"messages": [..., '
                   'a user turn], "answer"} chat records; prompted as the run was fine-tuned (its sft.template, '
                   "role markers for chat; the answer ends at its closing eos or <|end_turn|>), as raw text for a "
                   "run never fine-tuned or with --raw; unusable records are counted and skipped")
    e.add_argument("--heldout", action="store_true", help="also score the held-out documents")
    e.add_argument("--seq-len", type=int, default=None, help="scoring window (default: train.seq_len)")
    e.add_argument("--max-documents", type=int, default=0, help="per dataset; 0: all")
    e.add_argument("--tasks", nargs="*", default=None, metavar="TASK",
                   help="exact match per built-in task (add, reverse, sort, recall) on its test split, "
                   "prompted as `jaxlm sft` trains; no names: the run's sft.tasks (all if none); "
                   "sft.task_eval_examples problems per task unless --max-documents")
    e.add_argument("--by-position", action="append", type=int, default=[], metavar="LEN",
                   help="held-out loss by position in windows of LEN tokens (repeatable; LEN may exceed "
                   "train.seq_len), only the windows the documents fill")
    e.add_argument("--buckets", type=int, default=8, help="--by-position: position buckets of equal width")
    e.add_argument("--passkey", action="store_true",
                   help="passkey retrieval (a 5-digit key hidden in filler text; greedy) by depth of the key")
    e.add_argument("--passkey-lengths", type=int, nargs="+", default=[], metavar="LEN",
                   help="prompt lengths in tokens (default: 1/4, 1/2 and all of model.max_seq_len, less 7 "
                   "for the answer; a longer one needs model.max_seq_len=... as an override)")
    e.add_argument("--passkey-depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], metavar="D",
                   help="shares of the filler before the key (default: 0 0.25 0.5 0.75 1)")
    e.add_argument("--passkey-trials", type=int, default=10, help="keys per length and depth (default: 10)")
    e.add_argument("--seed", type=int, default=0, help="--passkey: the seed of the keys")


def _generate(cfg, args) -> int:
    from jaxlm import generate, runs

    cfg, params, tokenizer, mesh = runs.load_run(args.run_dir, args.overrides, step=args.step)
    generate.run(cfg, params, mesh, tokenizer, prompt=args.prompt, prompts_path=args.prompts,
                 infill=args.infill, out_path=args.out, batch_size=args.batch_size,
                 max_new_tokens=args.max_new_tokens, seed=args.seed, doc_start=not args.raw,
                 fim_mode=args.fim_mode, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, prefix_lm=args.prefix_lm, specials=args.specials, quiet=args.quiet)
    return 0


def _eval(cfg, args) -> int:
    from jaxlm import evaluate, runs

    run = runs.load_run(args.run_dir, args.overrides, step=args.step)
    cfg, params, tokenizer, mesh, step = run.cfg, run.params, run.tokenizer, run.mesh, run.step
    rows = evaluate.run_eval(args.run_dir, cfg, params, step, mesh, tokenizer, texts=args.text,
                             text_field=args.text_field, qa=args.qa, heldout=args.heldout or None,
                             seq_len=args.seq_len, batch_size=args.batch_size,
                             max_documents=args.max_documents, max_new_tokens=args.max_new_tokens,
                             raw=args.raw, tasks=args.tasks, by_position=args.by_position,
                             buckets=args.buckets, passkey_lengths=args.passkey_lengths if args.passkey else None,
                             passkey_depths=args.passkey_depths, passkey_trials=args.passkey_trials, seed=args.seed,
                             log=_log(args))
    if _process_index() == 0:
        print(f"checkpoint step {step} of {args.run_dir}")
        print(evaluate.format_table(rows))
        if args.qa:
            print(evaluate.format_qa(rows))
        if args.by_position:
            print(f"\nnats/token by position in the window (START-END: positions START to END-1; "
                  f"train.seq_len={cfg.train.seq_len})")
            print(evaluate.format_breakdown(rows, "by_position", "nats_per_token"))
        if args.passkey:
            print(f"\npasskey exact match by depth of the key ({args.passkey_trials} keys per cell)")
            print(evaluate.format_breakdown(rows, "by_depth", "exact_match"))
    return 0


def _reward(cfg, args) -> int:
    from jaxlm.train import reward

    summary = reward.main(cfg)
    lines = [f"held-out pairwise accuracy {name}: {acc:.3f}"
             for name, acc in sorted(summary.get("heldout_accuracy", {}).items())]
    s = summary["reward_stats"]
    lines.append(f"reward over {s['responses']} training responses: mean {s['mean']:.3f}, std {s['std']:.3f}")
    return _finish(cfg, args, summary, lines)


def _rejection_sample(cfg, args) -> int:
    from jaxlm.train import rejection

    summary = rejection.main(cfg, log=_log(args))
    lines = []
    for rnd in summary["rounds"]:
        before = rnd.get("accuracy_before", {})
        for name, acc in rnd["accuracy"].items():
            stats = rnd["stats"].get(name, {})
            start = f"{before[name]:.3f} -> " if name in before else ""
            lines.append(f"round {rnd['round']} task {name}: pass@1 {stats.get('pass@1', 0):.3f}, best-of-N "
                         f"{stats.get('best_of_n', 0):.3f}; exact match after SFT {start}{acc:.3f}")
    last = f"{cfg.train.run_dir}/round_{cfg.rs.rounds - 1}/sft"
    return _finish(cfg, args, {"rounds": len(summary["rounds"])}, lines, run=last)


def _ppo(cfg, args) -> int:
    from jaxlm.train import ppo

    return _finish(cfg, args, ppo.main(cfg, log=_log(args)))


def _log(args):
    """Where a command's progress lines go: stdout from process 0, unless --quiet or --json."""
    quiet = args.quiet or getattr(args, "json", False) or _process_index() != 0
    return (lambda line: None) if quiet else functools.partial(print, flush=True)


def _dpo(cfg, args) -> int:
    from jaxlm.train import dpo

    return _finish(cfg, args, dpo.main(cfg))


def _score(cfg, args) -> int:
    from jaxlm.train import reward

    reward.score_file(args.run_dir, args.file, out_path=args.out, normalize=args.normalize, overrides=args.overrides)
    return 0


def _sft(cfg, args) -> int:
    from jaxlm.data import readers
    from jaxlm.train import sft

    summary = sft.main(cfg)
    counts = [f"sft.{split}_files: {readers.counts_line(summary[f'counts_{split}'], truncated=True)}"
              for split in ("train", "eval") if summary[f"counts_{split}"]]
    return _finish(cfg, args, summary, counts)


def _plan(cfg, args) -> int:
    from jaxlm import plan

    if args.devices < 1 or not 0 < args.mfu <= 1:
        raise ConfigError(f"--devices={args.devices} must be >= 1 and --mfu={args.mfu} in (0, 1]")
    print(plan.format_plan(plan.plan(cfg, args.devices, args.mfu, args.peak_tflops, args.tokens)))
    return 0


def _pretrain(cfg, args) -> int:
    from jaxlm.train import pretrain

    summary = pretrain.main(cfg)
    lines = []
    if "eval_loss" in summary:
        ln2 = math.log(2)
        lines.append(f"held-out loss {summary['eval_loss']:.3f} nats/token ({summary['eval_loss'] / ln2:.3f} bits); "
                     f"unigram entropy of the training data {summary['unigram_entropy_nats']:.3f} nats/token "
                     f"({summary['unigram_entropy_nats'] / ln2:.3f} bits)")
    return _finish(cfg, args, summary, lines)


# What to run after each training command: {run} is its run directory.
NEXT = {
    "pretrain": "jaxlm generate {run} --prompt 'def '   or   jaxlm eval {run}   or   jaxlm sft CONFIG "
                "train.init_from={run}",
    "sft": "jaxlm eval {run} --tasks   or   jaxlm generate {run} --prompt '...'   or   jaxlm reward / dpo / ppo "
           "CONFIG train.init_from={run}",
    "reward": "jaxlm score {run} FILE.jsonl   or   jaxlm ppo CONFIG ppo.reward_run={run} ppo.checker=false",
    "dpo": "jaxlm eval {run} --tasks   or   jaxlm ppo CONFIG train.init_from={run}",
    "rejection-sample": "jaxlm eval {run} --tasks (the last round's model)",
    "ppo": "jaxlm eval {run} --tasks   or   jaxlm generate {run} --prompt '...'",
}


def _finish(cfg, args, summary: dict, lines=(), run=None) -> int:
    """The end of a training command, from process 0: with --json, the summary's scalars as one JSON
    line; else a done line, `lines`, the run directory and what to run next."""
    if _process_index() != 0:
        return 0
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, (list, dict))}))
        return 0
    if args.quiet:
        return 0
    if "final_step" in summary:
        loss = summary.get("loss")
        done = [f"step {summary['final_step']}", "train loss " + (f"{loss:.3f}" if loss is not None else "n/a")]
        if summary.get("tokens_per_s"):
            done.append(f"{summary['tokens_per_s']:.0f} tokens/s, MFU {summary.get('mfu', 0):.2f}")
        done.append(f"{summary.get('skipped', 0)} steps skipped, {summary.get('restores', 0)} restores")
        print(f"[jaxlm] done: {', '.join(done)}")
    for line in lines:
        print(line)
    after, before = summary.get("task_accuracy", {}), summary.get("task_accuracy_before", {})
    for name, acc in after.items():
        start = f"{before[name]:.3f} -> " if name in before else ""
        print(f"task {name}: exact match {start}{acc:.3f}")
    run = run or cfg.train.run_dir
    print(f"run directory: {run} (config.yaml, checkpoints/, metrics.jsonl; tensorboard --logdir {run}/tensorboard)")
    print("next: " + NEXT[args.command].format(run=run))
    return 0


def _bench(cfg, args) -> int:
    from jaxlm import bench

    result = bench.run(cfg, args.steps, args.rounds, compare=args.compare, sampler=not args.no_sampler)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return 0


def _data(cfg, args) -> int:
    if args.data_command == "prepare":
        from jaxlm.prepare import prepare

        prepare(cfg.prepare)
    elif args.data_command == "tokenizer":
        from jaxlm.data.tokenizers.spm import train_from_config

        train_from_config(cfg.tokenizer)
    elif args.data_command == "tokenize":
        from jaxlm.data.shards import tokenize_from_config

        tokenize_from_config(cfg.tokenize)
    return 0


# Commands that use JAX devices join the other processes of a multi-process run first,
# before any device use (jaxlm/distributed.py; the environment says whether there are any).
TRAINING_COMMANDS = ("pretrain", "sft", "reward", "dpo", "rejection-sample", "ppo")
DISTRIBUTED_COMMANDS = ("pretrain", "sft", "reward", "rejection-sample", "dpo", "ppo", "eval", "score", "bench")


def _process_index() -> int:
    import jax

    return jax.process_index()


def _convert(args) -> int:
    from jaxlm import interop
    from jaxlm.interop.hf_config import describe

    if args.from_hf:
        cfg, notes = interop.import_run(args.from_hf, args.out, param_dtype=args.param_dtype,
                                        max_seq_len=args.max_seq_len)
        print(f"imported {args.from_hf} -> {args.out}: {describe(cfg.model)}; data.tokenizer={cfg.data.tokenizer}")
    else:
        files, notes = interop.export_run(args.to_hf, args.out, dtype=args.dtype, family=args.family)
        print(f"exported {args.to_hf} -> {args.out}: {', '.join(files)}")
    for note in notes:
        print(f"note: {note}")
    return 0


def main(argv=None) -> int:
    import logging

    # Orbax logs through absl: its warnings and its own error reports (with tracebacks) would bury
    # jaxlm's one line; what fails reaches jaxlm as an exception, reported once below.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    if argv is None:  # a process of its own (`jaxlm ...`, `python -m jaxlm ...`), not a caller's
        from jaxlm.hugepages import restart_with_huge_pages

        restart_with_huge_pages(sys.argv[1:])
    args = _parse(_dotted_flags(sys.argv[1:] if argv is None else list(argv)))
    joined = False
    try:
        if args.command == "convert":
            return _convert(args)
        if args.command == "config":
            return _config(args)
        if args.command in KINDS:
            from jaxlm.config import find_config

            args.config = str(find_config(args.config, KINDS[args.command]))
        if args.command == "pipeline":
            from jaxlm import pipeline

            return pipeline.run(args.config, args.overrides, command=main, start=args.start, only=args.only,
                                until=args.until, quiet=args.quiet)
        if args.command == "report":
            from jaxlm import report

            print(report.write_report(args.dir))
            return 0
        if args.command in ("generate", "eval", "score"):
            from jaxlm.runs import run_config

            cfg = run_config(args.run_dir, args.overrides)
        else:
            quiet = args.command in TRAINING_COMMANDS and (args.quiet or args.json)
            cfg = load_config(args.config, [*args.overrides, *["train.progress=false"] * quiet])
            if args.command in TRAINING_COMMANDS:
                from jaxlm.runs import check_not_moved

                check_not_moved(args.config, cfg)
        if args.command in DISTRIBUTED_COMMANDS:
            from jaxlm import distributed

            joined = distributed.initialize(cfg.distributed) is not None
        return {"pretrain": _pretrain, "sft": _sft, "reward": _reward, "score": _score, "dpo": _dpo,
                "rejection-sample": _rejection_sample, "ppo": _ppo, "bench": _bench,
                "data": _data, "generate": _generate, "eval": _eval, "plan": _plan}[args.command](cfg, args)
    except (ConfigError, FileNotFoundError) as e:
        name = args.command if args.command != "data" else f"data {args.data_command}"
        print(f"jaxlm {name}: error: {e}", file=sys.stderr)
        if joined:
            _leave_run(2)
        return 2
    except RunFailed as e:
        print(f"jaxlm {args.command}: failed: {e}", file=sys.stderr)
        if joined:
            _leave_run(3)
        return 3
    except BrokenPipeError:  # the reader left early (`jaxlm config list | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or the exit's flush raises again
        return 141
    except KeyboardInterrupt as e:  # loop.Interrupted: stopped at a step boundary, that step saved
        if not hasattr(e, "code"):  # a plain KeyboardInterrupt, outside the loop
            saved = "the last checkpoint is kept"
        elif e.saved is not None:
            saved = f"saved at step {e.saved}, where it stopped"
        else:  # a bad step pending, or a state that is not finite: the loop refused to save it
            saved = f"not saved where it stopped; the latest checkpoint is {e.latest}"
        print(f"jaxlm {args.command}: interrupted ({e or 'SIGINT'}); {saved}", file=sys.stderr)
        return getattr(e, "code", 130)
    except Exception:
        if not joined:
            raise
        import traceback

        import jax

        traceback.print_exc()
        print(f"jaxlm {args.command}: process {jax.process_index()} of {jax.process_count()} failed (above; "
              "a failed collective means another process died: see its log); leaving the run so the "
              "others stop too", file=sys.stderr)
        _leave_run(1)


def _parse(argv: list[str]) -> argparse.Namespace:
    """The command line, overrides allowed after options too (`jaxlm eval RUN --qa F mesh.fsdp=1`):
    argparse gives the positional list only the words before the first option."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    late = [a for a in extra if "=" in a and not a.startswith("-")]
    if extra != late or (late and not hasattr(args, "overrides")):
        p.parse_args(argv)  # the usual usage error, naming what it does not know
    if late:
        args.overrides = [*args.overrides, *late]
    return args


def _dotted_flags(argv: list[str]) -> list[str]:
    """`--train.steps=10` and `--train.steps 10` as the override `train.steps=10`: a flag whose
    name holds a dot is a config key (no option of jaxlm's has one)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].split("=", 1)[0]
        if arg.startswith("--") and "." in name:
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                arg, i = f"{arg}={argv[i + 1]}", i + 1
            out.append(arg[2:] if "=" in arg else f"{name}=")
        else:
            out.append(arg)
        i += 1
    return out


def _config(args) -> int:
    import yaml

    from jaxlm.config import Config, find_config, load_config, shipped_configs, to_dict

    if args.config_command == "list":
        for name in shipped_configs():
            kind, short = name.split("/", 1)
            command = next(c for c, k in KINDS.items() if kind in k) + " prepare" * (kind == "data")
            print(f"{name:<24} jaxlm {command} {short}")
        return 0
    sections = [f.name for f in dataclasses.fields(Config)]
    overrides = [item for item in args.items if "=" in item]
    wanted = [item for item in args.items if "=" not in item and item in sections]
    files = [item for item in args.items if "=" not in item and item not in sections]
    if len(files) > 1:
        raise ConfigError(f"jaxlm config show takes one config file; got {files} (sections are: "
                          f"{', '.join(sections)})")
    cfg = load_config(find_config(files[0], ("pretrain",)) if files else None, overrides)
    tree = to_dict(cfg)
    print(yaml.safe_dump({name: tree[name] for name in wanted or sections}, sort_keys=False), end="")
    return 0


def _leave_run(code: int):
    """Exit at once: waiting for the others at shutdown could wait on a collective that never ends."""
    from jaxlm import distributed

    distributed.exit_now(code)


if __name__ == "__main__":
    sys.exit(main())
