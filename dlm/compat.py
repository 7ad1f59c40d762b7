"""Drop-in replacements for LLaDA's ``generate`` and Dream's ``diffusion_generate``.

    from dlm.compat import llada_generate as generate          # LLaDA's generate.py
    out = dream_generate(model, input_ids, attention_mask, max_new_tokens=256, steps=256,
                         alg="entropy", temperature=0.2, top_p=0.95)   # Dream's diffusion_generate

Same arguments, same defaults, same semantics, on the fused sampler (``dlm.sampler``). With
temperature 0 the outputs are token for token those of the original code, including the
algorithms whose position choice is random (LLaDA ``random``, Dream ``origin``): those draw their
positions from torch's global RNG exactly as the originals do, so the same ``torch.manual_seed``
gives the same output. Known differences (beyond confidences that tie to within a few float32
ulps: the originals round theirs in float32 or bfloat16 arithmetic, the op in its own (float32
exps and float64 sums on its unfiltered greedy pass, float64 elsewhere, a float32 result), so
such near-ties may be ordered differently):
  * temperature > 0: tokens come from the op's Philox Gumbel draw, not torch's RNG (same
    distribution, different stream);
  * Dream with alg_temp > 0: positions from the op's Gumbel-top-k (the distribution of Dream's
    torch.multinomial without replacement, another stream);
  * Dream with both top_p and top_k: the op filters top_k first, Dream top_p first;
  * Dream with top_p, when tied logits straddle the top-p boundary: Dream cuts its sorted
    order inside the tied group (which of them survive depends on torch.sort's order of
    equal values), the op keeps the whole group. The renormalised probabilities, hence the
    confidences and at T > 0 the draws, then differ (ties are common in bf16 logits);
  * Dream counts the batch's mean number of masks; we count each row's own (identical for the
    equal rows Dream's padding produces; where rows differ, as with masks in a prompt or a
    tokens hook that fills one row, Dream's own code writes the mask over tokens of rows with
    fewer masks and leaves masks unfilled in rows with more).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

import dlm_kernels
from dlm.sampler import _as_int, _generate, call_model

LLADA_EOS, LLADA_EOT = 126081, 126348


# ---------------------------------------------------------------------------------------------
# LLaDA
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def llada_generate(
    model,
    prompt: Tensor,
    attention_mask: Tensor | None = None,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int = 126336,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
) -> Tensor:
    """LLaDA's generate.py ``generate``: same signature, defaults and outputs.

    Args:
        model: mask predictor, called as ``model(x, attention_mask=...)`` (``.logits`` or a tensor).
        prompt: (B, P) int64 (left-padded for batches, with attention_mask).
        attention_mask: (B, P) 0/1 or bool; extended with ones over the generated part.
        steps: total steps (a multiple of gen_length // block_length).
        gen_length, block_length: answer length and semi-autoregressive block (divides it).
        temperature: Gumbel temperature (0: argmax). cfg_scale: guidance weight.
        remasking: "low_confidence" or "random".
        mask_id: the mask token (126336 for LLaDA).
        logits_eos_inf: forbid EOS (126081) everywhere (set to -inf on the guided logits,
            after classifier-free guidance, as LLaDA does).
        confidence_eos_eot_inf: LLaDA's option, with its exact effect: after the draw, the EoT
            logit (126348) is removed from the softmax that scores the drawn tokens (a drawn
            EoT scores 0), and at temperature 0 the EOS logit (126081) too. (LLaDA writes -inf
            to EOS in its noisy logits and to EoT in its logits; at temperature 0 its
            add_gumbel_noise returns the logits tensor itself, so both land in the one tensor
            the softmax reads.)

    Returns:
        (B, P + gen_length) int64.

    Example:
        >>> from dlm.compat import llada_generate as generate
        >>> out = generate(model, input_ids, steps=128, gen_length=128, block_length=32)
    """
    if remasking not in ("low_confidence", "random"):
        raise NotImplementedError(remasking)
    prompt = _token_ids("llada_generate", "prompt", prompt)
    _check_counts("llada_generate", steps=steps, gen_length=gen_length, block_length=block_length)
    if gen_length % block_length:
        raise ValueError(f"llada_generate: gen_length {gen_length} must be a multiple of "
                         f"block_length {block_length}")  # fmt: skip
    if steps % (gen_length // block_length):
        raise ValueError(f"llada_generate: steps {steps} must be a multiple of the number of "
                         f"blocks {gen_length // block_length}")  # fmt: skip

    def forward_fn(x, am, _pos, **t):  # t: only for a time-conditioned model (dlm's own)
        return call_model(model, x, attention_mask=am, **t)

    commit_fn = None
    if remasking == "random" or confidence_eos_eot_inf:
        commit_fn = _llada_commit(remasking, temperature, mask_id, confidence_eos_eot_inf)
    return _generate(
        model, prompt, attention_mask, gen_length=gen_length, steps=steps,
        block_length=block_length, alg=remasking, temperature=temperature, cfg_scale=cfg_scale,
        mask_id=mask_id, forward_fn=forward_fn, commit_fn=commit_fn, ban_mask=False,
        block_counts_only=True, seed=_seed_if_needed(temperature),
        # LLaDA bans EOS on the guided logits: banning it in both passes would guide
        # -inf - -inf into NaN.
        ban_tokens=(LLADA_EOS,) if logits_eos_inf else (),
        # LLaDA's random remasking draws torch.rand((B, L)) at every step, even one with
        # nothing left to commit (steps per block > block_length): run those steps too so
        # that torch's global RNG advances as in LLaDA. low_confidence draws nothing from
        # it at T = 0 and keeps skipping them.
        every_step=remasking == "random",
    )  # fmt: skip


def _llada_commit(remasking, temperature, mask_id, eot_inf):
    """LLaDA's choice of positions where the op's own rule would differ from the original."""

    def commit(xw, lw, cw, step, rule):
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64)) if temperature > 0 else 0
        kw = dict(mask_id=mask_id, temperature=temperature, seed=seed, offset=step)
        # The scores are computed in the dtype LLaDA uses, so that torch.topk sees the very
        # same tensor and breaks ties (a drawn EoT scores exactly 0) the same way.
        if remasking == "random":
            # LLaDA: x0_p = torch.rand((B, L)) from torch's global RNG, then top-k.
            conf = torch.rand(xw.shape, device=xw.device)
        else:
            # Draw every candidate's token (theta = 1), then score as LLaDA does with the EoT
            # logit set to -inf after the draw: p(x0) under softmax of the edited logits. At
            # T = 0 LLaDA's noisy logits are its logits (the same tensor), so the -inf it
            # writes to the noisy EOS logit reaches that softmax as well.
            drawn, _ = dlm_kernels.unmask_step(xw, lw, candidates=cw, ancestral=True, theta=1.0,
                                               **kw)  # fmt: skip
            edited = lw.clone()
            edited[:, :, LLADA_EOT] = float("-inf")
            if temperature == 0:
                edited[:, :, LLADA_EOS] = float("-inf")
            p = torch.softmax(edited, dim=-1)
            conf = p.gather(-1, drawn.clamp(0, lw.shape[-1] - 1)[..., None]).squeeze(-1)
        conf = torch.where(cw, conf, torch.full_like(conf, float("-inf")))
        chosen = _topk_rows(conf, rule.num_transfer)
        return dlm_kernels.unmask_step(xw, lw, candidates=chosen & cw, ancestral=True, theta=1.0,
                                       **kw)  # fmt: skip

    return commit


def _token_ids(who: str, name: str, ids) -> Tensor:
    """ids as (B, P) int64: the originals take any integer dtype (int32 from some tokenizers)."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{who}: {name} must be a (B, P) integer tensor, got "
                        f"{type(ids).__name__}")  # fmt: skip
    if ids.dim() != 2 or ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"{who}: {name} must be a (B, P) integer tensor, got {ids.dtype} "
                         f"{tuple(ids.shape)}")  # fmt: skip
    return ids.long()


