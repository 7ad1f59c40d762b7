"""dlm.likelihood: the Monte-Carlo ELBO and LLaDA's conditional estimate against exact sums over
every masking pattern of tiny sequences, and batching."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from dlm.config import ModelConfig
from dlm.likelihood import conditional_nll, elbo, masked_nll_estimate, perplexity_bound
from dlm.model import DiffusionLM

V, MASK = 6, 5


class PatternLM:
    """Logits a fixed function of both neighbours and the position: the prediction depends on
    which other tokens are masked, as a real model's does."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.left = torch.randn(V, V, generator=g)
        self.right = torch.randn(V, V, generator=g)
        self.pos = torch.randn(32, V, generator=g)

    def __call__(self, input_ids, attention_mask=None):
        left = F.pad(input_ids, (1, 0), value=0)[:, :-1]
        right = F.pad(input_ids, (0, 1), value=0)[:, 1:]
        return self.left[left] + self.right[right] + self.pos[: input_ids.shape[1]]


def exact_elbo(model, x, maskable):
    """sum over sets S of maskable positions of B(|S|, n - |S| + 1) sum_{i in S} -log p(x_i | x_S).

    The Beta weight is integral_0^1 (1/t) t^|S| (1 - t)^(n - |S|) dt: the linear-schedule ELBO
    written as an exact sum (no sampling at all)."""
    idx = maskable.nonzero()[:, 0].tolist()
    n = len(idx)
    total = 0.0
    for k in range(1, n + 1):
        w = math.factorial(k - 1) * math.factorial(n - k) / math.factorial(n)
        for S in itertools.combinations(idx, k):
            xt = x.clone()
            xt[list(S)] = MASK
            logp = torch.log_softmax(model(xt[None])[0].double(), -1)
            total += w * float(sum(-logp[i, x[i]] for i in S))
    return total


def test_elbo_estimate_is_unbiased_against_the_exact_sum():
    lm = PatternLM()
    x = torch.tensor([[1, 3, 0, 2, 4]])
    exact = exact_elbo(lm, x[0], torch.ones(5, dtype=torch.bool))
    est, se = elbo(lm, x, mask_id=MASK, mc_num=4000, batch_size=4000, seed=0,
                   return_stderr=True)  # fmt: skip
    assert abs(float(est[0]) - exact) < 4 * float(se[0]) + 1e-9, (float(est[0]), exact)
    # A wrong weight (n / (m + 1) instead of n / m) would be far outside that band.
    assert float(se[0]) < 0.05 * exact
    # With every set visited, the estimate is exact: n = 1 has a single set.
    one = elbo(lm, torch.tensor([[2]]), mask_id=MASK, mc_num=3, seed=1)
    assert (
        abs(float(one[0]) - exact_elbo(lm, torch.tensor([2]), torch.ones(1, dtype=torch.bool)))
        < 1e-6
    )


def test_llada_conditional_estimate_is_unbiased():
    lm = PatternLM(seed=3)
    prompt = torch.tensor([[4, 1]])
    answer = torch.tensor([[0, 3, 2]])
    x = torch.cat([prompt, answer], 1)[0]
    exact = exact_elbo(lm, x, torch.tensor([False, False, True, True, True]))
    # Many independent small estimates (LLaDA's 128 draws each): their mean converges.
    ests = torch.stack([conditional_nll(lm, prompt, answer, mask_id=MASK, mc_num=16, seed=s)[0]
                        for s in range(200)])  # fmt: skip
    se = float(ests.std() / math.sqrt(len(ests)))
    assert abs(float(ests.mean()) - exact) < 4 * se + 1e-9
    assert float(ests.std()) > 0  # the draws are random


