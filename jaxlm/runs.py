"""A run directory: what it holds, starting one safely, loading a trained one, and its metrics.

    RUN_DIR/config.yaml      the resolved config the run was started with (paths absolute)
    RUN_DIR/tokenizer.model  a copy of its tokenizer (tokenizer.json for a Hugging Face one;
                             none for `byte`), so the run needs nothing outside itself
    RUN_DIR/metrics.jsonl    one JSON object per logged step and per event
    RUN_DIR/tensorboard/     the same scalars for TensorBoard
    RUN_DIR/checkpoints/     Orbax checkpoints, one item per trained role (`jaxlm.checkpoint`)

`load_run(run_dir)` gives a trained run's config, params, tokenizer and mesh from any working
directory. `start(cfg)` refuses to train into a run directory that holds a different run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np
import yaml
from jax.experimental import multihost_utils

from jaxlm import model, sharding
from jaxlm.checkpoint import check_step, param_names, restore_params
from jaxlm.config import Config, ConfigError, flat_keys, load_config, save_config, to_dict
from jaxlm.data.tokenizers import file_sha256, load_tokenizer
from jaxlm.errors import RunFailed

# What a run trains on and with: a run directory refuses a config that differs in one of these.
IDENTITY = ("model", "data", "train.seq_len", "sft.train_files", "sft.eval_files", "sft.tasks",
            "sft.task_examples", "sft.template", "sft.truncation", "sft.packing", "reward.train_files",
            "reward.eval_files", "reward.tasks", "reward.task_pairs", "reward.margins", "reward.max_responses",
            "reward.groups_per_row", "reward.truncation", "dpo.train_files", "dpo.eval_files", "dpo.tasks",
            "dpo.task_pairs", "dpo.truncation", "dpo.groups_per_row", "dpo.reference_from",
            "dpo.precompute_reference", "dpo.task_rejected", "dpo.task_samples", "dpo.task_temperature",
            "rs.prompt_files", "rs.tasks", "rs.task_prompts", "rs.samples_per_prompt", "rs.temperature", "rs.top_p",
            "rs.max_new_tokens", "rs.checker", "rs.reward_run", "rs.min_score", "ppo.algorithm", "ppo.prompt_files",
            "ppo.tasks", "ppo.task_prompts", "ppo.checker", "ppo.reward_run", "ppo.prompts_per_iteration",
            "ppo.group_size", "ppo.value_from", "optim.name")
# How the same model computes, free to change between a run's sessions (and from an init_from run).
RUNTIME_MODEL_KEYS = ("dtype", "remat", "scan_layers", "scan_unroll", "attention")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def config_path(run_dir) -> Path:
    """RUN_DIR/config.yaml, or a ConfigError saying the directory holds no run."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"run directory {str(run_dir)!r} has no config.yaml (a training run writes it)")
    return path


def run_config(run_dir, overrides: Sequence[str] = ()) -> Config:
    """The config a run was trained with, with `key=value` overrides (e.g. mesh sizes)."""
    return load_config(config_path(run_dir), list(overrides))


def tokenizer_copy(run_dir) -> Optional[Path]:
    """The run's own copy of its tokenizer, if it has one."""
    return next((Path(run_dir) / n for n in TOKENIZER_FILES if (Path(run_dir) / n).is_file()), None)


def load_run_tokenizer(run_dir, cfg: Config):
    """The tokenizer a run was trained with: its own copy, else `data.tokenizer` (byte, or a run
    that keeps none, such as one converted with no tokenizer file)."""
    copy = tokenizer_copy(run_dir)
    return load_tokenizer(str(copy) if copy is not None else cfg.data.tokenizer)


def roles(run_dir, step: int) -> list[str]:
    """The roles whose params checkpoint `step` of a run holds."""
    step_dir = Path(run_dir) / "checkpoints" / str(step)
    return sorted(p.name for p in step_dir.iterdir() if p.is_dir() and p.name not in ("opt_state", "meta"))


def primary_role(run_dir, step: Optional[int] = None) -> str:
    """The role `load_run` reads by default: the policy, else the run's one role (a reward model)."""
    held = roles(run_dir, check_step(run_dir, step))
    return "policy" if "policy" in held or not held else held[0]


@dataclasses.dataclass
class Run:
    """A trained run, loaded: unpacks as `cfg, params, tokenizer, mesh`."""

    cfg: Config
    params: dict
    tokenizer: object
    mesh: object
    step: int
    role: str
    path: Path

    def __iter__(self):
        return iter((self.cfg, self.params, self.tokenizer, self.mesh))


