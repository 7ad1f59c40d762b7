"""Pure-PyTorch references: the meaning of every op in dlm_kernels.

Each reference is written for clarity, not speed, and computes in float32 (float64 when given
float64 inputs), so that tests can run it in float64 as the ground truth. The kernels in
``dlm_kernels/ops/`` must agree with these functions; where a reference is also the CPU fallback
it must stay free of host syncs where it can.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["masked_cross_entropy"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# masked cross-entropy
# ---------------------------------------------------------------------------------------------
def masked_cross_entropy_rows(
    logits: Tensor,
    target: Tensor,
    valid: Tensor,
    weight: Tensor | None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Per-row loss and logsumexp of (N, V) logits; 0 at rows where ``valid`` is False.

    loss_i = w_i * ((1 - eps) * (lse_i - x_i[y_i]) + eps * (lse_i - mean_j x_ij) + z * lse_i^2)
    """
    dt = _compute_dtype(logits)
    V = logits.shape[-1]
    # Invalid rows are replaced by zeros (not dropped: no host sync), so that a NaN or -inf in a
    # row that carries no loss cannot leak into the result or the gradient.
    x = torch.where(valid[:, None], logits.to(dt), torch.zeros((), dtype=dt, device=logits.device))
    in_range = (target >= 0) & (target < V)
    tgt = torch.where(valid & in_range, target, torch.zeros_like(target))
    lse = torch.logsumexp(x, dim=-1)
    nll = lse - x.gather(-1, tgt[:, None]).squeeze(-1)
    # An out-of-range target at a position that carries loss gives NaN (as the kernels do when
    # the eager check is off), never a finite loss against some other token.
    nll = torch.where(in_range, nll, torch.full_like(nll, float("nan")))
    loss = nll
    if label_smoothing:
        loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - x.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * lse * lse
    if weight is not None:
        loss = loss * weight.to(dt)
    zero = torch.zeros((), dtype=dt, device=logits.device)
    return torch.where(valid, loss, zero), torch.where(valid, lse, zero)


