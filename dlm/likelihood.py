"""Likelihood of text under a masked diffusion LM: Monte-Carlo ELBO, LLaDA's conditional
estimate, perplexity bound. Batched; any ``model(input_ids, attention_mask=None)`` callable.

The estimator (one for all three). For the linear schedule (MDLM, LLaDA, Dream) the continuous-
time ELBO of n maskable tokens is

    -log p(x) <= integral_0^1 (1/t) E[ sum over masked i of -log p(x_i | x_t) ] dt
              =  E_{m ~ U{1..n}} (n / m) E_{|S| = m} [ sum over i in S of -log p(x_i | x_S masked) ]

(the Beta integral of t^(m-1) (1-t)^(n-m) times the number of size-m subsets is 1/m). The right
side is LLaDA's estimator: mask exactly m tokens, weight n/m. It is unbiased for the ELBO with a
bounded variance, whereas masking each token with probability t and weighting 1/t has an
infinite variance near t = 0 (which is why MDLM clips t at eps and biases the bound). The m of the
``mc_num`` draws of a sequence come from antithetic (stratified) times t_j = (u + j / mc_num) mod 1,
m_j = floor(t_j n) + 1: every stratum of t is visited once, which removes most of the variance
that comes from m. The masked set is uniform among the maskable positions given m.

Randomness: with ``seed`` each sequence b draws from its own generator seeded with seed + b, so
a row's estimate does not depend on the batch it is in or on ``batch_size``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

import dlm_kernels
from dlm.sampler import (
    _accepts,
    _fused_head,
    call_model,
    check_token_id,
    guide,
    model_vocab_size,
    shift_logits,
    time_input,
)


def _row_generators(B: int, seed: int | None, generator: torch.Generator | None):
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), generator=generator, dtype=torch.int64))
    return [torch.Generator().manual_seed(seed + b) for b in range(B)]


def _draws(n: int, mc_num: int, S: int, maskable: Tensor, gen: torch.Generator):
    """(mc_num, S) bool masks, each with exactly m_j of the maskable positions, and m (mc_num,)."""
    u = torch.rand((), generator=gen, dtype=torch.float64)
    t = (u + torch.arange(mc_num, dtype=torch.float64) / mc_num) % 1.0
    m = (t * n).floor().to(torch.int64).clamp_max(n - 1) + 1
    # Keys for the n maskable positions only (in order), so that a row draws the same sets
    # whatever padding or prompt surrounds it.
    keys = torch.full((mc_num, S), 2.0, dtype=torch.float64)
    keys[:, maskable] = torch.rand(mc_num, n, generator=gen, dtype=torch.float64)
    rank = keys.argsort(dim=1).argsort(dim=1)
    return rank < m[:, None], m


@torch.no_grad()
def masked_nll_estimate(
    model,
    x: Tensor,
    maskable: Tensor,
    *,
    mask_id: int,
    attention_mask: Tensor | None = None,
    mc_num: int = 128,
    batch_size: int = 32,
    cfg_scale: float = 0.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    return_stderr: bool = False,
    fused_head: bool | None = None,
    logits_shift: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Estimate of -log p(x[maskable] | x[~maskable]) per row (an upper bound in expectation).

    Args:
        x: (B, S) int64 sequences. maskable: (B, S) bool, the tokens whose likelihood is wanted
            (the answer; every real token for the unconditional ELBO). A row without any gives 0.
        mask_id: the mask token. attention_mask: (B, S) bool, False at padding (passed on).
        mc_num: draws per row (antithetic in t). batch_size: sequences per model call.
        cfg_scale: LLaDA's guidance for the conditional estimate (prompt = ~maskable & real).
        seed, generator: randomness (see the module docstring).
        return_stderr: also return the standard error of each row's mean over its draws,
            as if the draws were independent: they are stratified (and t antithetic in
            elbo), which lowers the true spread, so the figure is conservative (it can be
            several times too large when the loss varies strongly with the masked count).
        fused_head: on a model with an ``lm_head`` nn.Linear whose forward takes
            ``return_hidden=`` (DiffusionLM), score the masked positions from the hidden states
            with ``dlm_kernels.masked_linear_cross_entropy``: no (batch, S, V) logits are ever
            stored (LLaDA's 126k vocabulary at batch 32 x 1024 tokens would be 16 GB of float32
            logits). None: from a 4096-token vocabulary up, as generate; False: logits.
            A model taking ``output_range=`` also runs its last layer (and the head) only over
            the span of each chunk's maskable positions (the answer, for conditional_nll).
        logits_shift: Dream's shifted logits (position i is predicted by the output at i - 1,
            position 0 by its own), as ``generate``'s; DiffusionLM's ``cfg.logits_shift``.

    Returns:
        (B,) float64 nats, and (B,) float64 standard errors when asked: NaN for a row estimated
        from a single draw (mc_num=1: one draw says nothing of its spread), 0 for a row with
        nothing to score (its estimate is exactly 0).
    """
    if not isinstance(x, Tensor) or x.dtype != torch.int64:
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x must be an int64 tensor of token ids, got {got}")
    if x.dim() != 2 or maskable.shape != x.shape:
        raise ValueError(f"x and maskable must both be (B, S), got {tuple(x.shape)} and "
                         f"{tuple(maskable.shape)}")  # fmt: skip
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(x.shape):
        raise ValueError(f"attention_mask must be (B, S) = {tuple(x.shape)} like x, got "
                         f"{tuple(attention_mask.shape)}")  # fmt: skip
    for name, v in (("mc_num", mc_num), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    # The mask must be a token the model embeds: checked from its embedding or config here,
    # else against the first logits' last dimension below.
    vocab = model_vocab_size(model)
    check_token_id("masked_nll_estimate", "mask_id", mask_id, vocab)
    B, S = x.shape
    dev = x.device
    gens = _row_generators(B, seed, generator)
    maskable = maskable.bool()
    if attention_mask is not None:
        maskable = maskable & attention_mask.to(dev).bool()
    n_all = maskable.sum(1).tolist()
    # A time-conditioned model gets t of each draw's masked fraction of the row's real tokens.
    t_of = time_input(model)
    n_real = [S] * B
    if t_of is not None and attention_mask is not None:
        n_real = attention_mask.to(dev).bool().sum(1).clamp_min(1).tolist()
    # All (row, draw) pairs, generated per row, then evaluated in chunks of batch_size.
    seqs, masks, weights, owners = [], [], [], []
    fracs_m, fracs_n = [], []
    for b in range(B):
        n = n_all[b]
        if n == 0:
            continue
        mk, m = _draws(n, mc_num, S, maskable[b].cpu(), gens[b])
        fracs_m.append(m.to(torch.float64))
        fracs_n.append(float(n_real[b]))
        masks.append(mk.to(dev))
        weights.append(n / m.to(torch.float64))
        seqs.append(x[b].expand(mc_num, S))
        owners += [b] * mc_num
    est = torch.zeros(B, dtype=torch.float64)
    sq = torch.zeros(B, dtype=torch.float64)
    if not seqs:
        return (est, sq) if return_stderr else est
    seqs_t, masks_t = torch.cat(seqs), torch.cat(masks)
    w_t, own = torch.cat(weights), torch.tensor(owners)
    am_t = None if attention_mask is None else attention_mask.to(dev).bool()[own.to(dev)]
    pos_t = None
    if am_t is not None and _accepts(model, "position_ids"):
        # As in generate: positions restart at each row's first real token.
        pos_t = (am_t.to(torch.int64).cumsum(1) - 1).clamp_min(0)
    frac_t = torch.cat([m / n for m, n in zip(fracs_m, fracs_n)]) if t_of is not None else None
    n_real_t = torch.tensor([float(n_real[b]) for b in owners], dtype=torch.float64)
    prompt_t = None
    if cfg_scale > 0:
        real = am_t if am_t is not None else torch.ones_like(masks_t)
        prompt_t = (~maskable[own.to(dev)]) & real
    head = _fused_head(model, fused_head, None, None, None, None, who="masked_nll_estimate")
    if head is not None:
        check_token_id("masked_nll_estimate", "mask_id", mask_id, head[0].shape[0])
    # Each row's span of maskable positions (host lists: no sync in the loop). A chunk's model
    # call computes its last layer only over the union of its rows' spans.
    ranged = _accepts(model, "output_range")
    mcpu = maskable.cpu()
    first = [int(mcpu[b].nonzero()[0]) if n_all[b] else S for b in range(B)]
    last = [int(mcpu[b].nonzero()[-1]) + 1 if n_all[b] else 0 for b in range(B)]
    terms = torch.empty(len(owners), dtype=torch.float64)
    for lo in range(0, len(owners), batch_size):
        hi = min(lo + batch_size, len(owners))
        x0, mk = seqs_t[lo:hi], masks_t[lo:hi]
        xt = torch.where(mk, torch.full_like(x0, mask_id), x0)
        am = None if am_t is None else am_t[lo:hi]
        kw = {} if pos_t is None else {"position_ids": pos_t[lo:hi]}
        if t_of is not None:
            kw["t"] = t_of(frac_t[lo:hi]).float().to(dev)
        a, e = 0, S
        if ranged:
            rows = set(owners[lo:hi])
            a, e = min(first[b] for b in rows), max(last[b] for b in rows)
        # The first output needed: one earlier under the shift.
        o0 = max(a - 1, 0) if logits_shift else a
        if ranged and (o0, e) != (0, S):
            kw["output_range"] = (o0, e)
        if head is not None:
            kw["return_hidden"] = True
        if prompt_t is not None:
            un = torch.where(prompt_t[lo:hi], torch.full_like(xt, mask_id), xt)
            kw = {k: torch.cat([v, v]) if isinstance(v, Tensor) else v for k, v in kw.items()}
            if t_of is not None:  # the unconditional input's own, larger masked fraction
                n_prompt = prompt_t[lo:hi].sum(1).cpu().to(torch.float64)
                f_un = frac_t[lo:hi] + n_prompt / n_real_t[lo:hi]
                kw["t"] = torch.cat([kw["t"][: hi - lo], t_of(f_un).float().to(dev)])
            both = call_model(model, torch.cat([xt, un]), attention_mask=None if am is None
                              else torch.cat([am, am]), **kw)  # fmt: skip
            c, u = both.chunk(2)
            # Guidance is linear, so guiding the hidden states guides the logits.
            out = guide(c, u, cfg_scale)
        else:
            out = call_model(model, xt, attention_mask=am, **kw)
        if logits_shift:  # on hidden states too: the head is applied row by row
            raw, out = out, shift_logits(out)
            if am is not None:
                # A left-padded row's first real token is predicted from its own output, as
                # in that row alone (where it is position 0), not from the pad slot before it:
                # a row's estimate must not depend on its batch or its padding.
                fr = am.to(torch.int64).argmax(1) - (o0 if "output_range" in kw else 0)
                fix = ((fr > 0) & (fr < out.shape[1])).nonzero()[:, 0]
                out[fix, fr[fix]] = raw[fix, fr[fix]]
        out = out[:, a - o0 :] if "output_range" in kw else out[:, a:e]
        x0, mk = x0[:, a:e], mk[:, a:e]
        if head is not None:
            ce = dlm_kernels.masked_linear_cross_entropy(
                out, head[0], x0, mk, bias=head[1], reduction="none"
            )[mk].double()
        else:
            if vocab is None:
                vocab = out.shape[-1]
                check_token_id("masked_nll_estimate", "mask_id", mask_id, vocab)
            # float32 at least (bf16 logits), float64 for a float64 model.
            lg = out[mk].to(torch.promote_types(out.dtype, torch.float32))
            ce = F.cross_entropy(lg, x0[mk], reduction="none").double()
        row = torch.zeros(hi - lo, dtype=torch.float64, device=dev)
        row.index_add_(0, mk.nonzero()[:, 0], ce)
        terms[lo:hi] = row.cpu() * w_t[lo:hi]
    est.index_add_(0, own, terms)
    cnt = torch.bincount(own, minlength=B).to(torch.float64).clamp_min(1)
    mean = est / cnt
    if not return_stderr:
        return mean
    # Two passes (deviations from the mean), not E[x^2] - E[x]^2: identical draws give exactly 0.
    sq.index_add_(0, own, (terms - mean[own]) ** 2)
    var = sq / (cnt - 1).clamp_min(1)
    stderr = (var / cnt).sqrt()
    draws = torch.bincount(own, minlength=B)
    return mean, stderr.masked_fill(draws == 1, float("nan"))


def elbo(
    model,
    x: Tensor,
    attention_mask: Tensor | None = None,
    *,
    mask_id: int,
    mc_num: int = 128,
    batch_size: int = 32,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    return_stderr: bool = False,
    fused_head: bool | None = None,
    logits_shift: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Monte-Carlo ELBO of each sequence: (B,) float64 nats, an upper bound on -log p(x).

    Example:
        >>> nats = elbo(model, ids, am, mask_id=mask, mc_num=64, seed=0)      # (B,)
        >>> bits_per_token = nats.sum() / am.sum() / math.log(2)
    """
    maskable = torch.ones_like(x, dtype=torch.bool)
    return masked_nll_estimate(model, x, maskable, mask_id=mask_id, attention_mask=attention_mask,
                               mc_num=mc_num, batch_size=batch_size, seed=seed,
                               generator=generator, return_stderr=return_stderr,
                               fused_head=fused_head, logits_shift=logits_shift)  # fmt: skip


def conditional_nll(
    model,
    prompt: Tensor,
    answer: Tensor,
    prompt_mask: Tensor | None = None,
    answer_mask: Tensor | None = None,
    *,
    mask_id: int,
    mc_num: int = 128,
    batch_size: int = 32,
    cfg_scale: float = 0.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    return_stderr: bool = False,
    fused_head: bool | None = None,
    logits_shift: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """LLaDA's conditional likelihood: estimate of -log p(answer | prompt), (B,) float64 nats.

    Args:
        prompt: (B, P) int64, left-padded (prompt_mask False at padding).
        answer: (B, A) int64, right-padded (answer_mask False at padding).
        The rest as :func:`masked_nll_estimate`. LLaDA's get_log_likelihood returns the
        negative of this (a lower bound on log p).

    Example:
        >>> nll = conditional_nll(model, q, a, mask_id=126336, mc_num=128, seed=0)
        >>> best = nll.argmin()    # multiple choice: the most likely answer
    """
    for name, t in (("prompt", prompt), ("answer", answer)):
        if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.dim() != 2:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"conditional_nll: {name} must be a (B, n) int64 tensor of token "
                            f"ids, got {got}")  # fmt: skip
    pm = torch.ones_like(prompt, dtype=torch.bool) if prompt_mask is None else prompt_mask.bool()
    amask = torch.ones_like(answer, dtype=torch.bool) if answer_mask is None else answer_mask.bool()
    for name, m, t in (("prompt_mask", pm, prompt), ("answer_mask", amask, answer)):
        if m.shape != t.shape:
            raise ValueError(f"conditional_nll: {name} must have the shape of its tokens "
                             f"{tuple(t.shape)}, got {tuple(m.shape)}")  # fmt: skip
    if prompt.shape[0] != answer.shape[0]:
        raise ValueError(f"conditional_nll: prompt and answer must have the same rows, got "
                         f"{prompt.shape[0]} and {answer.shape[0]}")  # fmt: skip
    # Left-padded prompts and right-padded answers keep each row's text contiguous: the
    # estimate scores the answer right after its prompt. (cummax: once real, real to the end.)
    if bool((pm != pm.to(torch.int8).cummax(1).values.bool()).any()):
        raise ValueError("conditional_nll: prompt_mask must be left padding (False, then True)")
    if bool((amask != amask.flip(1).to(torch.int8).cummax(1).values.bool().flip(1)).any()):
        raise ValueError("conditional_nll: answer_mask must be right padding (True, then False)")
    x = torch.cat([prompt, answer], 1)
    real = torch.cat([pm, amask], 1)
    maskable = torch.cat([torch.zeros_like(pm), amask], 1)
    am = None if bool(real.all()) else real
    return masked_nll_estimate(model, x, maskable, mask_id=mask_id, attention_mask=am,
                               mc_num=mc_num, batch_size=batch_size, cfg_scale=cfg_scale,
                               seed=seed, generator=generator,
                               return_stderr=return_stderr, fused_head=fused_head,
                               logits_shift=logits_shift)  # fmt: skip


def perplexity_bound(
    model,
    x: Tensor,
    attention_mask: Tensor | None = None,
    *,
    mask_id: int,
    mc_num: int = 32,
    batch_size: int = 32,
    seed: int | None = 0,
    fused_head: bool | None = None,
    logits_shift: bool | None = None,
) -> dict:
    """Corpus-level bound: nats and bits per token and exp(nats per token) over the real tokens.

    fused_head, logits_shift: as :func:`elbo`; logits_shift None takes the model's own
    (``model.cfg.logits_shift``, Dream's checkpoints).

    Example:
        >>> perplexity_bound(model, windows, mask_id=mask)["perplexity"]
    """
    if logits_shift is None:
        logits_shift = bool(getattr(getattr(model, "cfg", None), "logits_shift", False))
    nats = elbo(model, x, attention_mask, mask_id=mask_id, mc_num=mc_num, batch_size=batch_size,
                seed=seed, fused_head=fused_head, logits_shift=logits_shift)  # fmt: skip
    tokens = int(x.numel() if attention_mask is None else attention_mask.bool().sum())
    per_tok = float(nats.sum()) / max(tokens, 1)
    return {"nats_per_token": per_tok, "bits_per_token": per_tok / math.log(2),
            "perplexity": math.exp(per_tok), "tokens": tokens}  # fmt: skip
