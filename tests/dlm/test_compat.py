"""dlm.compat against plain-PyTorch re-implementations of the documented originals.

The two reference loops below restate, in our own words, what LLaDA's generate.py ``generate``
and Dream's ``diffusion_generate`` do (the published algorithms, step by step). At temperature 0
the compat functions must give the same tokens, including the random position choices of LLaDA's
"random" and Dream's "origin", which both draw from torch's global RNG.
"""

import pytest
import torch

from dlm.compat import LLADA_EOS, LLADA_EOT, dream_generate, llada_generate
from dlm.config import ModelConfig
from dlm.model import DiffusionLM

V, MASK = 67, 66


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # A wide init spreads the logits, so confidences never tie at float32 resolution.
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=128,
                      init_std=0.4, mask_token_id=MASK)  # fmt: skip
    return DiffusionLM(cfg).eval()


class _NoMaskPrediction(torch.nn.Module):
    """Never predicts the mask token, as trained models do not: Dream's batch-mean count and our
    per-row count then agree (a drawn mask would leave rows with different counts)."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.cfg = base.cfg

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        out = self.base(input_ids, attention_mask, position_ids)
        out[..., MASK] = -1e4
        return out


@pytest.fixture(scope="module")
def dream_model(model):
    return _NoMaskPrediction(model)


def _prompts(B, P, padded=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK - 1, (B, P), generator=g)
    am = torch.ones(B, P, dtype=torch.bool)  # DiffusionLM takes bool masks
    if padded:
        for b in range(1, B):
            am[b, : 2 * b] = False
        ids = torch.where(am, ids, torch.full_like(ids, 0))
    return ids, am


# ---------------------------------------------------------------------------------------------
# LLaDA's generate, restated
# ---------------------------------------------------------------------------------------------
def llada_reference(model, prompt, attention_mask=None, steps=128, gen_length=128,
                    block_length=128, temperature=0.0, cfg_scale=0.0,
                    remasking="low_confidence", mask_id=126336, logits_eos_inf=False,
                    confidence_eos_eot_inf=False):  # fmt: skip
    assert temperature == 0  # the test compares deterministic token choices
    B, P = prompt.shape
    L = P + gen_length
    x = torch.full((B, L), mask_id, dtype=torch.long)
    x[:, :P] = prompt
    am = None
    if attention_mask is not None:
        am = torch.cat([attention_mask, torch.ones(B, gen_length, dtype=attention_mask.dtype)], 1)
    given = x != mask_id  # the prompt, masked out in the unconditional pass
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    for blk in range(n_blocks):
        lo, hi = P + blk * block_length, P + (blk + 1) * block_length
        n = (x[:, lo:hi] == mask_id).sum(1)
        plan = n[:, None] // per_block + (
            torch.arange(per_block)[None, :] < (n % per_block)[:, None]
        )
        for i in range(per_block):
            masked = x == mask_id
            if cfg_scale > 0:
                un = torch.where(given, torch.full_like(x, mask_id), x)
                both = model(torch.cat([x, un]), attention_mask=None if am is None else
                             torch.cat([am, am]))  # fmt: skip
                cond, uncond = both.chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = model(x, attention_mask=am)
            if logits_eos_inf:
                logits[:, :, LLADA_EOS] = float("-inf")
            x0 = logits.argmax(-1)
            if confidence_eos_eot_inf:
                # After the draw, as LLaDA does: its chained assignment writes EOS in the noisy
                # logits and EoT in the logits, one tensor at T = 0 (add_gumbel_noise returns
                # its input there), so the scoring softmax loses both.
                logits[:, :, LLADA_EOS] = float("-inf")
                logits[:, :, LLADA_EOT] = float("-inf")
            if remasking == "low_confidence":
                score = torch.softmax(logits, -1).gather(-1, x0[..., None]).squeeze(-1)
            else:
                score = torch.rand(B, L)
            score[:, hi:] = float("-inf")
            score = torch.where(masked, score, torch.full_like(score, float("-inf")))
            x0 = torch.where(masked, x0, x)
            for b in range(B):
                pick = torch.topk(score[b], int(plan[b, i])).indices
                x[b, pick] = x0[b, pick]
    return x


@pytest.mark.parametrize(
    "case",
    [
        dict(steps=8, gen_length=16, block_length=16),
        dict(steps=12, gen_length=18, block_length=6),
        dict(steps=6, gen_length=12, block_length=4, cfg_scale=1.5),
        dict(steps=8, gen_length=16, block_length=8, padded=True),
    ],
    ids=["one-block", "blocks", "cfg", "padded-batch"],
)
def test_llada_low_confidence_matches_reference(model, case):
    case = dict(case)
    ids, am = _prompts(3, 9, padded=case.pop("padded", False))
    mask = None if am.all() else am
    ref = llada_reference(model, ids, mask, mask_id=MASK, **case)
    out = llada_generate(model, ids, mask, mask_id=MASK, **case)
    assert (ref[:, 9:] != MASK).float().mean() > 0.7  # a real generation, not a no-op
    assert torch.equal(out, ref)


@pytest.mark.parametrize("steps,gen_length,block_length", [(8, 16, 8), (12, 8, 4)],
                         ids=["steps<=block", "idle-steps"])  # fmt: skip
def test_llada_random_matches_reference_with_same_torch_seed(model, steps, gen_length,
                                                             block_length):  # fmt: skip
    # idle-steps: 6 steps per block of 4 leave 2 steps per block with nothing to commit;
    # LLaDA still draws torch.rand((B, L)) in them, so the global RNG must advance as LLaDA's.
    ids, _ = _prompts(2, 7)
    kw = dict(steps=steps, gen_length=gen_length, block_length=block_length, mask_id=MASK,
              remasking="random")  # fmt: skip
    torch.manual_seed(5)
    ref = llada_reference(model, ids, **kw)
    ref_next = torch.rand(4)
    torch.manual_seed(5)
    out = llada_generate(model, ids, **kw)
    assert torch.equal(out, ref)
    assert torch.equal(torch.rand(4), ref_next)  # the same draws from torch's RNG as LLaDA
    torch.manual_seed(6)
    other = llada_generate(model, ids, **kw)
    assert not torch.equal(other, ref)  # the position choice really is random


class _BigVocab:
    """The tiny model's logits placed in LLaDA's vocabulary, with EOS and EoT made likely."""

    def __init__(self, base):
        self.base = base

    def __call__(self, x, attention_mask=None):
        small = self.base(x.clamp_max(V - 1), attention_mask=attention_mask)
        out = torch.full((*x.shape, LLADA_EOT + 1), -30.0)
        out[..., :V] = small
        top = small.max(-1).values
        i = torch.arange(x.shape[1])
        out[..., LLADA_EOS] = top + torch.where(i % 3 == 0, 0.5, -1.0)  # argmax at i = 0 mod 3
        out[..., LLADA_EOT] = top + torch.where(i % 2 == 1, 0.7, -0.2)  # argmax at odd i
        return out


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("flags", [(True, False), (False, True), (True, True)],
                         ids=["eos-inf", "eot-conf", "both"])  # fmt: skip
def test_llada_eos_options_match_reference(model, flags, cfg_scale):
    # With guidance LLaDA bans EOS on the guided logits: a ban in both passes guides
    # -inf - -inf into NaN, and the NaN scores then pick arbitrary positions.
    big = _BigVocab(model)
    ids, _ = _prompts(2, 6)
    kw = dict(steps=8, gen_length=16, block_length=8, mask_id=126336, cfg_scale=cfg_scale,
              logits_eos_inf=flags[0], confidence_eos_eot_inf=flags[1])  # fmt: skip
    ref = llada_reference(big, ids, **kw)
    out = llada_generate(big, ids, **kw)
    assert torch.equal(out, ref)
    if flags[1] and not cfg_scale:
        assert (ref == LLADA_EOT).any()  # the option had something to act on


def test_llada_eot_conf_option_scores_a_drawn_eos_zero_at_t0():
    # At T = 0 LLaDA's noisy logits are its logits (one tensor), so confidence_eos_eot_inf's
    # -inf on EOS reaches the scoring softmax too: a drawn EOS scores 0 and waits. Here the
    # first answer position draws EOS confidently while the second is still masked, and 7 once
    # it is not; the second draws 5 either way, less confidently.
    P, Vb = 2, LLADA_EOT + 1

    def two_positions(x, attention_mask=None):
        out = torch.full((*x.shape, Vb), -20.0)
        first_open = x[:, P + 1] == 126336
        out[:, P, LLADA_EOS] = torch.where(first_open, 3.0, -20.0)
        out[:, P, 7] = torch.where(first_open, 0.0, 5.0)
        out[:, P + 1, 5] = torch.where(x[:, P] == 126336, 1.0, 5.0)
        out[:, P + 1, 6] = torch.where(x[:, P] == 126336, 0.0, -20.0)
        return out

    ids = torch.tensor([[1, 2]])
    kw = dict(steps=2, gen_length=2, block_length=2, confidence_eos_eot_inf=True)
    out = llada_generate(two_positions, ids, **kw)
    assert out.tolist() == [[1, 2, 7, 5]]
    assert torch.equal(out, llada_reference(two_positions, ids, **kw))
    # Without the option the confident EOS commits first, as in LLaDA.
    plain = llada_generate(two_positions, ids, steps=2, gen_length=2, block_length=2)
    assert plain.tolist() == [[1, 2, LLADA_EOS, 5]]


def test_llada_rejects_bad_arguments(model):
    ids, _ = _prompts(1, 5)
    with pytest.raises(ValueError, match="block_length"):
        llada_generate(model, ids, gen_length=10, block_length=4, steps=4, mask_id=MASK)
    with pytest.raises(NotImplementedError):
        llada_generate(model, ids, gen_length=8, block_length=8, steps=4, mask_id=MASK,
                       remasking="bogus")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Dream's diffusion_generate, restated
# ---------------------------------------------------------------------------------------------
def _dream_pick(logits, top_p=None, top_k=None, alg="maskgit_plus"):
    """Dream's sample_tokens at temperature 0: (confidence, token) per row."""
    if top_p is not None and top_p < 1:
        s, idx = torch.sort(logits, descending=True)
        cum = torch.softmax(s, -1).cumsum(-1)
        drop = cum > top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop),
                                    torch.finfo(logits.dtype).min)  # fmt: skip
    if top_k is not None:
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, -1)
    conf, x0 = probs.max(-1)
    if alg == "topk_margin":
        top2 = torch.sort(probs, descending=True).values
        conf = top2[:, 0] - top2[:, 1]
    if alg == "entropy":
        conf = (probs * torch.log(probs + 1e-10)).sum(-1)
    return conf, x0


