"""The losses of proximal policy optimisation (Schulman et al. 2017) on sampled responses.

Per-token arrays [B, T] with `mask` 1 at the response tokens. Each loss returns (its token mean
over the mask, metrics {name: (sum, count)}), so that a step can sum over micro-batches and
divide by the tokens of the whole batch (`jaxlm.train.step`).

- `policy_loss`: max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(logp - old_logp); with
  the clip fraction (|rho - 1| > eps) and the approximate KL to the sampling policy,
  (rho - 1) - log rho (k3, >= 0). At rho = 1 its gradient is the vanilla policy gradient
  -A grad log pi.
- `value_loss`: 1/2 max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, -c, c).
- `entropy`: the policy's token entropy (the bonus is -coef * entropy in the loss).
- `adaptive_kl_coef`: Ziegler et al. 2019's controller, e = clip(KL / target - 1, -0.2, 0.2),
  beta <- beta (1 + e n / horizon) after n samples; a fixed coefficient is simply not updated.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _masked(x_BT, mask_BT):
    n = jnp.sum(mask_BT)
    return (jnp.sum(x_BT * mask_BT), n)


def _mean(pair):
    return pair[0] / jnp.maximum(pair[1], 1.0)


def policy_loss(logp_BT, old_logp_BT, advantages_BT, mask_BT, clip_eps: float = 0.2):
    """(the clipped surrogate loss's token mean, metrics: policy_loss, clip_frac, approx_kl)."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    logp, old, adv, mask = map(f32, (logp_BT, old_logp_BT, advantages_BT, mask_BT))
    log_ratio = logp - old
    ratio = jnp.exp(log_ratio)
    losses = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps))
    metrics = {"policy_loss": _masked(losses, mask),
               "clip_frac": _masked((jnp.abs(ratio - 1) > clip_eps).astype(jnp.float32), mask),
               "approx_kl": _masked(jax.lax.stop_gradient(ratio - 1 - log_ratio), mask)}
    return _mean(metrics["policy_loss"]), metrics


def value_loss(values_BT, old_values_BT, returns_BT, mask_BT, clip: float = 0.2):
    """(the clipped value loss's token mean, metrics: value_loss, value_clip_frac)."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    v, old, ret, mask = map(f32, (values_BT, old_values_BT, returns_BT, mask_BT))
    clipped = old + jnp.clip(v - old, -clip, clip)
    unclipped_err, clipped_err = (v - ret) ** 2, (clipped - ret) ** 2
    losses = 0.5 * jnp.maximum(unclipped_err, clipped_err)
    metrics = {"value_loss": _masked(losses, mask),
               "value_clip_frac": _masked((clipped_err > unclipped_err).astype(jnp.float32), mask)}
    return _mean(metrics["value_loss"]), metrics


def entropy(logits_BTV, mask_BT):
    """(the mean token entropy over the mask, metrics: entropy), in float32."""
    logp_BTV = jax.nn.log_softmax(jnp.asarray(logits_BTV, jnp.float32), axis=-1)
    ent_BT = -jnp.sum(jnp.exp(logp_BTV) * logp_BTV, axis=-1)
    metrics = {"entropy": _masked(ent_BT, jnp.asarray(mask_BT, jnp.float32))}
    return _mean(metrics["entropy"]), metrics


def adaptive_kl_coef(coef: float, kl: float, n: int, target: float, horizon: float) -> float:
    """The next KL coefficient after `n` samples with mean sequence KL `kl` (module docstring)."""
    error = float(np.clip(kl / target - 1.0, -0.2, 0.2))
    return float(coef * (1.0 + error * n / horizon))