def _check_counts(who: str, **counts) -> None:
    """ValueError naming the wrapper and the argument for a count that is not an int >= 1."""
    for name, v in counts.items():
        v = _as_int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{who}: {name} must be an int >= 1, got {v!r}")


def _seed_if_needed(temperature) -> int | None:
    # At temperature 0 nothing is drawn from the seed: do not touch torch's global RNG, so that
    # the positions the originals draw from it (random, origin) come out the same.
    return 0 if not temperature else None


def _topk_rows(conf: Tensor, k: Tensor) -> Tensor:
    """(B, L) bool: each row's k[b] largest entries (torch.topk per row, as LLaDA and Dream)."""
    out = torch.zeros_like(conf, dtype=torch.bool)
    for b, kb in enumerate(k.tolist()):
        if kb > 0:
            out[b, torch.topk(conf[b], kb).indices] = True
    return out


# ---------------------------------------------------------------------------------------------
# Dream
# ---------------------------------------------------------------------------------------------
def _mask_token_of(model) -> int | None:
    for owner in (getattr(model, "generation_config", None), getattr(model, "config", None),
                  getattr(model, "cfg", None)):  # fmt: skip
        v = getattr(owner, "mask_token_id", None)
        if isinstance(v, int) and v >= 0:
            return v
    return None


