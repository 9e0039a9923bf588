"""`jaxlm pipeline`: every stage on a shrunken copy of configs/pipeline/tiny.yaml, chained (each
stage from the model before it), skipped when finished, refused when changed, redone with --from,
resumed after a SIGTERM inside a stage with the numbers of an uninterrupted run."""
import contextlib
import io
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jaxlm import cli, pipeline, runs

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 4, "model.n_kv_heads": 2, "model.d_ff": 64,
         "model.max_seq_len": 96, "train.seq_len": 64, "train.progress": False, "train.peak_tflops": 1.0,
         "optim.warmup_steps": 1}
STEPS = {"train.batch_size": 8, "train.log_every": 1, "train.eval_batches": 1}


# Each stage's overrides, shrunk: also what the docs' training lines run with (below).
DATA = {"prepare.sources": [{"name": "stdlib", "paths": "stdlib:email/*.py", "format": "text"}],
        "prepare.out_dir": "{dir}/data/prepared", "tokenizer.inputs": ["{dir}/data/prepared/stdlib.jsonl"],
        "tokenizer.out": "{dir}/data/tokenizer", "tokenize.inputs": ["{dir}/data/prepared/stdlib.jsonl"],
        "tokenize.tokenizer": "{dir}/data/tokenizer.model", "tokenize.out_dir": "{dir}/data/tokens"}
SHRUNK = {
    "pretrain": {**STEPS, "train.steps": 6, "train.eval_every": 3, "train.save_every": 3},
    "sft": {**STEPS, "sft.task_examples": 40, "sft.task_eval_examples": 4, "train.steps": 4, "train.eval_every": 2,
            "train.save_every": 2},
    "reward": {**STEPS, "reward.task_pairs": 24, "reward.task_eval_pairs": 8, "train.steps": 3, "train.eval_every": 3,
               "train.save_every": 3},
    "rs": {**STEPS, "rs.task_prompts": 8, "rs.samples_per_prompt": 2, "rs.rounds": 1, "rs.min_score": 0.0,
           "sft.task_eval_examples": 4, "train.steps": 2, "train.eval_every": 2, "train.save_every": 2},
    "dpo": {**STEPS, "dpo.task_pairs": 16, "dpo.task_samples": 2, "dpo.task_eval_pairs": 8, "train.steps": 2,
            "train.eval_every": 2, "train.save_every": 2},
    "ppo": {"ppo.task_prompts": 16, "ppo.prompts_per_iteration": 16, "ppo.minibatches": 2, "ppo.epochs": 1,
            "ppo.max_new_tokens": 8, "sft.task_eval_examples": 4, "train.steps": 2, "train.save_every": 1},
}


def _stage(config: str, **values) -> dict:
    return {"config": str(ROOT / "configs" / config), "set": values}


