"""The inference RMSNorm and RoPE kernels (ops/norm_rope.py) against their torch forms in float64,
when the model takes them, and that the model's forward through them matches the torch one."""

from __future__ import annotations

import pytest
import torch

from dlm.config import ModelConfig
from dlm.model import DiffusionLM, rope_cos_sin
from dlm_kernels.ops import norm_rope
from tests.utils import assert_close, device, ids, impl, skip_unless_available

DEV = device()  # CUDA on a GPU machine, else the CPU (Triton under the interpreter)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: ids(d=d))
def test_rms_norm_matches_reference(dtype):
    skip_unless_available("triton")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 37, 40, generator=g) * 3).to(DEV, dtype)
    x[0, 5] = 0.0  # an all-zero row: rsqrt(eps), no NaN
    x[1, 7, :3] = 300.0  # a large row
    w = torch.randn(40, generator=g).to(DEV, dtype)
    with impl("triton"), torch.no_grad():
        assert norm_rope.use_fused(x, w)
        out = norm_rope.rms_norm(x, w, 1e-5)
    ref = norm_rope.rms_norm_ref(x.double(), w.double(), 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(f"rms_norm {dtype}", ref, out, norm_rope.rms_norm_ref(x, w, 1e-5))
    assert torch.isfinite(out[0, 5]).all() and not out[0, 5].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: ids(d=d))
def test_rope_matches_reference(dtype):
    # H 3 and D 40 (neither a power of two), positions that do not start at 0, B 2 with different
    # positions per row, and the model's strided forms: cos / sin sliced to some positions (the
    # pruned last layer) and x a head slice of a wider tensor.
    skip_unless_available("triton")
    g = torch.Generator().manual_seed(1)
    pos = torch.stack([torch.arange(5, 42), torch.arange(100, 137)])
    cos, sin = rope_cos_sin(pos.to(DEV), 40, 10000.0)
    wide = (torch.randn(2, 37, 5, 40, generator=g) * 2).to(DEV, dtype)
    for x, c, s in (
        (wide[:, :, :3].contiguous(), cos, sin),
        (wide[:, :, 1:4], cos, sin),
        (wide[:, 10:20, :3], cos[:, 10:20], sin[:, 10:20]),
    ):
        with impl("triton"), torch.no_grad():
            out = norm_rope.rope(x, c, s)
        ref = norm_rope.rope_ref(x.double(), c.double(), s.double())
        assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
        assert_close(f"rope {dtype}", ref, out, norm_rope.rope_ref(x, c, s))


def test_only_without_gradients_and_on_the_triton_path():
    skip_unless_available("triton")
    x, w = torch.randn(3, 40, device=DEV), torch.ones(40, device=DEV, requires_grad=True)
    with impl("triton"):
        assert not norm_rope.use_fused(x, w)  # the weight trains: autograd needs the torch ops
        assert norm_rope.use_fused(x, w.detach())
        with torch.no_grad():
            assert norm_rope.use_fused(x, w)
            assert not norm_rope.use_fused(x.double(), w)  # float64: the torch ops
    with impl("reference"), torch.no_grad():
        assert not norm_rope.use_fused(x, w)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
def test_model_forward_through_the_kernels(kernels, monkeypatch):
    # DiffusionLM in bf16 under no_grad on the Triton path takes both kernels (every norm, every
    # rotation) and gives the torch forward's logits to bf16 rounding; kernels=False never does.
    skip_unless_available("triton")
    cfg = ModelConfig(vocab_size=67, d_model=120, n_layers=2, n_heads=3, n_kv_heads=1,
                      max_seq_len=64, mask_token_id=66, kernels=kernels)  # fmt: skip
    torch.manual_seed(0)
    model = DiffusionLM(cfg).eval().to(DEV)
    x = torch.randint(0, 66, (2, 13), device=DEV)
    am = torch.ones(2, 13, dtype=torch.bool, device=DEV)
    am[1, :4] = False
    with impl("reference"), torch.no_grad():
        want = model.double()(x, attention_mask=am).float()
    model = model.to(torch.bfloat16)
    calls = []
    for name in ("rms_norm", "rope"):
        real = getattr(norm_rope, name)
        monkeypatch.setattr(norm_rope, name,
                            lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))  # fmt: skip
    with impl("triton"), torch.no_grad():
        got = model(x, attention_mask=am, output_range=(3, 13)).float()
    if kernels:
        # 2 norms per layer and the final one; q and k per layer
        assert calls.count("rms_norm") == 5 and calls.count("rope") == 4, calls
    else:
        assert not calls
    real_rows = am[:, 3:13, None]
    err = ((got - want[:, 3:13]).abs() * real_rows).max().item()
    assert err < 0.05 * want.abs().max().item(), err
