"""The model: kernel path (dlm_kernels ops) against the plain PyTorch path, options, padding."""

import copy

import pytest
import torch

from dlm.config import PRESETS, ModelConfig, get_preset
from dlm.model import DiffusionLM

V = 61


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=48, n_layers=2, n_heads=3, n_kv_heads=1, mask_token_id=V - 1)
    base.update(kw)
    return ModelConfig(**base)


def pair(**kw):
    """The same weights on the kernel path and the reference path."""
    m = DiffusionLM(tiny(kernels=True, **kw))
    r = copy.deepcopy(m)
    r.cfg = copy.copy(m.cfg)
    r.cfg.kernels = False
    for mod in r.modules():
        if hasattr(mod, "cfg"):
            mod.cfg = r.cfg
    return m, r


def test_logits_match_reference_path():
    m, r = pair()
    x = torch.randint(0, V, (2, 37))
    torch.testing.assert_close(m(x), r(x), rtol=1e-5, atol=1e-5)


def test_loss_matches_reference_path_and_gradients():
    m, r = pair(tie_embeddings=True)
    x = torch.randint(0, V - 1, (3, 37))
    mask = torch.rand(3, 37) < 0.4
    w = 1 / torch.rand(3, 1).clamp_min(0.1)
    xt = torch.where(mask, V - 1, x)
    lm = m(xt, targets=x, loss_mask=mask, loss_weight=w, normalizer=3 * 37)
    lr = r(xt, targets=x, loss_mask=mask, loss_weight=w, normalizer=3 * 37)
    torch.testing.assert_close(lm, lr, rtol=1e-5, atol=1e-6)
    lm.backward()
    lr.backward()
    for (n, a), (_, b) in zip(m.named_parameters(), r.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_padding_does_not_change_real_positions():
    m, r = pair()
    x = torch.randint(0, V, (2, 29))
    am = torch.ones(2, 29, dtype=torch.bool)
    am[1, 20:] = False  # right padding on row 1
    x2 = x.clone()
    x2[1, 20:] = torch.randint(0, V, (9,))  # different junk in the padding
    for model in (m, r):
        a, b = model(x, attention_mask=am), model(x2, attention_mask=am)
        torch.testing.assert_close(a[1, :20], b[1, :20])
        alone = model(x[1:, :20])
        torch.testing.assert_close(a[1, :20], alone[0], rtol=1e-5, atol=1e-5)
        # Hugging Face's int64 0/1 masks mean the same on both paths; float masks are refused.
        torch.testing.assert_close(model(x, attention_mask=am.long()), a, rtol=0, atol=0)
        with pytest.raises(TypeError, match="attention_mask must be bool"):
            model(x, attention_mask=am.float())


def test_packing_equals_separate_documents():
    m, r = pair()
    x = torch.randint(0, V, (2, 24))
    # Row 0 holds documents of 10 and 14 tokens, row 1 one document of 24.
    cu = torch.tensor([0, 10, 24, 48], dtype=torch.int32)
    pos = torch.cat([torch.arange(10), torch.arange(14), torch.arange(24)]).view(2, 24)
    for model in (m, r):
        out = model(x, position_ids=pos, cu_seqlens=cu, max_seqlen=24)
        torch.testing.assert_close(out[0, :10], model(x[:1, :10])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[0, 10:], model(x[:1, 10:])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1], model(x[1:])[0], rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = DiffusionLM(tiny())
    b = copy.deepcopy(a)
    b.cfg.gradient_checkpointing = True
    x = torch.randint(0, V, (2, 16))
    mask = torch.rand(2, 16) < 0.5
    for model in (a, b):
        model.train()
        model(x, targets=x, loss_mask=mask).backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)


