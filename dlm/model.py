"""A bidirectional transformer for masked diffusion (the Dream / LLaDA family), in one file.

token embedding -> n_layers x [RMSNorm -> GQA attention with RoPE (no causal mask) -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> LM head. Optionally an embedding of the diffusion
time t is added to the input (the seed's E(t); MDLM, Dream and LLaDA leave it out).

Attention runs through ``dlm_kernels.bidirectional_attention`` and the training loss through
``dlm_kernels.masked_linear_cross_entropy``, which takes the final hidden states and the LM head
weight and never builds the (tokens, vocab) logits. ``ModelConfig.kernels = False`` swaps both
for plain PyTorch (SDPA and full logits + cross-entropy): the reference path the convergence test
compares against. With kernels on, inference on CUDA (no gradient) also runs RMSNorm and RoPE as
one Triton kernel each (dlm_kernels/ops/norm_rope.py), for a forward with fewer launches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import dlm_kernels
from dlm.config import ModelConfig
from dlm_kernels.dispatch import as_int
from dlm_kernels.ops import norm_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, kernels: bool = True):
        super().__init__()
        self.eps = eps
        self.kernels = kernels  # False: always the torch ops (ModelConfig.kernels)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 whatever the autocast dtype, as LLaMA and Qwen do:
        # x * rsqrt(mean(x^2) + eps) * weight. F.rms_norm gives the same bits on the CPU as those
        # five ops (checked on torch 2.13). On a GPU, where generation at 1B scale is
        # launch-bound (~1000 dispatches per step), inference takes one Triton kernel instead
        # (dlm_kernels/ops/norm_rope.py); training keeps these ops and their autograd.
        if self.kernels and norm_rope.use_fused(x, self.weight):  # CUDA, no grad: one launch
            return norm_rope.rms_norm(x, self.weight, self.eps)
        return norm_rope.rms_norm_ref(x, self.weight, self.eps)


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin of RoPE for (B, S) positions: (B, S, 1, head_dim) float32 each."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    )
    angles = position_ids.float()[..., None] * inv_freq  # (B, S, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, kernels: bool = True) -> Tensor:
    """Rotate (B, S, H, D) queries or keys; the half-split layout of LLaMA/Qwen checkpoints.
    kernels=False: always the torch ops (ModelConfig.kernels)."""
    if kernels and norm_rope.use_fused(x):  # CUDA, no gradient: one launch instead of seven
        return norm_rope.rope(x, cos, sin)
    return norm_rope.rope_ref(x, cos, sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, attn: dict, rows: slice | None = None
    ) -> Tensor:
        """rows: only these query positions (keys and values still come from all of x)."""
        B, S, _ = x.shape
        cfg = self.cfg
        xq, cq, sq = (x, cos, sin) if rows is None else (x[:, rows], cos[:, rows], sin[:, rows])
        n = xq.shape[1]
        q = self.wq(xq).view(B, n, cfg.n_heads, cfg.head_dim)
        k = self.wk(x).view(B, S, cfg.n_kv_heads, cfg.head_dim)
        v = self.wv(x).view(B, S, cfg.n_kv_heads, cfg.head_dim)
        q, k = apply_rope(q, cq, sq, cfg.kernels), apply_rope(k, cos, sin, cfg.kernels)
        if attn.get("kv_cache") is not None:
            # Sampling with a KV cache (dlm.sampler.KVCache): store this slice's keys/values and
            # attend to the whole cached sequence (the attention op's Sq < Sk mode).
            k, v = attn["kv_cache"].update(attn["layer"], k, v)
        if cfg.kernels and attn.get("attention_mask") is not None:
            # The op's Sq < Sk mode takes its queries for the last Sq keys, padding included:
            # rotate the keys (attention is a sum over a set) so that the query rows are (rows
            # asked for, or a cached slice that ends before the sequence does).
            end = (S if rows is None else rows.stop) + (
                attn["kv_cache"].start if attn.get("kv_cache") is not None else 0
            )
            if end < k.shape[1]:
                k, v = (torch.cat([t[:, end:], t[:, :end]], 1) for t in (k, v))
                m = attn["attention_mask"]
                attn = dict(attn, attention_mask=torch.cat([m[:, end:], m[:, :end]], 1))
        if cfg.kernels:
            y = _kernel_attention(q, k, v, attn)
        else:
            y = _sdpa_attention(q, k, v, attn, rows)
        return self.wo(y.reshape(B, n, -1))


def _kernel_attention(q: Tensor, k: Tensor, v: Tensor, attn: dict) -> Tensor:
    if attn.get("cu_seqlens") is not None:
        # Packed documents: the varlen layout is (total_tokens, H, D) with cu_seqlens marking
        # where each document starts; attention never crosses a document boundary.
        B, S, H, D = q.shape
        cu, mx = attn["cu_seqlens"], attn["max_seqlen"]
        y = dlm_kernels.bidirectional_attention(
            q.reshape(B * S, H, D),
            k.reshape(B * S, -1, D),
            v.reshape(B * S, -1, D),
            cu_seqlens_q=cu,
            cu_seqlens_k=cu,
            max_seqlen_q=mx,
            max_seqlen_k=mx,
        )
        return y.reshape(B, S, H, D)
    return dlm_kernels.bidirectional_attention(q, k, v, attention_mask=attn.get("attention_mask"))


def _sdpa_attention(q: Tensor, k: Tensor, v: Tensor, attn: dict, rows=None) -> Tensor:
    """Plain PyTorch attention: the reference path (also what the kernel must equal)."""
    rep = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    mask = attn.get("sdpa_mask")  # (B, 1, S, S) bool, True = may attend
    if mask is not None and rows is not None and mask.shape[2] > 1:
        mask = mask[:, :, rows]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    qm = attn.get("query_mask")  # (B, S) the input rows' padding
    if qm is not None:
        # Padded query rows attend to every key (or to padded keys only); zero them as the
        # kernel does.
        qm = qm if rows is None else qm[:, rows]
        y = y * qm[:, None, :, None].to(y.dtype)
    return y.transpose(1, 2)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.kernels)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.kernels)
        self.mlp = MLP(cfg)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, attn: dict, rows: slice | None = None
    ) -> Tensor:
        """rows: the output only at these positions (the last layer of a pruned forward)."""
        h = self.attn(self.attn_norm(x), cos, sin, attn, rows)
        x = (x if rows is None else x[:, rows]) + h
        return x + self.mlp(self.mlp_norm(x))


class TimeEmbedding(nn.Module):
    """E(t): sinusoidal features of t -> MLP -> (B, 1, d_model), added to the token embeddings."""

    def __init__(self, d_model: int, n_freq: int = 128):
        super().__init__()
        self.n_freq = n_freq
        self.mlp = nn.Sequential(nn.Linear(n_freq, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, t: Tensor) -> Tensor:
        half = self.n_freq // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        args = 1000.0 * t.float()[:, None] * freqs  # t in [0, 1]: scale up as DiT does
        feats = torch.cat([args.cos(), args.sin()], dim=-1)  # float32
        # In the MLP's dtype: a model cast to bfloat16 or float64 (no autocast) runs too.
        return self.mlp(feats.to(self.mlp[0].weight.dtype))[:, None, :]


class DiffusionLM(nn.Module):
    """The model. ``forward`` returns logits (B, S, V), or the loss when ``targets`` is given."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (> 0) before building the model")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.time_emb = TimeEmbedding(cfg.d_model) if cfg.time_conditioning else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.kernels)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                continue  # norm weights stay 1, biases 0 (set below)
            # GPT-2: residual output projections scaled by 1/sqrt(2 n_layers).
            scale = (
                1.0 / math.sqrt(2 * self.cfg.n_layers)
                if name.endswith(("wo.weight", "w2.weight"))
                else 1.0
            )
            nn.init.normal_(p, mean=0.0, std=std * scale)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        if self.time_emb is not None:
            # Start as the unconditioned model: E(t) = 0 until training finds a use for it.
            nn.init.zeros_(self.time_emb.mlp[-1].weight)
            nn.init.zeros_(self.time_emb.mlp[-1].bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, path: str, dtype=None, device="cpu", **overrides) -> DiffusionLM:
        """A Dream, LLaDA or dlm checkpoint directory (config.json + safetensors); keyword
        overrides of the config (e.g. ``mask_token_id=``) as dlm.hf.from_pretrained."""
        from dlm.hf import from_pretrained

        return from_pretrained(path, dtype=dtype, device=device, **overrides)

    def save_pretrained(self, path: str, **kwargs) -> None:
        """config.json + safetensors that ``from_pretrained`` reloads; see dlm.hf."""
        from dlm.hf import save_pretrained

        save_pretrained(self, path, **kwargs)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        *,
        targets: Tensor | None = None,
        loss_mask: Tensor | None = None,
        loss_weight: Tensor | None = None,
        normalizer: float | Tensor | None = None,
        t: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
        kv_cache=None,
        return_hidden: bool = False,
        output_range: tuple[int, int] | None = None,
    ) -> Tensor:
        """Logits, or the weighted masked cross-entropy when ``targets`` is given.

        Args:
            input_ids: (B, S) int64, the noised sequence x_t (mask_token_id where masked).
            attention_mask: (B, S) bool, True at real tokens (left/right padding is False); 0/1
                integers (Hugging Face's int64 masks) are read as bool.
            position_ids: (B, S) int64; default 0..S-1 per row (packing restarts them per document).
            targets: (B, S) int64, the clean tokens x0. Given: return the loss, build no logits.
                -100 (ignore_index) carries no loss and does not count in the default
                normalizer. With ``cfg.logits_shift`` the target at i is scored from the output
                at i - 1 (Dream's objective; at a document's first position, its own).
            loss_mask: (B, S) bool, True where a position carries loss (the masked tokens).
            loss_weight: (B, S) or (B, 1) float, per-position weight (w(t) of the sequence).
            normalizer: the loss is sum(weight * CE over loss_mask) / normalizer; default the
                number of positions in loss_mask.
            t: (B,) float diffusion time, used only with time_conditioning.
            cu_seqlens: (n_docs + 1,) int32 offsets of packed documents in the flattened B*S
                tokens (varlen attention); max_seqlen: the longest document. Not with
                ``attention_mask``.
            kv_cache: a dlm.sampler.KVCache (sampling only): input_ids are the positions
                [kv_cache.start, kv_cache.start + S) of a longer sequence whose keys/values the
                cache holds; attention_mask then covers the whole sequence (B, S_total).
            return_hidden: return the final hidden states h (B, S, d_model), logits being
                ``lm_head(h)`` (the sampler then runs the head only for the positions it draws).
            output_range: (a, b), 0 <= a < b <= S: outputs only for input positions [a, b),
                shape (B, b - a, ...), equal to the full forward's [:, a:b]. The last layer
                then runs its queries, attention, output projection and MLP for those rows
                only (its keys and values still come from every position); the sampler asks
                for the block it draws from. Not with ``targets`` or ``cu_seqlens``.

        Returns:
            (B, S, V) float logits, (B, S, d_model) hidden states, or a float32 scalar loss.
        """
        B, S = input_ids.shape
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            # Hugging Face's convention (1 at real tokens, 0 at padding, int64) is taken as is;
            # a float mask (additive -inf or a soft weight) has no meaning here.
            if attention_mask.is_floating_point() or attention_mask.is_complex():
                got = attention_mask.dtype
                raise TypeError("DiffusionLM.forward: attention_mask must be bool (or 0/1 "
                                f"integers), True at real tokens; got {got}")  # fmt: skip
            attention_mask = attention_mask != 0
        if cu_seqlens is not None and attention_mask is not None:
            # The varlen kernel has no padding mask: packed documents have no padding (a pad
            # run is a document of its own, or left out of the packing).
            raise ValueError("DiffusionLM.forward: attention_mask does not combine with "
                             "cu_seqlens (packed documents have no padding)")  # fmt: skip
        rows = None
        if output_range is not None:
            rows = _output_rows(output_range, S, targets, cu_seqlens)
        x = self.tok_emb(input_ids)
        if self.time_emb is not None:
            if t is None:
                raise ValueError("time_conditioning=True needs t (B,) in forward")
            x = x + self.time_emb(t).to(x.dtype)
        if position_ids is None:
            start = kv_cache.start if kv_cache is not None else 0
            position_ids = torch.arange(start, start + S, device=input_ids.device).expand(B, S)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        attn = {
            "attention_mask": attention_mask,
            "cu_seqlens": cu_seqlens,
            "max_seqlen": max_seqlen,
            "kv_cache": kv_cache,
        }
        if attention_mask is not None:
            start = kv_cache.start if kv_cache is not None else 0
            attn["query_mask"] = attention_mask[:, start : start + S]
        if not self.cfg.kernels:
            if kv_cache is not None and attention_mask is not None:
                attn["sdpa_mask"] = attention_mask[:, None, None, :]  # keys only: (B, 1, 1, Sk)
            else:
                attn["sdpa_mask"] = _sdpa_mask(attention_mask, cu_seqlens, B, S)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            attn["layer"] = i
            r = rows if i == last else None
            if self.cfg.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, attn, r, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn, r)
        h = self.norm(x)
        if return_hidden:
            return h
        if targets is None:
            return self.lm_head(h)
        if self.cfg.logits_shift:
            # Dream's objective, as the samplers and dlm.likelihood read a shifted model: the
            # target at position i is predicted from the output at i - 1, a sequence's (a
            # packed document's) first position from its own.
            prev = torch.cat([h[:, :1], h[:, :-1]], 1)
            first = position_ids == 0
            if attention_mask is not None:  # a left-padded row starts at its first real token
                am = attention_mask.bool()
                first = first | (am & (am.to(torch.int64).cumsum(1) == 1))
            h = torch.where(first[..., None], h, prev)
        return self.loss(h, targets, loss_mask, loss_weight, normalizer)

    def loss(self, h, targets, loss_mask, loss_weight, normalizer) -> Tensor:
        w = self.lm_head.weight
        if torch.is_autocast_enabled(h.device.type):
            # Custom ops see no autocast: give the fused op the autocast dtype ourselves (the
            # residual stream is float32 even under bf16 autocast).
            dt = torch.get_autocast_dtype(h.device.type)
            h, w = h.to(dt), w.to(dt)
        if self.cfg.kernels:
            return dlm_kernels.masked_linear_cross_entropy(
                h, w, targets, loss_mask, loss_weight, normalizer=normalizer
            )
        # Reference path: full logits, then the same weighted sum in float32.
        logits = F.linear(h, w).float()
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none",
                             ignore_index=-100)  # fmt: skip
        ce = ce.view_as(targets)
        mask = targets != -100  # the op's ignore_index: no loss, not in the default normalizer
        mask = mask if loss_mask is None else mask & loss_mask
        w = torch.ones_like(ce) if loss_weight is None else loss_weight.float().expand_as(ce)
        total = torch.where(mask, ce * w, torch.zeros_like(ce)).sum()
        if normalizer is None:
            normalizer = mask.sum().clamp_min(1)
        return total / normalizer


