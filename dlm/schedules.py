"""Noise schedules of masked diffusion, their ELBO weights, loss weightings and draws of t.

Each token survives unmasked with probability alpha(t) (t = 1: all masked). The continuous-time
ELBO weights the masked tokens' cross-entropy by w(t) = -alpha'(t) / (1 - alpha(t)); see
docs/MATH.md for the table every schedule here follows. All functions take and return
tensors of t, computed in float64 so that w(t) near t = 0 stays exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Schedule:
    """alpha(t) and the ELBO weight w(t) of one schedule; ``discrete`` schedules have T steps."""

    name = "base"
    discrete = False

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def weight(self, t: Tensor) -> Tensor:
        """w(t) = -alpha'(t) / (1 - alpha(t)): the ELBO weight of a masked token at time t."""
        raise NotImplementedError

    def unmask_prob(self, t: Tensor, s: Tensor) -> Tensor:
        """theta = (alpha(s) - alpha(t)) / (1 - alpha(t)): P(a token masked at t is unmasked
        at s < t), the reverse step of ancestral sampling."""
        a_t, a_s = self.alpha(t), self.alpha(s)
        return ((a_s - a_t) / (1 - a_t)).clamp(0.0, 1.0)

    def time_of(self, mask_prob: Tensor) -> Tensor:
        """The t with 1 - alpha(t) = mask_prob (float64): closed forms in the subclasses; here
        bisection over [0, 1] on the CPU (60 steps of a few float64 ops on B values)."""
        f = mask_prob.detach().double().cpu()
        lo, hi = torch.zeros_like(f), torch.ones_like(f)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            below = (1.0 - self.alpha(mid)) < f
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (0.5 * (lo + hi)).to(mask_prob.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Linear(Schedule):
    """alpha = 1 - t, w = 1 / t (MDLM, Dream, LLaDA)."""

    name = "linear"

    def alpha(self, t):
        return 1.0 - t.double()

    def weight(self, t):
        return 1.0 / t.double()

    def time_of(self, mask_prob):
        return mask_prob.double().clamp(0.0, 1.0)


class Cosine(Schedule):
    """alpha = cos(pi t / 2), w = (pi/2) sin(pi t/2) / (1 - cos(pi t/2)) (MDLM's cosine)."""

    name = "cosine"

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t.double())

    def weight(self, t):
        x = 0.5 * math.pi * t.double()
        # 1 - cos(x) = 2 sin^2(x/2): no cancellation near t = 0.
        return 0.5 * math.pi * torch.sin(x) / (2.0 * torch.sin(0.5 * x) ** 2)

    def time_of(self, mask_prob):
        return torch.acos((1.0 - mask_prob.double()).clamp(0.0, 1.0)) * (2.0 / math.pi)


class CosineSquared(Schedule):
    """alpha = cos^2(pi t / 2), w = pi sin cos / (1 - cos^2) (the seed's table)."""

    name = "cosine-squared"

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t.double()) ** 2

    def weight(self, t):
        x = 0.5 * math.pi * t.double()
        # 1 - cos^2(x) = sin^2(x), exact near t = 0.
        return math.pi * torch.sin(x) * torch.cos(x) / torch.sin(x) ** 2

    def time_of(self, mask_prob):
        return torch.acos((1.0 - mask_prob.double()).clamp(0.0, 1.0).sqrt()) * (2.0 / math.pi)


class LogLinear(Schedule):
    """alpha = 1 - (1 - eps) t, w = 1 / t (MDLM's default; alpha(1) = eps, never all masked)."""

    name = "log-linear"

    def __init__(self, eps: float = 1e-3):
        self.eps = eps

    def alpha(self, t):
        return 1.0 - (1.0 - self.eps) * t.double()

    def weight(self, t):
        return 1.0 / t.double()

    def time_of(self, mask_prob):
        return (mask_prob.double() / (1.0 - self.eps)).clamp(0.0, 1.0)

    def __repr__(self):
        return f"LogLinear(eps={self.eps})"


