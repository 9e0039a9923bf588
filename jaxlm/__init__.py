"""jaxlm: train large language models end to end in JAX."""
from jaxlm import evaluate, generate, model, objectives
from jaxlm.config import Config, ConfigError, ModelConfig, load_config, model_preset

__all__ = ["Config", "ConfigError", "ModelConfig", "evaluate", "generate", "load_config", "model", "model_preset",
           "objectives"]
