"""Direct preference optimisation and its family: a policy trained on preference pairs against a
frozen reference, no reward model (Rafailov et al. 2023).

Inputs are sequence log-probs of the chosen and rejected responses under the policy (pi) and the
reference (ref): summed over the response tokens (prompt and padding masked), or averaged over
them where the stage asks (`dpo.average_log_prob`). With

    Delta = (pi_c - pi_r) - (ref_c - ref_r),   beta applied exactly once,

the losses per pair are
- sigmoid (DPO; label_smoothing eps > 0: conservative DPO, Mitchell 2023):
  -(1 - eps) log sigma(beta Delta) - eps log sigma(-beta Delta)
- ipo (Azar et al. 2023): (Delta - 1/(2 beta))^2. The paper's code sums log-probs; TRL's
  IPO length-normalises them (its loss_type="ipo" averages): `dpo.average_log_prob` picks which.
- hinge (SLiC, Zhao et al. 2023): max(0, 1 - beta Delta)
- robust (Chowdhury et al. 2024): ((1 - eps)(-log sigma(beta Delta)) + eps log sigma(-beta Delta)) / (1 - 2 eps)
- simpo (Meng et al. 2024): -log sigma(beta (pi_c / |y_c| - pi_r / |y_r|) - gamma), reference-free and
  always length-averaged: its pi are the per-token means, whatever `average_log_prob` says.

Metrics ({name: (sum, count)} over pairs): rewards/chosen = beta (pi_c - ref_c), rewards/rejected,
rewards/accuracy (chosen strictly above: 0 at step 0, where the policy is the reference),
rewards/margin, and the log-probs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo")


def preference_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, *, beta: float,
                    loss_type: str = "sigmoid", label_smoothing: float = 0.0, gamma: float = 0.0,
                    chosen_tokens=None, rejected_tokens=None, mask=None):
    """(losses [P], metrics) of one of `LOSS_TYPES` (module docstring) on sequence log-probs [P].

    simpo needs `chosen_tokens` and `rejected_tokens` [P] (|y|, the response lengths) and takes the
    summed log-probs; the reference arguments are ignored there. mask [P] (None: all): the real
    pairs; the others' losses are 0 and they are not in the metrics."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not a DPO loss; allowed: {', '.join(LOSS_TYPES)}")
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    pi_c, pi_r, ref_c, ref_r = map(f32, (policy_chosen, policy_rejected, reference_chosen, reference_rejected))
    eps = label_smoothing
    if loss_type == "simpo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type='simpo' needs chosen_tokens and rejected_tokens (response lengths)")
        avg_c, avg_r = pi_c / jnp.maximum(f32(chosen_tokens), 1), pi_r / jnp.maximum(f32(rejected_tokens), 1)
        logits = beta * (avg_c - avg_r) - gamma
        losses = -jax.nn.log_sigmoid(logits)
        reward_c, reward_r = beta * avg_c, beta * avg_r
    else:
        delta = (pi_c - pi_r) - (ref_c - ref_r)
        if loss_type == "sigmoid":
            losses = -(1 - eps) * jax.nn.log_sigmoid(beta * delta) - eps * jax.nn.log_sigmoid(-beta * delta)
        elif loss_type == "ipo":
            losses = (delta - 1 / (2 * beta)) ** 2
        elif loss_type == "hinge":
            losses = jax.nn.relu(1 - beta * delta)
        else:  # robust
            losses = ((1 - eps) * -jax.nn.log_sigmoid(beta * delta)
                      + eps * jax.nn.log_sigmoid(-beta * delta)) / (1 - 2 * eps)
        reward_c, reward_r = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    w = jnp.ones_like(losses) if mask is None else jnp.asarray(mask, jnp.float32)
    losses = losses * w
    n = jnp.sum(w)
    metrics = {"loss": (jnp.sum(losses), n), "rewards/chosen": (jnp.sum(reward_c * w), n),
               "rewards/rejected": (jnp.sum(reward_r * w), n),
               "rewards/accuracy": (jnp.sum((reward_c > reward_r) * w), n),
               "rewards/margin": (jnp.sum((reward_c - reward_r) * w), n), "logps/chosen": (jnp.sum(pi_c * w), n),
               "logps/rejected": (jnp.sum(pi_r * w), n)}
    return losses, metrics
