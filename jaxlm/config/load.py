"""The whole config: one section per dataclass, filled from YAML files and `key.sub=value` overrides."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from jaxlm.config import data, model, stages, train
from jaxlm.config.data import DataConfig, PrepareConfig, TokenizeConfig, TokenizerConfig
from jaxlm.config.model import ModelConfig, model_preset
from jaxlm.config.schema import ConfigError, build, check
from jaxlm.config.stages import DPOConfig, PPOConfig, RewardConfig, RSConfig, SFTConfig
from jaxlm.config.train import DistributedConfig, MeshConfig, OptimConfig, TrainConfig


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
    reward: RewardConfig = RewardConfig()
    dpo: DPOConfig = DPOConfig()
    rs: RSConfig = RSConfig()
    ppo: PPOConfig = PPOConfig()
    distributed: DistributedConfig = DistributedConfig()


CHOICES = {**model.CHOICES, **train.CHOICES, **data.CHOICES, **stages.CHOICES}


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


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true and false (any case), so that `yes`,
    `no`, `on` and `off` stay strings, as YAML 1.2 reads them, and a key that wants a string gets
    one, a key that wants a bool names the bad value."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def load_yaml(text: str):
    """A config file's or override's YAML, with YAML 1.2's booleans (`_Yaml12Loader`)."""
    return yaml.load(text, Loader=_Yaml12Loader)


def parse_overrides(overrides: list[str], nest: bool = True) -> dict:
    """`["model.n_layers=2", "train.run_dir=/tmp/x"]` -> nested dict (values parsed as YAML);
    `nest=False`: {"model.n_layers": 2, ...}, as `override` takes them."""
    flat = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        try:
            flat[key.strip()] = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value {raw!r} is not valid YAML (a number, true/false, "
                              "a string, [a, list] or {a: mapping}; quote strings with special characters)") from None
    return _nest(flat) if nest else flat


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
        cfg = dataclasses.replace(cfg, **{name: build(section, name, updates)})
    validate(cfg)
    return cfg


SHIPPED = Path(__file__).resolve().parent.parent / "configs"  # the configs the package ships (configs/ in a clone)


def shipped_configs(kind: str = "") -> list[str]:
    """The shipped configs' names, `KIND/NAME` (`pretrain/tiny`), of one kind or all."""
    return sorted(str(p.relative_to(SHIPPED).with_suffix("")) for p in SHIPPED.glob(f"{kind or '*'}/*.yaml"))


def find_config(name: str | Path, kinds: tuple[str, ...] = ()) -> Path:
    """The YAML file `name` means: a file that exists; else a shipped config, named from any working
    directory as `configs/KIND/NAME.yaml` (as in a clone), `jaxlm:KIND/NAME.yaml`, `KIND/NAME` or,
    for a command whose configs are of one of `kinds`, `NAME` (`jaxlm pretrain tiny`)."""
    path = Path(name)
    if path.is_file():
        return path
    text = str(name).removeprefix("jaxlm:")
    rel = Path(text).relative_to("configs") if Path(text).parts[:1] == ("configs",) else Path(text)
    candidates = () if path.is_absolute() else (rel, *(Path(kind) / rel for kind in kinds))
    for candidate in candidates:
        for shipped in (SHIPPED / candidate, SHIPPED / candidate.with_name(candidate.name + ".yaml")):
            if shipped.is_file():
                return shipped
    names = [n for kind in kinds or ("",) for n in shipped_configs(kind)]
    raise ConfigError(f"config file {str(name)!r} does not exist; shipped {'/'.join(kinds) + ' ' if kinds else ''}"
                      f"configs: {', '.join(names) or 'none'} (`jaxlm config list` shows them all)")


def read_tree(path: str | Path) -> dict:
    """The nested dict of a YAML config file (`find_config` finds it), unvalidated (`from_dict`
    validates it)."""
    path = find_config(path)
    try:
        loaded = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return loaded