def dream_reference(model, input_ids, attention_mask=None, max_new_tokens=16, steps=16,
                    eps=1e-3, alg="origin", top_p=None, top_k=None, mask_token_id=MASK,
                    tokens_hook=None, logits_hook=None):  # fmt: skip
    B, P = input_ids.shape
    x = torch.nn.functional.pad(input_ids, (0, max_new_tokens), value=mask_token_id)
    kw = {}
    if attention_mask is not None and (attention_mask == 0).any():
        am = torch.nn.functional.pad(attention_mask, (0, max_new_tokens), value=1)
        pos = am.long().cumsum(-1) - 1
        kw = dict(attention_mask=am.bool(), position_ids=pos.masked_fill(am == 0, 1))
    ts = torch.linspace(1, eps, steps + 1)
    history = []
    if tokens_hook is not None:
        x = tokens_hook(None, x, None)
    for i in range(steps):
        masked = x == mask_token_id
        logits = model(x, **kw)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)  # i is predicted at i - 1
        if logits_hook is not None:
            logits = logits_hook(i, x, logits)
        ml = logits[masked]
        t, s = ts[i], ts[i + 1]
        if alg == "origin":
            p = 1 - s / t if i < steps - 1 else 1
            x0 = torch.full((int(masked.sum()),), mask_token_id, dtype=torch.long)
            go = torch.rand(x0.shape) < p
            x0[go] = _dream_pick(ml[go], top_p, top_k)[1]
            x[masked] = x0
        else:
            conf, x0 = _dream_pick(ml, top_p, top_k, alg)
            mean_n = masked.sum() / B
            k = int(mean_n * (1 - s / t)) if i < steps - 1 else int(mean_n)
            full = torch.full(x.shape, float("-inf"))
            full[masked] = conf
            if k > 0:
                idx = torch.topk(full, k).indices
                cand = torch.full_like(x, mask_token_id)
                cand[masked] = x0
                rows = torch.arange(B)[:, None].expand_as(idx)
                x[rows, idx] = cand[rows, idx]
        if tokens_hook is not None:
            x = tokens_hook(i, x, logits)
        history.append(x.clone())
    return x, history


