"""Reward-model losses: Bradley-Terry on preference pairs and on rankings, pure and masked.

A reward model scores a (prompt, response) with one number r. For a pair where the chosen
response beats the rejected one, the Bradley-Terry likelihood is sigma(r_c - r_r); with a
margin m (Llama 2: how clearly it is better) it is sigma(r_c - r_r - m). A ranking of K
responses, best first, gives K(K-1)/2 pairs (InstructGPT), all scored in one forward pass.

Every loss returns (loss, metrics), metrics being {name: (sum, count)}: accuracy (the chosen
reward strictly above the rejected), margin (r_c - r_r), the chosen and rejected means.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _pair_metrics(diff_P, r_c_P, r_r_P, weight_P, loss_P, n):
    """Metric sums over pairs weighted by `weight_P` (0: not a pair), each divided by the count `n`."""
    return {"loss": (jnp.sum(loss_P * weight_P), n),
            "accuracy": (jnp.sum((diff_P > 0) * weight_P), n),
            "margin": (jnp.sum(diff_P * weight_P), n),
            "reward_chosen": (jnp.sum(r_c_P * weight_P), n),
            "reward_rejected": (jnp.sum(r_r_P * weight_P), n)}


def pairwise_loss(r_chosen, r_rejected, margin=None, center_coef: float = 0.0):
    """Mean over pairs of -log sigma(r_c - r_r - m), plus center_coef * mean((r_c + r_r)^2).

    r_chosen, r_rejected [P] float32 rewards; margin [P] (None: 0). The centring term (Eisenstein
    et al. 2023) keeps rewards near zero; it is in the loss, not in the metrics' "loss" sum,
    which is the Bradley-Terry part alone.
    """
    r_c, r_r = jnp.asarray(r_chosen, jnp.float32), jnp.asarray(r_rejected, jnp.float32)
    m = jnp.zeros_like(r_c) if margin is None else jnp.asarray(margin, jnp.float32)
    diff = r_c - r_r
    nll = jax.nn.softplus(-(diff - m))  # -log sigma(x) = softplus(-x)
    loss = jnp.mean(nll) + center_coef * jnp.mean((r_c + r_r) ** 2)
    return loss, _pair_metrics(diff, r_c, r_r, jnp.ones_like(diff), nll, jnp.float32(diff.shape[0]))


def ranking_pairs(valid_PK):
    """[P, K, K] weights of the pairs (i, j), i ranked above j, both valid: 1 / (the prompt's pairs)."""
    valid = jnp.asarray(valid_PK, bool)
    K = valid.shape[-1]
    above = jnp.triu(jnp.ones((K, K), bool), k=1)  # i < j: i is ranked above j
    pairs = valid[:, :, None] & valid[:, None, :] & above
    count = jnp.sum(pairs, axis=(1, 2), keepdims=True)
    return pairs / jnp.maximum(count, 1)


def ranking_loss(rewards, valid, margin=None, center_coef: float = 0.0):
    """InstructGPT's K-way loss: every valid pair (i < j) of a prompt's rewards [P, K], sorted best
    first, contributes -log sigma(r_i - r_j - m_i) (m_i: the margin of the better response, None:
    0); averaged over the pairs of each prompt, then over the prompts with a pair. K = 2 is
    `pairwise_loss`. valid [P, K] bool marks real responses (a prompt may have fewer than K)."""
    r = jnp.asarray(rewards, jnp.float32)
    m = jnp.zeros_like(r) if margin is None else jnp.asarray(margin, jnp.float32)
    weight = ranking_pairs(valid)  # [P, K, K]
    diff = r[:, :, None] - r[:, None, :]
    nll = jax.nn.softplus(-(diff - m[:, :, None]))
    prompts = jnp.sum(jnp.any(weight > 0, axis=(1, 2))).astype(jnp.float32)  # exact: prompts with a pair
    total = jnp.sum(nll * weight) + center_coef * jnp.sum((r[:, :, None] + r[:, None, :]) ** 2 * weight)
    loss = total / jnp.maximum(prompts, 1)
    # metrics per pair, each prompt's pairs weighing 1 / its pair count, so the means are per prompt
    w, d = weight.reshape(-1), diff.reshape(-1)
    r_i = jnp.broadcast_to(r[:, :, None], diff.shape).reshape(-1)
    r_j = jnp.broadcast_to(r[:, None, :], diff.shape).reshape(-1)
    metrics = _pair_metrics(d, r_i, r_j, w, nll.reshape(-1), prompts)
    return loss, metrics