def load_run(run_dir, overrides: Sequence[str] = (), *, step: Optional[int] = None, role: Optional[str] = None,
             mesh=None) -> Run:
    """A run's config, one role's params (default: the policy, or the run's one role) at its latest
    checkpoint (or `step`), its tokenizer, and the mesh the params are sharded on (from the run's
    `mesh.*`, with `overrides`, unless given). A `--step` that does not exist lists those that do."""
    cfg = run_config(run_dir, overrides)
    step = check_step(run_dir, step)
    role = role or primary_role(run_dir, step)
    value_head = "value_head" in param_names(run_dir, step, role)
    if value_head != cfg.model.value_head:  # a reward model or critic of an LM run's config
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, value_head=value_head))
    mesh = mesh if mesh is not None else sharding.make_mesh(cfg.mesh)
    target = model.abstract_params(cfg.model, mesh, cfg.mesh.rules)
    params, step = restore_params(run_dir, target, step, role=role, what="run directory")
    return Run(cfg, params, load_run_tokenizer(run_dir, cfg), mesh, step, role, Path(run_dir))


# --- starting a run -----------------------------------------------------------------------


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute()) if path else path


def resolve_paths(cfg: Config) -> Config:
    """`cfg` with every file path made absolute, so the saved config reads the same from anywhere."""
    d, t, s, r = cfg.data, cfg.train, cfg.sft, cfg.reward
    data = dataclasses.replace(
        d, tokenizer=d.tokenizer if d.tokenizer == "byte" else _absolute(d.tokenizer),
        sources=tuple(dataclasses.replace(src, path=_absolute(src.path)) for src in d.sources))
    return dataclasses.replace(
        cfg, data=data, train=dataclasses.replace(t, run_dir=_absolute(t.run_dir), init_from=_absolute(t.init_from)),
        sft=dataclasses.replace(s, train_files=tuple(map(_absolute, s.train_files)),
                                eval_files=tuple(map(_absolute, s.eval_files))),
        reward=dataclasses.replace(r, train_files=tuple(map(_absolute, r.train_files)),
                                   eval_files=tuple(map(_absolute, r.eval_files))),
        dpo=dataclasses.replace(cfg.dpo, train_files=tuple(map(_absolute, cfg.dpo.train_files)),
                                eval_files=tuple(map(_absolute, cfg.dpo.eval_files)),
                                reference_from=_absolute(cfg.dpo.reference_from)))


def _identity(tree: dict) -> dict:
    flat = flat_keys(tree)
    return {k: v for k, v in flat.items()
            if any(k == p or k.startswith(p + ".") for p in IDENTITY)
            and k not in {f"model.{r}" for r in RUNTIME_MODEL_KEYS}}