@pytest.mark.parametrize(
    "alg,extra",
    [("maskgit_plus", {}), ("topk_margin", {}), ("entropy", {}), ("maskgit_plus", {"top_p": 0.995}),
     ("entropy", {"top_k": 5}), ("maskgit_plus", {"padded": True})],
    ids=["maskgit_plus", "topk_margin", "entropy", "top_p", "top_k", "padded-batch"],
)  # fmt: skip
def test_dream_confidence_algs_match_reference(dream_model, alg, extra):
    extra = dict(extra)
    ids, am = _prompts(3, 8, padded=extra.pop("padded", False))
    mask = None if am.all() else am
    ref, _ = dream_reference(dream_model, ids, mask, max_new_tokens=14, steps=9, alg=alg, **extra)
    out = dream_generate(dream_model, ids, mask, max_new_tokens=14, steps=9, alg=alg,
                         mask_token_id=MASK, **extra)  # fmt: skip
    assert (ref[:, 8:] != MASK).float().mean() > 0.7
    assert torch.equal(out, ref)


def test_dream_origin_matches_reference_with_same_torch_seed(dream_model):
    ids, _ = _prompts(2, 8)
    torch.manual_seed(3)
    ref, _ = dream_reference(dream_model, ids, max_new_tokens=12, steps=6, alg="origin")
    torch.manual_seed(3)
    out = dream_generate(
        dream_model, ids, max_new_tokens=12, steps=6, alg="origin", mask_token_id=MASK
    )
    assert torch.equal(out, ref)


