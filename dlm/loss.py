"""The masked diffusion training objective (docs/MATH.md, "Training objective").

    L = E_{t, x_t ~ q} [ w(t) * sum over masked i of -log p(x0^i | x_t) ] / normaliser

``DiffusionObjective.noise`` draws t and the masked positions; ``.loss`` runs the model on x_t
and returns L through the model's fused masked-only cross-entropy. Noise is drawn for the whole
global batch from one generator and each process keeps its own rows, so a run on N processes
sees exactly the noise of a run on one process with the same global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dlm.schedules import Schedule, get_schedule, llada_p_mask, loss_weight, sample_t


@dataclass
class Noised:
    x_t: Tensor  # (B, S) int64, mask_token_id where masked
    mask: Tensor  # (B, S) bool, True at masked positions (the ones that carry loss)
    weight: Tensor  # (B, S) float32, per-position loss weight
    t: Tensor  # (B,) float64 diffusion time
    normalizer: float | Tensor  # the loss divides the weighted sum by this


class DiffusionObjective:
    """How training noises a batch and weighs the loss.

    Args:
        mask_token_id: id written at masked positions.
        schedule: a Schedule or its name (dlm.schedules.SCHEDULES).
        weighting: "elbo" (w(t) of the schedule), "uniform" (1) or "min_snr" (min(SNR, gamma)).
        objective: "mdlm" (schedule + weighting, normaliser = tokens per batch) or "llada"
            (p_mask = (1 - eps) t + eps, weight 1 / p_mask, normaliser = B * L).
        eps: t is drawn in [eps, 1] for mdlm; LLaDA's eps of p_mask for llada.
        t_sampling: "antithetic" (stratified over the global batch) or "uniform".
        random_length_prob: chance that a batch is cut to a random length in 1..L (LLaDA: 0.01).
        min_snr_gamma: gamma of min_snr.
    """

    def __init__(
        self,
        mask_token_id: int,
        schedule: Schedule | str = "linear",
        weighting: str = "elbo",
        objective: str = "mdlm",
        eps: float = 1e-3,
        t_sampling: str = "antithetic",
        random_length_prob: float = 0.0,
        min_snr_gamma: float = 5.0,
    ):
        if objective not in ("mdlm", "llada"):
            raise ValueError(f"objective must be 'mdlm' or 'llada', got {objective!r}")
        self.mask_token_id = mask_token_id
        self.schedule = get_schedule(schedule) if isinstance(schedule, str) else schedule
        self.weighting, self.objective, self.eps = weighting, objective, eps
        self.t_sampling, self.random_length_prob = t_sampling, random_length_prob
        self.min_snr_gamma = min_snr_gamma
        loss_weight(self.schedule, torch.full((1,), 0.5), weighting)  # validate the name now

    def mask_prob(self, t: Tensor) -> Tensor:
        """The chance that a token is masked at time t (float64)."""
        t = t.double()
        if self.objective == "llada":
            return llada_p_mask(t, self.eps)
        return 1.0 - self.schedule.alpha(t).double()

    def time_of(self, masked_fraction: Tensor) -> Tensor:
        """The time t at which ``masked_fraction`` of the tokens are masked in expectation:
        the inverse of ``mask_prob`` (closed forms, bisection for the discrete schedule),
        float32 on the input's device.

        What a time-conditioned model is given at sampling and likelihood time (dlm.sampler,
        dlm.likelihood), where only the masked fraction is known."""
        f = masked_fraction.double()
        if self.objective == "llada":
            t = ((f - self.eps) / (1.0 - self.eps)).clamp(0.0, 1.0)
        else:
            t = self.schedule.time_of(f)
        return t.to(device=masked_fraction.device, dtype=torch.float32)

    def noise(
        self,
        x0: Tensor,
        generator: torch.Generator,
        *,
        rows: slice | None = None,
        global_batch: int | None = None,
        t: Tensor | None = None,
        prompt_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Noised:
        """Mask x0 (B, S) at a time t per sequence.

        rows / global_batch: x0 is rows ``rows`` of a global batch of ``global_batch``
        sequences; t and the mask draws are made for the global batch (same generator state on
        every process) and sliced, so the result does not depend on the number of processes.
        t: (B,) fixed times instead of drawing them (evaluation).
        prompt_mask: (B, S) bool, True at prompt tokens (SFT): never masked; the loss of each
            sequence is divided by its answer length and the batch sum by B (LLaDA's SFT).
        attention_mask: (B, S) bool, False at padding: never masked, not counted in L.
        """
        B, S = x0.shape
        n = global_batch or B
        rows = rows if rows is not None else slice(0, B)
        if t is None:
            # mdlm: t in [eps, 1], away from w(t) = 1/t's pole; llada: eps enters p_mask instead;
            # a discrete schedule has no pole, and its step ceil(t T) must be uniform in 1..T
            # (with eps >= 1/T step 1 was never drawn, and the others were reweighted).
            eps = self.eps if self.objective == "mdlm" and not self.schedule.discrete else 0.0
            t = sample_t(n, generator, mode=self.t_sampling, eps=eps)[rows]
        u = torch.rand(n, S, generator=generator, dtype=torch.float64)[rows]
        t, u = t.to(x0.device), u.to(x0.device)
        if self.objective == "llada":
            p_mask = llada_p_mask(t, self.eps)
            w = 1.0 / p_mask
        else:
            p_mask = 1.0 - self.schedule.alpha(t)
            w = loss_weight(self.schedule, t, self.weighting, self.min_snr_gamma)
        mask = u < p_mask[:, None]
        if attention_mask is None:
            real, normalizer = torch.ones_like(mask), float(B * S)
        else:
            real = attention_mask.bool()
            normalizer = real.sum().clamp_min(1)
        mask &= real
        weight = w[:, None].float().expand(B, S)
        if prompt_mask is not None:
            mask &= ~prompt_mask
            answer_len = (real & ~prompt_mask).sum(1, keepdim=True).clamp_min(1)
            weight = weight / answer_len
            normalizer = B
        x_t = torch.where(mask, torch.full_like(x0, self.mask_token_id), x0)
        return Noised(x_t, mask, weight.float(), t, normalizer)

    def loss(
        self,
        model,
        x0: Tensor,
        generator: torch.Generator,
        *,
        rows: slice | None = None,
        global_batch: int | None = None,
        t: Tensor | None = None,
        prompt_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> tuple[Tensor, Noised]:
        """(scalar loss, the Noised batch) for clean tokens x0 (B, S); see ``noise``."""
        if self.random_length_prob > 0 and cu_seqlens is None:
            # LLaDA: 1% of batches are cut to a random length so that the model also sees short
            # sequences. One draw for the whole batch, from the shared generator.
            draw = torch.rand(2, generator=generator)
            if draw[0] < self.random_length_prob:
                length = 1 + int(draw[1] * x0.shape[1])
                x0 = x0[:, :length]
                cut = lambda m: None if m is None else m[:, :length]
                prompt_mask, attention_mask = cut(prompt_mask), cut(attention_mask)
                position_ids = cut(position_ids)
        nz = self.noise(
            x0,
            generator,
            rows=rows,
            global_batch=global_batch,
            t=t,
            prompt_mask=prompt_mask,
            attention_mask=attention_mask,
        )
        loss = model(
            nz.x_t,
            attention_mask,
            position_ids,
            targets=x0,
            loss_mask=nz.mask,
            loss_weight=nz.weight,
            normalizer=nz.normalizer,
            t=nz.t,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
        )
        return loss, nz