class Geometric(Schedule):
    """alpha = exp(-sigma(t)), sigma = sigma_min^(1-t) sigma_max^t, w = sigma' / expm1(sigma)."""

    name = "geometric"

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sigma(self, t):
        t = t.double()
        return self.sigma_min ** (1.0 - t) * self.sigma_max**t

    def alpha(self, t):
        return torch.exp(-self.sigma(t))

    def weight(self, t):
        sigma = self.sigma(t)
        dsigma = sigma * math.log(self.sigma_max / self.sigma_min)
        return dsigma / torch.expm1(sigma)

    def time_of(self, mask_prob):
        # 1 - f = exp(-sigma), log sigma = log sigma_min + t log(sigma_max / sigma_min)
        sigma = -torch.log1p(-mask_prob.double().clamp(0.0, 1.0))
        t = (torch.log(sigma) - math.log(self.sigma_min)) / math.log(
            self.sigma_max / self.sigma_min
        )
        return t.clamp(0.0, 1.0)

    def __repr__(self):
        return f"Geometric(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class DiscreteLinearBeta(Schedule):
    """The seed's discrete schedule: T steps, beta_s linear from beta_1 to beta_T,
    alpha_i = prod_{s<=i} (1 - beta_s). Continuous t in (0, 1] maps to step i = ceil(t T).

    The ELBO estimator with i uniform in 1..T is T * theta_i * (sum of masked CE), with
    theta_i = (alpha_{i-1} - alpha_i) / (1 - alpha_i): that product is what ``weight`` returns.
    It assumes x_T is all masks: alpha_T is 4e-5 at the defaults, but 0.13 at T = 200 and 0.36
    at T = 100 with these betas, and then the bound leaves out its prior term and training
    never sees the all-masked inputs sampling starts from.
    """

    name = "discrete-linear-beta"
    discrete = True

    def __init__(self, T: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02):
        self.T, self.beta_1, self.beta_T = T, beta_1, beta_T
        betas = torch.linspace(beta_1, beta_T, T, dtype=torch.float64)
        # alphas[0] = 1 (t = 0, clean), alphas[i] = prod_{s<=i} (1 - beta_s).
        self.alphas = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])

    def step(self, t: Tensor) -> Tensor:
        return torch.ceil(t.double() * self.T).long().clamp(0, self.T)

    def alpha(self, t):
        return self.alphas.to(t.device)[self.step(t)]

    def weight(self, t):
        a = self.alphas.to(t.device)
        i = self.step(t).clamp_min(1)
        theta = (a[i - 1] - a[i]) / (1.0 - a[i])
        return self.T * theta

    def __repr__(self):
        return f"DiscreteLinearBeta(T={self.T}, beta_1={self.beta_1}, beta_T={self.beta_T})"


SCHEDULES = {
    s.name: s for s in (Linear, Cosine, CosineSquared, LogLinear, Geometric, DiscreteLinearBeta)
}
WEIGHTINGS = ("elbo", "uniform", "min_snr")


def get_schedule(name: str, **kwargs) -> Schedule:
    """A schedule by name: linear, cosine, cosine-squared, log-linear, geometric,
    discrete-linear-beta (keyword arguments go to its constructor)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](**kwargs)


def loss_weight(schedule: Schedule, t: Tensor, weighting: str = "elbo", gamma: float = 5.0):
    """Per-sequence weight of the masked tokens' cross-entropy at time t (float64).

    elbo: w(t) from the schedule (the ELBO); uniform: 1; min_snr: min(SNR(t), gamma) with
    SNR = alpha / (1 - alpha).
    """
    if weighting == "elbo":
        return schedule.weight(t)
    if weighting == "uniform":
        return torch.ones_like(t, dtype=torch.float64)
    if weighting == "min_snr":
        a = schedule.alpha(t)
        return (a / (1.0 - a)).clamp(max=gamma)
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")


def llada_p_mask(t: Tensor, eps: float = 1e-3) -> Tensor:
    """LLaDA's masking probability p_mask = (1 - eps) t + eps; each masked token weighs 1/p_mask."""
    return (1.0 - eps) * t.double() + eps


def sample_t(
    n: int,
    generator: torch.Generator | None = None,
    *,
    mode: str = "antithetic",
    eps: float = 0.0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """n diffusion times in [eps, 1), float64.

    antithetic (stratified, MDLM): one u ~ U(0, 1), t_b = (u + b / n) mod 1, so the batch covers
    [0, 1) evenly and the loss has less variance; uniform: independent draws. Then
    t = eps + (1 - eps) t keeps t away from 0, where w(t) = 1/t explodes.
    """
    if mode == "antithetic":
        u = torch.rand(1, generator=generator, dtype=torch.float64)
        t = (u + torch.arange(n, dtype=torch.float64) / n) % 1.0
    elif mode == "uniform":
        t = torch.rand(n, generator=generator, dtype=torch.float64)
    else:
        raise ValueError(f"t sampling mode must be 'antithetic' or 'uniform', got {mode!r}")
    return (eps + (1.0 - eps) * t).to(device)
