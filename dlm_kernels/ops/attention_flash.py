"""Optional route from ``bidirectional_attention`` to flash-attn, for the cases it supports.

flash-attn is never a dependency. With ``DLM_KERNELS_IMPL=flash_attn`` (or
``dispatch.use("flash_attn")``), a call whose inputs flash-attn handles runs
``flash_attn_func`` / ``flash_attn_varlen_func`` (non-causal: every visible key, as ours); every
other call runs our Triton kernels as under ``auto``. Supported:

- CUDA tensors in float16 / bfloat16, head dim a multiple of 8 and at most 256, GQA / MQA;
- no mask, cache mode (Sq < Sk: the queries are the last Sq positions), varlen (cu_seqlens);
- a padding ``attention_mask``: the real tokens are gathered into a packed batch
  (``flash_attn_varlen_func``, one host sync for the longest row) and scattered back; padding
  query rows get output 0, as ours.

Not routed (our kernels run): block_size (flash-attn has no block-causal mask),
``return_lse=True`` (flash-attn's log-sum-exp carries no gradient; ours does), float32, other
head dims. Which is faster is measured by benchmarks/bench_attention.py ("flash_attn" rows).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Devices whose tensors are routed (tests add "cpu" to run the route against a stand-in).
DEVICES = ("cuda",)


def available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


def supports(q: Tensor, attention_mask, block_size, return_lse: bool) -> bool:
    """Whether flash-attn computes exactly this call (see the module docstring)."""
    D = q.shape[-1]
    return (
        q.device.type in DEVICES
        and q.dtype in (torch.float16, torch.bfloat16)
        and D % 8 == 0
        and D <= 256
        and not block_size
        and not return_lse
        and (attention_mask is None or attention_mask.dim() == 2)
    )


def attention(q, k, v, *, attention_mask, cu_q, cu_k, max_q, max_k, softmax_scale) -> Tensor:
    """flash-attn's output for q (B, Sq, Hq, D) / k, v (B, Sk, Hkv, D), or the packed layout
    (total, H, D) with cu_seqlens; the same meaning as ``bidirectional_attention``."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    kw = dict(dropout_p=0.0, softmax_scale=softmax_scale, causal=False)
    # flash-attn needs the head dim contiguous.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if cu_q is not None:
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **kw)
    if attention_mask is None:
        return flash_attn_func(q, k, v, **kw)
    # Padding: pack the real tokens of every row (queries: the last Sq key positions).
    B, Sq = q.shape[:2]
    Sk = k.shape[1]
    real_k = attention_mask.bool()
    real_q = real_k[:, Sk - Sq :]
    n_q, n_k = real_q.sum(1, dtype=torch.int32), real_k.sum(1, dtype=torch.int32)
    zero = torch.zeros(1, dtype=torch.int32, device=q.device)
    cu_q_ = torch.cat([zero, n_q.cumsum(0, dtype=torch.int32)])
    cu_k_ = torch.cat([zero, n_k.cumsum(0, dtype=torch.int32)])
    mq, mk = (int(x) for x in torch.stack([n_q.max(), n_k.max()]).tolist())  # one host sync
    out = torch.zeros_like(q)
    if mq == 0 or mk == 0:
        return out  # nothing real: every query row is padding or sees no key
    packed = flash_attn_varlen_func(
        q[real_q], k[real_k], v[real_k], cu_q_, cu_k_, mq, mk, **kw
    )  # fmt: skip
    # A real query in a row without real keys cannot exist (queries are key positions).
    return out.index_put((real_q,), packed)
