"""Rewards and advantages of sampled responses, for PPO and the critic-free GRPO and RLOO.

Arrays are [B, T] over the positions of packed rollout rows; `mask` is 1 at the positions whose
target is a response token (the actions) and 0 at the prompt and padding. Everything is pure,
masked and jit-able, and computed in float32 whatever the inputs' dtype.

- `kl_penalty`: per-token estimators of KL(pi || ref) from samples of pi (Schulman 2020,
  "Approximating KL divergence"): k1 = log pi - log ref (unbiased, of either sign),
  k2 = (log pi - log ref)^2 / 2 (biased, >= 0, low variance), k3 = exp(ref - pi) - 1 - (ref - pi)
  (unbiased and >= 0; the one GRPO puts in its loss).
- `token_rewards`: -kl_coef * KL at every response token, plus the sequence's score at its last
  response token (Ziegler et al. 2019; Stiennon et al. 2020).
- `gae`: generalised advantage estimation (Schulman et al. 2016) by a reverse scan.
- `whiten`: masked standardisation.
- `group_advantages`: GRPO's group-normalised scores (Shao et al. 2024) and RLOO's leave-one-out
  baseline (Ahmadian et al. 2024), for G samples of each prompt.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

KL_KINDS = ("k1", "k2", "k3")
GROUP_KINDS = ("grpo", "rloo")


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def kl_penalty(logp, ref_logp, kind: str = "k1"):
    """The per-token KL estimate of `kind` (module docstring), same shape as `logp`."""
    if kind not in KL_KINDS:
        raise ValueError(f"kind={kind!r} is not a KL estimator; allowed: {', '.join(KL_KINDS)}")
    log_ratio = _f32(logp) - _f32(ref_logp)  # log pi - log ref
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    return jnp.expm1(-log_ratio) + log_ratio  # exp(ref - pi) - 1 - (ref - pi)


def last_index(mask_BT):
    """(index [B] of each row's last masked position, whether the row has one [B])."""
    mask_BT = jnp.asarray(mask_BT) > 0
    T = mask_BT.shape[1]
    return T - 1 - jnp.argmax(mask_BT[:, ::-1], axis=1), jnp.any(mask_BT, axis=1)


def token_rewards(scores_B, logp_BT, ref_logp_BT, mask_BT, kl_coef, kind: str = "k1"):
    """(rewards [B, T], kl [B, T]), float32: rewards = -kl_coef * KL per response token, plus the
    score at each row's last response token (never on padding; a row without one gets none)."""
    mask_BT = _f32(mask_BT)
    kl_BT = kl_penalty(logp_BT, ref_logp_BT, kind) * mask_BT
    last_B, has_B = last_index(mask_BT)
    at_last_BT = jax.nn.one_hot(last_B, mask_BT.shape[1], dtype=jnp.float32) * has_B[:, None]
    return -_f32(kl_coef) * kl_BT + _f32(scores_B)[:, None] * at_last_BT, kl_BT


def gae(rewards_BT, values_BT, mask_BT, gamma: float = 1.0, lam: float = 0.95):
    """(advantages [B, T], returns [B, T]) of generalised advantage estimation:
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, over the masked positions
    only (a masked-out position is skipped: t+1 is the next masked one, and past the last V = A = 0).
    returns = advantages + values (before any whitening); both 0 where mask is 0."""
    r_TB, v_TB, m_TB = (_f32(x).T for x in (rewards_BT, values_BT, mask_BT))

    def back(carry, x):
        next_v, next_a = carry
        r, v, m = x
        a = r + gamma * next_v - v + gamma * lam * next_a
        keep = m > 0
        return (jnp.where(keep, v, next_v), jnp.where(keep, a, next_a)), jnp.where(keep, a, 0.0)

    zeros = jnp.zeros(r_TB.shape[1], jnp.float32)
    _, adv_TB = jax.lax.scan(back, (zeros, zeros), (r_TB, v_TB, m_TB), reverse=True)
    adv_BT = adv_TB.T
    return adv_BT, (adv_BT + _f32(values_BT)) * _f32(mask_BT)


def whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
    """(x - mean) / sqrt(var + eps) over the masked entries, the variance Bessel-corrected (n - 1);
    shift_mean=False adds the mean back (scale only). 0 where mask is 0."""
    x, mask = _f32(x), _f32(mask)
    n = jnp.sum(mask)
    mean = jnp.sum(x * mask) / jnp.maximum(n, 1.0)
    var = jnp.sum(((x - mean) * mask) ** 2) / jnp.maximum(n - 1.0, 1.0)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def group_advantages(scores_N, group_size: int, kind: str = "grpo", eps: float = 1e-4):
    """Advantages [N] of N = P * group_size scores, the G = group_size samples of a prompt adjacent:
    grpo: (s - group mean) / (group std + eps), the std Bessel-corrected (as torch.std, TRL);
    rloo: s - the mean of the other G - 1 samples of its prompt."""
    if kind not in GROUP_KINDS:
        raise ValueError(f"kind={kind!r} is not a group baseline; allowed: {', '.join(GROUP_KINDS)}")
    G = int(group_size)
    scores_N = _f32(scores_N)
    if G < 2 or scores_N.shape[0] % G:
        raise ValueError(f"group_size={group_size} must be >= 2 and divide the {scores_N.shape[0]} scores")
    s_PG = scores_N.reshape(-1, G)
    mean_P1 = jnp.mean(s_PG, axis=1, keepdims=True)
    if kind == "grpo":
        std_P1 = jnp.std(s_PG, axis=1, keepdims=True, ddof=1)
        return ((s_PG - mean_P1) / (std_P1 + eps)).reshape(-1)
    return (s_PG - (jnp.sum(s_PG, axis=1, keepdims=True) - s_PG) / (G - 1)).reshape(-1)