def test_time_conditioning_and_tied_embeddings():
    m = DiffusionLM(tiny(time_conditioning=True, tie_embeddings=True, qkv_bias=True))
    assert m.lm_head.weight is m.tok_emb.weight
    x = torch.randint(0, V, (2, 11))
    with pytest.raises(ValueError, match="needs t"):
        m(x)
    # E(t) starts at zero: the untrained model ignores t, and learns to use it.
    out1, out2 = m(x, t=torch.tensor([0.1, 0.9])), m(x, t=torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(out1, out2)
    loss = m(x, targets=x, t=torch.tensor([0.1, 0.9]))
    loss.backward()
    assert m.time_emb.mlp[-1].weight.grad.abs().sum() > 0


def test_presets_build_configs():
    for name in PRESETS:
        cfg = get_preset(name)
        assert cfg.model.d_model % cfg.model.n_heads == 0
    big = get_preset("dream-7b").model
    assert (big.n_heads, big.n_kv_heads, big.head_dim, big.vocab_size) == (28, 4, 128, 152064)
    with torch.device("meta"):  # shapes only, no memory: about 7.6B parameters
        n = DiffusionLM(big).num_params()
    assert 7.0e9 < n < 8.0e9
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(d_model=50, n_heads=4)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "sdpa"])
def test_output_range_equals_slice_of_full_forward(kernels):
    """output_range=(a, b) runs the last layer for rows [a, b) only: equal to the full forward's
    [:, a:b] (float64, so only the order of sums differs), on logits and hidden states, with
    left padding (a range that starts in the padding gets 0 attention output there, as the full
    forward), right padding, position ids, time conditioning and a KV cache."""
    torch.manual_seed(0)
    m = DiffusionLM(tiny(kernels=kernels, n_layers=3, time_conditioning=True)).double().eval()
    B, S = 3, 37
    x = torch.randint(0, V, (B, S))
    am = torch.ones(B, S, dtype=torch.bool)
    am[1, :5] = False
    am[2, :30] = False
    am[0, 31:] = False  # right padding: the op's last Sq keys are then padding, the rows not
    pos = (am.long().cumsum(1) - 1).clamp_min(0)
    t = torch.rand(B, dtype=torch.float64)
    with torch.no_grad():
        for mask, p in ((None, None), (am, pos)):
            full = m(x, attention_mask=mask, position_ids=p, t=t)
            hid = m(x, attention_mask=mask, position_ids=p, t=t, return_hidden=True)
            for a, b in ((13, 29), (0, 37), (0, 1), (36, 37), (2, 7)):
                kw = dict(attention_mask=mask, position_ids=p, t=t, output_range=(a, b))
                part = m(x, **kw)
                assert part.shape == (B, b - a, V)
                torch.testing.assert_close(part, full[:, a:b], rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(m(x, return_hidden=True, **kw), hid[:, a:b],
                                           rtol=1e-12, atol=1e-12)  # fmt: skip
        # With a KV cache: the input is positions [start, start + n) of the cached sequence.
        from dlm.sampler import KVCache

        cache = KVCache()
        m(x, attention_mask=am, position_ids=pos, t=t, kv_cache=cache)
        cache.start = 29
        seg = dict(attention_mask=am, position_ids=pos[:, 29:], t=t, kv_cache=cache)
        whole = m(x[:, 29:], **seg)
        cache.start = 29
        part = m(x[:, 29:], output_range=(0, 3), **seg)
        torch.testing.assert_close(part, whole[:, 0:3], rtol=1e-12, atol=1e-12)
        # A cached slice that ends before the sequence, over row 0's right padding: every
        # layer's queries must be the slice's own rows (the cache holds the same keys).
        full = m(x, attention_mask=am, position_ids=pos, t=t)
        for rng in (None, (1, 7)):
            cache.start = 24
            sl = m(x[:, 24:33], attention_mask=am, position_ids=pos[:, 24:33], t=t,
                   kv_cache=cache, output_range=rng)  # fmt: skip
            a, b = (0, 9) if rng is None else rng
            torch.testing.assert_close(sl, full[:, 24 + a : 24 + b], rtol=1e-12, atol=1e-12)


def test_output_range_checks():
    m = DiffusionLM(tiny()).eval()
    x = torch.randint(0, V, (2, 9))
    for bad in ((3, 3), (-1, 4), (0, 10), (5, 2)):
        with pytest.raises(ValueError, match=r"output_range must satisfy 0 <= a < b <= 9"):
            m(x, output_range=bad)
    for bad in ((1,), (1.0, 3), "ab", (True, 3), 4):
        with pytest.raises(TypeError, match="output_range must be a pair of ints"):
            m(x, output_range=bad)
    with pytest.raises(ValueError, match=r"output_range does not combine with targets"):
        m(x, targets=x, output_range=(0, 2))
    cu = torch.tensor([0, 9, 18], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"output_range does not combine with cu_seqlens"):
        m(x, cu_seqlens=cu, max_seqlen=9, output_range=(0, 2))
    import numpy as np

    assert m(x, output_range=(np.int64(1), 4)).shape == (2, 3, V)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_time_conditioned_model_cast_to_other_dtype(dtype):
    """A time-conditioned model cast with .to(dtype) (a checkpoint loaded in bfloat16, no
    autocast) runs: the float32 time features meet the MLP in its own dtype."""
    torch.manual_seed(0)
    m = DiffusionLM(tiny(time_conditioning=True)).eval()
    x, t = torch.randint(0, V - 1, (2, 9)), torch.rand(2)
    ref = m(x, t=t).double()
    out = m.to(dtype)(x, t=t)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float64 else 0.1  # the reference is float32
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rms_norm_bits(dtype):
    # RMSNorm runs F.rms_norm (one call; on a GPU, where generation is launch-bound, possibly
    # one kernel). On the CPU it must give the same bits as the five ops it replaced: the
    # README's demo samples and every saved run depend on them.
    from dlm.model import RMSNorm

    g = torch.Generator().manual_seed(3)
    norm = RMSNorm(40, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(40, generator=g))
    x = (torch.randn(3, 37, 40, generator=g) * 3).to(dtype)
    xf = x.float()
    want = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)) * norm.weight.float()
    got = norm(x)
    assert got.dtype == dtype
    assert torch.equal(got, want.to(dtype))
    # and it trains: the weight and the input get gradients
    x.requires_grad_(True)
    norm(x).float().square().sum().backward()
    assert norm.weight.grad is not None and x.grad is not None


