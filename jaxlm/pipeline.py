"""`jaxlm pipeline CONFIG`: the whole road from a raw corpus to an aligned model, in one command.

The stages run in this order, each in its own directory DIR/NAME under the pipeline directory DIR:

    data      prepare -> tokenizer -> tokenize, writing where its config says
    pretrain  a decoder from scratch
    sft       from pretrain             reward    a reward model, from sft
    rs        from sft (its model: the SFT run of its last round)
    dpo       from rs                   ppo       from dpo
    eval      exact match per task of every model stage's model, and sample generations

A training stage starts from the model of the nearest model stage before it (pretrain, sft, rs,
dpo); the pipeline sets its `train.run_dir` and `train.init_from`. A pipeline config:

    dir: runs/pipeline                        # DIR
    set: {data.tokenizer: "{dir}/data/tokenizer.model"}   # dotted keys set in every stage's config
    stages:                                   # a config file, or {config: FILE, set: {...}} per stage
      data: configs/pretrain/tiny.yaml
      pretrain: {config: configs/pretrain/tiny_fim.yaml, set: {train.steps: 300}}
      eval: {tasks: [add, reverse], examples: 100, samples: 2}

"{dir}" in a `set` value is DIR. DIR/pipeline.json records each stage's status, wall time and
resolved config, and DIR/configs/NAME.yaml is the config it ran with. Re-running resumes: a finished
stage whose config is unchanged is skipped, an unfinished one resumes from its checkpoints, and a
finished one whose config changed is refused with the keys that differ unless `--from` names it (or
a stage before it): it and every stage after it are then redone, their directories first moved to
DIR/replaced/. DIR/report.html (`jaxlm.report`) is refreshed after every stage.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from jaxlm.config import (Config, ConfigError, flat_keys, from_dict, override, parse_overrides, read_tree,
                          save_config, to_dict)

STAGES = ("data", "pretrain", "sft", "reward", "rs", "dpo", "ppo", "eval")
MODELS = ("pretrain", "sft", "rs", "dpo", "ppo")  # stages that leave a policy behind, in `eval`'s chart
COMMANDS = {"data": (("data", "prepare"), ("data", "tokenizer"), ("data", "tokenize")),
            "pretrain": (("pretrain",),), "sft": (("sft",),), "reward": (("reward",),),
            "rs": (("rejection-sample",),), "dpo": (("dpo",),), "ppo": (("ppo",),)}
EVAL_DEFAULTS = {"tasks": ["add", "reverse", "sort", "recall"], "examples": 100, "samples": 2}
RECORD = "pipeline.json"


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    cfg: Optional[Config]  # None for eval
    settings: dict  # what decides its result: the resolved config as JSON (eval: its settings)
    run_dir: Path  # DIR/NAME
    model: Optional[str]  # the run directory holding the model it leaves (rs: its last round's SFT run)


def _jsonable(tree):
    return json.loads(json.dumps(tree))


def _fill(value, directory: Path):
    """`value` with "{dir}" in its strings replaced by the pipeline directory."""
    if isinstance(value, str):
        return value.replace("{dir}", str(directory))
    if isinstance(value, list):
        return [_fill(v, directory) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, directory) for k, v in value.items()}
    return value


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {value!r}")
    return value


def load(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Path, list[Stage]]:
    """The pipeline directory and its stages, in order, each stage's config resolved and validated.

    overrides: `dir=PATH`, or `STAGE.section.key=value` (set in that stage's config, after its `set`)."""
    tree = read_tree(path)
    unknown = sorted(set(tree) - {"dir", "set", "stages"})
    if unknown:
        raise ConfigError(f"pipeline config {str(path)!r}: unknown keys {unknown}; allowed: dir, set, stages")
    extra = parse_overrides(list(overrides), nest=False)  # {"dir": ..., "sft.train.steps": 3}
    if not (extra.get("dir") or tree.get("dir")):
        raise ConfigError(f"pipeline config {str(path)!r} sets no dir (the pipeline directory)")
    directory = Path(str(extra.get("dir") or tree["dir"])).resolve()
    shared = _mapping(tree.get("set") or {}, "pipeline set")
    specs = _mapping(tree.get("stages"), f"pipeline config {str(path)!r}: stages")
    unknown = [name for name in specs if name not in STAGES]
    if unknown or not specs:
        raise ConfigError(f"pipeline stages {unknown or '{}'}: allowed are {', '.join(STAGES)} (in that order)")
    for key in (item.split("=", 1)[0].strip() for item in overrides):
        if key != "dir" and key.split(".")[0] not in specs:
            raise ConfigError(f"pipeline override {key!r}: allowed are dir=PATH and STAGE.section.key=value with "
                              f"STAGE one of the pipeline's stages: {', '.join(n for n in STAGES if n in specs)}")
    stage_keys = lambda name: {k.split(".", 1)[1]: v for k, v in extra.items() if k.startswith(name + ".")}
    stages, previous = [], None
    for name in (n for n in STAGES if n in specs):
        spec, run_dir = specs[name], directory / name
        mine = stage_keys(name)  # this stage's overrides
        if name == "eval":
            settings = {**EVAL_DEFAULTS, **_mapping(spec or {}, "stages.eval"), **mine}
            if set(settings) != set(EVAL_DEFAULTS):
                raise ConfigError(f"stages.eval: unknown keys {sorted(set(settings) - set(EVAL_DEFAULTS))}; "
                                  f"allowed: {', '.join(EVAL_DEFAULTS)}")
            settings["models"] = [s.model for s in stages if s.name in MODELS]
            stages.append(Stage(name, None, _jsonable(settings), run_dir, None))
            continue
        spec = {"config": spec} if isinstance(spec, str) else _mapping(spec, f"stages.{name}")
        if set(spec) - {"config", "set"} or "config" not in spec:
            raise ConfigError(f"stages.{name} must be a config file or {{config: FILE, set: {{key: value}}}}, "
                              f"got {spec!r}")
        flat = _fill({**shared, **_mapping(spec.get("set") or {}, f"stages.{name}.set")}, directory)
        wiring = {"tokenize.overwrite": True}  # an unfinished data stage is redone whole
        if name != "data":
            wiring = {"train.run_dir": str(run_dir), **({"train.init_from": previous} if previous else {})}
        try:
            cfg = from_dict(override(read_tree(spec["config"]), {**flat, **mine, **wiring}))
        except ConfigError as e:
            raise ConfigError(f"stage {name} ({spec['config']}): {e}") from None
        model = None
        if name in MODELS:
            model = str(run_dir / f"round_{cfg.rs.rounds - 1}" / "sft") if name == "rs" else str(run_dir)
            previous = model
        stages.append(Stage(name, cfg, _jsonable(to_dict(cfg)), run_dir, model))
    return directory, stages


def differences(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two nested dicts (either side missing counts)."""
    a, b = flat_keys(old), flat_keys(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, None) != b.get(k, None) or (k in a) != (k in b))


def read_record(directory: Path) -> dict:
    """{stage name: {"status", "wall_s", "settings", ...}} of DIR/pipeline.json ({} before the first stage)."""
    path = directory / RECORD
    if not path.is_file():
        return {}
    return {s["name"]: s for s in json.loads(path.read_text())["stages"]}


def _write_record(directory: Path, stages: list[Stage], record: dict) -> None:
    rows = [{"name": s.name, "kind": s.name, "run_dir": str(s.run_dir), "model": s.model,
             "status": "pending", "wall_s": None, **record.get(s.name, {})} for s in stages]
    tmp = directory / (RECORD + ".tmp")
    tmp.write_text(json.dumps({"dir": str(directory), "stages": rows}, indent=1) + "\n")
    tmp.replace(directory / RECORD)


def _select(stages: list[Stage], start: Optional[str], only: Optional[str], until: Optional[str]) -> list[Stage]:
    names = [s.name for s in stages]
    for flag, value in (("--from", start), ("--only", only), ("--until", until)):
        if value is not None and value not in names:
            raise ConfigError(f"{flag} {value}: the pipeline's stages are {', '.join(names)}")
    if only is not None:
        return [s for s in stages if s.name == only]
    if until is not None:
        return stages[:names.index(until) + 1]
    return stages


def run(path: str | Path, overrides: Sequence[str] = (), *, command, start: Optional[str] = None,
        only: Optional[str] = None, until: Optional[str] = None, quiet: bool = False, log=print) -> int:
    """Run the pipeline of config `path`; returns the exit code (that of the first stage that failed).

    command: runs one jaxlm command line and returns its exit code (`jaxlm.cli.main`); `quiet`: the
    training commands get --quiet."""
    directory, stages = load(path, overrides)
    selected = _select(stages, start, only, until)
    directory.mkdir(parents=True, exist_ok=True)
    with _exclusive(directory):
        return _run(directory, stages, selected, start, command, log, quiet)


@contextlib.contextmanager
def _exclusive(directory: Path):
    """Hold DIR/pipeline.lock (an advisory lock the system drops when the process ends): a second
    pipeline on the same directory stops with one line instead of racing this one."""
    with open(directory / "pipeline.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise ConfigError(f"{directory} is in use by another jaxlm pipeline (process {f.read().strip() or '?'}); "
                              "wait for it to finish or stop it") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield


def _run(directory: Path, stages, selected, start, command, log, quiet: bool) -> int:
    record = read_record(directory)
    if start is not None:
        for stage in stages[[s.name for s in stages].index(start):]:
            _move_aside(directory, stage, record, log)
    changed = {s.name: differences(record[s.name]["settings"], s.settings) for s in selected
               if record.get(s.name, {}).get("status") == "finished"}
    changed = {name: keys for name, keys in changed.items() if keys}
    if changed:
        name, keys = next(iter(changed.items()))
        shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
        raise ConfigError(f"stage {name} finished with another config (differs in {shown}); rerun with "
                          f"--from {name} to redo it and the stages after it (their directories are moved to "
                          f"{directory / 'replaced'})")
    _write_record(directory, stages, record)
    for i, stage in enumerate(selected):
        done = record.get(stage.name, {})
        if done.get("status") == "finished":
            log(f"[pipeline] {stage.name}: finished before, skipped ({stage.run_dir})")
            continue
        log(f"[pipeline] {stage.name} ({i + 1}/{len(selected)}): {stage.run_dir}")
        t0 = time.monotonic()
        record[stage.name] = {**done, "status": "running", "settings": stage.settings}
        _write_record(directory, stages, record)
        code = 1
        try:
            code = _run_stage(directory, stage, stages, command, log, quiet)
        finally:
            status = "finished" if code == 0 else "interrupted" if code in (130, 143) else "failed"
            wall = (done.get("wall_s") or 0.0) + time.monotonic() - t0
            record[stage.name] = {**record[stage.name], "status": status, "wall_s": round(wall, 1), "exit": code}
            _write_record(directory, stages, record)
            _report(directory, log)
        if code:
            log(f"[pipeline] {stage.name}: {status} (exit {code}); run the same command again to resume it")
            return code
    log(f"[pipeline] done: {directory / 'report.html'} draws every stage (open it in a browser)")
    last = next((s.model for s in reversed(stages) if s.model), None)
    if last:
        log(f"next: jaxlm eval {last} --tasks   or   jaxlm generate {last} --prompt '...'")
    return 0


def _move_aside(directory: Path, stage: Stage, record: dict, log) -> None:
    record.pop(stage.name, None)
    if stage.run_dir.exists():
        target = directory / "replaced" / f"{stage.name}.{time.strftime('%Y%m%d-%H%M%S')}"
        target.parent.mkdir(exist_ok=True)
        stage.run_dir.rename(target)
        log(f"[pipeline] {stage.name}: redone; the old one is {target}")


def _run_stage(directory: Path, stage: Stage, stages: list[Stage], command, log, quiet: bool) -> int:
    if stage.name == "eval":
        evaluate_models(directory, stage, stages, log)
        return 0
    path = directory / "configs" / f"{stage.name}.yaml"
    path.parent.mkdir(exist_ok=True)
    save_config(stage.cfg, path)
    for argv in COMMANDS[stage.name]:
        code = command([*argv, str(path), *["--quiet"] * (quiet and argv[0] != "data")])
        if code:
            return code
    return 0


def evaluate_models(directory: Path, stage: Stage, stages: list[Stage], log) -> dict:
    """Exact match per task of every model stage's model, on the same problems and prompts (the
    template of the SFT stage, else of the first model stage): DIR/eval/accuracy.json, and the first
    `samples` problems of each task with every model's completion, DIR/eval/samples.jsonl."""
    from jaxlm import evaluate, runs

    s = stage.settings
    models = [m for m in stages if m.name in MODELS]
    if not models:
        raise ConfigError("stages.eval compares the models of pretrain, sft, rs, dpo or ppo; the pipeline has none")
    prompting = next((m.cfg for m in models if m.name == "sft"), models[0].cfg)
    accuracy, samples = {}, {}
    for m in models:
        run = runs.load_run(m.model)
        res = evaluate.task_accuracy(prompting, run.params, run.tokenizer, s["tasks"], s["examples"], mesh=run.mesh)
        accuracy[m.name] = {task: r["exact_match"] for task, r in res.items()}
        log(f"[pipeline] eval {m.name}: " + ", ".join(f"{t} {a:.3f}" for t, a in accuracy[m.name].items()))
        for task, r in res.items():
            for j, ex in enumerate(r["examples"][:s["samples"]]):
                row = samples.setdefault((task, j), {"task": task, "prompt": ex["prompt"], "answer": ex["answer"],
                                                     "outputs": {}})
                row["outputs"][m.name] = ex["completion"]
    stage.run_dir.mkdir(parents=True, exist_ok=True)
    result = {"tasks": list(s["tasks"]), "examples": s["examples"], "stages": accuracy}
    (stage.run_dir / "accuracy.json").write_text(json.dumps(result, indent=1) + "\n")
    (stage.run_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples.values()))
    return result


def _report(directory: Path, log) -> None:
    """Refresh DIR/report.html; a report that cannot be drawn is one line, never the run's end."""
    try:
        from jaxlm import report

        report.write_report(directory)
    except Exception as e:  # noqa: BLE001 - the stages' results are kept whatever the drawing does
        print(f"[pipeline] report not written: {type(e).__name__}: {e}", file=sys.stderr)
