"""PPO's pure pieces against numpy written from the formulas: the KL estimators, token rewards (the
score on the last real token whatever the padding), GAE by a plain backward loop (masked, gamma
and lambda at 1 and below), Bessel whitening, the GRPO and RLOO baselines, the clipped policy and
value losses inside and outside the clip range, PPO at ratio 1 == the vanilla policy gradient, and
the adaptive KL controller."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.objectives import advantages as adv
from jaxlm.objectives import ppo


def _masks(rng, B=5, T=12):
    """Rollout-like masks: a prompt, then a response of random length, then padding; one row empty."""
    mask = np.zeros((B, T), np.float32)
    for b in range(B - 1):
        start = rng.integers(1, 5)
        mask[b, start:start + rng.integers(1, T - start)] = 1
    return mask


@pytest.mark.parametrize("kind", adv.KL_KINDS)
def test_kl_estimators_are_their_formulas(kind):
    rng = np.random.default_rng(0)
    logp, ref = rng.normal(-2, 1, (3, 7)), rng.normal(-2, 1, (3, 7))
    r = ref - logp
    want = {"k1": logp - ref, "k2": 0.5 * (logp - ref) ** 2, "k3": np.exp(r) - 1 - r}[kind]
    np.testing.assert_allclose(np.asarray(adv.kl_penalty(logp, ref, kind)), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="kind='k4'.*allowed: k1, k2, k3"):
        adv.kl_penalty(logp, ref, "k4")


def test_the_score_lands_on_the_last_real_token_whatever_the_padding():
    rng = np.random.default_rng(1)
    mask = _masks(rng)
    logp, ref = rng.normal(-2, 1, mask.shape), rng.normal(-2, 1, mask.shape)
    scores = np.array([0.7, -1.25, 3.5, 0.1, 9.0])  # fractional: an integer buffer would truncate them
    rewards, kl = adv.token_rewards(scores, logp, ref, mask, kl_coef=0.1, kind="k1")
    assert rewards.dtype == jnp.float32
    want = -0.1 * (logp - ref) * mask
    for b in range(mask.shape[0]):
        real = np.flatnonzero(mask[b])
        if len(real):
            want[b, real[-1]] += scores[b]
    np.testing.assert_allclose(np.asarray(rewards), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(kl), (logp - ref) * mask, rtol=1e-5, atol=1e-6)
    assert not np.asarray(rewards)[-1].any()  # the row without a response token gets no score
    # an integer score buffer still gives float rewards
    r_int, _ = adv.token_rewards(np.array([1, 2, 3, 4, 5]), logp, ref, mask, 0.0)
    assert r_int.dtype == jnp.float32


def _gae_reference(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    advantages = np.zeros((B, T))
    for b in range(B):
        idx = np.flatnonzero(mask[b])  # the masked positions, in order: t+1 is the next of them
        next_v = next_a = 0.0
        for t in reversed(idx):
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            next_a = delta + gamma * lam * next_a
            next_v = values[b, t]
            advantages[b, t] = next_a
    return advantages, (advantages + values) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 1.0), (0.99, 0.95)])
@pytest.mark.parametrize("holes", [False, True])
def test_gae_is_the_backward_recursion_over_masked_positions(gamma, lam, holes):
    rng = np.random.default_rng(2)
    mask = _masks(rng)
    if holes:  # masked-out positions inside a response are skipped, not a break in the chain
        mask[0, 2:9] = 1
        mask[0, 5] = 0
    rewards, values = rng.normal(0, 1, mask.shape) * mask, rng.normal(0, 1, mask.shape)
    got_a, got_r = adv.gae(rewards, values, mask, gamma, lam)
    want_a, want_r = _gae_reference(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(np.asarray(got_a), want_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_r), want_r, rtol=1e-5, atol=1e-5)
    if gamma == lam == 1.0:  # Monte Carlo: the advantage is the reward to go minus the value
        b, real = 1, np.flatnonzero(mask[1])
        togo = np.cumsum(rewards[b, real][::-1])[::-1]
        np.testing.assert_allclose(np.asarray(got_a)[b, real], togo - values[b, real], rtol=1e-5, atol=1e-5)


def test_gae_jits():
    rng = np.random.default_rng(3)
    mask = _masks(rng)
    x = rng.normal(0, 1, mask.shape)
    a, _ = jax.jit(adv.gae, static_argnums=(3, 4))(x, x, mask, 0.99, 0.95)
    np.testing.assert_allclose(np.asarray(a), _gae_reference(x * 1.0, x, mask, 0.99, 0.95)[0], rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_is_masked_and_bessel_corrected(shift_mean):
    rng = np.random.default_rng(4)
    mask = _masks(rng)
    x = rng.normal(3, 2, mask.shape)
    vals = x[mask > 0]
    mean, var = vals.mean(), vals.var(ddof=1)
    want = (x - mean) / np.sqrt(var + 1e-8) + (0 if shift_mean else mean)
    got = np.asarray(adv.whiten(x, mask, shift_mean))
    np.testing.assert_allclose(got[mask > 0], want[mask > 0], rtol=1e-4, atol=1e-5)
    assert not got[mask == 0].any()
    if shift_mean:
        assert abs(got[mask > 0].mean()) < 1e-5 and abs(got[mask > 0].std(ddof=1) - 1) < 1e-4


def test_group_baselines():
    rng = np.random.default_rng(5)
    G = 4
    s = rng.normal(0, 1, 3 * G)
    groups = s.reshape(-1, G)
    grpo = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(np.asarray(adv.group_advantages(s, G, "grpo")), grpo.reshape(-1), rtol=1e-4)
    others = np.array([[np.delete(g, i).mean() for i in range(G)] for g in groups])
    np.testing.assert_allclose(np.asarray(adv.group_advantages(s, G, "rloo")), (groups - others).reshape(-1),
                               rtol=1e-5, atol=1e-6)
    for kind in adv.GROUP_KINDS:  # equal scores in a group: nothing to learn from it
        same = np.repeat([0.0, 1.0, 0.5], G)
        assert not np.asarray(adv.group_advantages(same, G, kind)).any()
    with pytest.raises(ValueError, match="group_size=3 must be >= 2 and divide the 10 scores"):
        adv.group_advantages(s[:10], 3, "grpo")
    with pytest.raises(ValueError, match="group_size=1 must be >= 2"):
        adv.group_advantages(s, 1, "rloo")


@pytest.mark.parametrize("log_ratio", [0.0, 0.1, -0.1, 0.5, -0.5])  # inside and outside clip 0.2
def test_clipped_policy_loss(log_ratio):
    rng = np.random.default_rng(6)
    mask = _masks(rng)
    old = rng.normal(-2, 0.5, mask.shape)
    logp = old + log_ratio + rng.normal(0, 0.01, mask.shape)
    A = rng.normal(0, 1, mask.shape)
    loss, m = ppo.policy_loss(logp, old, A, mask, 0.2)
    rho = np.exp(logp - old)
    per = np.maximum(-A * rho, -A * np.clip(rho, 0.8, 1.2))
    n = mask.sum()
    np.testing.assert_allclose(float(loss), (per * mask).sum() / n, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(m["clip_frac"][0]) / n, ((np.abs(rho - 1) > 0.2) * mask).sum() / n, atol=1e-6)
    np.testing.assert_allclose(float(m["approx_kl"][0]) / n, ((rho - 1 - np.log(rho)) * mask).sum() / n,
                               rtol=1e-3, atol=1e-7)


def test_ppo_at_ratio_one_is_the_vanilla_policy_gradient():
    rng = np.random.default_rng(7)
    mask = _masks(rng)
    logp0 = jnp.asarray(rng.normal(-2, 0.5, mask.shape), jnp.float32)
    A = rng.normal(0, 1, mask.shape)
    g_ppo = jax.grad(lambda lp: ppo.policy_loss(lp, jax.lax.stop_gradient(lp), A, mask, 0.2)[0])(logp0)
    g_pg = jax.grad(lambda lp: -jnp.sum(A * lp * mask) / mask.sum())(logp0)
    np.testing.assert_allclose(np.asarray(g_ppo), np.asarray(g_pg), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("delta", [0.05, 0.5, -0.5])  # the new value inside and outside clip 0.2
def test_clipped_value_loss(delta):
    rng = np.random.default_rng(8)
    mask = _masks(rng)
    old, ret = rng.normal(0, 1, mask.shape), rng.normal(0, 1, mask.shape)
    v = old + delta
    loss, m = ppo.value_loss(v, old, ret, mask, 0.2)
    clipped = old + np.clip(v - old, -0.2, 0.2)
    per = 0.5 * np.maximum((v - ret) ** 2, (clipped - ret) ** 2)
    np.testing.assert_allclose(float(loss), (per * mask).sum() / mask.sum(), rtol=1e-5)
    if abs(delta) < 0.2:  # inside the range the clip changes nothing: the plain squared error
        np.testing.assert_allclose(float(loss), (0.5 * (v - ret) ** 2 * mask).sum() / mask.sum(), rtol=1e-5)
        assert float(m["value_clip_frac"][0]) == 0


def test_entropy():
    rng = np.random.default_rng(9)
    mask = _masks(rng, B=3, T=7)
    logits = rng.normal(0, 2, (3, 7, 6))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    ent = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(float(ppo.entropy(logits, mask)[0]), (ent * mask).sum() / mask.sum(), rtol=1e-5)


def test_adaptive_kl_controller():
    # Ziegler et al.: e = clip(KL/target - 1, -0.2, 0.2); beta *= 1 + e n / horizon
    assert ppo.adaptive_kl_coef(0.1, 6.0, 256, 6.0, 10000) == pytest.approx(0.1)
    assert ppo.adaptive_kl_coef(0.1, 7.2, 256, 6.0, 10000) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    assert ppo.adaptive_kl_coef(0.1, 60.0, 256, 6.0, 10000) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    assert ppo.adaptive_kl_coef(0.1, 0.0, 256, 6.0, 10000) == pytest.approx(0.1 * (1 - 0.2 * 256 / 10000))