class DreamOutput(dict):
    """Dream's DreamModelOutput: ``.sequences`` and ``.history`` (also as dict keys)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


@torch.no_grad()
def dream_generate(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    steps: int = 512,
    eps: float = 1e-3,
    alg: str = "origin",
    alg_temp: float | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    mask_token_id: int | None = None,
    output_history: bool = False,
    return_dict_in_generate: bool = False,
    generation_tokens_hook_func=None,
    generation_logits_hook_func=None,
):
    """Dream's ``model.diffusion_generate``: same arguments and semantics, shifted logits included.

    Args:
        model: a Dream model (called as ``model(x, attention_mask, position_ids)`` with Dream's
            4-D mask / "full") or any model taking ``(input_ids, attention_mask=(B, S) bool,
            position_ids=)`` (DiffusionLM).
        input_ids: (B, P) int64, left-padded with attention_mask for batches.
        max_new_tokens / max_length: output length P + max_new_tokens, else max_length, else
            Dream's default max_length 20 + P.
        steps, eps: Dream's timesteps linspace(1, eps, steps + 1).
        alg: "origin", "maskgit_plus", "topk_margin", "entropy". alg_temp: position sampling.
        temperature, top_p, top_k: token sampling (0: argmax).
        mask_token_id: default the model's (generation_)config.mask_token_id.
        output_history, return_dict_in_generate: as Dream (history only in the dict).
        generation_tokens_hook_func(step, x, logits) -> x and
        generation_logits_hook_func(step, x, logits) -> logits: Dream's hooks, called at every
            one of the ``steps`` steps (also once nothing is masked), as is the history. With
            either hook, each step runs the model on that step's x for the whole batch, as
            Dream does (the logits hook may edit them in place; the tokens hook gets them);
            without hooks the prediction of a row is reused while its x does not change.

    Returns:
        (B, max_length) int64, or a DreamOutput(sequences=..., history=...).

    Example:
        >>> out = dream_generate(model, ids, am, max_new_tokens=128, steps=128, alg="entropy",
        ...                      mask_token_id=151666)
    """
    if alg not in ("origin", "maskgit_plus", "topk_margin", "entropy"):
        raise RuntimeError(f"Unknown alg: {alg}")
    _check_counts("dream_generate", steps=steps)
    input_ids = _token_ids("dream_generate", "input_ids", input_ids)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps < 1:
        raise ValueError(f"dream_generate: eps (the final time) must be a number in [0, 1), "
                         f"got {eps!r}")  # fmt: skip
    for name, v in (("max_new_tokens", max_new_tokens), ("max_length", max_length)):
        if v is not None:
            _check_counts("dream_generate", **{name: v})
    if alg == "origin":
        alg_temp = None  # Dream's origin ignores alg_temp (no confidence to sample from)
    mask_id = mask_token_id if mask_token_id is not None else _mask_token_of(model)
    if mask_id is None:
        raise ValueError("dream_generate: mask_token_id not given and not found on the model")
    B, P = input_ids.shape
    if max_new_tokens is not None:
        total = P + _as_int(max_new_tokens)
    elif max_length is not None:
        total = _as_int(max_length)
    else:
        total = 20 + P
        cap = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        total = min(total, cap) if isinstance(cap, int) else total
    if total <= P:
        raise ValueError(f"dream_generate: input length {P} must be below max_length {total}")
    dream_native = hasattr(model, "diffusion_generate")
    has_pad = attention_mask is not None and bool((attention_mask == 0).any())

    def forward_fn(x, am, _pos, **t):  # t: only for a time-conditioned model (dlm's own)
        if not has_pad:
            return call_model(model, x, attention_mask="full" if dream_native else None, **t)
        tok_idx = am.long().cumsum(-1) - 1
        tok_idx = tok_idx.masked_fill(am == 0, 1)
        if dream_native:
            am4 = torch.logical_and(am[:, None, None, :].bool(), am[:, None, :, None].bool())
            return model(x, am4, tok_idx).logits
        return call_model(model, x, attention_mask=am.bool(), position_ids=tok_idx, **t)

    logits_hook = None
    if generation_logits_hook_func is not None:
        logits_hook = lambda i, x, lg: generation_logits_hook_func(i, x, lg)  # noqa: E731
    tokens_hook = None
    if generation_tokens_hook_func is not None:
        tokens_hook = lambda i, x, lg: generation_tokens_hook_func(i, x, lg)  # noqa: E731
    commit_fn = (
        _dream_origin_commit(mask_id, temperature, top_p, top_k) if alg == "origin" else None
    )
    out = _generate(
        model, input_ids, attention_mask if has_pad else None, gen_length=total - P,
        steps=steps, alg=alg, alg_temp=alg_temp, temperature=temperature, top_p=top_p,
        top_k=top_k, mask_id=mask_id, logits_shift=True, schedule="dream", eps=eps,
        output_history=return_dict_in_generate and output_history, forward_fn=forward_fn,
        logits_hook=logits_hook, tokens_hook=tokens_hook, commit_fn=commit_fn, ban_mask=False,
        seed=_seed_if_needed(temperature if alg == "origin" else temperature or alg_temp),
        # Dream runs all `steps` steps, also once nothing is masked: its hooks and history
        # see every one of them.
        every_step=True,
    )  # fmt: skip
    if return_dict_in_generate:
        seq, hist = out if output_history else (out, None)
        return DreamOutput(sequences=seq, history=hist)
    return out


def _dream_origin_commit(mask_id, temperature, top_p, top_k):
    """Dream's origin: each mask commits iff torch.rand < 1 - s/t (torch's RNG, as Dream)."""

    def commit(xw, lw, cw, step, rule):
        n = int(cw.sum())
        u = torch.rand(n, device=xw.device)
        go = torch.zeros_like(cw)
        go[cw] = u < rule.theta
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64)) if temperature > 0 else 0
        return dlm_kernels.unmask_step(
            xw, lw, mask_id=mask_id, candidates=go, ancestral=True, theta=1.0,
            temperature=temperature, top_p=top_p, top_k=top_k, confidence="prob", seed=seed,
            offset=step,
        )  # fmt: skip

    return commit


__all__ = ["llada_generate", "dream_generate", "DreamOutput"]
