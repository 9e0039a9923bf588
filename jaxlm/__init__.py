"""jaxlm: train large language models end to end in JAX.

The submodules load on first use (`jaxlm.model`, `jaxlm.load_run`, ...), so a process that needs
only a part (a data-preparation worker, `jaxlm --help`) does not pay for importing JAX.
"""
import importlib

_SUBMODULES = ("evaluate", "generate", "model", "objectives", "runs")
_NAMES = {"Config": "jaxlm.config", "ConfigError": "jaxlm.config", "ModelConfig": "jaxlm.config",
          "load_config": "jaxlm.config", "model_preset": "jaxlm.config", "load_run": "jaxlm.runs"}

__all__ = sorted([*_SUBMODULES, *_NAMES])


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxlm.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'jaxlm' has no attribute {name!r}")
