"""Frozen dataclasses: the only schema. YAML files and `key.sub=value` overrides fill them.

A YAML file holds overrides only, e.g.::

    model: {preset: tiny, n_layers: 4}
    train: {steps: 300, batch_size: 16}

`model.preset` picks a named size first; every other key overrides a field of the preset.
Errors are `ConfigError`: one line naming the bad key and what is allowed.

One module per group of sections (`model`, `train`, `data`, `stages`), the coercer they share
(`schema`), and the whole config with its loading and validation (`load`).
"""
from jaxlm.config.data import (
    DataConfig,
    MixSourceConfig,
    PrepareConfig,
    SourceConfig,
    StageConfig,
    TokenizeConfig,
    TokenizerConfig,
)
from jaxlm.config.load import (Config, find_config, flat_keys, from_dict, load_config, override, parse_overrides,
                               pipeline_microbatches, read_tree, save_config, shipped_configs, to_dict,
                               validate)
from jaxlm.config.model import PRESET_NAMES, ModelConfig, model_preset
from jaxlm.config.schema import ConfigError
from jaxlm.config.stages import DPOConfig, PPOConfig, RewardConfig, RSConfig, SFTConfig
from jaxlm.config.train import DistributedConfig, MeshConfig, OptimConfig, TrainConfig

__all__ = [
    "Config", "ConfigError", "DPOConfig", "DataConfig", "DistributedConfig", "MeshConfig", "MixSourceConfig",
    "ModelConfig", "OptimConfig", "PPOConfig", "PRESET_NAMES", "PrepareConfig", "RSConfig", "RewardConfig",
    "SFTConfig", "SourceConfig", "StageConfig", "TokenizeConfig", "TokenizerConfig", "TrainConfig", "find_config",
    "flat_keys", "from_dict", "load_config", "model_preset", "override", "parse_overrides", "pipeline_microbatches",
    "read_tree", "save_config", "shipped_configs", "to_dict", "validate",
]