def test_batched_rows_equal_each_row_alone():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                      mask_token_id=MASK)  # fmt: skip
    model = DiffusionLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    lens = [9, 5, 7]
    x = torch.zeros(3, 9, dtype=torch.long)
    am = torch.zeros(3, 9, dtype=torch.bool)
    for b, n in enumerate(lens):
        x[b, 9 - n :] = torch.randint(0, MASK, (n,), generator=g)
        am[b, 9 - n :] = True
    batched = elbo(model, x, am, mask_id=MASK, mc_num=12, batch_size=7, seed=5)
    for b, n in enumerate(lens):
        alone = elbo(model, x[b : b + 1, 9 - n :], mask_id=MASK, mc_num=12, batch_size=5,
                     seed=5 + b)  # fmt: skip
        torch.testing.assert_close(batched[b], alone[0], rtol=1e-5, atol=1e-6)
    # Conditional, left-padded prompts and right-padded answers.
    pm = torch.tensor([[True, True, True], [False, True, True]])
    amask = torch.tensor([[True, True, False], [True, True, True]])
    p = torch.tensor([[1, 2, 3], [0, 4, 1]])
    a = torch.tensor([[2, 2, 0], [3, 1, 0]])
    both = conditional_nll(model, p, a, pm, amask, mask_id=MASK, mc_num=8, seed=2)
    r0 = conditional_nll(model, p[:1], a[:1, :2], mask_id=MASK, mc_num=8, seed=2)
    r1 = conditional_nll(model, p[1:, 1:], a[1:], mask_id=MASK, mc_num=8, seed=3)
    torch.testing.assert_close(both, torch.cat([r0, r1]), rtol=1e-5, atol=1e-6)


def test_perplexity_bound_and_edge_cases():
    lm = PatternLM()
    x = torch.tensor([[1, 3, 0, 2, 4], [2, 2, 1, 0, 3]])
    r = perplexity_bound(lm, x, mask_id=MASK, mc_num=8)
    assert r["tokens"] == 10 and r["perplexity"] == pytest.approx(math.exp(r["nats_per_token"]))
    assert r["bits_per_token"] == pytest.approx(r["nats_per_token"] / math.log(2))
    none = masked_nll_estimate(lm, x, torch.zeros_like(x, dtype=torch.bool), mask_id=MASK)
    assert torch.equal(none, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="maskable"):
        masked_nll_estimate(lm, x, torch.ones(2, 4, dtype=torch.bool), mask_id=MASK)


def test_input_errors_name_the_argument():
    torch.manual_seed(0)
    model = DiffusionLM(ModelConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2,
                                    max_seq_len=16, mask_token_id=MASK)).eval()  # fmt: skip
    x = torch.tensor([[1, 3, 0, 2, 4]])
    kw = dict(mc_num=2, seed=0)
    # The mask must be a token the model embeds: from its embedding, or (a callable that says
    # nothing and never embeds the id) from the first logits' last dimension.
    with pytest.raises(ValueError, match=f"mask_id {V} must be < the model's vocabulary size {V}"):
        elbo(model, x, mask_id=V, **kw)
    lm = PatternLM()
    with pytest.raises(ValueError, match=f"mask_id 9 must be < the model's vocabulary size {V}"):
        elbo(lambda ids, attention_mask=None: lm(ids.clamp_max(V - 1)), x, mask_id=9, **kw)
    with pytest.raises(ValueError, match="attention_mask must be"):
        elbo(lm, x, torch.ones(1, 4, dtype=torch.bool), mask_id=MASK, **kw)
    with pytest.raises(TypeError, match="x must be an int64"):
        elbo(lm, x.int(), mask_id=MASK, **kw)
    # Left-padded prompts and right-padded answers only: anything else would score the answer
    # away from its prompt.
    p, a = torch.tensor([[1, 2, 3]]), torch.tensor([[2, 4]])
    with pytest.raises(ValueError, match="prompt_mask must be left padding"):
        conditional_nll(lm, p, a, torch.tensor([[True, True, False]]), mask_id=MASK, **kw)
    with pytest.raises(ValueError, match="answer_mask must be right padding"):
        conditional_nll(lm, p, a, None, torch.tensor([[False, True]]), mask_id=MASK, **kw)
    with pytest.raises(ValueError, match="answer_mask must have the shape"):
        conditional_nll(lm, p, a, None, torch.tensor([[True]]), mask_id=MASK, **kw)
    with pytest.raises(TypeError, match=r"conditional_nll: answer must be a \(B, n\) int64"):
        conditional_nll(lm, p, a.float(), mask_id=MASK, **kw)
    with pytest.raises(TypeError, match=r"conditional_nll: prompt must be a \(B, n\) int64"):
        conditional_nll(lm, p[0], a, mask_id=MASK, **kw)