def test_dream_hooks_history_and_lengths(dream_model):
    ids, _ = _prompts(2, 8)
    seen = []

    def tokens_hook(step, x, logits):
        seen.append(step)
        x = x.clone()
        x[:, 9] = 5  # force a token, as users do with infilling hooks
        return x

    def logits_hook(step, x, logits):
        logits = logits.clone()
        logits[:, :, 7] = logits[:, :, 7] + 2.0
        return logits

    ref, hist = dream_reference(dream_model, ids, max_new_tokens=10, steps=5, alg="entropy",
                                tokens_hook=tokens_hook, logits_hook=logits_hook)  # fmt: skip
    seen.clear()
    out = dream_generate(dream_model, ids, max_new_tokens=10, steps=5, alg="entropy",
                         mask_token_id=MASK, output_history=True, return_dict_in_generate=True,
                         generation_tokens_hook_func=tokens_hook,
                         generation_logits_hook_func=logits_hook)  # fmt: skip
    assert seen == [None, 0, 1, 2, 3, 4]
    assert torch.equal(out.sequences, ref)
    assert len(out.history) == 5 and all(torch.equal(a, b) for a, b in zip(out.history, hist))
    # max_length instead of max_new_tokens; the model's mask token by default.
    y = dream_generate(dream_model, ids, max_length=15, steps=4, alg="maskgit_plus")
    assert y.shape == (2, 15)
    with pytest.raises(ValueError, match="max_length"):
        dream_generate(dream_model, ids, max_length=8, steps=4, alg="maskgit_plus")