def _pipeline_config(tmp: Path, name: str) -> Path:
    tree = {
        "dir": str(tmp / name),
        "set": {"data.tokenizer": "{dir}/data/tokenizer.model", **SMALL},
        "stages": {
            "data": _stage("pretrain/tiny.yaml", **DATA),
            "pretrain": _stage("pretrain/tiny_fim.yaml", **SHRUNK["pretrain"], **{
                "data.sources": [{"name": "stdlib", "path": "{dir}/data/tokens"}]}),
            "sft": _stage("sft/tiny.yaml", **SHRUNK["sft"]),
            "reward": _stage("reward/tiny.yaml", **SHRUNK["reward"]),
            "rs": _stage("rs/tiny.yaml", **SHRUNK["rs"]),
            "dpo": _stage("dpo/tiny.yaml", **SHRUNK["dpo"]),
            "ppo": _stage("ppo/tiny.yaml", **SHRUNK["ppo"]),
            "eval": {"tasks": ["add", "reverse"], "examples": 4, "samples": 1},
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    path = _pipeline_config(tmp, "pipe")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert cli.main(["pipeline", str(path), "--quiet"]) == 0
    return path, tmp / "pipe", out.getvalue()


def _losses(run_dir) -> dict:
    return {r["step"]: r["loss"] for r in runs.read_metrics(run_dir) if "loss" in r and "event" not in r}


@pytest.mark.slow
def test_every_stage_runs_from_the_model_before_it(finished):
    path, directory, out = finished
    # --quiet: the pipeline's line per stage and the data stage's counts; nothing of the training stages'
    assert "[pipeline] done: " in out and "wrote 1 shards" in out, out
    assert not [line for line in out.splitlines() if line.startswith(("[jaxlm]", "run directory: ", "round "))], out
    record = pipeline.read_record(directory)
    assert list(record) == list(pipeline.STAGES) and all(r["status"] == "finished" for r in record.values())
    assert all(r["wall_s"] > 0 for r in record.values())
    starts = {name: runs.run_config(directory / name).train.init_from for name in ("sft", "reward", "rs", "dpo", "ppo")}
    assert starts == {"sft": str(directory / "pretrain"), "reward": str(directory / "sft"),
                      "rs": str(directory / "sft"), "dpo": str(directory / "rs" / "round_0" / "sft"),
                      "ppo": str(directory / "dpo")}
    assert all(_losses(directory / name) for name in ("pretrain", "sft", "reward", "dpo"))
    accuracy = json.loads((directory / "eval" / "accuracy.json").read_text())
    assert list(accuracy["stages"]) == ["pretrain", "sft", "rs", "dpo", "ppo"]
    assert all(set(a) == {"add", "reverse"} for a in accuracy["stages"].values())
    samples = [json.loads(line) for line in (directory / "eval" / "samples.jsonl").read_text().splitlines()]
    assert [s["task"] for s in samples] == ["add", "reverse"] and all(len(s["outputs"]) == 5 for s in samples)
    page = (directory / "report.html").read_text()
    shown = re.findall(r'data-file="figures/([\w.]+)"', page)
    assert {"data_documents.png", "pretrain_loss.png", "dpo_preferences.png", "ppo_training.png",
            "eval_accuracy.png"} <= set(shown) and all((directory / "figures" / f).is_file() for f in shown)
    assert cli.main(["report", str(directory / "sft")]) == 0  # one run's report
    assert (directory / "sft" / "figures" / "sft_loss.png").is_file()


@pytest.mark.slow
def test_a_second_run_skips_every_finished_stage(finished, capsys):
    path, directory, _ = finished
    before = {p: p.stat().st_mtime_ns for p in directory.glob("*/metrics.jsonl")}
    assert cli.main(["pipeline", str(path)]) == 0
    out = capsys.readouterr().out
    assert all(f"[pipeline] {name}: finished before, skipped" in out for name in pipeline.STAGES)
    assert before == {p: p.stat().st_mtime_ns for p in directory.glob("*/metrics.jsonl")}
    assert cli.main(["pipeline", str(path), "--only", "reward"]) == 0  # one stage: the others not even looked at
    assert re.findall(r"\[pipeline\] (\w+)", capsys.readouterr().out) == ["reward", "done"]


@pytest.mark.slow
def test_a_changed_stage_is_refused_then_redone_with_from(finished, capsys):
    path, directory, _ = finished
    assert cli.main(["pipeline", str(path), "dpo.train.steps=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage dpo finished with another config (differs in train.steps)" in err[0], err
    assert "--from dpo" in err[0]
    # Changing eval's problems and redoing it alone: the old eval directory is kept aside.
    old = json.loads((directory / "eval" / "accuracy.json").read_text())
    assert cli.main(["pipeline", str(path), "eval.examples=2", "--from", "eval"]) == 0
    new = json.loads((directory / "eval" / "accuracy.json").read_text())
    assert new["examples"] == 2 and old["examples"] == 4
    (aside,) = (directory / "replaced").glob("eval.*")
    assert json.loads((aside / "accuracy.json").read_text()) == old
    assert pipeline.read_record(directory)["eval"]["settings"]["examples"] == 2


def test_stage_names_and_overrides_are_checked(tmp_path):
    path = _pipeline_config(tmp_path, "pipe")
    with pytest.raises(pipeline.ConfigError, match="--until train: the pipeline's stages are data, pretrain"):
        pipeline.run(path, command=cli.main, until="train")
    with pytest.raises(pipeline.ConfigError, match="pipeline override 'rl.train.steps'"):
        pipeline.load(path, ["rl.train.steps=3"])
    with pytest.raises(pipeline.ConfigError, match=r"stage sft \(.*sft/tiny.yaml\): .*train.steps"):
        pipeline.load(path, ["sft.train.steps=-1"])
    tree = yaml.safe_load(path.read_text())
    tree["stages"]["critic"] = tree["stages"].pop("reward")
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(pipeline.ConfigError, match=r"pipeline stages \['critic'\]: allowed are data, pretrain"):
        pipeline.load(path)


def test_a_second_pipeline_on_the_same_directory_is_refused(tmp_path):
    import fcntl
    import os

    path = _pipeline_config(tmp_path, "pipe")
    (tmp_path / "pipe").mkdir()
    with open(tmp_path / "pipe" / "pipeline.lock", "w") as held:  # as a running pipeline holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(str(os.getpid()))
        held.flush()
        message = rf"pipe is in use by another jaxlm pipeline \(process {os.getpid()}\)"
        with pytest.raises(pipeline.ConfigError, match=message):
            pipeline.run(path, command=lambda argv: pytest.fail(f"ran {argv}"))


def test_the_embedded_default_resolves():
    directory, stages = pipeline.load(ROOT / "configs" / "pipeline" / "tiny.yaml", ["dir=/tmp/x"])
    assert [s.name for s in stages] == list(pipeline.STAGES)
    tokens = stages[0].cfg.tokenize.out_dir
    assert tokens == "/tmp/x/data/tokens" and stages[1].cfg.data.sources[0].path == tokens
    assert all(s.cfg.data.tokenizer == "/tmp/x/data/tokenizer.model" for s in stages if s.cfg is not None)


@pytest.mark.slow
def test_a_stage_stopped_by_sigterm_resumes_to_the_uninterrupted_numbers(finished, tmp_path):
    path = _pipeline_config(tmp_path, "stopped")
    argv = [sys.executable, "-m", "jaxlm", "pipeline", str(path), "--until", "pretrain"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "stopped" / "pretrain" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and '"step": 2' in metrics.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, out[-2000:]
    assert "[pipeline] pretrain: interrupted (exit 143)" in out
    record = pipeline.read_record(tmp_path / "stopped")
    assert record["data"]["status"] == "finished" and record["pretrain"]["status"] == "interrupted"
    assert cli.main(["pipeline", str(path), "--until", "pretrain"]) == 0
    assert _losses(tmp_path / "stopped" / "pretrain") == _losses(finished[1] / "pretrain")


# The docs' runs and data, and what stands for each here: this pipeline's (its pretraining is tiny_fim's).
DOC_PATHS = {"runs/tiny": "pretrain", "runs/tiny_fim": "pretrain", "runs/sft_tiny": "sft", "runs/reward_tiny": "reward",
             "runs/dpo_from_sft": "dpo", "runs/pipeline": "", "data/stdlib/tokens": "data/tokens",
             "data/stdlib/tokenizer.model": "data/tokenizer.model"}
# Lines on what the docs train for long context, on a reader's own text or config, or an imported Hugging
# Face model: parsed and their configs checked in tests/test_docs.py only.
NOT_RUN = ("runs/tiny_lambda", "runs/tiny_long", "runs/own_text", "configs/data/own_text.yaml",
           "runs/llama31/config.yaml", "CONFIG")
STAGE_OF = {"pretrain": "pretrain", "sft": "sft", "reward": "reward", "rejection-sample": "rs", "dpo": "dpo",
            "ppo": "ppo"}


def _docs_lines(commands_run: tuple, directory: Path, tmp_path: Path, monkeypatch):
    """(where, words) of the README's and docs' `jaxlm` lines of `commands_run`, with the working
    directory one where the docs' runs, data and files are (DOC_PATHS: links to this pipeline's)."""
    from test_docs import SHELL, commands, of

    monkeypatch.chdir(tmp_path)
    for link, target in DOC_PATHS.items():
        (tmp_path / link).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / link).symlink_to(directory / target)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "def "}\n{"prefix": "x = ", "suffix": "\\n"}\n')
    (tmp_path / "more_code.jsonl").write_text('{"text": "import os\\nprint(os.getcwd())\\n"}\n')
    (tmp_path / "qa.jsonl").write_text('{"prompt": "1 + 1 =", "answer": "2"}\n')
    (tmp_path / "scored.jsonl").write_text('{"prompt": "Add: 1 + 2", "chosen": "3", "rejected": "4"}\n')
    for block in (p.values[0] for p in of(*SHELL)):
        for words in commands(block.text):
            if words[0] == "jaxlm" and words[1] in commands_run and not set(words[2:4]) & set(NOT_RUN):
                yield block.where, words


@pytest.mark.slow
def test_the_docs_generate_eval_and_report_lines_run_on_the_pipelines_models(finished, tmp_path, monkeypatch):
    """Every `jaxlm generate`, `eval` and `report` line of the README and docs/, as printed, on this
    pipeline's models in place of the docs' runs; fewer tokens and problems, so that it is quick."""
    ran = []
    for where, words in _docs_lines(("generate", "eval", "report"), finished[1], tmp_path, monkeypatch):
        fewer = {"generate": ["--max-new-tokens", "4"], "eval": ["--max-new-tokens", "4", "--max-documents", "2"]}
        assert cli.main(words[1:] + fewer.get(words[1], [])) == 0, f"{where}: {' '.join(words)}"
        ran.append(" ".join(words[1:3]))
    assert len(ran) >= 14, ran  # README's and docs/generation-eval.md's, and more
    assert (tmp_path / "completions.jsonl").read_text().count("\n") == 2


@pytest.mark.slow
def test_the_docs_training_and_data_lines_run_shrunk(finished, tmp_path, monkeypatch):
    """Every `jaxlm data`, training command and `score` line of the README and docs/, as printed, where
    the docs' runs and data are this pipeline's, with the pipeline's small model, one step and each
    stage's shrunk sizes (SHRUNK), in a run directory of its own; the data lines on a few files.
    `jaxlm pipeline` lines are the tests above; `bench` is tests/test_bench.py; `convert` needs a
    Hugging Face checkpoint (tests/interop)."""
    one_step = {**SMALL, "train.steps": 1, "train.eval_every": 1, "train.save_every": 1}
    ran = []
    for where, words in _docs_lines((*STAGE_OF, "data", "score"), finished[1], tmp_path, monkeypatch):
        if words[1] == "data":
            extra = {k: yaml.safe_load(json.dumps(v).replace("{dir}", str(tmp_path / "data_lines")))
                     for k, v in DATA.items()}
        elif words[1] == "score":
            extra = {}
        else:
            extra = {**SHRUNK[STAGE_OF[words[1]]], **one_step, "train.run_dir": str(tmp_path / f"out{len(ran)}")}
        assert cli.main(words[1:] + [f"{k}={json.dumps(v)}" for k, v in extra.items()]) == 0, \
            f"{where}: {' '.join(words)}"
        ran.append(" ".join(words[1:4 if words[1] == "data" else 3]))
    assert len(ran) >= 20, ran
    assert (tmp_path / "rewards.jsonl").is_file() and (tmp_path / "data_lines" / "data" / "tokens").is_dir()
