"""Frozen dataclasses: the only schema. YAML files and `key.sub=value` overrides fill them.

A YAML file holds overrides only, e.g.::

    model: {preset: tiny, n_layers: 4}
    train: {steps: 300, batch_size: 16}

`model.preset` picks a named size first; every other key overrides a field of the preset.
Errors are `ConfigError`: one line naming the bad key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A bad config value: the message names the key and what is allowed."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 512
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 352
    max_seq_len: int = 256
    rope_theta: float = 10_000.0
    # RoPE frequency scaling for long context (the Hugging Face `rope_scaling` kinds):
    # none | linear (every frequency / factor) | llama3 (Llama 3.1: low frequencies / factor,
    # high ones kept, a smooth blend between, by wavelength relative to rope_original_max_len).
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_len: int = 8192  # llama3 only: the context length before scaling
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    dtype: str = "auto"  # compute dtype; auto: bfloat16 on GPU/TPU, float32 on CPU
    param_dtype: str = "float32"
    remat: str = "none"  # none | dots | full
    # true: the layers run as one jax.lax.scan over their stacked params (compile time does
    # not grow with depth); false: a Python loop over per-layer slices, which compiles longer
    # but saves the scan's copies of every layer's activations into stacked buffers (faster
    # for shallow models; same params and checkpoints either way).
    scan_layers: bool = True
    scan_unroll: int = 1  # layers per scan iteration: more compiles longer, may run faster
    # auto: on CPU causal blocks where the mask allows; on a CUDA GPU cuDNN flash attention for
    # a plain causal mask in bf16/fp16; jax.nn.dot_product_attention's XLA path otherwise |
    # blocks (causal blocks, skipping the upper triangle, on any backend where the mask
    # allows) | cudnn (as auto on GPU; an error where cuDNN cannot run) | reference (plain
    # einsum). `jaxlm.model.attention.kernel` decides; `jaxlm bench` prints its choice.
    attention: str = "auto"
    init_std: float = 0.02
    value_head: bool = False  # a scalar-per-token head (reward model, PPO critic)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def compute_dtype(self) -> str:
        """`dtype` with "auto" resolved for the default backend."""
        if self.dtype != "auto":
            return self.dtype
        import jax

        return "float32" if jax.default_backend() == "cpu" else "bfloat16"


# LLaMA shapes (Touvron et al. 2023, table 2; LLaMA-2 70B for GQA with 8 kv heads).
_PRESETS = {
    "tiny": ModelConfig(),
    "125m": ModelConfig(vocab_size=32_000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                        d_ff=2048, max_seq_len=2048),
    "1b": ModelConfig(vocab_size=32_000, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16,
                      d_ff=5632, max_seq_len=2048),
    "7b": ModelConfig(vocab_size=32_000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                      d_ff=11_008, max_seq_len=2048, norm_eps=1e-6),
    "70b": ModelConfig(vocab_size=32_000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                       d_ff=28_672, max_seq_len=4096, norm_eps=1e-5),
}
PRESET_NAMES = tuple(_PRESETS)


def model_preset(name: str) -> ModelConfig:
    """The `ModelConfig` of a named size: tiny, 125m, 1b, 7b, 70b."""
    if name not in _PRESETS:
        raise ConfigError(f"model.preset={name!r} is not a preset; allowed: {', '.join(_PRESETS)}")
    return _PRESETS[name]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1: the rest of the devices
    tensor: int = 1
    rules: str = "fsdp"  # dp | fsdp | fsdp_tp


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # adamw | adafactor
    lr: float = 3e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 100
    decay: str = "cosine"  # cosine | linear | inverse_sqrt | constant
    final_lr_fraction: float = 0.1
    clip_norm: float = 1.0  # 0 disables clipping


@dataclasses.dataclass(frozen=True)
class MixSourceConfig:
    """One training source: a token-shard directory written by `jaxlm data tokenize`."""

    name: str = ""
    path: str = ""
    weight: float = 1.0  # mixture weight (normalised over the sources)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """A curriculum stage: `weights` ({source: weight}) until `until` (in data.curriculum_unit);
    the last stage may leave `until` out and runs on to the end."""

    until: Optional[int] = None
    weights: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"  # stdlib: the standard library's .py files in memory | shards: `sources`
    tokenizer: str = "byte"  # byte (UTF-8 bytes and jaxlm's specials), SentencePiece .model, tokenizer.json
    sources: tuple[MixSourceConfig, ...] = ()
    curriculum: tuple[StageConfig, ...] = ()  # empty: the sources' weights throughout
    curriculum_unit: str = "tokens"  # tokens | steps (concat packing) | examples
    objective: dict = dataclasses.field(default_factory=lambda: {"clm": 1.0})  # name -> weight
    packing: str = "auto"  # auto: concat for clm/fim objectives, first_fit otherwise
    lookahead: int = 256  # first_fit: examples packed together
    # concat: sequences are drawn in a random order within blocks of this many (each exactly
    # once per block); 1: in stream order. Small blocks keep a batch to a few documents for many
    # steps (train loss falls below held-out); the default covers 16.8M tokens at seq_len 256.
    shuffle_block: int = 65536
    fim_max_tokens: int = 0  # FIM: documents are cut into pieces this long, each FIM'd alone; 0: seq_len // 2
    heldout_fraction: float = 0.02
    max_documents: int = 0  # 0: all (per source)
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One raw-document source for `jaxlm data prepare`."""

    name: str = ""
    paths: tuple[str, ...] = ()  # files or globs
    format: str = "auto"  # auto (by suffix) | jsonl | parquet | text
    text_field: str = "text"
    rules: Optional[dict] = None  # rule name -> params (or true); None: prepare.rules


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """`jaxlm data prepare`: filter, scrub and deduplicate raw documents, per source."""

    sources: tuple[SourceConfig, ...] = ()
    rules: dict = dataclasses.field(default_factory=lambda: {
        "html": True, "gopher_quality": True, "gopher_repetition": True, "c4": True, "pii": True})
    exact_dedup: bool = True
    minhash_dedup: bool = True
    minhash_ngram: int = 5
    minhash_bands: int = 14
    minhash_rows: int = 8
    suffix_dedup: bool = False  # exact repeated spans (Lee et al. 2022), on UTF-8 bytes
    suffix_min_len: int = 50
    max_chars: int = 1_000_000  # longer documents are counted and skipped
    out_dir: str = "data/prepared"
    write_rejects: bool = True  # RUN_DIR/rejects.jsonl: every dropped document with its reason


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """`jaxlm data tokenizer`: train SentencePiece with the special symbols reserved."""

    inputs: tuple[str, ...] = ()  # prepared JSONL (or text/Parquet) files or globs
    text_field: str = "text"
    out: str = "data/tokenizer"  # model prefix: writes OUT.model and OUT.vocab
    vocab_size: int = 8192
    model_type: str = "bpe"  # bpe | unigram
    n_sentinels: int = 100
    max_documents: int = 0  # 0: all


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    """`jaxlm data tokenize`: tokenize documents in worker processes into ArrayRecord shards."""

    inputs: tuple[str, ...] = ()
    text_field: str = "text"
    tokenizer: str = "data/tokenizer.model"  # a SentencePiece .model, or "byte"
    out_dir: str = "data/tokens"
    workers: int = 0  # 0: one per CPU core
    docs_per_shard: int = 8192
    overwrite: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # global sequences per optimizer step
    seq_len: int = 256
    grad_accum_steps: int = 1
    batch_ramp_start: int = 0  # 0: no ramp; else the global batch at step 0
    batch_ramp_tokens: int = 0  # tokens over which the batch grows linearly to batch_size
    run_dir: str = "runs/default"
    seed: int = 0
    init_from: str = ""  # another run's directory: start from its latest params
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    save_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    spike_factor: float = 0.0  # 0 disables; else restore when loss > factor * running mean
    max_bad_steps: int = 3  # consecutive non-finite or spiking steps before a restore
    progress: bool = True
    peak_tflops: float = 0.0  # device peak for MFU; 0: measured with a large matmul
    # device memory bandwidth for the decode bound of `jaxlm bench`; 0: measured (jaxlm.perf)
    peak_bandwidth_gbs: float = 0.0
    loss_chunk: int = 0  # > 0: output projection + cross-entropy this many positions at a time


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process runs. Which process this is comes from the environment (jaxlm/distributed.py)."""

    init_timeout_s: int = 300  # wait this long for every process to join
    heartbeat_timeout_s: int = 100  # a process silent this long is dead: the others exit
    shutdown_timeout_s: int = 300  # at a clean exit, wait this long for the others to finish


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """`jaxlm sft`: instruction / chat JSONL and built-in tasks; the longest example is train.seq_len."""

    train_files: tuple[str, ...] = ()  # JSONL of instruction or chat records (globs allowed)
    eval_files: tuple[str, ...] = ()  # held-out records; empty: data.heldout_fraction of train_files
    tasks: tuple[str, ...] = ()  # built-in verifiable tasks (jaxlm.data.tasks): add, reverse, sort, recall
    task_examples: int = 20_000  # training examples drawn per built-in task
    task_eval_examples: int = 100  # distinct test problems per task: eval loss and exact-match accuracy
    template: str = "### Instruction:\n{prompt}\n\n### Response:\n"  # instruction records
    truncation: str = "trim_context"  # trim_context (keep the response, cut the oldest context) | drop
    packing: bool = True  # several examples per row (segment ids, restarted positions)
    max_new_tokens: int = 16  # generation budget of the accuracy eval


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    prepare: PrepareConfig = PrepareConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    sft: SFTConfig = SFTConfig()
    distributed: DistributedConfig = DistributedConfig()


_CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "dots", "full"),
    "model.attention": ("auto", "blocks", "cudnn", "reference"),
    "model.rope_scaling": ("none", "linear", "llama3"),
    "mesh.rules": ("dp", "fsdp", "fsdp_tp"),
    "optim.name": ("adamw", "adafactor"),
    "optim.decay": ("cosine", "linear", "inverse_sqrt", "constant"),
    "data.source": ("stdlib", "shards"),
    "data.curriculum_unit": ("tokens", "steps", "examples"),
    "data.packing": ("auto", "concat", "first_fit"),
    "tokenizer.model_type": ("bpe", "unigram"),
    "sft.truncation": ("trim_context", "drop"),
}


def _field_type(cls, name: str):
    return typing.get_type_hints(cls)[name]


def _coerce(key: str, value: Any, typ) -> Any:
    """Check `value` against a field type; ints are accepted for floats."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        (elem,) = typing.get_args(typ)[:1]
        if isinstance(value, str) and elem is str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} has the wrong type; expected a list")
        if dataclasses.is_dataclass(elem):
            for i, v in enumerate(value):
                if not isinstance(v, dict):
                    raise ConfigError(f"{key}[{i}]={v!r} must be a mapping of {elem.__name__} fields")
            return tuple(_apply(elem(), f"{key}[{i}]", v) for i, v in enumerate(value))
        return tuple(_coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value))
    if typ is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key}={value!r} has the wrong type; expected a mapping")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{key}={value!r} has the wrong type; expected {typ.__name__}")


