"""The training objective: equal to the reference computation, its noise rules, and a 30-step
convergence test of the kernel path against the plain PyTorch path."""

import copy

import pytest
import torch

from dlm.loss import DiffusionObjective
from dlm.model import DiffusionLM
from dlm.schedules import DiscreteLinearBeta
from tests.dlm.test_model import V, pair, tiny

M = V - 1  # mask token


def reference_loss(model, x0, x_t, mask, w_row, normalizer):
    """MATH.md's objective written out in float64 from full logits."""
    logits = model(x_t).double()
    logp = torch.log_softmax(logits, -1).gather(-1, x0[..., None]).squeeze(-1)
    return (-(logp * mask) * w_row).sum() / normalizer


@pytest.mark.parametrize(
    "schedule,weighting", [("linear", "elbo"), ("cosine", "min_snr"), ("geometric", "uniform")]
)
def test_loss_equals_reference(schedule, weighting):
    m = DiffusionLM(tiny())
    obj = DiffusionObjective(M, schedule, weighting)
    x0 = torch.randint(0, V - 1, (4, 37))
    loss, nz = obj.loss(m, x0, torch.Generator().manual_seed(3))
    # Recompute t, the mask and the weight by hand from the same generator.
    g = torch.Generator().manual_seed(3)
    u0 = torch.rand(1, generator=g, dtype=torch.float64)
    t = 1e-3 + (1 - 1e-3) * ((u0 + torch.arange(4, dtype=torch.float64) / 4) % 1)
    torch.testing.assert_close(nz.t, t)
    u = torch.rand(4, 37, generator=g, dtype=torch.float64)
    s = obj.schedule
    mask = u < (1 - s.alpha(t))[:, None]
    assert torch.equal(nz.mask, mask) and torch.equal(nz.x_t, torch.where(mask, M, x0))
    w = {
        "elbo": s.weight(t),
        "uniform": torch.ones_like(t),
        "min_snr": (s.alpha(t) / (1 - s.alpha(t))).clamp(max=5.0),
    }[weighting]
    ref = reference_loss(m, x0, nz.x_t, mask, w[:, None], 4 * 37)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-6, atol=1e-7)


def test_llada_objective_and_sft():
    m = DiffusionLM(tiny())
    obj = DiffusionObjective(M, objective="llada", eps=1e-3)
    x0 = torch.randint(0, V - 1, (3, 20))
    prompt = torch.zeros(3, 20, dtype=torch.bool)
    prompt[:, :7] = True
    prompt[2, :12] = True
    t = torch.tensor([0.2, 0.6, 0.9], dtype=torch.float64)
    loss, nz = obj.loss(m, x0, torch.Generator().manual_seed(0), t=t, prompt_mask=prompt)
    assert not (nz.mask & prompt).any(), "prompt tokens must never be masked"
    p_mask = (1 - 1e-3) * t + 1e-3
    answer_len = torch.tensor([13.0, 13.0, 8.0], dtype=torch.float64)
    # LLaDA SFT: sum over masked of CE / p_mask / answer length, divided by B.
    ref = reference_loss(m, x0, nz.x_t, nz.mask, (1 / p_mask / answer_len)[:, None], 3)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-6, atol=1e-7)


def test_padding_is_never_masked_and_not_counted():
    obj = DiffusionObjective(M)
    x0 = torch.randint(0, V - 1, (2, 16))
    am = torch.ones(2, 16, dtype=torch.bool)
    am[0, 10:] = False
    nz = obj.noise(
        x0, torch.Generator().manual_seed(0), t=torch.tensor([1.0, 1.0]), attention_mask=am
    )
    assert torch.equal(nz.mask, am)  # t = 1 masks every real token and nothing else
    assert int(nz.normalizer) == 26


def test_rows_of_global_batch_equal_slices_of_whole():
    # What DDP relies on: process r's noise is rows r of the single-process noise.
    obj = DiffusionObjective(M, t_sampling="antithetic")
    x0 = torch.randint(0, V - 1, (8, 12))
    whole = obj.noise(x0, torch.Generator().manual_seed(5))
    part = obj.noise(x0[4:], torch.Generator().manual_seed(5), rows=slice(4, 8), global_batch=8)
    assert torch.equal(part.x_t, whole.x_t[4:]) and torch.equal(part.t, whole.t[4:])


def test_random_length_truncation():
    obj = DiffusionObjective(M, random_length_prob=1.0)  # always cut, to see it happen
    m = DiffusionLM(tiny())
    x0 = torch.randint(0, V - 1, (2, 30))
    _, nz = obj.loss(m, x0, torch.Generator().manual_seed(1))
    assert 1 <= nz.x_t.shape[1] < 30 and nz.normalizer == 2 * nz.x_t.shape[1]


def test_convergence_kernel_path_vs_reference_path():
    """30 AdamW steps of a tiny model on a repeated-pattern task: the two loss curves agree."""
    torch.manual_seed(0)
    m, r = pair()
    obj = DiffusionObjective(M)
    base = torch.arange(37) % 11
    data = torch.stack([(base + k) % (V - 1) for k in range(8)])
    curves = []
    for model in (m, r):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(30):
            loss, _ = obj.loss(model, data, g)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    km, ref = curves
    print("kernel", km[::5].tolist(), "\nreference", ref[::5].tolist())
    assert ref[-10:].mean() < 0.8 * ref[:3].mean(), "the tiny model should learn the pattern"
    torch.testing.assert_close(km, ref, rtol=1e-3, atol=1e-3)
    copy.deepcopy(m)  # the trained model stays a plain nn.Module (checkpointable)


@pytest.mark.parametrize(
    "schedule",
    ["linear", "cosine", "cosine-squared", "log-linear", "geometric", "discrete-linear-beta"],
)
@pytest.mark.parametrize("objective", ["mdlm", "llada"])
def test_time_of_inverts_mask_prob(schedule, objective):
    # What a time-conditioned model is fed at sampling: the t whose masking probability is the
    # masked fraction the sampler sees (float32 t: 1e-6; the discrete schedule: one step).
    obj = DiffusionObjective(0, schedule, objective=objective)
    f = obj.mask_prob(torch.linspace(0.0, 1.0, 41, dtype=torch.float64))
    t = obj.time_of(f)
    assert t.dtype == torch.float32 and bool(((t >= 0) & (t <= 1)).all())
    tol = 3e-3 if (schedule == "discrete-linear-beta" and objective == "mdlm") else 1e-6
    torch.testing.assert_close(obj.mask_prob(t), f, rtol=0, atol=tol)
    if objective == "mdlm" and schedule == "linear":
        g = torch.tensor([0.0, 0.25, 1.0])
        torch.testing.assert_close(obj.time_of(g), g)  # 1 - alpha(t) = t


def test_discrete_schedule_draws_every_step_uniformly():
    # i = ceil(t T) must be uniform in 1..T: eps (for w = 1/t's pole, which a discrete schedule
    # does not have) kept step 1 from ever being drawn once eps >= 1/T, and reweighted the rest.
    obj = DiffusionObjective(0, DiscreteLinearBeta(T=8), eps=0.3)
    x0 = torch.ones(8, 5, dtype=torch.long)
    for seed in range(3):
        nz = obj.noise(x0, torch.Generator().manual_seed(seed))  # antithetic: one t per stratum
        assert obj.schedule.step(nz.t).sort().values.tolist() == list(range(1, 9))
