"""Pure JAX losses: each returns (loss, metrics), metrics being {name: (sum, count)} pairs.

The examples the losses are computed on are built in numpy by `jaxlm.data.examples`.
"""
from jaxlm.objectives.lm import lm_loss, token_log_probs

__all__ = ["lm_loss", "token_log_probs"]