def flat_keys(tree: dict, prefix: str = "") -> dict:
    """{"section.key": value} of a config tree (mappings inside a section are values), the inverse
    of `override`'s nesting."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and "." not in key:  # sections; mappings inside them are values
            out.update(flat_keys(v, key + "."))
        else:
            out[key] = v
    return out


def override(tree: dict, flat: dict[str, Any]) -> dict:
    """`tree` with the dotted keys of `flat` set ({"train.steps": 10}), `tree` itself unchanged.

    A `section.key` is set whole, so a mapping replaces the one there (`data.objective={ul2: 1.0}`
    trains UL2 alone); a longer key sets one entry inside it (`data.objective.fim=0.5` adds FIM)."""
    out = dict(tree)
    for key, value in flat.items():
        if "." not in key:
            raise ConfigError(f"override {key!r} is not of the form section.key=value")
        section, *inner, last = key.split(".")
        if not isinstance(out.get(section, {}), dict):
            raise ConfigError(f"config section {section!r} must be a mapping, got {out[section]!r}")
        node = out[section] = dict(out.get(section) or {})
        for part in inner:
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"config key {key!r} sets an entry inside {part!r}, which is not a mapping")
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[last] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file of overrides, apply `key.sub=value` overrides (`override`), validate."""
    tree = read_tree(path) if path is not None else {}
    return from_dict(override(tree, parse_overrides(overrides or [], nest=False)))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write `cfg` as YAML, atomically: a reader sees the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)


def pipeline_microbatches(cfg: Config) -> int:
    """train.microbatches, its default (0) resolved: 2 x mesh.stage."""
    return cfg.train.microbatches or 2 * cfg.mesh.stage


def _validate_pipeline(cfg: Config) -> None:
    mesh, t, m = cfg.mesh, cfg.train, cfg.model
    check(t.microbatches >= 0, f"train.microbatches={t.microbatches} must be >= 0 (0: 2 x mesh.stage)")
    if mesh.stage == 1:
        return
    chunks = mesh.stage * mesh.repeats
    stacks = {"model.n_layers": m.n_layers}
    if m.arch == "encoder_decoder":
        stacks["model.n_encoder_layers"] = m.n_encoder_layers or m.n_layers
    for key, n in stacks.items():
        check(n % chunks == 0, f"{key}={n} must be a multiple of mesh.stage x mesh.repeats = {chunks}: "
              "each stage holds an equal share of the layers")
    micro = pipeline_microbatches(cfg)
    rows = t.batch_size // t.grad_accum_steps
    check(rows % micro == 0, f"train.batch_size / train.grad_accum_steps = {rows} rows must split into "
          f"train.microbatches={micro} pipeline microbatches")
    check(mesh.repeats == 1 or micro >= mesh.stage, f"mesh.repeats={mesh.repeats} (circular) needs "
          f"train.microbatches >= mesh.stage={mesh.stage}; got {micro}")
    check(mesh.sequence == 1, f"mesh.sequence={mesh.sequence} with mesh.stage={mesh.stage}: context and pipeline "
          "parallelism do not combine yet; allowed: mesh.sequence=1")
    check(t.batch_ramp_start == 0, f"train.batch_ramp_start={t.batch_ramp_start} with mesh.stage={mesh.stage}: "
          "a growing batch does not keep the pipeline's microbatches; allowed: 0")


def validate(cfg: Config) -> None:
    """Reject impossible values with one line naming the key."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        check(value in allowed, f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")
    model.validate(cfg.model)
    train.validate_mesh(cfg.mesh)
    train.validate_train(cfg.train)
    t, m = cfg.train, cfg.model
    check(t.seq_len <= m.max_seq_len, f"train.seq_len={t.seq_len} must be <= model.max_seq_len={m.max_seq_len}")
    check(t.seq_len % cfg.mesh.sequence == 0, f"train.seq_len={t.seq_len} must be a multiple of "
          f"mesh.sequence={cfg.mesh.sequence}: each of its devices holds an equal slice of every sequence")
    _validate_pipeline(cfg)
    check(m.arch == "decoder" or cfg.data.bidirectional_prefix,
          f"data.bidirectional_prefix=false is for model.arch=decoder; model.arch={m.arch}'s encoder reads its "
          "inputs both ways")
    train.validate_optim(cfg.optim)
    data.validate_prepare(cfg.prepare)
    data.validate_tokenizer(cfg.tokenizer)
    data.validate_tokenize(cfg.tokenize)
    train.validate_distributed(cfg.distributed)
    data.validate_data(cfg.data)
    stages.validate_sft(cfg.sft)
    stages.validate_reward(cfg.reward)
    stages.validate_dpo(cfg.dpo)
    stages.validate_rs(cfg.rs)
    stages.validate_ppo(cfg.ppo)
