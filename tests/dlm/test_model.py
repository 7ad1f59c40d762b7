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
