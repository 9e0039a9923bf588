"""DPO's family of losses against numpy written from each paper's formula, beta applied once, the
start (policy == reference) at log 2 with accuracy 0, and masked pairs that count for nothing."""
import numpy as np
import pytest

from jaxlm.objectives.dpo import LOSS_TYPES, preference_loss


def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def _reference(kind, pi_c, pi_r, ref_c, ref_r, beta, eps, gamma, n_c, n_r):
    delta = (pi_c - pi_r) - (ref_c - ref_r)
    if kind == "sigmoid":
        return -(1 - eps) * _log_sigmoid(beta * delta) - eps * _log_sigmoid(-beta * delta)
    if kind == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    if kind == "hinge":
        return np.maximum(0, 1 - beta * delta)
    if kind == "robust":
        return ((1 - eps) * -_log_sigmoid(beta * delta) + eps * _log_sigmoid(-beta * delta)) / (1 - 2 * eps)
    return -_log_sigmoid(beta * (pi_c / n_c - pi_r / n_r) - gamma)  # simpo


@pytest.mark.parametrize("kind", LOSS_TYPES)
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_every_loss_is_its_papers_formula(kind, eps):
    rng = np.random.default_rng(0)
    pi_c, pi_r, ref_c, ref_r = (rng.normal(-20, 5, 11) for _ in range(4))
    n_c, n_r = rng.integers(3, 30, 11), rng.integers(3, 30, 11)
    beta, gamma = 0.3, 0.5
    losses, metrics = preference_loss(pi_c, pi_r, ref_c, ref_r, beta=beta, loss_type=kind, label_smoothing=eps,
                                      gamma=gamma, chosen_tokens=n_c, rejected_tokens=n_r)
    want = _reference(kind, pi_c, pi_r, ref_c, ref_r, beta, eps, gamma, n_c, n_r)
    np.testing.assert_allclose(np.asarray(losses), want, rtol=1e-4, atol=1e-5)
    r_c = beta * (pi_c / n_c if kind == "simpo" else pi_c - ref_c)
    r_r = beta * (pi_r / n_r if kind == "simpo" else pi_r - ref_r)
    mean = lambda name: float(metrics[name][0]) / float(metrics[name][1])
    np.testing.assert_allclose(mean("rewards/chosen"), r_c.mean(), rtol=1e-4)
    assert mean("rewards/accuracy") == pytest.approx(np.mean(r_c > r_r))


def test_at_the_start_the_loss_is_log_2_and_no_pair_is_right():
    pi_c, pi_r = np.array([-10.0, -3.0, -7.5]), np.array([-12.0, -2.0, -7.5])
    losses, metrics = preference_loss(pi_c, pi_r, pi_c, pi_r, beta=0.1)  # the policy is the reference
    np.testing.assert_allclose(np.asarray(losses), np.log(2), rtol=1e-6)
    assert float(metrics["rewards/accuracy"][0]) == 0.0


def test_masked_pairs_count_for_nothing():
    rng = np.random.default_rng(1)
    args = [rng.normal(-5, 2, 6) for _ in range(4)]
    mask = np.array([1, 1, 0, 1, 0, 1], bool)
    losses, metrics = preference_loss(*args, beta=0.2, mask=mask)
    sub, sub_metrics = preference_loss(*(a[mask] for a in args), beta=0.2)
    np.testing.assert_allclose(np.asarray(losses)[mask], np.asarray(sub), rtol=1e-6)
    assert np.all(np.asarray(losses)[~mask] == 0)
    for name in sub_metrics:
        np.testing.assert_allclose([float(x) for x in metrics[name]], [float(x) for x in sub_metrics[name]], rtol=1e-5)


def test_an_unknown_loss_is_one_line():
    with pytest.raises(ValueError, match="loss_type='dpo2' is not a DPO loss; allowed: sigmoid, ipo"):
        preference_loss([0.0], [0.0], [0.0], [0.0], beta=0.1, loss_type="dpo2")