def test_ignored_targets_agree_on_both_paths_and_packing_refuses_a_padding_mask():
    # -100 targets carry no loss and do not count in the default normalizer, on both paths.
    m, r = pair()
    x = torch.randint(0, V - 1, (3, 17))
    tg = x.clone()
    tg[0, :4] = -100
    mask = torch.rand(3, 17) < 0.6
    for lm in (None, mask):
        torch.testing.assert_close(m(x, targets=tg, loss_mask=lm), r(x, targets=tg, loss_mask=lm),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    # Packed documents have no padding: a padding mask with cu_seqlens is refused (the varlen
    # kernel would have ignored it).
    cu = torch.tensor([0, 8, 17, 34, 51], dtype=torch.int32)
    am = torch.ones(3, 17, dtype=torch.bool)
    for model in (m, r):
        with pytest.raises(ValueError, match="attention_mask does not combine with cu_seqlens"):
            model(x, attention_mask=am, cu_seqlens=cu, max_seqlen=17)


def test_logits_shift_trains_the_shifted_objective():
    # With logits_shift the training loss scores target i from the output at i - 1 (position 0
    # and a packed document's first position from their own), as dlm.likelihood and the
    # samplers read such a model.
    from dlm.sampler import shift_logits

    for kernels in (True, False):
        m = DiffusionLM(tiny(logits_shift=True, kernels=kernels)).double()
        x = torch.randint(0, V - 1, (2, 17))
        mask = torch.rand(2, 17) < 0.5
        xt = torch.where(mask, V - 1, x)
        loss = m(xt, targets=x, loss_mask=mask)
        lg = shift_logits(m(xt))
        want = torch.nn.functional.cross_entropy(lg[mask], x[mask])
        torch.testing.assert_close(loss, want.to(loss.dtype), rtol=1e-6, atol=1e-6)
    # Left padding without position ids: the first real token is scored from its own output,
    # so the loss does not depend on the pad id.
    m = DiffusionLM(tiny(logits_shift=True)).double()
    am = torch.ones(2, 17, dtype=torch.bool)
    am[1, :5] = False
    lmask = mask & am
    lmask[1, 5] = True  # the first real token carries loss
    losses = [m(torch.where(am, xt, pad), targets=x, loss_mask=lmask, attention_mask=am)
              for pad in (0, 5)]  # fmt: skip
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    # Packed: two documents per row, positions restart at 8; the shift stays inside each.
    pos = torch.cat([torch.arange(8), torch.arange(9)]).expand(2, 17)
    cu = torch.tensor([0, 8, 17, 25, 34], dtype=torch.int32)
    m = DiffusionLM(tiny(logits_shift=True)).double()
    loss = m(xt, targets=x, loss_mask=mask, position_ids=pos, cu_seqlens=cu, max_seqlen=9)
    lg = m(xt, position_ids=pos, cu_seqlens=cu, max_seqlen=9)
    lg = torch.cat([shift_logits(lg[:, :8]), shift_logits(lg[:, 8:])], 1)
    want = torch.nn.functional.cross_entropy(lg[mask], x[mask])
    torch.testing.assert_close(loss, want.to(loss.dtype), rtol=1e-6, atol=1e-6)


def test_config_refuses_values_that_would_fail_or_do_nothing_later():
    from dlm.config import Config, ConfigError, DataConfig, TrainConfig

    with pytest.raises(ConfigError, match="even head size"):
        ModelConfig(d_model=6, n_heads=2)  # RoPE rotates pairs: every forward would fail
    for kw in (dict(lr=float("inf")), dict(seed=2**64), dict(weight_decay=float("inf"))):
        with pytest.raises(ConfigError, match=next(iter(kw))):
            TrainConfig(**kw)
    TrainConfig(seed=-1, grad_clip=float("inf"))  # torch's seeds; inf: no clipping
    with pytest.raises(ConfigError, match="rope_theta"):
        ModelConfig(rope_theta=float("inf"))
    # Settings a new run refuses but a stored config may hold (older checkpoints still load).
    llada = Config(train=TrainConfig(objective="llada", weighting="min_snr"))
    with pytest.raises(ConfigError, match="train.weighting"):
        llada.check_new_run()  # llada's 1 / p_mask is fixed
    packed = Config(data=DataConfig(packing=True), train=TrainConfig(random_length_prob=0.01))
    with pytest.raises(ConfigError, match="random_length_prob"):
        packed.check_new_run()
    assert Config.from_dict(packed.to_dict()) == packed
    with pytest.raises(ConfigError, match="unknown section"):
        Config.from_dict({"trian": {"steps": 3}})
    with pytest.raises(ConfigError, match=r"\[train\] must be a table"):
        Config.from_dict({"train": 5})
