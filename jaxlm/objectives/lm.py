"""Next-token cross-entropy with a loss mask, in float32, and the token log-probs it is made of."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.model.layers import dense


def token_log_probs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """log p(target) per token [B, T], computed in float32."""
    return _log_probs_and_hits(logits_BTV, targets_BT)[0]


def sequence_log_probs(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array, segment_ids_BT=None,
                       n_segments: int = 1):
    """(sums [B, S], counts [B, S]): the log-probs of the masked targets of each segment, and how many
    there are (S = n_segments; segment s holds the positions with segment id s + 1, or the whole row
    when segment_ids is None). The one sequence log-prob of every sequence-level loss (DPO, PPO)."""
    logp_BT = token_log_probs(logits_BTV, targets_BT) * mask_BT
    if segment_ids_BT is None:
        return jnp.sum(logp_BT, axis=1, keepdims=True), jnp.sum(mask_BT, axis=1, keepdims=True).astype(jnp.float32)
    onehot_BTS = (segment_ids_BT[..., None] == jnp.arange(1, n_segments + 1)).astype(jnp.float32)
    return (jnp.einsum("BT,BTS->BS", logp_BT, onehot_BTS),
            jnp.einsum("BT,BTS->BS", mask_BT.astype(jnp.float32), onehot_BTS))


def _log_probs_and_hits(logits_BTV, targets_BT):
    """log p(target) [B, T] float32, and whether the target's logit is the largest [B, T].

    The hit reuses the max that the log-sum-exp needs, instead of a second pass over the
    vocabulary for an argmax (ties count as hits, where argmax would pick the first index).
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    max_BT = jax.lax.stop_gradient(jnp.max(logits_BTV, axis=-1))
    logz_BT = max_BT + jnp.log(jnp.sum(jnp.exp(logits_BTV - max_BT[..., None]), axis=-1))
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return target_logit_BT - logz_BT, target_logit_BT >= max_BT


def lm_loss(logits_BTV: jax.Array, targets_BT: jax.Array, loss_mask_BT: jax.Array | None = None):
    """Mean negative log-likelihood over masked-in tokens.

    Returns (loss, metrics): metrics {"loss": (summed NLL in nats, tokens), "accuracy":
    (tokens whose target has the largest logit, tokens)}, sums and counts that add across
    micro-batches and devices without bias (`tokens` is the mask sum).
    """
    if loss_mask_BT is None:
        loss_mask_BT = jnp.ones(targets_BT.shape, jnp.float32)
    mask = loss_mask_BT.astype(jnp.float32)
    logp_BT, hit_BT = _log_probs_and_hits(logits_BTV, targets_BT)
    loss_sum = -jnp.sum(logp_BT * mask)
    tokens = jnp.sum(mask)
    correct = jnp.sum(hit_BT * mask)
    loss = loss_sum / jnp.maximum(tokens, 1.0)
    return loss, {"loss": (loss_sum, tokens), "accuracy": (correct, tokens)}


def chunked_lm_loss(x_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array,
                    loss_mask_BT: jax.Array | None = None, chunk: int = 1024):
    """`lm_loss(x @ w, ...)` without materialising the [B, T, V] logits.

    The output projection and cross-entropy run over `chunk` positions at a time (a scan), each
    chunk rematerialised in the backward pass, so at most [B, chunk, V] float32 logits live at
    once. `x_BTD` are final-norm hidden states in the compute dtype; `w_DV` is cast to it. T must
    be a multiple of `chunk` (or smaller). Same (loss, metrics) as `lm_loss`.
    """
    B, T, D = x_BTD.shape
    if loss_mask_BT is None:
        loss_mask_BT = jnp.ones(targets_BT.shape, jnp.float32)
    C = min(chunk, T)
    if T % C:
        raise ValueError(f"sequence length {T} must be a multiple of the loss chunk {C}")
    w_DV = w_DV.astype(x_BTD.dtype)

    @jax.checkpoint
    def piece(x_BCD, t_BC, m_BC):
        logits_BCV = dense(x_BCD, w_DV).astype(jnp.float32)
        m_BC = m_BC.astype(jnp.float32)
        logp_BC, hit_BC = _log_probs_and_hits(logits_BCV, t_BC)
        nll = -jnp.sum(logp_BC * m_BC)
        hits = jnp.sum(hit_BC * m_BC)
        return nll, hits

    split = lambda a: a.reshape(B, T // C, C, *a.shape[2:]).swapaxes(0, 1)  # [n, B, C, ...]
    nll_n, hits_n = jax.lax.map(lambda a: piece(*a), (split(x_BTD), split(targets_BT), split(loss_mask_BT)))
    loss_sum, tokens = jnp.sum(nll_n), jnp.sum(loss_mask_BT.astype(jnp.float32))
    correct = jax.lax.stop_gradient(jnp.sum(hits_n))
    return loss_sum / jnp.maximum(tokens, 1.0), {"loss": (loss_sum, tokens), "accuracy": (correct, tokens)}