def _apply(section, prefix: str, updates: dict):
    allowed = {f.name for f in dataclasses.fields(section)}
    changes = {}
    for name, value in updates.items():
        key = f"{prefix}.{name}"
        if name not in allowed:
            raise ConfigError(f"unknown config key {key!r}; allowed under {prefix!r}: "
                              f"{', '.join(sorted(allowed))}")
        changes[name] = _coerce(key, value, _field_type(type(section), name))
    return dataclasses.replace(section, **changes)


def _nest(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {key!r} sets a field inside a non-section")
        node[parts[-1]] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """`["model.n_layers=2", "train.run_dir=/tmp/x"]` -> nested dict (values parsed as YAML)."""
    flat = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        try:
            flat[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value {raw!r} is not valid YAML (a number, true/false, "
                              "a string, [a, list] or {a: mapping}; quote strings with special characters)") from None
    return _nest(flat)


def from_dict(tree: dict) -> Config:
    """Build a validated `Config` from a nested dict of overrides."""
    cfg = Config()
    sections = {f.name for f in dataclasses.fields(Config)}
    for name, updates in tree.items():
        if name not in sections:
            raise ConfigError(f"unknown config section {name!r}; allowed: {', '.join(sorted(sections))}")
        if not isinstance(updates, dict):
            raise ConfigError(f"config section {name!r} must be a mapping, got {updates!r}")
        section = getattr(cfg, name)
        if name == "model" and "preset" in updates:
            updates = dict(updates)
            section = model_preset(updates.pop("preset"))
        cfg = dataclasses.replace(cfg, **{name: _apply(section, name, updates)})
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file of overrides, apply `key.sub=value` overrides, validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}".splitlines()[0]) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
        tree = loaded
    return from_dict(_merge(tree, parse_overrides(overrides or [])))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _check(ok: bool, msg: str):
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    """Reject impossible values with one line naming the key."""
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(value in allowed, f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")
    m, t, o, mesh = cfg.model, cfg.train, cfg.optim, cfg.mesh
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len",
                "scan_unroll"):
        _check(getattr(m, key) > 0, f"model.{key}={getattr(m, key)} must be positive")
    _check(m.d_model % m.n_heads == 0,
           f"model.n_heads={m.n_heads} must divide model.d_model={m.d_model}")
    _check(m.n_heads % m.n_kv_heads == 0,
           f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads}")
    _check(m.head_dim % 2 == 0, f"model.d_model/n_heads={m.head_dim} must be even for RoPE")
    _check(m.rope_theta > 0, f"model.rope_theta={m.rope_theta} must be positive")
    if m.rope_scaling != "none":
        _check(m.rope_scaling_factor > 0, f"model.rope_scaling_factor={m.rope_scaling_factor} must be positive")
    if m.rope_scaling == "llama3":
        _check(0 < m.rope_low_freq_factor < m.rope_high_freq_factor,
               f"model.rope_low_freq_factor={m.rope_low_freq_factor} and model.rope_high_freq_factor="
               f"{m.rope_high_freq_factor} must satisfy 0 < low < high")
        _check(m.rope_original_max_len > 0,
               f"model.rope_original_max_len={m.rope_original_max_len} must be positive")
    for key in ("data", "fsdp", "tensor"):
        v = getattr(mesh, key)
        _check(v == -1 or v >= 1, f"mesh.{key}={v} must be >= 1, or -1 for the rest of the devices")
    _check([mesh.data, mesh.fsdp, mesh.tensor].count(-1) <= 1,
           "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    for key in ("steps", "batch_size", "seq_len", "grad_accum_steps", "log_every", "eval_every",
                "save_every", "keep_checkpoints", "max_bad_steps"):
        _check(getattr(t, key) > 0, f"train.{key}={getattr(t, key)} must be positive")
    _check(t.eval_batches >= 0, f"train.eval_batches={t.eval_batches} must be >= 0")
    for key in ("peak_tflops", "peak_bandwidth_gbs"):
        _check(getattr(t, key) >= 0, f"train.{key}={getattr(t, key)} must be >= 0 (0: measured)")
    _check(t.loss_chunk >= 0 and (t.loss_chunk == 0 or t.seq_len % min(t.loss_chunk, t.seq_len) == 0),
           f"train.loss_chunk={t.loss_chunk} must be 0 (off) or divide train.seq_len={t.seq_len}")
    _check(t.seq_len <= m.max_seq_len,
           f"train.seq_len={t.seq_len} must be <= model.max_seq_len={m.max_seq_len}")
    _check(t.batch_size % t.grad_accum_steps == 0,
           f"train.grad_accum_steps={t.grad_accum_steps} must divide train.batch_size={t.batch_size}")
    _check(0 <= t.batch_ramp_start <= t.batch_size,
           f"train.batch_ramp_start={t.batch_ramp_start} must be in [0, train.batch_size={t.batch_size}]")
    _check(t.batch_ramp_tokens >= 0, f"train.batch_ramp_tokens={t.batch_ramp_tokens} must be >= 0")
    _check(t.spike_factor == 0 or t.spike_factor > 1,
           f"train.spike_factor={t.spike_factor} must be 0 (off) or > 1")
    _check(o.lr > 0, f"optim.lr={o.lr} must be positive")
    _check(0 <= o.warmup_steps <= t.steps,
           f"optim.warmup_steps={o.warmup_steps} must be in [0, train.steps={t.steps}]")
    _check(0 <= o.final_lr_fraction <= 1, f"optim.final_lr_fraction={o.final_lr_fraction} must be in [0, 1]")
    _check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optim.b1={o.b1}, optim.b2={o.b2} must be in [0, 1)")
    _check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _check(o.clip_norm >= 0, f"optim.clip_norm={o.clip_norm} must be >= 0 (0 disables)")
    for key, value in (("data.tokenizer", cfg.data.tokenizer), ("tokenize.tokenizer", cfg.tokenize.tokenizer)):
        _check(value == "byte" or value.endswith((".model", ".json")),
               f"{key}={value!r} is not a tokenizer; allowed: byte, the path of a SentencePiece .model, "
               "or of a Hugging Face tokenizer.json")
    _check(cfg.tokenizer.vocab_size > 0, f"tokenizer.vocab_size={cfg.tokenizer.vocab_size} must be positive")
    _check(cfg.tokenize.workers >= 0, f"tokenize.workers={cfg.tokenize.workers} must be >= 0 (0: all cores)")
    for key in ("init_timeout_s", "heartbeat_timeout_s", "shutdown_timeout_s"):
        v = getattr(cfg.distributed, key)
        _check(v > 0, f"distributed.{key}={v} must be positive (seconds)")
    _check(cfg.tokenize.docs_per_shard > 0,
           f"tokenize.docs_per_shard={cfg.tokenize.docs_per_shard} must be positive")
    from jaxlm.objectives.denoise import OBJECTIVES

    for name, w in cfg.data.objective.items():
        _check(name in OBJECTIVES, f"data.objective has {name!r}, not an objective; allowed: "
               f"{', '.join(OBJECTIVES)}")
        _check(isinstance(w, (int, float)) and w > 0, f"data.objective.{name}={w!r} must be a positive weight")
    _check(bool(cfg.data.objective), f"data.objective is empty; give weights to some of: {', '.join(OBJECTIVES)}")
    _check(cfg.data.lookahead > 0, f"data.lookahead={cfg.data.lookahead} must be positive")
    _check(cfg.data.shuffle_block > 0, f"data.shuffle_block={cfg.data.shuffle_block} must be positive")
    _check(cfg.data.fim_max_tokens >= 0, f"data.fim_max_tokens={cfg.data.fim_max_tokens} must be >= 0 "
           "(0: half of train.seq_len)")
    _check(cfg.data.max_documents >= 0, f"data.max_documents={cfg.data.max_documents} must be >= 0 (0: all)")
    _check(0 <= cfg.data.heldout_fraction < 1,
           f"data.heldout_fraction={cfg.data.heldout_fraction} must be in [0, 1)")
    from jaxlm.data.tasks import TASK_NAMES

    for name in cfg.sft.tasks:
        _check(name in TASK_NAMES, f"sft.tasks has {name!r}, not a built-in task; allowed: {', '.join(TASK_NAMES)}")
    for key in ("task_examples", "task_eval_examples", "max_new_tokens"):
        _check(getattr(cfg.sft, key) > 0, f"sft.{key}={getattr(cfg.sft, key)} must be positive")
    _check(cfg.sft.template.count("{prompt}") == 1,
           f"sft.template={cfg.sft.template!r} must hold {{prompt}} exactly once")