def test_stderr_of_a_single_draw_is_nan():
    # One draw says nothing of its spread: NaN, not 0. A row with nothing to score is exact.
    lm = PatternLM()
    x = torch.tensor([[1, 3, 0, 2, 4]])
    _, se1 = elbo(lm, x, mask_id=MASK, mc_num=1, seed=0, return_stderr=True)
    _, se2 = elbo(lm, x, mask_id=MASK, mc_num=2, seed=0, return_stderr=True)
    assert torch.isnan(se1).all() and torch.isfinite(se2).all() and (se2 > 0).all()
    none = torch.zeros_like(x, dtype=torch.bool)
    _, se0 = masked_nll_estimate(lm, x, none, mask_id=MASK, mc_num=1, return_stderr=True)
    assert torch.equal(se0, torch.zeros(1, dtype=torch.float64))


class _Unranged(DiffusionLM):
    """DiffusionLM without output_range / return_hidden: the plain logits path."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, *, t=None):
        return super().forward(input_ids, attention_mask, position_ids, t=t)


class _Ranged(DiffusionLM):
    """DiffusionLM recording each call's output_range."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, *, t=None,
                return_hidden=False, output_range=None):  # fmt: skip
        self.ranges.append(output_range)
        self.hidden.append(return_hidden)
        return super().forward(input_ids, attention_mask, position_ids, t=t,
                               return_hidden=return_hidden, output_range=output_range)  # fmt: skip


def _ranged_and_plain(**cfg_kw):
    """The same float64 weights behind both forwards."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                      mask_token_id=MASK, **cfg_kw)  # fmt: skip
    fused = _Ranged(cfg).double().eval()
    plain = _Unranged(cfg).double().eval()
    plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.mark.parametrize("time", [False, True], ids=["plain", "time-conditioned"])
def test_fused_head_and_answer_window_change_no_estimate(time):
    """On DiffusionLM the estimate scores the masked positions from the hidden states (fused
    linear cross-entropy, no (batch, S, V) logits) and runs the last layer only over the span
    of the chunk's maskable positions (the answers): equal, in float64, to the plain logits
    path over every position, for the ELBO and the conditional estimate with guidance, on
    padded rows; and the span really is the answers'."""
    fused, plain = _ranged_and_plain(time_conditioning=time)
    g = torch.Generator().manual_seed(4)
    p = torch.randint(0, MASK, (3, 6), generator=g)
    a = torch.randint(0, MASK, (3, 4), generator=g)
    pm = torch.ones(3, 6, dtype=torch.bool)
    pm[1, :2] = False
    amask = torch.ones(3, 4, dtype=torch.bool)
    amask[2, 3:] = False
    kw = dict(mask_id=MASK, mc_num=6, batch_size=4, seed=1)
    for cfg_scale, head in itertools.product((0.0, 1.5), (True, False)):
        fused.ranges, fused.hidden = [], []
        got = conditional_nll(fused, p, a, pm, amask, cfg_scale=cfg_scale, fused_head=head, **kw)
        want = conditional_nll(plain, p, a, pm, amask, cfg_scale=cfg_scale, **kw)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        assert fused.hidden == [head] * 5
        # 18 draws in chunks of 4: answers at [6, 10), row 2's (right-padded) at [6, 9).
        assert fused.ranges == [(6, 10)] * 3 + [(6, 9)] * 2, fused.ranges
    x = torch.cat([p, a], 1)
    am = torch.cat([pm, amask], 1)
    fused.ranges, fused.hidden = [], []
    got = elbo(fused, x, am, fused_head=True, **kw)
    torch.testing.assert_close(got, elbo(plain, x, am, **kw), rtol=1e-10, atol=1e-10)
    # Every real token is maskable: row 0 spans everything (no range), row 1 starts at 2 and
    # row 2 ends at 9.
    assert fused.ranges == [None, None, (2, 10), (0, 9), (0, 9)], fused.ranges
    with pytest.raises(ValueError, match="masked_nll_estimate: fused_head=True needs"):
        elbo(plain, x, am, fused_head=True, **kw)
    with pytest.raises(TypeError, match="masked_nll_estimate: fused_head must be"):
        elbo(fused, x, am, fused_head=1, **kw)


