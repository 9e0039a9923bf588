"""jaxlm: train large language models end to end in JAX."""
from jaxlm import evaluate, generate, model, objectives, runs
from jaxlm.config import Config, ConfigError, ModelConfig, load_config, model_preset
from jaxlm.runs import load_run

__all__ = ["Config", "ConfigError", "ModelConfig", "evaluate", "generate", "load_config", "load_run", "model",
           "model_preset", "objectives", "runs"]