def test_dream_tokens_hook_gets_each_steps_logits(dream_model):
    """Dream hands its tokens hook that step's prediction for every row. Here the hook fills
    every mask at step 1: the later steps have nothing masked, and the reuse of an unchanged
    row's prediction had handed the hook step 1's logits again."""
    ids, _ = _prompts(2, 5)

    def run(fn, **kw):
        seen = []

        def tokens_hook(step, x, logits):
            if logits is not None:
                seen.append((step, logits.clone()))
            if step == 1:
                x = torch.where(x == MASK, 7, x)
            return x

        out = fn(dream_model, ids, max_new_tokens=6, steps=5, alg="maskgit_plus",
                 tokens_hook=tokens_hook, **kw)  # fmt: skip
        return out, seen

    (ref, _), want = run(dream_reference)
    out, got = run(lambda *a, tokens_hook, **k: dream_generate(
        *a, mask_token_id=MASK, generation_tokens_hook_func=tokens_hook, **k))  # fmt: skip
    assert torch.equal(out, ref)
    assert [s for s, _ in got] == [s for s, _ in want] == [0, 1, 2, 3, 4]
    for (s, a), (_, b) in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {s}")


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus"])
def test_dream_runs_every_step_once_nothing_is_masked(dream_model, alg):
    # Dream runs all `steps` steps: hooks and history see each one even when nothing is left
    # to unmask, and a hook that re-masks a token late gets it filled again.
    ids, _ = _prompts(2, 5)
    seen = []

    def tokens_hook(step, x, logits):
        seen.append(step)
        x = x.clone()
        if step == 2:  # force every token still masked: steps 3.. have nothing to do
            x[x == MASK] = 5
        if step == 7:  # re-mask a generated token: steps 8 and 9 must fill it again
            x[:, 6] = MASK
        return x

    torch.manual_seed(0)
    ref, hist = dream_reference(dream_model, ids, max_new_tokens=3, steps=10, alg=alg,
                                tokens_hook=tokens_hook)  # fmt: skip
    seen.clear()
    torch.manual_seed(0)
    out = dream_generate(dream_model, ids, max_new_tokens=3, steps=10, alg=alg,
                         mask_token_id=MASK, output_history=True, return_dict_in_generate=True,
                         generation_tokens_hook_func=tokens_hook)  # fmt: skip
    assert seen == [None, *range(10)]
    assert (hist[7][:, 6] == MASK).all() and not (ref == MASK).any()
    assert torch.equal(out.sequences, ref)
    assert len(out.history) == 10 and all(torch.equal(a, b) for a, b in zip(out.history, hist))


def test_dream_logits_hook_gets_fresh_logits_every_step(dream_model):
    # A hook that edits the logits in place, as users write them: each step must hand it the
    # model's logits of that step's x (Dream calls the model every step), never the previous
    # step's logits it already edited, even when x did not change.
    ids, _ = _prompts(1, 5)

    def hook_into(seen):
        def hook(step, x, logits):
            seen.append(float(logits[0, -1, 7].detach()))
            logits[:, :, 7] -= 1.0
            return logits

        return hook

    ref_seen, out_seen = [], []
    ref, _ = dream_reference(dream_model, ids, max_new_tokens=3, steps=12, alg="maskgit_plus",
                             logits_hook=hook_into(ref_seen))  # fmt: skip
    out = dream_generate(
        dream_model,
        ids,
        max_new_tokens=3,
        steps=12,
        alg="maskgit_plus",
        mask_token_id=MASK,
        generation_logits_hook_func=hook_into(out_seen),
    )
    assert len(out_seen) == 12 and out_seen == pytest.approx(ref_seen, abs=1e-5)
    assert torch.equal(out, ref)