class _ShiftOutside(torch.nn.Module):
    """Dream's shift applied to a model's full logits, outside the estimator."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        from dlm.sampler import shift_logits

        return shift_logits(self.model(input_ids, attention_mask, position_ids))


def test_logits_shift_matches_shifting_the_logits():
    """Dream's shift (position i scored from the output at i - 1): the native option, with the
    fused head and the window, equals shifting the full logits outside the estimator on rows
    without padding, with and without guidance; on left-padded rows, where the first real
    token is scored from its own output (as the row alone), the fused / windowed path equals
    the plain one and every row equals itself alone."""
    fused, plain = _ranged_and_plain(logits_shift=True)
    fused.ranges, fused.hidden = [], []
    g = torch.Generator().manual_seed(6)
    p, a = torch.randint(0, MASK, (3, 6), generator=g), torch.randint(0, MASK, (3, 4), generator=g)
    pm = torch.ones(3, 6, dtype=torch.bool)
    amask = torch.ones(3, 4, dtype=torch.bool)
    kw = dict(mask_id=MASK, mc_num=6, batch_size=4, seed=2)
    close = dict(rtol=1e-10, atol=1e-10)
    for cfg_scale in (0.0, 1.5):
        want = conditional_nll(_ShiftOutside(plain), p, a, pm, amask, cfg_scale=cfg_scale, **kw)
        got = conditional_nll(fused, p, a, pm, amask, cfg_scale=cfg_scale, fused_head=True,
                              logits_shift=True, **kw)  # fmt: skip
        torch.testing.assert_close(got, want, **close)
    x = torch.cat([p, a], 1)
    want = elbo(_ShiftOutside(plain), x, **kw)
    for model in (fused, plain):
        torch.testing.assert_close(elbo(model, x, logits_shift=True, **kw), want, **close)

    pm[0, :3] = False  # row 0: a prompt of 3 after 3 pad slots
    pm[2, :] = False  # row 2: an empty prompt, its answer's first token is its first real one
    amask[1, 2:] = False
    for cfg_scale in (0.0, 1.5):
        fused.ranges, fused.hidden = [], []
        both = conditional_nll(fused, p, a, pm, amask, cfg_scale=cfg_scale, fused_head=True,
                               logits_shift=True, **kw)  # fmt: skip
        assert all(fused.hidden)
        ref = conditional_nll(plain, p, a, pm, amask, cfg_scale=cfg_scale, logits_shift=True,
                              **kw)  # fmt: skip
        torch.testing.assert_close(both, ref, **close)
        alone = [
            conditional_nll(plain, p[b : b + 1, pm[b]], a[b : b + 1, amask[b]],
                            cfg_scale=cfg_scale, logits_shift=True, **{**kw, "seed": 2 + b})
            for b in range(3)
        ]  # fmt: skip
        torch.testing.assert_close(both, torch.cat(alone), **close)
    x, am = torch.cat([p, a], 1), torch.cat([pm, amask], 1)
    batched = elbo(fused, x, am, logits_shift=True, **kw)
    torch.testing.assert_close(batched, elbo(plain, x, am, logits_shift=True, **kw), **close)
    for b in range(3):
        alone = elbo(plain, x[b : b + 1, am[b]], logits_shift=True, **{**kw, "seed": 2 + b})
        torch.testing.assert_close(batched[b : b + 1], alone, **close)
    # perplexity_bound takes the model's own shift.
    r = perplexity_bound(plain, x, am, mask_id=MASK, mc_num=6, batch_size=4, seed=2)
    assert r["nats_per_token"] == pytest.approx(float(batched.sum()) / int(am.sum()), rel=1e-12)