def differences(saved: dict, cfg: Config) -> list[str]:
    """`key=new (saved: old)` for each identity key where `cfg` differs from a saved config tree."""
    ours = _identity(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    # a key the saved config predates had its default value then
    theirs = {**_identity(yaml.safe_load(yaml.safe_dump(to_dict(Config())))), **_identity(saved)}
    return [f"{k}={ours.get(k)!r} (saved: {theirs.get(k)!r})"
            for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]


def _check_tokenizer(run_dir: Path, tokenizer: str) -> None:
    copy = tokenizer_copy(run_dir)
    if copy is None or tokenizer == "byte" or not Path(tokenizer).is_file():
        return
    if file_sha256(tokenizer) != file_sha256(copy):
        raise ConfigError(f"data.tokenizer={tokenizer!r} is not the tokenizer the run in {str(run_dir)!r} was "
                          f"trained with (its copy {str(copy)!r} differs); use another train.run_dir")


def copy_tokenizer(run_dir: Path, tokenizer: str) -> None:
    """Copy a tokenizer file (and a tokenizer.json's tokenizer_config.json) into a run directory."""
    if tokenizer == "byte":
        return
    source = Path(tokenizer)
    name = "tokenizer.json" if source.suffix == ".json" else "tokenizer.model"
    shutil.copy2(source, run_dir / name)
    if name == "tokenizer.json" and (source.parent / "tokenizer_config.json").is_file():
        shutil.copy2(source.parent / "tokenizer_config.json", run_dir / "tokenizer_config.json")


def start(cfg: Config, main: bool = True) -> Config:
    """Check that `train.run_dir` is new or holds this same run, then (process 0) write its config
    and tokenizer copy. Returns the resolved config. A run directory whose saved config differs in
    what is trained (`IDENTITY`) is refused, naming the keys, before anything is written. In a
    multi-process run process 0 alone checks and writes (the others could read its config.yaml
    half-written), and every process raises when it refuses, none going on into a collective."""
    cfg = resolve_paths(cfg)
    if jax.process_count() == 1:
        return _start(cfg) if main else cfg
    error = None
    if main:
        try:
            _start(cfg)
        except ConfigError as e:
            error = e
    if int(multihost_utils.broadcast_one_to_all(np.int32(error is not None))):
        raise error or ConfigError(f"process 0 refused train.run_dir={cfg.train.run_dir!r} (see its log)")
    return cfg


def _start(cfg: Config) -> Config:
    run_dir = Path(cfg.train.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.run_dir={str(run_dir)!r} is a file, not a directory")
    saved = run_dir / "config.yaml"
    if saved.is_file():
        try:
            tree = yaml.safe_load(saved.read_text()) or {}
        except yaml.YAMLError:
            raise ConfigError(f"{str(saved)!r} is not valid YAML; use another train.run_dir") from None
        diff = differences(tree, cfg)
        if diff:
            raise ConfigError(f"train.run_dir={str(run_dir)!r} holds a run with another config: "
                              f"{'; '.join(diff)}; use another train.run_dir (or remove it to start over)")
        _check_tokenizer(run_dir, cfg.data.tokenizer)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if tokenizer_copy(run_dir) is None:
            copy_tokenizer(run_dir, cfg.data.tokenizer)
        save_config(cfg, saved)
    except OSError as e:
        raise ConfigError(f"train.run_dir={str(run_dir)!r} cannot be written: {e.strerror}") from None
    return cfg


def check_not_moved(config_path, cfg: Config) -> None:
    """A run's own config.yaml names its run directory: run from a directory that was moved, it
    would start over at the old path. ConfigError unless `train.run_dir` (overrides applied) is
    the directory the file sits in."""
    here = Path(config_path).parent
    if (Path(config_path).name == "config.yaml" and (here / "checkpoints").is_dir()
            and here.resolve() != Path(cfg.train.run_dir).resolve()):
        raise ConfigError(f"{config_path} is the config of the run in {str(here)!r}, but its train.run_dir is "
                          f"{cfg.train.run_dir!r} (the run was moved?); add train.run_dir={here} to resume it there")


def check_init_from(model_cfg, tokenizer: str, run_dir, what: str = "train.init_from") -> None:
    """A run to start from must have this model (runtime keys, the value head, and what sets the
    positions it reads: max_seq_len, the RoPE keys and the attention window, may differ) and this
    tokenizer (by content), else one line naming what differs."""
    theirs = yaml.safe_load(config_path(run_dir).read_text()) or {}
    # no parameter depends on the positions the model reads: context extension changes them
    free = (*RUNTIME_MODEL_KEYS, "value_head", "max_seq_len", "sliding_window", "attention_sinks")
    for key, value in dataclasses.asdict(model_cfg).items():
        other = (theirs.get("model") or {}).get(key, value)
        if key not in free and not key.startswith("rope_") and other != value:
            raise ConfigError(f"model.{key}={value!r} differs from the {what} run {str(run_dir)!r} "
                              f"({other!r}); set it to the same value")
    copy = tokenizer_copy(run_dir)
    their_tok = str(copy) if copy is not None else (theirs.get("data") or {}).get("tokenizer", "byte")
    same = (tokenizer == their_tok == "byte" or
            ("byte" not in (tokenizer, their_tok) and Path(tokenizer).is_file() and Path(their_tok).is_file()
             and file_sha256(tokenizer) == file_sha256(their_tok)))
    if not same:
        raise ConfigError(f"data.tokenizer={tokenizer!r} differs from the tokenizer of the {what} run "
                          f"{str(run_dir)!r} ({their_tok!r}); set it to the same tokenizer")


# --- metrics ------------------------------------------------------------------------------


def _strict(value):
    """`value` as strict JSON allows it: a NaN or infinity becomes null, numpy scalars numbers."""
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / jax scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class MetricsWriter:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl and mirrors scalars to TensorBoard.

    Only process 0 writes (`enabled`); TensorBoard's tags are grouped (`tag`). Rows are {"step": ...,
    name: value, ...}; events are {"event": name, "time": ..., ...} (start, resume, restore, nonfinite,
    spike, end). Lines are strict JSON: a value that is not finite is written as null.
    """

    # Events also said on stderr: what went wrong always, where a run starts from unless train.progress
    # is off (--quiet); start, end and eval never (the banner, the summary and eval's table say them).
    SAID_UNLESS_QUIET = ("init_from", "resume")
    UNSAID = ("start", "end", "eval")

    def __init__(self, run_dir: str | Path, enabled: bool = True, group: str = "train", cfg=None):
        self.enabled, self.group = enabled, group
        self.quiet = cfg is not None and not cfg.train.progress
        self._tb = self._wandb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        try:
            self._tb = EventFile(run_dir / "tensorboard")
        except ImportError:  # TensorBoard is optional: the JSONL has everything
            self._tb = None
        if cfg is not None and cfg.train.wandb_project:
            self._wandb = wandb_run(cfg, run_dir)

    def _write(self, obj: dict) -> None:
        try:
            self._file.write(json.dumps(obj, allow_nan=False) + "\n")
        except OSError as e:  # a full disk: one line, not a traceback
            raise RunFailed(f"cannot write {self._file.name}: {e.strerror}") from None

    def scalars(self, row: dict) -> None:
        if not self.enabled:
            return
        row = _strict(row)
        self._write(row)
        numbers = {self.tag(k): v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            self._tb.scalars(row["step"], numbers)
        if self._wandb is not None:
            self._wandb.log(numbers, step=row["step"])

    def tag(self, name: str) -> str:
        """TensorBoard's name of a metric, grouped: "eval_loss" -> "eval/loss", "loss" -> "train/loss"
        (the writer's group), a name with a group of its own ("rewards/accuracy") as it is."""
        if "/" in name:
            return name
        return f"eval/{name[5:]}" if name.startswith("eval_") else f"{self.group}/{name}"

    def event(self, name: str, **fields) -> None:
        if not self.enabled:
            return
        self._write(_strict({"event": name, "time": time.time(), **fields}))
        if name not in self.UNSAID and not (self.quiet and name in self.SAID_UNLESS_QUIET):
            print(f"[jaxlm] {name}: " + ", ".join(f"{k}={v}" for k, v in fields.items()), file=sys.stderr)

    def close(self) -> None:
        if not self.enabled or self._file.closed:
            return
        for f in (self._file, self._tb):
            try:
                if f is not None:
                    f.close()  # closes the file also when its last flush fails
            except OSError:  # a full disk: what could be written is written
                pass
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def wandb_run(cfg: Config, run_dir: Path):
    """The Weights & Biases run of RUN_DIR in `train.wandb_project`: one per run directory (its id
    from the directory's path), so a resumed run appends to it; files under RUN_DIR/wandb."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(f"train.wandb_project={cfg.train.wandb_project!r} logs to Weights & Biases, which is "
                          "not installed: pip install wandb (or leave train.wandb_project empty)") from None
    return wandb.init(project=cfg.train.wandb_project, name=run_dir.name, id=wandb_run_id(run_dir), resume="allow",
                      dir=str(run_dir), config=to_dict(cfg))


def wandb_run_id(run_dir) -> str:
    """The W&B run id of a run directory: from its absolute path, the same on every resume."""
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


_EVENT_FILES = itertools.count()


class EventFile:
    """TensorBoard's event file (scalars), written in the caller's thread.

    tensorboardX's SummaryWriter writes from a thread of its own and, when its last flush fails
    (a full disk), leaves the file open and retries at exit with a traceback; this writer is the
    same records (a length, the Event proto, their CRCs) through a plain file.
    """

    def __init__(self, directory: Path):
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.record_writer import RecordWriter

        self._event, self._summary = Event, Summary
        directory.mkdir(exist_ok=True)
        # TensorBoard reads every file named *tfevents*; the pid and a count keep two writers of one
        # second (a run, then `jaxlm eval` on it) from truncating each other's file
        name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}.{next(_EVENT_FILES)}"
        self._records = RecordWriter(str(directory / name))
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event) -> None:
        try:
            self._records.write(event.SerializeToString())
        except OSError as e:  # a full disk: one line, not a traceback
            raise RunFailed(f"cannot write {self._records.path}: {e.strerror}") from None

    def scalars(self, step: int, values: dict) -> None:
        summary = self._summary(value=[self._summary.Value(tag=k, simple_value=v) for k, v in values.items()])
        self._write(self._event(wall_time=time.time(), step=step, summary=summary))

    def close(self) -> None:
        self._records.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All rows and events of a run, in order. A last line without its newline that is not JSON is
    one the run is writing now, and is left out; any other line that is not JSON raises."""
    *lines, last = (Path(run_dir) / "metrics.jsonl").read_text().split("\n")
    rows = [json.loads(line) for line in lines if line.strip()]
    try:
        return rows + ([json.loads(last)] if last.strip() else [])
    except json.JSONDecodeError:
        return rows
