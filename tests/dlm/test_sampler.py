"""dlm.sampler.generate: batch invariance, every alg and schedule, blocks, guidance, shift,
Fast-dLLM's parallel rules and caches, early stop, history and prediction reuse.

Tiny random DiffusionLMs for end-to-end behaviour; small fake callables where they state a rule
more clearly (their logits are a known function of x, so the expected commits can be computed).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from dlm.config import ModelConfig
from dlm.model import DiffusionLM
from dlm.sampler import KVCache, dream_timesteps, even_counts, generate

V, MASK, EOS = 53, 52, 1


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                      max_seq_len=128, init_std=0.4, mask_token_id=MASK)  # fmt: skip
    return DiffusionLM(cfg).eval()


def _padded_batch():
    """Three prompts of lengths 7, 4 and 6, left-padded to 7."""
    g = torch.Generator().manual_seed(2)
    lens = [7, 4, 6]
    ids = torch.zeros(3, 7, dtype=torch.long)
    am = torch.zeros(3, 7, dtype=torch.bool)
    for b, n in enumerate(lens):
        ids[b, 7 - n :] = torch.randint(2, MASK, (n,), generator=g)
        am[b, 7 - n :] = True
    return ids, am, lens


class FakeLM:
    """Logits a fixed function of the left and right neighbours and the position; counts calls."""

    def __init__(self, vocab=V, seed=0, scale=3.0):
        g = torch.Generator().manual_seed(seed)
        self.left = torch.randn(vocab, vocab, generator=g) * scale
        self.right = torch.randn(vocab, vocab, generator=g) * scale
        self.pos = torch.randn(256, vocab, generator=g) * scale
        self.calls = 0
        self.rows = 0

    def __call__(self, input_ids, attention_mask=None):
        self.calls += 1
        self.rows += input_ids.shape[0]
        left = F.pad(input_ids, (1, 0), value=0)[:, :-1]
        right = F.pad(input_ids, (0, 1), value=0)[:, 1:]
        return self.left[left] + self.right[right] + self.pos[: input_ids.shape[1]]


# ---------------------------------------------------------------------------------------------
# Batches: each row equals its prompt alone
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alg", ["low_confidence", "random", "maskgit_plus", "topk_margin",
                                 "entropy", "ancestral"])  # fmt: skip
@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["T0", "T0.8"])
def test_left_padded_batch_rows_equal_each_prompt_alone(model, alg, temperature):
    ids, am, lens = _padded_batch()
    kw = dict(gen_length=12, steps=6, block_length=6, alg=alg, temperature=temperature,
              mask_id=MASK, seed=11, top_p=0.9 if temperature else None,
              schedule="dream" if alg in ("entropy", "topk_margin") else "even")  # fmt: skip
    out = generate(model, ids, am, **kw)
    assert out.shape == (3, 19)
    assert torch.equal(out[:, :7], ids)  # the prompt is never touched
    assert (out[:, 7:] != MASK).all()  # the mask is never drawn, everything is filled
    for b, n in enumerate(lens):
        alone = generate(model, ids[b : b + 1, 7 - n :], **kw)
        assert torch.equal(out[b, 7 - n :], alone[0]), f"row {b}"


def test_seed_reproducible_and_generator(model):
    ids, am, _ = _padded_batch()
    kw = dict(gen_length=8, steps=4, mask_id=MASK, temperature=1.0)
    a = generate(model, ids, am, seed=3, **kw)
    assert torch.equal(a, generate(model, ids, am, seed=3, **kw))
    assert not torch.equal(a, generate(model, ids, am, seed=4, **kw))
    # Per-row temperatures: row 0 at T = 0 is the greedy row, row 1 the T = 1 row.
    mixed = generate(model, ids, am, gen_length=8, steps=4, mask_id=MASK, seed=3,
                     temperature=torch.tensor([0.0, 1.0, 0.5]))  # fmt: skip
    greedy = generate(model, ids, am, gen_length=8, steps=4, mask_id=MASK)
    assert torch.equal(mixed[0], greedy[0]) and torch.equal(mixed[1], a[1])
    # Per-row seeds: row b is the prompt alone with seed[b]; one prompt gives distinct samples.
    same = ids[2:3].expand(3, 7)
    per = generate(model, same, am[2:3].expand(3, 7), seed=[3, 4, 5], **kw)
    alone = generate(model, ids[2:3, 1:], seed=4, **kw)
    assert torch.equal(per[1, 1:], alone[0]) and not torch.equal(per[0], per[1])
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(generate(model, ids, am, generator=g1, **kw),
                       generate(model, ids, am, generator=g2, **kw))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Schedules, blocks, history
# ---------------------------------------------------------------------------------------------
def _commits_per_step(history, start):
    prev = None
    counts = []
    for h in history:
        masked = (h[:, start:] == MASK).sum(1)
        counts.append((prev - masked) if prev is not None else None)
        prev = masked
    return counts


def test_even_counts_split_like_llada():
    n = torch.tensor([10, 3, 0, 8])
    c = even_counts(n, 4)
    assert c.tolist() == [[3, 3, 2, 2], [1, 1, 1, 0], [0, 0, 0, 0], [2, 2, 2, 2]]


def test_even_schedule_blocks_and_history():
    lm = FakeLM()
    prompt = torch.randint(2, MASK, (2, 5), generator=torch.Generator().manual_seed(0))
    x, hist = generate(lm, prompt, gen_length=12, steps=6, block_length=4, mask_id=MASK,
                       output_history=True)  # fmt: skip
    assert len(hist) == 6 and torch.equal(hist[-1], x)
    start = torch.cat([prompt, torch.full((2, 12), MASK)], 1)
    for i, h in enumerate([start] + hist[:-1]):
        nxt = hist[i]
        was = h[:, 5:] == MASK
        # Committed tokens never change, and 4 tokens per block over 2 steps: 2 per step.
        assert torch.equal(nxt[:, 5:][~was], h[:, 5:][~was])
        assert ((was & (nxt[:, 5:] != MASK)).sum(1) == 2).all()
        blk = i // 2
        # Nothing beyond the current block is committed.
        assert (nxt[:, 5 + 4 * (blk + 1) :] == MASK).all()


def test_dream_schedule_counts():
    lm = FakeLM()
    prompt = torch.randint(2, MASK, (2, 3), generator=torch.Generator().manual_seed(1))
    steps, G = 5, 17
    x, hist = generate(lm, prompt, gen_length=G, steps=steps, alg="maskgit_plus", mask_id=MASK,
                       schedule="dream", eps=1e-3, output_history=True)  # fmt: skip
    ts = dream_timesteps(steps, 1e-3, "cpu")
    n = G
    for i, h in enumerate(hist):
        k = n if i == steps - 1 else int(torch.tensor(float(n)) * (1 - ts[i + 1] / ts[i]))
        left = int((h[0, 3:] == MASK).sum())
        assert n - left == k, f"step {i}"
        n = left
    assert n == 0


def test_ancestral_commits_with_theta_and_finishes():
    lm = FakeLM()
    prompt = torch.randint(2, MASK, (1, 4), generator=torch.Generator().manual_seed(3))
    # 4 steps on the linear grid: theta = 1/4, 1/3, 1/2, 1: the expected masked fraction left
    # after each step is 3/4, 1/2, 1/4, 0. Average over many positions (a wide row).
    x, hist = generate(lm, prompt, gen_length=200, steps=4, alg="origin", mask_id=MASK,
                       temperature=1.0, seed=0, output_history=True)  # fmt: skip
    left = [float((h[0, 4:] == MASK).float().mean()) for h in hist]
    for got, want in zip(left, [0.75, 0.5, 0.25, 0.0]):
        assert abs(got - want) < 0.1
    assert (x != MASK).all()


def test_infilling_masks_inside_the_prompt(model):
    prompt = torch.randint(2, MASK, (1, 9), generator=torch.Generator().manual_seed(4))
    prompt[0, 3:5] = MASK
    x = generate(model, prompt, gen_length=4, steps=3, mask_id=MASK)
    assert (x != MASK).all()
    keep = torch.ones(9, dtype=torch.bool)
    keep[3:5] = False
    assert torch.equal(x[0, :9][keep], prompt[0][keep])
    # gen_length 0: infilling only.
    y = generate(model, prompt, gen_length=0, steps=2, mask_id=MASK)
    assert y.shape == (1, 9) and (y != MASK).all()


# ---------------------------------------------------------------------------------------------
# Guidance, shift, parallel decoding, early stop, reuse
# ---------------------------------------------------------------------------------------------
def test_cfg_uses_guided_logits():
    lm = FakeLM()
    prompt = torch.randint(2, MASK, (2, 5), generator=torch.Generator().manual_seed(5))
    w = 1.5
    # One step commits everything: the tokens are the argmax of the guided logits.
    x = generate(lm, prompt, gen_length=6, steps=1, cfg_scale=w, mask_id=MASK)
    x_t = torch.cat([prompt, torch.full((2, 6), MASK)], 1)
    c = lm(x_t)
    u = lm(torch.full_like(x_t, MASK))
    g = u + (w + 1) * (c - u)
    g[..., MASK] = float("-inf")
    assert torch.equal(x[:, 5:], g.argmax(-1)[:, 5:])
    assert not torch.equal(x, generate(lm, prompt, gen_length=6, steps=1, mask_id=MASK))


def test_logits_shift_predicts_from_previous_position():
    class PositionLM:
        def __call__(self, input_ids, attention_mask=None):
            B, S = input_ids.shape
            return F.one_hot(torch.arange(S) % 40 + 2, V).float().expand(B, S, V) * 5

    prompt = torch.full((1, 4), 7)
    x = generate(PositionLM(), prompt, gen_length=6, steps=3, mask_id=MASK, logits_shift=True)
    assert x[0, 4:].tolist() == [(i - 1) % 40 + 2 for i in range(4, 10)]
    y = generate(PositionLM(), prompt, gen_length=6, steps=3, mask_id=MASK)
    assert y[0, 4:].tolist() == [i % 40 + 2 for i in range(4, 10)]


class ConfidenceLM:
    """Position i predicts token 2 + i % 40 with a chosen probability conf[i]."""

    def __init__(self, conf):
        self.conf = torch.tensor(conf, dtype=torch.float64)

    def __call__(self, input_ids, attention_mask=None):
        B, S = input_ids.shape
        c = self.conf[:S].clamp(1e-6, 1 - 1e-6)
        other = (1 - c) / (V - 1)
        logits = torch.log(other)[:, None].expand(S, V).clone()
        logits[torch.arange(S), torch.arange(S) % 40 + 2] = torch.log(c)
        return logits.float().expand(B, S, V)


def test_threshold_commits_confident_positions_together():
    P = 3
    conf = [0.5] * P + [0.95, 0.2, 0.97, 0.3, 0.99, 0.1]
    x, hist = generate(ConfidenceLM(conf), torch.full((1, P), 7), gen_length=6, steps=6,
                       alg="maskgit_plus", threshold=0.9, mask_id=MASK,
                       output_history=True)  # fmt: skip
    # Step 1 commits the three >= 0.9 at once, then one per step (the most confident).
    assert [int((h[0, P:] != MASK).sum()) for h in hist] == [3, 4, 5, 6]
    assert (hist[0][0, P:] != MASK).tolist() == [True, False, True, False, True, False]
    assert x[0, P:].tolist() == [i % 40 + 2 for i in range(P, P + 6)]


def test_factor_rule_commits_a_data_dependent_count():
    P = 2
    conf = [0.5] * P + [0.99, 0.9, 0.8, 0.1]
    x, hist = generate(ConfidenceLM(conf), torch.full((1, P), 7), gen_length=4, steps=4,
                       alg="low_confidence", factor=1.0, mask_id=MASK,
                       output_history=True)  # fmt: skip
    # sorted 0.99 >= 1 - 1/2, 0.9 >= 1 - 1/3, 0.8 >= 1 - 1/4, 0.1 < 1 - 1/5: three at once.
    assert [int((h[0, P:] != MASK).sum()) for h in hist] == [3, 4]


def test_stop_at_eos_fills_and_stops():
    P = 2

    # Position P + 2 predicts EOS with certainty; everything else is unsure.
    class EosLM(FakeLM):
        def __call__(self, input_ids, attention_mask=None):
            out = super().__call__(input_ids, attention_mask).clone()
            out[:, P + 2] = -10.0
            out[:, P + 2, EOS] = 10.0
            return out

    prompt = torch.full((1, P), 7)
    lm = EosLM()
    x = generate(lm, prompt, gen_length=16, steps=16, block_length=4, mask_id=MASK, eos_id=EOS,
                 stop_at_eos=True)  # fmt: skip
    # The block holding the EOS is finished as usual; every later mask becomes EOS.
    assert x[0, P + 2] == EOS and (x[0, P + 4 :] == EOS).all() and (x[0, P:] != MASK).all()
    assert lm.calls == 4  # the first block's 4 steps; the other 12 steps never ran
    lm2 = EosLM()
    y = generate(lm2, prompt, gen_length=16, steps=16, block_length=4, mask_id=MASK, eos_id=EOS)
    assert lm2.calls == 16 and torch.equal(y[0, : P + 3], x[0, : P + 3])


def test_reuse_of_the_prediction_when_x_did_not_change():
    lm = FakeLM()
    prompt = torch.randint(2, MASK, (1, 4), generator=torch.Generator().manual_seed(6))
    # 12 steps for 4 tokens: 8 steps commit nothing, so their prediction is reused.
    x, hist = generate(lm, prompt, gen_length=4, steps=12, mask_id=MASK, output_history=True)
    changed = sum(int(not torch.equal(a, b)) for a, b in zip(hist[:-1], hist[1:]))
    assert lm.calls == 1 + changed == 4
    # Ancestral with small theta: rows that did not change are not recomputed either.
    lm2 = FakeLM()
    x2, h2 = generate(lm2, prompt.expand(3, 4), gen_length=3, steps=20, alg="ancestral",
                      temperature=1.0, seed=5, mask_id=MASK, output_history=True)  # fmt: skip
    start = torch.cat([prompt.expand(3, 4), torch.full((3, 3), MASK)], 1)
    states = [start] + h2
    row_changes = sum(int(not torch.equal(a[b], c[b])) for a, c in zip(states[:-2], states[1:-1])
                      for b in range(3))  # fmt: skip
    assert lm2.rows == 3 + row_changes < 3 * 20
    # The same tokens as a model that is recomputed every step (no reuse possible).
    assert torch.equal(x2, generate(lambda i, attention_mask=None: FakeLM()(i), prompt.expand(3, 4),
                                    gen_length=3, steps=20, alg="ancestral", temperature=1.0,
                                    seed=5, mask_id=MASK))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# KV caches (Fast-dLLM) against a small attention model implementing the KVCache protocol
# ---------------------------------------------------------------------------------------------
class CachedAttnLM(torch.nn.Module):
    """Embedding -> n_layers x (single-head attention + MLP) -> head, with kv_cache support."""

    def __init__(self, n_layers, d=24, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(V, d)
        self.pos = torch.nn.Embedding(128, d)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(d, 3 * d) for _ in range(n_layers))
        self.mlp = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(n_layers))
        self.head = torch.nn.Linear(d, V)
        self.calls = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None):
        B, n = input_ids.shape
        start = kv_cache.start if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + n).expand(B, n)
        self.calls.append(n)
        h = self.emb(input_ids) + self.pos(position_ids)
        for i, (qkv, mlp) in enumerate(zip(self.qkv, self.mlp)):
            q, k, v = qkv(h).chunk(3, -1)
            if kv_cache is not None:
                k, v = kv_cache.update(i, k, v)
            s = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
            if attention_mask is not None:
                s = s.masked_fill(~attention_mask[:, None, :], float("-inf"))
            h = h + torch.softmax(s, -1) @ v
            h = h + torch.tanh(mlp(h))
        return self.head(h) * 4


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_kv_cache_exact_with_one_layer(mode):
    lm = CachedAttnLM(1)
    ids, am, _ = _padded_batch()
    kw = dict(gen_length=12, steps=6, block_length=4, mask_id=MASK)
    ref = generate(lm, ids, am, **kw)
    lm.calls.clear()
    out = generate(lm, ids, am, kv_cache=mode, **kw)
    assert torch.equal(out, ref)
    # Per block: one full forward, then the block (+ the suffix for prefix) only.
    L = 19
    want = [L, 12 - 0 if mode == "prefix" else 4, L, 8 if mode == "prefix" else 4, L,
            4 if mode == "prefix" else 4]  # fmt: skip
    assert lm.calls == want
    # Dream's shift needs the position before the block as well.
    ref_s = generate(lm, ids, am, logits_shift=True, **kw)
    assert torch.equal(generate(lm, ids, am, logits_shift=True, kv_cache=mode, **kw), ref_s)


def test_kv_cache_approximation_with_two_layers_and_errors(model):
    lm = CachedAttnLM(2)
    ids, am, _ = _padded_batch()
    kw = dict(gen_length=12, steps=6, block_length=4, mask_id=MASK)
    ref = generate(lm, ids, am, **kw)
    for mode in ("prefix", "dual"):
        out = generate(lm, ids, am, kv_cache=mode, threshold=0.5, alg="low_confidence",
                       **kw)  # fmt: skip
        assert (out != MASK).all() and torch.equal(out[:, :7], ids)
        out = generate(lm, ids, am, kv_cache=mode, **kw)
        # Stale keys of a 2-layer model: most tokens agree, not necessarily all.
        assert (out == ref).float().mean() > 0.6
    with pytest.raises(ValueError, match="kv_cache"):
        generate(FakeLM(), ids, am, kv_cache="dual", **kw)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "sdpa"])
def test_kv_cache_with_diffusion_lm(kernels):
    """DiffusionLM takes kv_cache=: exact with one layer (its keys depend on the tokens only),
    an approximation with more (Fast-dLLM's), on a left-padded batch. At T > 0 too: the draws
    of the block are keyed by their position in the row, whatever window the op is given."""
    ids, am, lens = _padded_batch()
    kw = dict(gen_length=12, steps=6, block_length=4, mask_id=MASK)
    for n_layers in (1, 2):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=n_layers, n_heads=2, n_kv_heads=1,
                          max_seq_len=128, init_std=0.4, mask_token_id=MASK,
                          kernels=kernels)  # fmt: skip
        lm = DiffusionLM(cfg).eval()
        ref = generate(lm, ids, am, **kw)
        for mode in ("prefix", "dual"):
            out = generate(lm, ids, am, kv_cache=mode, **kw)
            if n_layers == 1:
                assert torch.equal(out, ref), mode
                hot = dict(kw, alg="maskgit_plus", temperature=0.9, top_p=0.95, seed=3)
                ref_t = generate(lm, ids, am, **hot)
                assert torch.equal(generate(lm, ids, am, kv_cache=mode, **hot), ref_t), mode
            else:
                assert (out[:, 7:] != MASK).all() and (out == ref).float().mean() > 0.6
            # Batch invariance holds with the cache too.
            alone = generate(lm, ids[1:2, 7 - lens[1] :], kv_cache=mode, **kw)
            assert torch.equal(out[1, 7 - lens[1] :], alone[0])


def test_kv_cache_object_protocol():
    c = KVCache()
    k = torch.randn(2, 10, 1, 4)
    assert c.update(0, k, k)[0] is k
    c.start = 3
    new = torch.ones(2, 2, 1, 4)
    kk, _ = c.update(0, new, new)
    assert kk.shape == (2, 10, 1, 4) and torch.equal(kk[:, 3:5], new)


def test_bad_arguments(model):
    ids, am, _ = _padded_batch()
    with pytest.raises(ValueError, match="alg"):
        generate(model, ids, mask_id=MASK, alg="greedy")
    with pytest.raises(ValueError, match="block_length"):
        generate(model, ids, mask_id=MASK, gen_length=10, block_length=4)
    with pytest.raises(ValueError, match="steps"):
        generate(model, ids, mask_id=MASK, gen_length=12, block_length=4, steps=4)
    with pytest.raises(ValueError, match="left padding"):
        generate(model, ids, am.flip(1), mask_id=MASK, gen_length=4, steps=2)
    with pytest.raises(ValueError, match="eos_id"):
        generate(model, ids, mask_id=MASK, stop_at_eos=True, gen_length=4, steps=2)
    with pytest.raises(TypeError, match="prompt"):
        generate(model, ids.float(), mask_id=MASK)


class _TimeStub(torch.nn.Module):
    """A time-conditioned model that records the t it is given; logits favour token 3."""

    def __init__(self, V=11, time_of=None):
        super().__init__()
        self.V, self.seen = V, []
        self.cfg = ModelConfig(vocab_size=V, time_conditioning=True)
        if time_of is not None:
            self.time_of = time_of

    def forward(self, input_ids, attention_mask=None, t=None):
        assert t is not None, "a time-conditioned model must be given t"
        self.seen.append(t.clone())
        logits = torch.zeros(*input_ids.shape, self.V)
        logits[..., 3] = 1.0 + torch.arange(input_ids.shape[1]) / 100  # confidence by position
        return logits


def test_time_conditioned_model_gets_t_of_the_masked_fraction():
    mask = 10
    prompt = torch.tensor([[0, 5, 6], [7, 8, 9]])
    am = torch.tensor([[False, True, True], [True, True, True]])
    m = _TimeStub()
    out = generate(m, prompt, am, gen_length=8, steps=4, mask_id=mask, alg="low_confidence")
    assert bool((out[:, 3:] == 3).all())
    # 8 masks, 2 committed per step, over the row's real tokens (2 + 8 and 3 + 8; linear:
    # t = fraction)
    left = torch.tensor([8.0, 6.0, 4.0, 2.0])[:, None]
    want = left / torch.tensor([10.0, 11.0])
    got = torch.stack(m.seen)  # (steps, B)
    torch.testing.assert_close(got, want)
    # the model's own map (load_model attaches the training schedule's inverse)
    m2 = _TimeStub(time_of=lambda f: f**2)
    generate(m2, prompt, am, gen_length=8, steps=4, mask_id=mask, cfg_scale=1.5)
    got2 = torch.stack(m2.seen)  # cfg: the unconditional rows have their prompt masked too
    want_un = (left + torch.tensor([2.0, 3.0])) / torch.tensor([10.0, 11.0])
    torch.testing.assert_close(got2, torch.cat([want, want_un], 1) ** 2)


def test_time_conditioned_diffusion_lm_samples_and_scores():
    from dlm.likelihood import masked_nll_estimate

    torch.manual_seed(0)
    model = DiffusionLM(
        ModelConfig(
            vocab_size=13,
            d_model=32,
            n_layers=1,
            n_heads=2,
            n_kv_heads=1,
            mask_token_id=12,
            time_conditioning=True,
        )
    )
    model.eval()  # fmt: skip
    prompt = torch.randint(0, 12, (2, 5))
    out = generate(model, prompt, gen_length=6, steps=3, mask_id=12)  # raised without t
    assert out.shape == (2, 11) and bool((out[:, 5:] != 12).all())
    est = masked_nll_estimate(model, out, torch.ones_like(out, dtype=torch.bool), mask_id=12,
                              mc_num=4, seed=0)  # fmt: skip
    assert bool(torch.isfinite(est).all())


def test_likelihood_gives_t_of_each_draw():
    from dlm.likelihood import masked_nll_estimate

    seen_frac = []

    class Stub(_TimeStub):
        def forward(self, input_ids, attention_mask=None, t=None):
            seen_frac.append((input_ids == 10).sum(1).double() / 8)  # of the 8 real tokens
            return super().forward(input_ids, attention_mask, t)

    m = Stub()
    x = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    maskable = torch.tensor([[False, False, True, True, True, True, True, True]])  # n = 6
    masked_nll_estimate(m, x, maskable, mask_id=10, mc_num=5, batch_size=2, seed=1)
    torch.testing.assert_close(torch.cat(m.seen).double(), torch.cat(seen_frac))
    # With guidance the unconditional half (prompt masked too) gets its own fraction's t.
    m.seen.clear()
    seen_frac.clear()
    masked_nll_estimate(m, x, maskable, mask_id=10, mc_num=5, batch_size=2, seed=1,
                        cfg_scale=1.0)  # fmt: skip
    got, frac = torch.cat(m.seen).double(), torch.cat(seen_frac)
    torch.testing.assert_close(got, frac, rtol=1e-6, atol=1e-7)
    assert bool((frac[2:4] > frac[0:2]).all())  # the first chunk's unconditional rows


# ---------------------------------------------------------------------------------------------
# The fused head: the LM head only for the positions a step draws
# ---------------------------------------------------------------------------------------------
CASES = {
    "low_confidence-T0": dict(alg="low_confidence"),
    "maskgit_plus-T0.8-shift": dict(
        alg="maskgit_plus", temperature=0.8, top_p=0.9, logits_shift=True
    ),
    "entropy-dream": dict(alg="entropy", schedule="dream", temperature=0.5, top_k=20),
    "ancestral": dict(alg="ancestral", temperature=1.0),
    "topk_margin-alg_temp": dict(alg="topk_margin", alg_temp=0.5),
    "threshold": dict(alg="low_confidence", threshold=0.3),
    "stop_at_eos": dict(alg="low_confidence", stop_at_eos=True, eos_id=EOS),
    "cfg": dict(alg="low_confidence", cfg_scale=1.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_head_gives_the_logits_path_tokens(model, case):
    # Same tokens as the logits path on a padded batch with blocks; at T > 0 too (the draws are
    # keyed the same way). fused_head=False is the reference here.
    ids, am, _ = _padded_batch()
    kw = dict(gen_length=12, steps=6, block_length=6, mask_id=MASK, seed=3, **CASES[case])
    out = generate(model, ids, am, fused_head=True, **kw)
    ref = generate(model, ids, am, fused_head=False, **kw)
    assert torch.equal(out, ref)
    assert (out[:, 7:] != MASK).all()


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("shift", [False, True], ids=["noshift", "shift"])
def test_fused_head_with_kv_cache(model, mode, shift):
    ids, am, _ = _padded_batch()
    kw = dict(gen_length=12, steps=6, block_length=6, mask_id=MASK, seed=3, kv_cache=mode,
              logits_shift=shift, alg="maskgit_plus", temperature=0.7)  # fmt: skip
    out = generate(model, ids, am, fused_head=True, **kw)
    assert torch.equal(out, generate(model, ids, am, fused_head=False, **kw))


@pytest.mark.parametrize("vocab", [V, 4099], ids=["V53-forced", "V4099-default"])
def test_fused_head_never_builds_full_logits(model, monkeypatch, vocab):
    # With the fused head the model's own lm_head never runs, and the head runs for candidate
    # rows only (at most one block of each row per step). It is the default from V 4096 up.
    if vocab != V:
        torch.manual_seed(1)
        cfg = ModelConfig(vocab_size=vocab, d_model=16, n_layers=1, n_heads=2, max_seq_len=64,
                          init_std=0.4, mask_token_id=vocab - 1)  # fmt: skip
        model = DiffusionLM(cfg).eval()
    mask = model.cfg.mask_token_id
    ids, am, _ = _padded_batch()
    rows = []
    real_linear = F.linear

    def spy(h, w, b=None):
        if w is model.lm_head.weight:
            rows.append(h.shape[0] if h.dim() == 2 else h.shape[0] * h.shape[1])
        return real_linear(h, w, b)

    # The Triton path (CUDA, or forced under the interpreter) computes the head in its own
    # kernel, over the first `count` of the gathered rows (a device-side count): spied there.
    # Without it the test failed on an empty list under DLM_KERNELS_IMPL=triton.
    import dlm_kernels.ops.fused_head_sample as fhs

    real_head = fhs._head_logits_rows_op

    def head_spy(hidden, weight, bias, hrows, count, start, chunk):
        if weight is model.lm_head.weight:
            rows.append(max(0, min(int(count), start + chunk) - start))
        return real_head(hidden, weight, bias, hrows, count, start, chunk)

    monkeypatch.setattr(F, "linear", spy)
    monkeypatch.setattr(fhs, "_head_logits_rows_op", head_spy)
    monkeypatch.setattr(model.lm_head, "forward", lambda h: pytest.fail("full logits built"))
    out = generate(model, ids, am, gen_length=12, steps=6, block_length=6, mask_id=mask,
                   fused_head=True if vocab == V else None)  # fmt: skip
    assert (out[:, 7:] != mask).all()
    assert rows and max(rows) <= 3 * 6  # B rows x one block of candidates
    monkeypatch.undo()
    assert torch.equal(out, generate(model, ids, am, gen_length=12, steps=6, block_length=6,
                                     mask_id=mask, fused_head=False))  # fmt: skip


def test_fused_head_arguments(model):
    ids, am, _ = _padded_batch()
    kw = dict(gen_length=4, steps=2, mask_id=MASK)
    with pytest.raises(ValueError, match="lm_head"):
        generate(FakeLM(), ids, am, fused_head=True, **kw)
    with pytest.raises(TypeError, match="fused_head"):
        generate(model, ids, am, fused_head="yes", **kw)


# ---------------------------------------------------------------------------------------------
# What the model returns, token ids outside the vocabulary, arguments without effect
# ---------------------------------------------------------------------------------------------
def test_model_output_kinds(model):
    ids = torch.tensor([[5, 6, 7]])
    kw = dict(mask_id=MASK, gen_length=4, steps=4, seed=0)
    want = generate(model, ids, **kw)
    # A dict with "logits" (a Hugging Face ModelOutput is one) and a tuple work as the tensor.
    assert torch.equal(generate(lambda x, attention_mask=None: {"logits": model(x)}, ids, **kw),
                       want)  # fmt: skip
    assert torch.equal(generate(lambda x, attention_mask=None: (model(x),), ids, **kw), want)
    int_logits = torch.zeros(1, 7, V, dtype=torch.long)
    for bad, what in [(None, "returned NoneType"), ({"scores": 1}, "without a 'logits' key"),
                      (int_logits, "returned torch.int64")]:  # fmt: skip
        with pytest.raises(TypeError, match=what):
            generate(lambda x, attention_mask=None, out=bad: out, ids, **kw)


def test_mask_id_and_eos_id_must_lie_in_the_vocabulary(model):
    ids = torch.tensor([[5, 6, 7]])
    kw = dict(gen_length=4, steps=4, seed=0)
    with pytest.raises(ValueError, match=f"mask_id {V} must be < the model's vocabulary size {V}"):
        generate(model, ids, mask_id=V, **kw)  # DiffusionLM: known from its embedding
    with pytest.raises(ValueError, match="mask_id must be >= 0, got -1"):
        generate(model, ids, mask_id=-1, **kw)
    with pytest.raises(ValueError, match=f"eos_id 60 must be < the model's vocabulary size {V}"):
        generate(model, ids, mask_id=MASK, eos_id=60, **kw)
    # A callable that tells nothing of its vocabulary and never embeds the id (it clamps): the
    # first logits' last dimension tells, before anything is committed.
    lm = FakeLM()
    with pytest.raises(ValueError, match=f"mask_id 60 must be < the model's vocabulary size {V}"):
        generate(lambda x, attention_mask=None: lm(x.clamp_max(V - 1)), ids, mask_id=60, **kw)
    # Integers of other kinds (numpy's, as tokenizers return them) are ints.
    np = pytest.importorskip("numpy")
    got = generate(model, ids, mask_id=np.int64(MASK), gen_length=np.int64(4), steps=np.int32(4),
                   seed=0)  # fmt: skip
    assert torch.equal(got, generate(model, ids, mask_id=MASK, **kw))


def test_alg_temp_where_it_has_no_effect_is_an_error(model):
    ids, am, _ = _padded_batch()
    kw = dict(gen_length=8, steps=8, mask_id=MASK, seed=0, block_length=4)
    for extra in (dict(alg="maskgit_plus", threshold=0.3), dict(alg="maskgit_plus", factor=1.0),
                  dict(alg="ancestral", temperature=1.0), dict(alg="origin")):  # fmt: skip
        with pytest.raises(ValueError, match="alg_temp=5.0 has no effect"):
            generate(model, ids, am, alg_temp=5.0, **kw, **extra)
    # Where it means something it changes the positions; 0 / None mean off everywhere.
    base = generate(model, ids, am, alg="maskgit_plus", **kw)
    assert not torch.equal(generate(model, ids, am, alg="maskgit_plus", alg_temp=5.0, **kw), base)
    generate(model, ids, am, alg="maskgit_plus", threshold=0.3, alg_temp=0.0, **kw)
    with pytest.raises(ValueError, match="eps"):
        generate(model, ids, am, alg="entropy", schedule="dream", eps=2.0, **kw)


# ---------------------------------------------------------------------------------------------
# Edge cases found in review
# ---------------------------------------------------------------------------------------------
def test_stop_at_eos_with_padding_that_holds_the_mask_id():
    # Padding may hold any id, the mask's included: those pad slots are not masks before the
    # EOS, so a padded row still stops as its prompt alone does.
    class PosEosLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tab = torch.randn(256, V, generator=torch.Generator().manual_seed(0)) * 3

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            B, n = input_ids.shape
            if position_ids is None:
                position_ids = torch.arange(n).expand(B, n)
            lg = self.tab[position_ids].clone()
            lg[..., EOS] = torch.where(position_ids == 9, 100.0, -100.0)  # EOS at real pos 9
            return lg

    lm = PosEosLM()
    ids, am, lens = _padded_batch()
    ids = torch.where(am, ids, torch.full_like(ids, MASK))
    kw = dict(gen_length=12, steps=12, block_length=4, mask_id=MASK, eos_id=EOS,
              stop_at_eos=True, seed=[3, 3, 3])  # fmt: skip
    out = generate(lm, ids, am, **kw)
    for b, n in enumerate(lens):
        alone = generate(lm, ids[b : b + 1, 7 - n :], **{**kw, "seed": [3]})
        assert torch.equal(out[b, 7 - n :], alone[0]), b
        assert (alone[0, 10:] == EOS).all()  # it did stop: every mask after the EOS is EOS


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_empty_prompt_with_kv_cache_and_shifted_logits(model, mode):
    empty = torch.zeros(2, 0, dtype=torch.long)
    kw = dict(gen_length=8, steps=4, block_length=4, mask_id=MASK, logits_shift=True, seed=0)
    out = generate(model, empty, kv_cache=mode, **kw)
    assert out.shape == (2, 8) and not (out == MASK).any()
    # The cache changes nothing at a block's first step; the first block is exact here.
    assert torch.equal(out[:, :1], generate(model, empty, **kw)[:, :1])


def test_infilling_with_gen_length_0_and_a_block_length(model):
    ids, am, _ = _padded_batch()
    ids[0, 3] = MASK
    ids[1, 5] = MASK
    kw = dict(gen_length=0, steps=2, mask_id=MASK, seed=1)
    out = generate(model, ids, am, block_length=3, **kw)
    assert torch.equal(out, generate(model, ids, am, **kw)) and not (out == MASK).any()


def test_more_bad_arguments(model):
    ids, _, _ = _padded_batch()
    kw = dict(gen_length=4, steps=2, mask_id=MASK)
    a = generate(model, ids, seed=torch.tensor(3), **kw)  # a 0-d tensor seed is an int
    assert torch.equal(a, generate(model, ids, seed=3, **kw))
    with pytest.raises(TypeError, match="seed"):
        generate(model, ids, seed=1.5, **kw)
    with pytest.raises(ValueError, match="cfg_scale"):
        generate(model, ids, cfg_scale=float("nan"), **kw)
    bad = ids.clone()
    bad[0, 0] = V
    with pytest.raises(ValueError, match=f"prompt holds token id {V}, outside"):
        generate(model, bad, **kw)
