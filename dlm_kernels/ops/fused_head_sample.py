"""The unmasking step from the last hidden states: the LM head only for the rows that may commit.

``fused_head_unmask_step(x, hidden, W, ...)`` means
``unmask_step(x, reference.linear_logits(hidden, W, bias, softcap), ...)``, but the logits are
computed only for the candidate positions (masked and inside ``candidates``), chunk by chunk,
and a chunk's logits are freed before the next one is computed: the peak extra memory is one
(chunk_rows, V) buffer instead of (B * L, V). At late steps few positions are masked and the
head, not the sampler, is the cost of a step; no DLM code base skips the unmasked rows.

Design (one function, three pieces, no sampling code of its own):

1. Compaction. The candidate positions p = b * L + l are listed first in ``order`` (a stable
   sort of the mask, on the device, no host sync) and ``count`` (1,) int32 says how many there
   are. With ``logits_shift`` (Dream) the hidden row of position (b, l) is (b, max(l - 1, 0)).
2. Per chunk of ``chunk_rows`` slots of ``order``: logits = h[rows] @ W.T (+ bias) in the input
   dtype, then the optional softcap in float32, exactly as ``reference.linear_logits``; then
   the existing row sampler of ``ops/unmask_sample.py`` (``_sample``: the same Triton / C++ /
   reference kernels, the same Philox counter row p), so tokens and confidences cannot drift
   from ``unmask_step``'s.
   - CPU: the count is read on the host (free there), so only ceil(count / chunk_rows) chunks
     run, each an addmm over gathered rows.
   - CUDA, eager ("triton"): the count is read on the host (one sync) and each chunk is an
     F.linear (cuBLAS) over the gathered candidate rows, then the Triton row sampler.
   - CUDA under graph capture or torch.compile ("triton"; DLM_KERNELS_HEAD=fused anywhere): no
     host sync. The host loops over all ceil(B * L / chunk_rows) chunks; the
     gather-GEMM kernel below reads ``count`` on the device and a row tile at or past it exits
     at once, and the sampler skips rows flagged invalid, so chunks past the count cost two
     empty launches each. CUDA graphs and torch.compile see a fixed launch sequence.
   - "reference" on CUDA: the same fixed loop with torch.mm on every chunk (no sync, no saving).
3. Selection: the chunk results are scattered back to (B, L) and the commits are picked as in
   ``unmask_step`` (``select_and_commit``: the C++ pass on the CPU, the reference's torch ops
   elsewhere).

Equality with ``unmask_step`` on materialised logits is exact when the two GEMMs agree bit for
bit; a different GEMM (another row count, cuBLAS vs the Triton kernel) may change the last bit
of a float32 logit, which can change a token only at a near-tie (~1e-7 relative).

Bytes and flops per step: the head is 2 * count * V * H flops (compute-bound for H >= 1024);
the extra traffic over a bare masked-rows matmul is one write and the sampler's reads of each
chunk's logits (count * V * itemsize, from L2 for a small chunk). On the H100 (2026-11-26) the
gather-GEMM kernel path took 9.8 ms where a cuBLAS matmul of all rows plus unmask_step took
5.2 ms, hence cuBLAS in eager mode. Keeping logit tiles in registers and sampling in the GEMM
epilogue (one kernel) would need a cross-tile top-p search; not done.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlm_kernels import dispatch
from dlm_kernels.ops import unmask_sample as us
from dlm_kernels.ops.linear_cross_entropy import _check_head

try:
    import triton
    import triton.language as tl

    from dlm_kernels.ops.linear_cross_entropy import _dot
except Exception:  # no triton, or a broken one: the Triton path is never selected
    triton = None

# Default chunk: (rows x V) logits of at most 2**26 elements (256 MB of float32).
_CHUNK_ELEMS = 2**26


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _head_rows_kernel(
        h_ptr,  # (N, H) hidden rows, last dim contiguous
        stride_h,  # elements between rows of hidden
        w_ptr,  # (V, H) LM head, last dim contiguous
        stride_w,  # elements between rows of the LM head
        b_ptr,  # (V,) bias (unused without HAS_BIAS)
        hrow_ptr,  # (S,) int64: hidden row of each compacted slot
        count_ptr,  # (1,) int32: number of valid slots (on the device: no host sync)
        out_ptr,  # (CHUNK, V) logits out, in hidden's dtype
        start,  # first slot of this chunk
        CHUNK,  # rows of out
        V,  # vocabulary size
        H,  # hidden size
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,  # rows per tile
        BLOCK_V: tl.constexpr,  # vocabulary columns per tile
        BLOCK_K: tl.constexpr,  # hidden slice per tl.dot
        PREC: tl.constexpr,  # "ieee" for float32 (torch's matmul does not use TF32 by default)
        UPCAST: tl.constexpr,  # interpreter: float32 operands for tl.dot (see _dot)
    ):
        pid_m = tl.program_id(0)
        pid_v = tl.program_id(1)
        count = tl.load(count_ptr)
        s0 = start + pid_m * BLOCK_M
        if s0 < count:  # tiles past the count: nothing to do (the sampler skips those rows)
            slot = s0 + tl.arange(0, BLOCK_M)
            r_ok = (slot < count) & (pid_m * BLOCK_M + tl.arange(0, BLOCK_M) < CHUNK)
            rows = tl.load(hrow_ptr + slot, mask=r_ok, other=0)
            offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
            v_ok = offs_v < V
            acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
            for k0 in range(0, H, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < H
                # padded slots load zeros: tl.dot's 16-wide minimum tiles work for any shape
                a = tl.load(h_ptr + rows[:, None] * stride_h + offs_k[None, :],
                            mask=r_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
                b = tl.load(w_ptr + offs_v[None, :].to(tl.int64) * stride_w + offs_k[:, None],
                            mask=v_ok[None, :] & k_ok[:, None], other=0.0)  # fmt: skip
                acc = _dot(a, b, acc, PREC, UPCAST)
            if HAS_BIAS:
                # float32 accumulate + bias, one rounding to the output dtype (cuBLAS's epilogue)
                acc += tl.load(b_ptr + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
            m_local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            ptrs = out_ptr + m_local[:, None].to(tl.int64) * V + offs_v[None, :]
            tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & v_ok[None, :])


def _blocks(H: int, dtype: torch.dtype) -> dict:
    # Under the interpreter (numpy) few wide tiles are fastest. GPU sizes follow
    # linear_cross_entropy's (64 x 128, BLOCK_K 64 bf16 / 32 fp32); not tuned on a GPU yet.
    if dispatch.triton_interpret():
        return dict(BLOCK_M=16, BLOCK_V=256, BLOCK_K=max(16, min(64, triton.next_power_of_2(H))))
    bk = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=min(bk, max(16, triton.next_power_of_2(H))))


# ---------------------------------------------------------------------------------------------
# custom op: the logits of one chunk of compacted rows
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("dlm_kernels::head_logits_rows", mutates_args=())
def _head_logits_rows_op(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, hrows: Tensor, count: Tensor,
    start: int, chunk: int,
) -> Tensor:  # fmt: skip
    """(chunk, V) logits h[hrows[start + i]] @ W.T + bias in hidden's dtype; rows at or past
    ``count`` are left unwritten (garbage: the sampler is told to skip them)."""
    V, H = weight.shape
    out = torch.empty(chunk, V, dtype=hidden.dtype, device=hidden.device)
    if chunk == 0:
        return out
    blk = _blocks(H, hidden.dtype)
    # Row tiles on grid axis 0 (launched fastest): the chunk's row tiles of one vocabulary tile
    # run together, so each W tile comes from HBM about once per chunk and is reused from L2.
    grid = (triton.cdiv(chunk, blk["BLOCK_M"]), triton.cdiv(V, blk["BLOCK_V"]))
    _head_rows_kernel[grid](
        hidden, hidden.stride(0), weight, weight.stride(0), weight if bias is None else bias,
        hrows, count, out, start, chunk, V, H, HAS_BIAS=bias is not None,
        PREC="ieee" if hidden.dtype in (torch.float32, torch.float64) else "tf32",
        UPCAST=dispatch.triton_interpret(), num_warps=4, **blk,
    )  # fmt: skip
    return out


@_head_logits_rows_op.register_fake
def _(hidden, weight, bias, hrows, count, start, chunk):
    return hidden.new_empty(chunk, weight.shape[0])


_HEAD_CHOICES = ("auto", "cublas", "fused")


def _head_by_blas(hidden: Tensor) -> bool:
    """Whether the Triton path computes each chunk's logits with cuBLAS over the gathered
    candidate rows, after reading their count on the host: eager CUDA calls ("auto"), or
    DLM_KERNELS_HEAD=cublas. Under CUDA-graph capture and torch.compile (no host sync allowed),
    or with DLM_KERNELS_HEAD=fused, the gather-GEMM kernel above runs the fixed loop instead.
    Measured on an H100 (gpu-h100-2026-11-26-run1, 8 x 512 positions, 2054 masked, H 3584,
    V 151936, bf16, greedy): that untuned kernel made the fused step 9.8 ms against 5.2 ms for
    a cuBLAS matmul of all 4096 rows plus unmask_step."""
    import os

    choice = os.environ.get("DLM_KERNELS_HEAD", "auto").strip().lower() or "auto"
    if choice not in _HEAD_CHOICES:
        raise ValueError(f"DLM_KERNELS_HEAD must be one of {_HEAD_CHOICES}, got {choice!r}")
    if not dispatch.plain_eager() or (hidden.is_cuda and torch.cuda.is_current_stream_capturing()):
        return False  # the host read would break the graph or trace: never, even when asked for
    if choice != "auto":
        return choice == "cublas"
    return hidden.is_cuda


def _softcap(logits: Tensor, softcap) -> Tensor:
    # Exactly reference.linear_logits's second half (float32 for low precision, float64 kept).
    if softcap is None:
        return logits
    x = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    return softcap * torch.tanh(x / softcap)


# ---------------------------------------------------------------------------------------------
# argument checks (the rule checks mirror unmask_step's, message for message)
# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------
def fused_head_unmask_step(
    x: Tensor,
    hidden: Tensor,
    lm_head_weight: Tensor,
    *,
    mask_id: int,
    bias: Tensor | None = None,
    softcap: float | None = None,
    logits_shift: bool = False,
    chunk_rows: int | None = None,
    num_transfer: int | Tensor | None = None,
    threshold: float | Tensor | None = None,
    factor: float | None = None,
    alg_temp: float | None = None,
    candidates: Tensor | None = None,
    ancestral: bool = False,
    theta: float | Tensor | None = None,
    temperature: float | Tensor = 0.0,
    top_k: int | Tensor | None = None,
    top_p: float | Tensor | None = None,
    min_p: float | Tensor | None = None,
    confidence: str = "prob",
    generator: torch.Generator | None = None,
    seed: int | Tensor | None = None,
    offset: int | Tensor | None = None,
    left_pad: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`unmask_step` from the last hidden states, with the LM head run only where needed.

    Same result as ``unmask_step(x, reference.linear_logits(hidden, lm_head_weight, bias,
    softcap), ...)`` (with Dream's shift applied to the logits when ``logits_shift``), for the
    same seed, but the head runs only for candidate positions (masked, and True in
    ``candidates``) and at most ``chunk_rows`` rows of logits exist at once.

    Args:
        x: (B, L) int64, the current sequences; masked positions hold ``mask_id``.
        hidden: (B, L, H) float32/bfloat16/float16 (float64 runs the reference sampler), the
            model's last hidden states (after the final norm).
        lm_head_weight: (V, H), hidden's dtype and device.
        mask_id: the mask token id.
        bias: (V,) or None, hidden's dtype.
        softcap: None or c > 0: logits = c * tanh(logits / c) in float32 (Gemma).
        logits_shift: Dream's shift: position l is predicted by hidden[:, l - 1] (position 0 by
            hidden[:, 0]). Default False.
        chunk_rows: rows of logits computed at once (default: 2**26 // V, at least 16); the
            peak extra memory is chunk_rows x V logits (x2 with softcap in bf16/fp16).
        num_transfer, threshold, factor, alg_temp, candidates, ancestral, theta: the commit
            rule, as in :func:`unmask_step` (exactly one of num_transfer / threshold / factor /
            ancestral=True).
        temperature, top_k, top_p, min_p, confidence, generator, seed, offset, left_pad: the
            draw and its Philox keys, as in :func:`unmask_step` (per-row tensors are (B,)).

    Returns:
        (new x (B, L) int64, committed (B, L) bool), as :func:`unmask_step`.

    Example:
        >>> x = torch.full((2, 37), 999); h = torch.randn(2, 37, 40); W = torch.randn(1003, 40)
        >>> x, done = fused_head_unmask_step(x, h, W, mask_id=999, num_transfer=4,
        ...                                  temperature=0.7, top_p=0.95, seed=0, offset=step)
    """
    name = "fused_head_unmask_step"
    if not isinstance(x, Tensor) or x.dtype != torch.int64 or x.dim() != 2:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{name}: x must be a (B, L) int64 tensor, got {got}")
    B, L = x.shape
    dev = x.device
    _check_head(name, hidden, lm_head_weight, bias, None, softcap)
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != (B, L):
        raise ValueError(f"{name}: hidden must be ({B}, {L}, H) like x, got "
                         f"{tuple(hidden.shape)}")  # fmt: skip
    if hidden.device != dev:
        raise ValueError(f"{name}: hidden is on {hidden.device}, expected {dev}")
    m = dispatch.as_int(mask_id)
    if m is None:
        raise TypeError(f"{name}: mask_id must be an int, got {type(mask_id).__name__}")
    mask_id = m
    if not isinstance(logits_shift, bool):
        raise TypeError(f"{name}: logits_shift must be a bool, got {logits_shift!r}")
    V, H = lm_head_weight.shape
    if chunk_rows is None:
        chunk_rows = max(16, _CHUNK_ELEMS // V)
    elif isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"{name}: chunk_rows must be an int >= 1, got {chunk_rows!r}")
    us.check_rules(name, num_transfer, threshold, factor, alg_temp, ancestral, theta)
    cand = us.candidate_mask(name, x, x == mask_id, candidates)
    if confidence not in us._CONF_MODES:
        raise ValueError(f"{name}: confidence must be one of {tuple(us._CONF_MODES)}, got "
                         f"{confidence!r}")  # fmt: skip

    def per_pos(arg, value, dtype, **kw):  # (B,) option -> (B * L,) per position
        return us._per_row(name, arg, value, B, dtype, dev, **kw).repeat_interleave(L)

    temp = per_pos("temperature", temperature, torch.float64, lo=0.0, temperature=True)
    tk = None if top_k is None else per_pos("top_k", top_k, torch.int64, lo=0)
    tp = None
    if top_p is not None:
        tp = per_pos("top_p", top_p, torch.float64, lo=0.0, hi=1.0, lo_open=True)
    mp = None if min_p is None else per_pos("min_p", min_p, torch.float64, lo=0.0, hi=1.0)
    nt = th = tt = None
    if num_transfer is not None:
        nt = us._per_row(name, "num_transfer", num_transfer, B, torch.int64, dev, lo=0)
    if threshold is not None:
        th = us._per_row(name, "threshold", threshold, B, torch.float64, dev)
    if ancestral:
        tt = us._per_row(name, "theta", theta, B, torch.float64, dev, lo=0.0, hi=1.0)
    seed, offset, left_pad = us._step_keys(name, B, L, dev, seed, offset, left_pad, generator)
    us._check_left_pad(name, cand, left_pad)

    # 1. Compaction: candidate positions first, in row-major order; no host sync.
    flat = cand.reshape(-1)
    N = B * L
    order = torch.argsort((~flat).to(torch.int8), stable=True)
    count = flat.sum(dtype=torch.int32).reshape(1)
    hrow = order
    if logits_shift:
        hrow = order - (order % L > 0).to(torch.int64)
    h2d = hidden.reshape(N, H)
    if h2d.stride(-1) != 1:
        h2d = h2d.contiguous()
    W = lm_head_weight if lm_head_weight.stride(-1) == 1 else lm_head_weight.contiguous()
    if bias is not None and bias.stride(0) != 1:  # the kernel reads b_ptr + column
        bias = bias.contiguous()

    # 2. Per chunk: logits, then the row sampler of unmask_step.
    impl = dispatch.select(dev)
    use_triton = impl == "triton" and hidden.dtype in us._KERNEL_DTYPES
    blas = use_triton and _head_by_blas(hidden)
    if (us._host_checkable(x) and not use_triton) or blas:
        # CPU: the count is free; eager CUDA: one host sync buys cuBLAS on exactly the
        # candidate rows. Only the chunks that hold rows run.
        n_valid = int(count)
    else:
        # Triton (CUDA, or CPU under the interpreter, so that tests run this very loop) and
        # CUDA tensors: a fixed loop; chunks past the device-side count do no work.
        n_valid = N
    tok_full = torch.full((N + 1,), mask_id, dtype=torch.int64, device=dev)  # slot N: dump
    conf_full = torch.full((N + 1,), float("-inf"), dtype=torch.float32, device=dev)
    # Everything per slot is gathered once, so a chunk costs only views plus its own kernels
    # (the GEMM, the sampler, two scatters): launch overhead matters on the fixed CUDA loop.
    valid_all = torch.arange(N, dtype=torch.int64, device=dev) < count
    dst_all = torch.where(valid_all, order, torch.full_like(order, N))
    temp, tk, tp, mp = (None if t is None else t[order] for t in (temp, tk, tp, mp))
    krows, kseed, koff = us._keys_at(order, L, seed, offset, left_pad)
    greedy = us.all_greedy(temperature)
    per_row_seed, per_row_off = isinstance(kseed, Tensor), isinstance(koff, Tensor)
    for s in range(0, n_valid, chunk_rows):
        e = min(s + chunk_rows, n_valid)
        if use_triton and not blas:
            logits = _head_logits_rows_op(h2d, W, bias, hrow, count, s, e - s)
        else:
            logits = torch.nn.functional.linear(h2d[hrow[s:e]], W, bias)
        logits = _softcap(logits, softcap)
        opts = [None if t is None else t[s:e] for t in (temp, tk, tp, mp)]
        tok, conf = us._sample(logits, krows[s:e], valid_all[s:e], *opts, confidence,
                               kseed[s:e] if per_row_seed else kseed,
                               koff[s:e] if per_row_off else koff, greedy)  # fmt: skip
        del logits  # the chunk's logits die here: peak extra memory is one chunk
        tok_full.scatter_(0, dst_all[s:e], tok)
        conf_full.scatter_(0, dst_all[s:e], conf)

    # 3. Selection over (B, L), as unmask_step.
    tok_full = tok_full[:N].reshape(B, L)
    conf_full = conf_full[:N].reshape(B, L)
    return us.select_and_commit(x, tok_full, conf_full, cand, nt, th, factor, alg_temp, tt, seed,
                                offset, left_pad)  # fmt: skip
