"""Schedules, weightings and draws of t against hand-computed values (docs/MATH.md)."""

import math

import pytest
import torch

from dlm.schedules import (
    SCHEDULES,
    DiscreteLinearBeta,
    get_schedule,
    llada_p_mask,
    loss_weight,
    sample_t,
)

T = torch.tensor([0.3], dtype=torch.float64)


def _one(x):
    return float(x.reshape(-1)[0])


# (schedule, alpha(0.3), w(0.3)) computed by hand from the table of MATH.md.
HAND = [
    ("linear", 0.7, 1 / 0.3),
    (
        "cosine",
        math.cos(0.15 * math.pi),
        (math.pi / 2) * math.sin(0.15 * math.pi) / (1 - math.cos(0.15 * math.pi)),
    ),
    (
        "cosine-squared",
        math.cos(0.15 * math.pi) ** 2,
        math.pi
        * math.sin(0.15 * math.pi)
        * math.cos(0.15 * math.pi)
        / (1 - math.cos(0.15 * math.pi) ** 2),
    ),
    ("log-linear", 1 - (1 - 1e-3) * 0.3, 1 / 0.3),
]


@pytest.mark.parametrize("name,alpha,w", HAND, ids=[h[0] for h in HAND])
def test_alpha_and_weight_hand_values(name, alpha, w):
    s = get_schedule(name)
    assert _one(s.alpha(T)) == pytest.approx(alpha, rel=1e-12)
    assert _one(s.weight(T)) == pytest.approx(w, rel=1e-12)


def test_geometric_hand_values():
    s = get_schedule("geometric", sigma_min=1e-4, sigma_max=20.0)
    sigma = 1e-4**0.7 * 20.0**0.3
    dsigma = sigma * math.log(20.0 / 1e-4)
    assert _one(s.alpha(T)) == pytest.approx(math.exp(-sigma), rel=1e-12)
    assert _one(s.weight(T)) == pytest.approx(dsigma / math.expm1(sigma), rel=1e-12)


@pytest.mark.parametrize("name", [n for n in SCHEDULES if not SCHEDULES[n].discrete])
def test_weight_is_minus_alpha_prime_over_one_minus_alpha(name):
    # w(t) = -alpha'(t) / (1 - alpha(t)), with alpha' from autograd, across (0, 1).
    s = get_schedule(name)
    t = torch.tensor([0.01, 0.2, 0.5, 0.77, 0.99], dtype=torch.float64, requires_grad=True)
    a = s.alpha(t)
    (da,) = torch.autograd.grad(a.sum(), t)
    expected = -da / (1 - a.detach())
    torch.testing.assert_close(s.weight(t.detach()), expected, rtol=1e-9, atol=0)


def test_weights_stay_finite_near_zero():
    t = torch.tensor([1e-6], dtype=torch.float64)
    for name in SCHEDULES:
        w = get_schedule(name).weight(t)
        assert torch.isfinite(w).all() and (w > 0).all(), name


def test_discrete_linear_beta_by_hand():
    s = DiscreteLinearBeta(T=4, beta_1=0.1, beta_T=0.4)
    betas = [0.1, 0.2, 0.3, 0.4]
    alphas = [1.0]
    for b in betas:
        alphas.append(alphas[-1] * (1 - b))  # 0.9, 0.72, 0.504, 0.3024
    # t in ((i-1)/T, i/T] is step i.
    t = torch.tensor([0.25, 0.3, 0.74, 1.0], dtype=torch.float64)
    steps = [1, 2, 3, 4]
    torch.testing.assert_close(
        s.alpha(t), torch.tensor([alphas[i] for i in steps], dtype=torch.float64)
    )
    theta = [(alphas[i - 1] - alphas[i]) / (1 - alphas[i]) for i in steps]
    torch.testing.assert_close(
        s.weight(t), torch.tensor([4 * th for th in theta], dtype=torch.float64)
    )
    assert theta[0] == pytest.approx(1.0)  # step 1: every masked token came from x0 directly


def test_unmask_prob_linear_is_one_minus_s_over_t():
    s = get_schedule("linear")
    t = torch.tensor([0.8], dtype=torch.float64)
    u = torch.tensor([0.6], dtype=torch.float64)
    assert _one(s.unmask_prob(t, u)) == pytest.approx(1 - 0.6 / 0.8, rel=1e-12)


def test_weightings():
    s = get_schedule("linear")
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(loss_weight(s, t, "elbo"), 1 / t)
    torch.testing.assert_close(loss_weight(s, t, "uniform"), torch.ones_like(t))
    # SNR = (1 - t) / t = 9, 1, 1/9 -> min(., 5) = 5, 1, 1/9.
    torch.testing.assert_close(
        loss_weight(s, t, "min_snr"), torch.tensor([5.0, 1.0, 1 / 9], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="weighting"):
        loss_weight(s, t, "snr")


def test_llada_p_mask():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(
        llada_p_mask(t, 1e-3), torch.tensor([1e-3, 0.5005, 1.0], dtype=torch.float64)
    )


def test_antithetic_t_is_stratified():
    g = torch.Generator().manual_seed(0)
    n = 16
    t = sample_t(n, g, mode="antithetic")
    # One point in every stratum [k/n, (k+1)/n), all sharing the same offset u.
    strata = torch.sort((t * n).floor()).values
    torch.testing.assert_close(strata, torch.arange(n, dtype=torch.float64))
    frac = (t * n) % 1.0
    torch.testing.assert_close(frac, frac[:1].expand(n))
    t_eps = sample_t(n, torch.Generator().manual_seed(0), mode="antithetic", eps=0.1)
    torch.testing.assert_close(t_eps, 0.1 + 0.9 * t)
    u = sample_t(1000, g, mode="uniform")
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.05


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="schedule"):
        get_schedule("quadratic")
    with pytest.raises(ValueError, match="antithetic"):
        sample_t(4, mode="sobol")
