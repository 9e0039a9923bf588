"""`jaxlm convert`: a Hugging Face checkpoint directory <-> a jaxlm run directory.

`import_run` writes what a jaxlm run holds, so every later command (generate, eval, sft,
pretrain with `train.init_from`) takes it:

    RUN_DIR/config.yaml       the resolved Config: the imported model, data.tokenizer
    RUN_DIR/checkpoints/0/    params and meta, in the format jaxlm.checkpoint writes
    RUN_DIR/hf/               the checkpoint's other files: config.json, tokenizer files, ...

`export_run` reads a run's latest params and writes config.json and safetensors. The HF
config it starts from (family, token ids, sliding window) is found in RUN_DIR/hf, or in
the hf/ of the run it was initialised from (`train.init_from`, followed back).
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Optional

import jax
import yaml

from jaxlm import runs, sharding
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import Config, ConfigError, DataConfig, MeshConfig, TrainConfig, load_config, save_config, validate
from jaxlm.data.tokenizers import file_sha256, load_tokenizer
from jaxlm.interop.hf import load_hf, read_config, save_hf
from jaxlm.interop.hf_config import InteropError, family_of, sliding_window

# The non-weight files of a checkpoint directory that travel with it.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.model", "spiece.model", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
              "chat_template.json")


def _tokenizer_path(side: Path) -> Optional[Path]:
    """tokenizer.model (T5's spiece.model) if there is one (SentencePiece, used as is), else tokenizer.json."""
    for name in ("tokenizer.model", "spiece.model", "tokenizer.json"):
        if (side / name).is_file():
            return (side / name).absolute()
    return None


def import_run(hf_dir: str | Path, run_dir: str | Path, *, param_dtype: str = "float32",
               max_seq_len: Optional[int] = None, mesh=None, rules: str = "fsdp") -> tuple[Config, list[str]]:
    """Convert a Hugging Face checkpoint into a jaxlm run directory; returns (config, notes)."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if (run_dir / "checkpoints").exists() or (run_dir / "config.yaml").exists():
        raise InteropError(f"--out {str(run_dir)!r} already holds a run; choose a new directory")
    hf = read_config(hf_dir)
    model_cfg, params = load_hf(hf_dir, mesh=mesh, rules=rules, param_dtype=param_dtype, max_seq_len=max_seq_len)
    notes = []
    family = family_of(hf)
    window = sliding_window(hf, family)
    if window is not None and not model_cfg.sliding_window and max_seq_len is None:
        notes.append(f"some layers attend within a sliding window of {window}; jaxlm's window is on every "
                     f"layer or none, so model.max_seq_len={model_cfg.max_seq_len} keeps every sequence inside it")
    side = run_dir / "hf"
    main = jax.process_index() == 0
    if main:
        side.mkdir(parents=True, exist_ok=True)
        for name in SIDE_FILES:
            if (hf_dir / name).is_file():
                shutil.copy2(hf_dir / name, side / name)
    tokenizer = _tokenizer_path(side)
    if tokenizer is None:
        notes.append(f"{hf_dir} has no tokenizer.model or tokenizer.json: data.tokenizer stays 'byte'; "
                     "set it to this model's tokenizer before training or generating")
    cfg = Config(model=model_cfg, mesh=MeshConfig(rules=rules),
                 data=dataclasses.replace(DataConfig(), tokenizer=str(tokenizer or "byte")),
                 train=dataclasses.replace(TrainConfig(), run_dir=str(run_dir),
                                           seq_len=min(TrainConfig.seq_len, model_cfg.max_seq_len)))
    validate(cfg)
    cfg = runs.resolve_paths(cfg)
    if tokenizer is not None:
        _check_tokenizer(cfg, notes)
    ckpt = Checkpointer(run_dir / "checkpoints", roles=("policy",), keep=1, async_save=False)
    meta = {"step": 0, "cursor": 0, "converted_from": str(hf_dir.absolute()), "family": family}
    # No optimizer state: a converted run is a starting point (train.init_from), not a run to resume.
    ckpt.save(0, {"policy": params}, None, meta)
    ckpt.close()
    if main:
        if tokenizer is not None:
            runs.copy_tokenizer(run_dir, str(tokenizer))
        save_config(cfg, run_dir / "config.yaml")
    return cfg, notes


def _check_tokenizer(cfg: Config, notes: list[str]) -> None:
    try:
        tok = load_tokenizer(cfg.data.tokenizer)
    except ConfigError as e:  # e.g. `tokenizers` not installed: the run is still usable once it is
        notes.append(str(e))
        return
    if tok.vocab_size > cfg.model.vocab_size:
        raise InteropError(f"the tokenizer {cfg.data.tokenizer} has {tok.vocab_size} ids but the model's "
                           f"vocab_size is {cfg.model.vocab_size}")


def _run_config(run_dir: Path) -> Config:
    if not (run_dir / "config.yaml").is_file():
        raise InteropError(f"{str(run_dir)!r} is not a jaxlm run (no config.yaml)")
    return load_config(run_dir / "config.yaml")


def find_hf_side(run_dir: Path) -> Optional[Path]:
    """RUN_DIR/hf, or that of the run it was initialised from (followed back), if any."""
    seen = set()
    while run_dir and run_dir.absolute() not in seen:
        seen.add(run_dir.absolute())
        if (run_dir / "hf" / "config.json").is_file():
            return run_dir / "hf"
        try:
            tree = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            return None
        init_from = (tree.get("train") or {}).get("init_from")
        run_dir = Path(init_from) if init_from else None
    return None


def export_run(run_dir: str | Path, out_dir: str | Path, *, dtype: Optional[str] = None,
               family: Optional[str] = None, max_shard_bytes: Optional[int] = None) -> tuple[list[str], list[str]]:
    """Write a run's latest params as a Hugging Face checkpoint; returns (files written, notes)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _run_config(run_dir)
    if any(out_dir.glob("*.safetensors")) or (out_dir / "config.json").exists():
        raise InteropError(f"--out {str(out_dir)!r} already holds a checkpoint; choose a new directory")
    if (out_dir / "checkpoints").exists() or (out_dir / "config.yaml").exists():
        raise InteropError(f"--out {str(out_dir)!r} is a jaxlm run directory; write the Hugging Face files to a "
                           "new directory (a run keeps the ones it was imported from in RUN_DIR/hf)")
    side = find_hf_side(run_dir)
    base = read_config(side) if side else None
    run = runs.load_run(run_dir, mesh=sharding.make_mesh(MeshConfig()))
    cfg, params, step = run.cfg, run.params, run.step
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    files = save_hf(cfg.model, params, out_dir, family=family, base_config=base, dtype=dtype, **kwargs)
    notes = [f"read the params of step {step}"]
    if jax.process_index() != 0:
        return files, notes
    copy, copied = runs.tokenizer_copy(run_dir), []
    tokenizer = str(copy) if copy is not None else cfg.data.tokenizer
    if tokenizer == "byte":
        notes.append("data.tokenizer is jaxlm's byte tokenizer, which Hugging Face has no counterpart "
                     "for: no tokenizer written")
        return files, notes
    name = "tokenizer.json" if not tokenizer.endswith(".model") else (
        "spiece.model" if cfg.model.arch == "encoder_decoder" else "tokenizer.model")  # T5's name
    shutil.copy2(tokenizer, out_dir / name)
    copied.append(name)
    if side and (side / name).is_file() and file_sha256(side / name) == file_sha256(tokenizer):
        # the imported tokenizer: its settings and the generation config (token ids) belong with it
        for name in SIDE_FILES:
            if name not in ("config.json", *copied) and (side / name).is_file():
                shutil.copy2(side / name, out_dir / name)
                copied.append(name)
    return files + copied, notes
