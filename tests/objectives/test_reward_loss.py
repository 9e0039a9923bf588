"""Reward-model losses against numpy written from the Bradley-Terry formula (with margins and the
centring term), a ranking of two == a pair, and the K-way loss as the mean over each prompt's pairs."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.objectives.reward import pairwise_loss, ranking_loss


def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


@pytest.mark.parametrize("with_margin, center", [(False, 0.0), (True, 0.0), (True, 0.05)])
def test_pairwise_loss_is_the_bradley_terry_formula(with_margin, center):
    rng = np.random.default_rng(0)
    r_c, r_r = rng.normal(0.5, 2, 9), rng.normal(0, 2, 9)
    m = rng.uniform(0, 1, 9) if with_margin else np.zeros(9)
    loss, metrics = pairwise_loss(r_c, r_r, m if with_margin else None, center)
    want = np.mean(-_log_sigmoid(r_c - r_r - m)) + center * np.mean((r_c + r_r) ** 2)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    mean = lambda name: float(metrics[name][0]) / float(metrics[name][1])
    assert mean("accuracy") == np.mean(r_c > r_r)
    np.testing.assert_allclose(mean("margin"), np.mean(r_c - r_r), rtol=1e-5)
    np.testing.assert_allclose(mean("reward_chosen"), r_c.mean(), rtol=1e-5)
    np.testing.assert_allclose(mean("loss"), np.mean(-_log_sigmoid(r_c - r_r - m)), rtol=1e-5)  # without centring


def test_accuracy_is_strict_so_equal_rewards_are_not_right():
    _, metrics = pairwise_loss(jnp.zeros(4), jnp.zeros(4))
    assert float(metrics["accuracy"][0]) == 0.0
    loss, _ = pairwise_loss(jnp.zeros(4), jnp.zeros(4))
    np.testing.assert_allclose(float(loss), np.log(2), rtol=1e-6)


def test_a_ranking_of_two_is_a_pair():
    rng = np.random.default_rng(1)
    r = rng.normal(size=(7, 2))
    m = rng.uniform(0, 1, (7, 2))
    a_loss, a_metrics = ranking_loss(r, np.ones((7, 2), bool), m, center_coef=0.1)
    b_loss, b_metrics = pairwise_loss(r[:, 0], r[:, 1], m[:, 0], center_coef=0.1)
    np.testing.assert_allclose(float(a_loss), float(b_loss), rtol=1e-5)
    for name in b_metrics:
        np.testing.assert_allclose([float(x) for x in a_metrics[name]], [float(x) for x in b_metrics[name]], rtol=1e-5)


def test_k_way_loss_is_the_mean_over_each_prompts_pairs_then_over_prompts():
    rng = np.random.default_rng(2)
    r = rng.normal(size=(5, 4))
    valid = np.ones((5, 4), bool)
    valid[1, 3] = False  # 3 responses: 3 pairs
    valid[2, 2:] = False  # 2 responses: 1 pair
    valid[4, 1:] = False  # 1 response: no pair, no prompt
    per_prompt = []
    for p in range(5):
        k = valid[p].sum()
        pairs = [-_log_sigmoid(r[p, i] - r[p, j]) for i, j in itertools.combinations(range(k), 2)]
        if pairs:
            per_prompt.append(np.mean(pairs))
    loss, metrics = ranking_loss(r, valid)
    np.testing.assert_allclose(float(loss), np.mean(per_prompt), rtol=1e-5)
    assert float(metrics["loss"][1]) == 4  # prompts with a pair
    grads = jax.grad(lambda x: ranking_loss(x, valid)[0])(jnp.asarray(r, jnp.float32))
    assert np.all(np.asarray(grads)[~valid] == 0)  # padding responses get no gradient