def masked_cross_entropy(
    logits: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    weight: Tensor | None = None,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Reference for :func:`dlm_kernels.masked_cross_entropy` (same arguments, no checks)."""
    V = logits.shape[-1]
    shape = target.shape
    valid = target.to(torch.int64) != ignore_index  # int64: uint8 would wrap -100 to 156
    if mask is not None:
        valid = valid & mask
    if weight is not None:
        weight = torch.broadcast_to(weight, shape).reshape(-1)
    loss, _ = masked_cross_entropy_rows(
        logits.reshape(-1, V),
        target.reshape(-1),
        valid.reshape(-1),
        weight,
        label_smoothing,
        z_loss,
    )
    if reduction == "none":
        return loss.reshape(shape)
    total = loss.sum()
    if reduction == "sum":
        return total
    if normalizer is not None:
        return total / normalizer
    return total / valid.sum().clamp_min(1)


# ---- linear cross-entropy ----
def linear_logits(
    hidden: Tensor, lm_head_weight: Tensor, bias: Tensor | None = None, softcap=None
) -> Tensor:
    """The LM head as a model computes it: ``hidden @ W.T + bias`` in the input dtype, then
    (optionally) Gemma's ``softcap * tanh(logits / softcap)`` in float32 (float64)."""
    logits = torch.nn.functional.linear(hidden, lm_head_weight, bias)
    if softcap is not None:
        x = logits.to(_compute_dtype(logits))
        logits = softcap * torch.tanh(x / softcap)
    return logits


def masked_linear_cross_entropy_rows(
    hidden: Tensor,
    lm_head_weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    valid: Tensor,
    weight: Tensor | None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap=None,
) -> tuple[Tensor, Tensor]:
    """Per-row loss and logsumexp of the (N, H) rows of ``hidden`` under the LM head (V, H).

    Rows that carry no loss enter as zeros: their NaN or inf would reach the weight gradient
    through 0 * NaN otherwise (the kernels never read them)."""
    hidden = hidden.masked_fill(~valid.reshape(-1, 1), 0.0)
    logits = linear_logits(hidden, lm_head_weight, bias, softcap)
    return masked_cross_entropy_rows(logits, target, valid, weight, label_smoothing, z_loss)


def masked_linear_cross_entropy(
    hidden: Tensor,
    lm_head_weight: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    weight: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    normalizer: float | Tensor | None = None,
    softcap=None,
) -> Tensor:
    """Reference for :func:`dlm_kernels.masked_linear_cross_entropy`: the full (..., V) logits,
    then :func:`masked_cross_entropy` (same arguments, no checks, no ``return_lse``)."""
    logits = linear_logits(hidden, lm_head_weight, bias, softcap)
    return masked_cross_entropy(
        logits, target, mask, weight, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, normalizer=normalizer,
    )  # fmt: skip


# ---- bidirectional attention ----
def attention_visibility(
    batch: int,
    seqlen_q: int,
    seqlen_k: int,
    attention_mask: Tensor | None = None,
    block_size: int | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Which keys each query sees: (B, Sq, Sk) bool, for :func:`bidirectional_attention`.

    Query i sits at key position p = Sk - Sq + i (Sq < Sk: the last Sq positions, a block
    against a cached prefix). Key j is visible when it is real (``attention_mask[b, j]``) and,
    with ``block_size``, when j // block_size <= p // block_size (block-causal). A query whose
    own position is padding sees nothing: its row is all False.
    """
    if attention_mask is not None:
        device = attention_mask.device
    pos_q = torch.arange(seqlen_q, device=device) + (seqlen_k - seqlen_q)
    pos_k = torch.arange(seqlen_k, device=device)
    vis = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if block_size is not None:
        vis = (pos_k[None, :] // block_size) <= (pos_q[:, None] // block_size)
    vis = vis.expand(batch, seqlen_q, seqlen_k)
    if attention_mask is not None:
        q_real = attention_mask[:, pos_q]  # (B, Sq): the query's own position is real
        vis = vis & attention_mask[:, None, :] & q_real[:, :, None]
    return vis


def varlen_visibility(
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    total_q: int,
    total_k: int,
    block_size: int | None = None,
) -> Tensor:
    """(1, total_q, total_k) bool visibility of packed sequences (flash-attn's varlen layout).

    Sequence b holds queries cu_seqlens_q[b]:cu_seqlens_q[b+1] and keys cu_seqlens_k[b]:
    cu_seqlens_k[b+1]; its queries are the last len_q positions of its keys. No host sync.
    """
    dev = cu_seqlens_q.device
    cu_q, cu_k = cu_seqlens_q.long(), cu_seqlens_k.long()
    iq, ik = torch.arange(total_q, device=dev), torch.arange(total_k, device=dev)
    seq_q = torch.searchsorted(cu_q[1:], iq, right=True)  # sequence of each packed query
    seq_k = torch.searchsorted(cu_k[1:], ik, right=True)
    len_q, len_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    pos_q = iq - cu_q[seq_q] + (len_k - len_q)[seq_q]  # position among its sequence's keys
    pos_k = ik - cu_k[seq_k]
    vis = seq_q[:, None] == seq_k[None, :]
    if block_size is not None:
        vis = vis & ((pos_k[None, :] // block_size) <= (pos_q[:, None] // block_size))
    return vis[None]


def zero_attention_padding(
    q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v with 0 at padding positions (keys where attention_mask is False, queries whose
    own position is), as the kernels, which never read them: a probability of 0 times a NaN
    stored in a padded value row (e.g. a KV cache allocated with torch.empty) is still NaN.
    Gradients are unchanged: padding keys and queries get zero gradients either way."""
    if attention_mask is None:
        return q, k, v
    Sq, Sk = q.shape[1], k.shape[1]
    key_pad = ~attention_mask[:, :, None, None]
    q = q.masked_fill(~attention_mask[:, Sk - Sq :, None, None], 0.0)
    return q, k.masked_fill(key_pad, 0.0), v.masked_fill(key_pad, 0.0)


def attention_with_visibility(
    q: Tensor, k: Tensor, v: Tensor, visible: Tensor, softmax_scale: float, upcast: bool = True
) -> tuple[Tensor, Tensor]:
    """softmax(scale * Q K^T) V written out, over the keys ``visible`` (B, Sq, Sk) allows.

    q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D) with Hq a multiple of Hkv (query head h reads
    key head h // (Hq // Hkv)). Returns (out (B, Sq, Hq, D) in q's dtype, lse (B, Hq, Sq) in
    float32, float64 for float64 inputs). A query row that sees no key gets out 0 and lse -inf,
    and passes no gradient to q, k or v (never NaN).
    upcast=False runs the two matmuls in the input dtype (softmax still in float32), as the
    kernels do: the "reference in low precision" of the tests' error rule.
    """
    sd = _compute_dtype(q)  # softmax dtype
    dt = sd if upcast else q.dtype  # matmul dtype
    group = q.shape[2] // k.shape[2]
    qf = q.to(dt).transpose(1, 2)  # (B, Hq, Sq, D)
    kf = k.to(dt).repeat_interleave(group, dim=2).transpose(1, 2)
    vf = v.to(dt).repeat_interleave(group, dim=2).transpose(1, 2)
    scores = (qf @ kf.transpose(-1, -2)).to(sd) * softmax_scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    m = scores.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows that see nothing
    p = torch.exp(scores - m)
    l = p.sum(dim=-1, keepdim=True)
    seen = l > 0
    l_safe = torch.where(seen, l, torch.ones_like(l))
    out = (p / l_safe).to(dt) @ vf
    lse = torch.where(seen, m + torch.log(l_safe), torch.full_like(l, float("-inf")))
    return out.transpose(1, 2).to(q.dtype), lse.squeeze(-1)


def bidirectional_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attention_mask: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    block_size: int | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    upcast: bool = True,
):
    """Reference for :func:`dlm_kernels.bidirectional_attention` (same arguments, no checks).

    Scores, softmax and the weighted sum are written out in float32 (float64 for float64
    inputs; the input dtype with upcast=False). lse is float32 (float64 for float64 inputs),
    (B, Hq, Sq), or (Hq, total_q) in the varlen layout.
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if cu_seqlens_q is not None:
        vis = varlen_visibility(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], block_size)
        out, lse = attention_with_visibility(q[None], k[None], v[None], vis, scale, upcast)
        out, lse = out[0], lse[0]
    else:
        B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
        vis = attention_visibility(B, Sq, Sk, attention_mask, block_size, q.device)
        q, k, v = zero_attention_padding(q, k, v, attention_mask)
        out, lse = attention_with_visibility(q, k, v, vis, scale, upcast)
    return (out, lse) if return_lse else out


def bidirectional_attention_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attention_mask: Tensor | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    block_size: int | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
):
    """The fast reference (the CPU fallback): SDPA with the equivalent boolean mask.

    SDPA returns NaN for a query that sees no key, so such rows are given one harmless visible
    key and their output is then replaced by 0 (no gradient reaches q, k or v through them).
    Padding positions of q, k and v are zeroed first (zero_attention_padding), so that values
    stored there, NaN included, never reach the result, as with the kernels.
    The lse, when asked for, is the logsumexp of the masked scores ((B, Hq, Sq, Sk) memory).
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    varlen = cu_seqlens_q is not None
    dense = attention_mask is None and block_size is None and not varlen
    if varlen:
        vis = varlen_visibility(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], block_size)
        q, k, v = q[None], k[None], v[None]
    elif not dense or return_lse:  # dense attention needs no (B, Sq, Sk) mask
        vis = attention_visibility(
            q.shape[0], q.shape[1], k.shape[1], attention_mask, block_size, q.device
        )
        q, k, v = zero_attention_padding(q, k, v, attention_mask)
    if not dense:
        seen = vis.any(dim=-1)  # (B, Sq)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    group = q.shape[2] // k.shape[2]
    if group > 1:
        kt, vt = kt.repeat_interleave(group, dim=1), vt.repeat_interleave(group, dim=1)
    mask = None if dense else (vis | ~seen[:, :, None])[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    out = out.transpose(1, 2)
    if not dense:
        out = torch.where(seen[:, :, None, None], out, torch.zeros((), dtype=out.dtype))
    if return_lse:
        s = (qt.to(_compute_dtype(q)) @ kt.to(_compute_dtype(q)).transpose(-1, -2)) * scale
        s = s.masked_fill(~vis[:, None], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # -inf where a row sees nothing
    if varlen:
        out = out[0]
        if return_lse:
            lse = lse[0]
    return (out, lse) if return_lse else out


# ---- unmask-sample ----
# The meaning of dlm_kernels.sample_tokens / unmask_step, written the way Dream and LLaDA write
# their samplers (float64, a full sort for top-k / top-p, softmax, gathers), except that the
# noise comes from the counter-based Philox generator below instead of torch.rand, so that the
# kernels can reproduce every draw bit for bit.
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 round multipliers (Random123)
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_MASK32 = 0xFFFFFFFF
# Counter word c3 says what a draw is for, so no two uses share a stream.
STREAM_TOKEN, STREAM_CONFIDENCE, STREAM_ALG_TEMP, STREAM_ANCESTRAL = 0, 1, 2, 3
UNMASK_CONFIDENCES = ("prob", "raw_prob", "margin", "neg_entropy", "random")


def _mulhilo32(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of a * m for a in [0, 2^32) (int64) and m < 2^32, without
    overflowing int64: a * m itself can reach 2^64, and signed overflow is undefined behaviour in
    the C++ that torch.compile's inductor generates (GCC -O3 then gave wrong high words for
    per-row seeds; eager wraps). a * m = (a * mh) 2^16 + a * ml with 16-bit halves mh, ml."""
    t0 = a * (m & 0xFFFF)  # < 2^48
    t1 = a * (m >> 16)  # < 2^48
    s = t0 + ((t1 & 0xFFFF) << 16)  # < 2^49: the low 48 bits of a * m, plus a carry
    return (t1 >> 16) + (s >> 32), s & _MASK32


def philox4x32(c0: Tensor, c1, c2, c3, seed) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 (Salmon et al. 2011) on int64 tensors holding uint32 values.

    Counter (c0, c1, c2, c3), key (seed mod 2^32, seed >> 32); seed an int or an int64 tensor
    that broadcasts against the counters (one key per row). The 32 x 32 -> 64-bit products are
    formed from 32 x 16-bit halves (_mulhilo32) that never overflow int64. Matches Random123's
    philox4x32_10 (known answers in the tests), Triton's tl.philox and csrc/unmask_sample.cpp.
    """
    dev = c0.device
    # A Python int word becomes a tensor by an add (torch.as_tensor would make torch.compile
    # specialise the graph on the value of a traced int, e.g. offset=step).
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    c = torch.broadcast_tensors(
        *[v.to(torch.int64) if isinstance(v, Tensor) else zero + v for v in (c0, c1, c2, c3)]
    )
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(c[0], PHILOX_M0)
        hi1, lo1 = _mulhilo32(c[2], PHILOX_M1)
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return c[0], c[1], c[2], c[3]


def philox_uniform(cols: Tensor, rows, stream: int, seed, offset) -> Tensor:
    """Float64 uniforms in (0, 1) keyed by (seed, offset, row, column, stream).

    seed and offset: ints, or int64 tensors that broadcast against cols and rows.

    u = (k + 1/2) / 2^52 with k the top 26 bits of words 0 and 1: exact in float64 on every path,
    never 0 or 1, so -log(-log u) is always finite.

    Under torch.compile the draws run as one opaque op (dlm_kernels::philox_uniform, the same
    torch code run eagerly): inductor inlining the ten rounds into one expression took minutes
    to compile (more than 5 for an ancestral step of 3 x 16 positions).
    """
    if torch.compiler.is_compiling():
        zero = torch.zeros((), dtype=torch.int64, device=cols.device)
        as_t = [v if isinstance(v, Tensor) else zero + v for v in (rows, seed, offset)]
        return _philox_uniform_op(cols, as_t[0], stream, as_t[1], as_t[2])
    return _philox_uniform(cols, rows, stream, seed, offset)


def _philox_uniform(cols, rows, stream, seed, offset) -> Tensor:
    w0, w1, _, _ = philox4x32(cols, rows, offset & _MASK32, stream, seed)
    k = (w0 >> 6) * 67108864 + (w1 >> 6)
    return (k.to(torch.float64) + 0.5) * 2.0**-52


@torch.library.custom_op("dlm_kernels::philox_uniform", mutates_args=())
def _philox_uniform_op(
    cols: Tensor, rows: Tensor, stream: int, seed: Tensor, offset: Tensor
) -> Tensor:
    return _philox_uniform(cols, rows, stream, seed, offset)


@_philox_uniform_op.register_fake
def _(cols, rows, stream, seed, offset):
    shape = torch.broadcast_shapes(cols.shape, rows.shape, seed.shape, offset.shape)
    return cols.new_empty(shape, dtype=torch.float64)


def _sanitize_logits(logits: Tensor) -> Tensor:
    # NaN counts as -inf (never drawn); +inf as the largest float32 so the arithmetic stays finite.
    x = logits.to(torch.float64)
    big = float(torch.finfo(torch.float32).max)
    return torch.nan_to_num(x, nan=float("-inf"), posinf=big, neginf=float("-inf"))


def sample_tokens_rows(
    logits: Tensor,
    rows: Tensor,
    temperature: Tensor,
    top_k: Tensor | None,
    top_p: Tensor | None,
    min_p: Tensor | None,
    confidence: str,
    seed: int | Tensor,
    offset: int | Tensor,
) -> tuple[Tensor, Tensor]:
    """Reference of the per-row draw: (tokens int64 (R,), confidence float32 (R,)).

    logits (R, V); rows (R,) int64 the counter's row of each logits row; seed and offset ints
    or (R,) int64 tensors (each row's own Philox key and counter word 2); temperature (R,)
    float64 (<= 0: argmax); top_k (R,) int64 (<= 0 or >= V: off); top_p (R,) float64 (>= 1: off);
    min_p (R,) float64 (<= 0: off). The rules, shared by every path:
      z = x / T (T = 1 for argmax rows); top_k keeps every x >= the k-th largest x (ties at the
      boundary all stay); top_p keeps x_j iff the top-k-renormalised mass of the values strictly
      above x_j is < p (the smallest set with mass >= p, ties kept together, the top token always);
      min_p keeps z_j - max z >= log(min_p). T > 0: argmax over kept j of z_j + g_j,
      g = -log(-log u), u from philox_uniform(col j, row, STREAM_TOKEN); ties to the lowest index.
    A row with no finite logit gives token 0 and confidence -inf.
    """
    x = _sanitize_logits(logits)
    R, V = x.shape
    dev = x.device
    ninf = torch.tensor(float("-inf"), dtype=torch.float64, device=dev)
    temperature = temperature.to(torch.float64)
    greedy = temperature <= 0
    T = torch.where(greedy, torch.ones_like(temperature), temperature)
    z = x / T[:, None]
    keep = torch.ones_like(x, dtype=torch.bool)
    if top_k is not None:
        k = top_k.to(torch.int64)
        on = (k > 0) & (k < V)
        sorted_x = torch.sort(x, dim=-1, descending=True).values
        kth = sorted_x.gather(-1, (k.clamp(1, V) - 1)[:, None])
        keep &= ~on[:, None] | (x >= kth)
    if top_p is not None:
        p = top_p.to(torch.float64)
        zk = torch.where(keep, z, ninf)
        s, idx = torch.sort(zk, dim=-1, descending=True)  # Dream's top_p_logits sorts too
        q = torch.softmax(s, dim=-1)
        excl = torch.cat([torch.zeros_like(q[:, :1]), torch.cumsum(q, dim=-1)[:, :-1]], dim=-1)
        # Tie-invariance: every member of a run of equal values gets the mass above the run.
        pos = torch.arange(V, device=dev).expand(R, V)
        new_run = torch.ones_like(s, dtype=torch.bool)
        new_run[:, 1:] = s[:, 1:] != s[:, :-1]
        start = torch.cummax(torch.where(new_run, pos, torch.zeros_like(pos)), dim=-1).values
        above = excl.gather(-1, start)
        keep_sorted = (above < p[:, None]) | (s == s[:, :1])
        kp = torch.zeros_like(keep).scatter(-1, idx, keep_sorted)
        keep &= ~(p < 1)[:, None] | kp
    m = z.max(dim=-1, keepdim=True).values
    finite_row = torch.isfinite(m).squeeze(-1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    if min_p is not None:
        mp = min_p.to(torch.float64)
        on = mp > 0
        lz = torch.log(torch.where(on, mp, torch.ones_like(mp)))
        keep &= ~on[:, None] | ((z - m) >= lz[:, None])
    zf = torch.where(keep, z, ninf)
    q = torch.softmax(zf, dim=-1)  # the filtered, tempered distribution
    cols = torch.arange(V, device=dev, dtype=torch.int64)[None, :]
    s2, o2 = (v[:, None] if isinstance(v, Tensor) else v for v in (seed, offset))
    g = -torch.log(-torch.log(philox_uniform(cols, rows[:, None], STREAM_TOKEN, s2, o2)))
    drawn = torch.argmax(zf + g, dim=-1)  # argmax returns the first maximal index
    tokens = torch.where(greedy, torch.argmax(x, dim=-1), drawn)
    tokens = torch.where(finite_row, tokens, torch.zeros_like(tokens))
    if confidence == "prob":
        conf = q.gather(-1, tokens[:, None]).squeeze(-1)
    elif confidence == "raw_prob":
        conf = torch.softmax(x, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    elif confidence == "margin":
        top2 = torch.sort(q, dim=-1, descending=True).values  # Dream's topk_margin sorts
        second = top2[:, 1] if V > 1 else torch.zeros_like(top2[:, 0])
        conf = top2[:, 0] - second
    elif confidence == "neg_entropy":
        logq = torch.where(q > 0, torch.log(q), torch.zeros_like(q))
        conf = (q * logq).sum(dim=-1)
    elif confidence == "random":
        zero = torch.zeros_like(rows)
        conf = philox_uniform(zero, rows, STREAM_CONFIDENCE, seed, offset)
    else:
        raise ValueError(f"confidence must be one of {UNMASK_CONFIDENCES}, got {confidence!r}")
    conf = torch.where(finite_row, conf, ninf)
    return tokens, conf.to(torch.float32)


def select_commits(
    conf: Tensor,
    cand: Tensor,
    *,
    num_transfer: Tensor | None = None,
    threshold: Tensor | None = None,
    factor: float | None = None,
    alg_temp: float | None = None,
    theta: Tensor | None = None,
    seed: int | Tensor = 0,
    offset: int | Tensor = 0,
    left_pad: Tensor | None = None,
) -> Tensor:
    """Which candidate positions commit: (B, L) bool. Torch ops only, no host sync.

    conf (B, L) float32 (anything at non-candidates); cand (B, L) bool; num_transfer (B,) int64;
    threshold (B,) float64; theta (B,) float64 for the ancestral rule. Candidates are ranked by
    confidence, descending, ties to the lowest position (a stable sort), as Dream's and LLaDA's
    topk would do if topk were stable. With alg_temp the rank key is conf / alg_temp plus Gumbel
    noise (STREAM_ALG_TEMP): k positions drawn without replacement from softmax(conf / alg_temp).
    factor (Fast-dLLM): with c_1 >= c_2 >= ... the sorted confidences, commit the longest prefix
    with c_i >= 1 - factor / (i + 1) (c_1 always), i.e. Fast-dLLM's rule without its quirk of
    also committing the last candidate when only that one fails.
    The draws of position (b, l) have counter (column l, row b) and key (seed, offset); seed and
    offset may be (B,) int64 tensors (per row); with left_pad (B,) the counter is (column
    l - left_pad[b], row 0), as for row b alone and unpadded.
    """
    B, L = cand.shape
    dev = cand.device
    pos = torch.arange(L, device=dev, dtype=torch.int64)
    if left_pad is None:
        ccol, crow = pos[None, :], torch.arange(B, device=dev, dtype=torch.int64)[:, None]
    else:
        ccol, crow = (pos[None, :] - left_pad[:, None]).clamp_min(0), torch.zeros_like(pos[:1])
    seed, offset = (v[:, None] if isinstance(v, Tensor) else v for v in (seed, offset))
    if theta is not None:
        u = philox_uniform(ccol, crow, STREAM_ANCESTRAL, seed, offset)
        return cand & (u < theta.to(torch.float64)[:, None])
    key = conf.to(torch.float64)
    if alg_temp is not None and alg_temp > 0:
        u = philox_uniform(ccol, crow, STREAM_ALG_TEMP, seed, offset)
        key = key / alg_temp - torch.log(-torch.log(u))
    # Candidates first (a candidate at -inf still outranks every non-candidate), then the key.
    lowest = -torch.finfo(torch.float64).max
    key = torch.where(cand, key.clamp_min(lowest), float("-inf"))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, pos.expand(B, L).contiguous())
    n = cand.sum(dim=1)
    if num_transfer is not None:
        k = torch.minimum(num_transfer.to(torch.int64).clamp_min(0), n)
        return cand & (rank < k[:, None])
    if threshold is not None:
        tau = threshold.to(torch.float64)[:, None]
        return cand & ((conf.to(torch.float64) >= tau) | (rank == 0))
    if factor is not None:
        sc = conf.to(torch.float64).gather(1, order)
        i = pos.to(torch.float64) + 1.0  # the thresholds in float64, as the comparison
        ok = (sc >= 1.0 - factor / (i + 1.0)) & (pos[None, :] < n[:, None])
        if L:
            ok[:, 0] = n > 0
        count = torch.cumprod(ok.to(torch.int64), dim=1).sum(dim=1)
        return cand & (rank < count[:, None])
    raise ValueError("select_commits: give one of num_transfer, threshold, factor or theta")