def _output_rows(output_range, S: int, targets, cu_seqlens) -> slice:
    """forward's output_range (a, b) as a slice of the S input positions, checked."""
    if targets is not None or cu_seqlens is not None:
        what = "targets (the loss)" if targets is not None else "cu_seqlens (packed documents)"
        raise ValueError(f"DiffusionLM.forward: output_range does not combine with {what}")
    pair = list(output_range) if isinstance(output_range, (tuple, list)) else []
    a, b = (as_int(v) for v in pair) if len(pair) == 2 else (None, None)
    if a is None or b is None:
        raise TypeError(
            f"DiffusionLM.forward: output_range must be a pair of ints (a, b), got {output_range!r}"
        )
    if not 0 <= a < b <= S:
        raise ValueError(
            f"DiffusionLM.forward: output_range must satisfy 0 <= a < b <= {S} (the input's "
            f"length), got ({a}, {b})"
        )
    return slice(a, b)


def _sdpa_mask(attention_mask, cu_seqlens, B: int, S: int) -> Tensor | None:
    """(B, 1, S, S) bool for SDPA: keys must be real tokens and, when packed, in the same doc."""
    mask = None
    if attention_mask is not None:
        # A fully padded query row would attend to nothing (NaN): let padded queries see
        # everything; their output is zeroed afterwards.
        keys = attention_mask[:, None, None, :]
        mask = keys | ~attention_mask[:, None, :, None]
    if cu_seqlens is not None:
        flat = torch.zeros(B * S, dtype=torch.long, device=cu_seqlens.device)
        flat[cu_seqlens[1:-1].long()] = 1
        doc = flat.cumsum(0).view(B, S)
        same = (doc[:, :, None] == doc[:, None, :])[:, None]
        mask = same if mask is None else mask & same
    return mask
