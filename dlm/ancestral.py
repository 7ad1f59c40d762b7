"""A plain ancestral sampler (MDLM's ddpm, Dream's "origin"): enough to read what a model writes.

From all masks at t = 1, each step t -> s draws a candidate x0 for every masked position and
commits it with probability theta = (alpha(s) - alpha(t)) / (1 - alpha(t)); the last step
commits the rest. The project's fused sampler (`dlm sample`) replaces this loop.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlm.sampler import call_model, time_input
from dlm.schedules import Schedule, get_schedule


@torch.no_grad()
def ancestral_sample(
    model,
    *,
    batch: int,
    length: int,
    steps: int,
    mask_token_id: int,
    schedule: Schedule | str = "linear",
    temperature: float = 1.0,
    banned_ids: list[int] | None = None,
    prompt: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """(batch, length) int64 tokens sampled from the model.

    prompt: (batch, P) int64 tokens fixed at the start (P < length), or None.
    banned_ids: ids never sampled (the mask and pad tokens).
    temperature: 0 takes the argmax; otherwise the logits are divided by it.
    """
    schedule = get_schedule(schedule) if isinstance(schedule, str) else schedule
    t_of = time_input(model)  # a time-conditioned model: masked fraction -> its t
    x = torch.full((batch, length), mask_token_id, dtype=torch.long, device=device)
    if prompt is not None:
        x[:, : prompt.shape[1]] = prompt.to(device)
    for i in range(steps, 0, -1):
        t = torch.tensor([i / steps], dtype=torch.float64)
        s = torch.tensor([(i - 1) / steps], dtype=torch.float64)
        masked = x == mask_token_id
        kw = {}
        if t_of is not None:  # t of the masked fraction, through the model's training schedule
            kw["t"] = t_of(masked.sum(1).to(torch.float64) / length).float()
        logits = call_model(model, x, **kw).float()
        if banned_ids:
            logits[..., banned_ids] = float("-inf")
        if temperature == 0:
            x0 = logits.argmax(-1)
        else:
            # Gumbel-max in float64: argmax(l/T + g) is a draw from softmax(l/T).
            u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).to(device)
            g = -torch.log(-torch.log(u.clamp_min(1e-300)))
            x0 = (logits.double() / temperature + g).argmax(-1)
        theta = 1.0 if i == 1 else float(schedule.unmask_prob(t, s))
        commit = torch.rand(x.shape, generator=generator).to(device) < theta
        x = torch.where(masked & commit, x0, x)
    return x