def test_compat_argument_errors_name_the_wrapper_and_argument(dream_model, model):
    ids, _ = _prompts(1, 5)
    with pytest.raises(ValueError, match="dream_generate: steps"):
        dream_generate(dream_model, ids, max_new_tokens=4, steps=0, alg="entropy")
    with pytest.raises(ValueError, match="dream_generate: eps"):
        dream_generate(dream_model, ids, max_new_tokens=4, steps=4, alg="entropy", eps=2.0)
    with pytest.raises(ValueError, match="llada_generate: steps"):
        llada_generate(model, ids, steps=0, gen_length=8, block_length=8, mask_id=MASK)
    # Dream's origin ignores alg_temp (no confidence to sample from): accepted, no effect.
    torch.manual_seed(3)
    a = dream_generate(dream_model, ids, max_new_tokens=6, steps=4, alg="origin")
    torch.manual_seed(3)
    b = dream_generate(dream_model, ids, max_new_tokens=6, steps=4, alg="origin", alg_temp=0.5)
    assert torch.equal(a, b)


class _TimeRecorder(torch.nn.Module):
    """A time-conditioned model (as dlm trains with time_conditioning=True) that records t."""

    def __init__(self, base):
        super().__init__()
        self.base, self.seen = base, []
        self.cfg = ModelConfig(vocab_size=V, time_conditioning=True, mask_token_id=MASK)

    def forward(self, input_ids, attention_mask=None, position_ids=None, t=None):
        assert t is not None, "a time-conditioned model must be given t"
        self.seen.append(t.clone())
        am = None if attention_mask is None else attention_mask.bool()  # LLaDA passes 0/1
        out = self.base(input_ids, am, position_ids)
        out[..., MASK] = -1e4
        return out


@pytest.mark.parametrize("which", ["llada", "dream"])
def test_compat_wrappers_give_a_time_conditioned_model_t(model, which):
    # t is the masked fraction of the row's real tokens (the linear schedule's map), as
    # generate gives it: 8 generated tokens, 2 committed per step, prompts of 3 and 2 real tokens.
    m = _TimeRecorder(model)
    ids = torch.tensor([[5, 6, 7], [0, 8, 9]])
    am = torch.tensor([[1, 1, 1], [0, 1, 1]])
    if which == "llada":
        llada_generate(m, ids, am, steps=4, gen_length=8, block_length=8, mask_id=MASK)
    else:
        dream_generate(m, ids, am, max_new_tokens=8, steps=4, alg="entropy", mask_token_id=MASK)
    got = torch.stack(m.seen)  # (steps, B)
    if which == "llada":
        want = torch.tensor([8.0, 6.0, 4.0, 2.0])[:, None] / torch.tensor([11.0, 10.0])
        torch.testing.assert_close(got.double(), want.double())
    else:  # Dream's schedule commits floor(n (1 - s/t)) per step; t still falls to the end
        assert got.shape == (4, 2) and bool((got[0] == torch.tensor([8 / 11, 8 / 10])).all())
        assert bool((got[1:] <= got[:-1]).all()) and bool((got[-1] > 0).all())


def test_wrappers_take_int32_ids_and_name_bad_arguments(model):
    ids, am = _prompts(2, 6)
    kw = dict(steps=4, gen_length=8, block_length=8, mask_id=MASK)
    assert torch.equal(llada_generate(model, ids.int(), **kw), llada_generate(model, ids, **kw))
    dkw = dict(max_new_tokens=6, steps=4, alg="maskgit_plus", mask_token_id=MASK)
    assert torch.equal(dream_generate(model, ids.to(torch.int32), **dkw),
                       dream_generate(model, ids, **dkw))  # fmt: skip
    for bad in (ids[0], ids.float(), [[1, 2]]):
        with pytest.raises((TypeError, ValueError), match="input_ids"):
            dream_generate(model, bad, **dkw)
        with pytest.raises((TypeError, ValueError), match="prompt"):
            llada_generate(model, bad, **kw)
    with pytest.raises(ValueError, match="eps"):
        dream_generate(model, ids, **dkw, eps=None)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dream_generate(model, ids, **{**dkw, "max_new_tokens": 2.5})
    with pytest.raises(ValueError, match="max_length"):
        dream_generate(model, ids, max_length=0, steps=4, mask_token_id=MASK)
