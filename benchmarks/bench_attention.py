"""Benchmark bidirectional_attention against SDPA, FlexAttention and flash-attn.

TFLOP/s of the forward, the backward and both, for three masks: none, 30% padding (each row has
70% real tokens, alternately left- and right-padded) and block-causal (block 32). FLOPs count the
(query, key) pairs that are visible, so a kernel that skips padding is credited only with useful
work: fwd 4 * H * D * pairs, bwd 2.5x that (FlashAttention's convention), fwd+bwd 3.5x.

GPU: bf16, B = 16384 // S, H = 2048 // D, S in 512..16384, D 64 and 128 (quick: S 4096, D 128,
the issue's goal shape). CPU: tiny shapes, for a smoke run only. Every row of one run comes from
the same process and device, so ratios between providers are meaningful.

    python benchmarks/bench_attention.py --quick            # writes benchmarks/results/*.json
    from benchmarks.bench_attention import run; rows = run(quick=True, device="cuda")
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dlm_kernels  # noqa: E402
from benchmarks.common import check_time, machine, time_fn  # noqa: E402

MASKS = ("none", "padding30", "block32")
MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
# ours_atomic_dq: ours with deterministic=False (dQ by atomics in the dK/dV kernel); its forward
# is ours, so it has bwd and fwd+bwd rows only. "sdpa" is SDPA as a user gets it (the backend
# it picks is recorded in each row's "backend"); sdpa_flash and sdpa_cudnn pin one backend, for
# the unmasked case only (issue 5's goal names SDPA's flash backend; on Hopper SDPA may pick
# cuDNN's kernels instead, which are faster there).
PROVIDERS = ("ours", "ours_atomic_dq", "sdpa", "sdpa_flash", "sdpa_cudnn", "flex", "flash_attn")
PINNED = ("sdpa_flash", "sdpa_cudnn")


# ------------------------------------------------------------------ inputs and FLOPs
def _key_mask(B: int, S: int, device) -> torch.Tensor:
    """70% real tokens per row; even rows right-padded, odd rows left-padded (prompts)."""
    n_real = round(0.7 * S)
    idx = torch.arange(S, device=device)
    rows = [(idx < n_real) if b % 2 == 0 else (idx >= S - n_real) for b in range(B)]
    return torch.stack(rows)


def _visible_pairs(B: int, S: int, mask: str) -> int:
    if mask == "none":
        return B * S * S
    if mask == "padding30":
        return B * round(0.7 * S) ** 2
    bs = 32  # query i sees keys < (i // bs + 1) * bs
    return B * sum(min(S, (i // bs + 1) * bs) for i in range(S))


# ------------------------------------------------------------------ providers
def _ours(q, k, v, mask, key_mask, deterministic=True):
    kw = {"attention_mask": key_mask} if mask == "padding30" else {}
    if mask == "block32":
        kw["block_size"] = 32
    return lambda: dlm_kernels.bidirectional_attention(q, k, v, deterministic=deterministic, **kw)


def _ours_atomic_dq(q, k, v, mask, key_mask):
    return _ours(q, k, v, mask, key_mask, deterministic=False)


def _sdpa_args(q, k, v, mask, key_mask):
    # SDPA takes (B, H, S, D); the transposes are views. A boolean mask sends it off the flash
    # backend (efficient or math), which is the point of the comparison.
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    S = q.shape[1]
    attn_mask = None
    if mask == "padding30":
        attn_mask = key_mask[:, None, None, :]
    elif mask == "block32":
        i = torch.arange(S, device=q.device)
        attn_mask = (i[None, :] // 32) <= (i[:, None] // 32)
    return qt, kt, vt, attn_mask


def sdpa_backend(q, k, v, mask, key_mask) -> str | None:
    """The backend SDPA picks for these inputs ("FLASH_ATTENTION", "CUDNN_ATTENTION", ...)."""
    from torch.nn.attention import SDPBackend

    try:
        return SDPBackend(torch._fused_sdp_choice(*_sdpa_args(q, k, v, mask, key_mask))).name
    except Exception:  # a private function: its absence must not cost the figures
        return None


def _sdpa(q, k, v, mask, key_mask):
    qt, kt, vt, attn_mask = _sdpa_args(q, k, v, mask, key_mask)
    return lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask).transpose(1, 2)


def _sdpa_pinned(backend_name: str):
    def make(q, k, v, mask, key_mask):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        qt, kt, vt, _ = _sdpa_args(q, k, v, mask, key_mask)

        def run():
            # The backward runs the backend the forward chose: only the forward needs the pin.
            with sdpa_kernel(backend):
                try:
                    out = F.scaled_dot_product_attention(qt, kt, vt)
                except RuntimeError as e:  # "No viable backend ...": not on this device / shape
                    raise NotImplementedError(f"{backend_name}: {str(e)[:120]}") from e
            return out.transpose(1, 2)

        return run

    return make


_FLEX = None


def _flex(q, k, v, mask, key_mask):
    global _FLEX
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _FLEX is None:
        # Every (shape, mask, grad mode) is a recompile: past dynamo's default limit of 8 it
        # silently falls back to the unfused path, which materialises the scores (and OOMs).
        import torch._dynamo

        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)
        _FLEX = torch.compile(flex_attention, dynamic=False)
    B, S, H, _ = q.shape
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    block_mask = None
    if mask == "padding30":

        def mask_mod(b, h, qi, kj):
            return key_mask[b, kj] & key_mask[b, qi]

        block_mask = create_block_mask(mask_mod, B, None, S, S, device=q.device)
    elif mask == "block32":

        def mask_mod(b, h, qi, kj):
            return (kj // 32) <= (qi // 32)

        block_mask = create_block_mask(mask_mod, None, None, S, S, device=q.device)
    return lambda: _FLEX(qt, kt, vt, block_mask=block_mask)


def _flash_attn(q, k, v, mask, key_mask):
    import flash_attn  # noqa: F401  (ImportError -> "missing")
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if mask == "none":
        return lambda: flash_attn_func(q, k, v)
    if mask == "block32":
        raise NotImplementedError("flash-attn has no block-causal mask")
    # Padding: flash-attn's way is to pack the real tokens (varlen); packing is not timed.
    B, S = key_mask.shape
    lens = key_mask.sum(1, dtype=torch.int32)
    cu = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    qp, kp, vp = (t[key_mask].detach().requires_grad_(t.requires_grad) for t in (q, k, v))
    mx = int(lens.max())

    def run():
        for t in (qp, kp, vp):  # packed leaves of their own: fwd+bwd must not accumulate
            t.grad = None
        return flash_attn_varlen_func(qp, kp, vp, cu, cu, mx, mx)

    return run


_MAKERS = {"ours": _ours, "ours_atomic_dq": _ours_atomic_dq, "sdpa": _sdpa,
           "sdpa_flash": _sdpa_pinned("FLASH_ATTENTION"),
           "sdpa_cudnn": _sdpa_pinned("CUDNN_ATTENTION"), "flex": _flex,
           "flash_attn": _flash_attn}  # fmt: skip


# ------------------------------------------------------------------ timing
def _timed_fn(make, q, k, v, mask, key_mask, mode):
    """A zero-argument callable running ``mode`` for one provider."""
    if mode == "fwd":
        f = make(q, k, v, mask, key_mask)

        def fwd():
            with torch.no_grad():
                f()

        return fwd
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    f = make(*leaves, mask, key_mask)
    if mode == "bwd":
        out = f()
        g = torch.randn_like(out)

        def bwd():
            for t in leaves:
                t.grad = None
            out.backward(g, retain_graph=True)

        return bwd

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        f().sum().backward()

    return fwd_bwd


def _configs(quick: bool, device: str):
    if device != "cuda":
        return [(1, 256, 2, 64, torch.float32)]
    # The goal shape (D 128, S 4096) first, so that a run cut short by its budget still has it.
    if quick:
        pairs = [(128, 4096)]
    else:
        pairs = [(128, 4096), (128, 16384), (64, 4096), (128, 1024), (128, 512), (128, 2048),
                 (128, 8192), (64, 1024), (64, 16384)]  # fmt: skip
    return [(16384 // S, S, 2048 // D, D, torch.bfloat16) for D, S in pairs]


def run(quick: bool = True, device: str = "cuda") -> list[dict]:
    """Time every provider x mask x mode; one dict per measurement.

    Row keys: name, provider, shape, dtype, mask, mode, ms, ms_p20, ms_p80, tflops,
    peak_mem_mb (extra memory over the inputs, CUDA only), status ("ok", "missing",
    "unsupported: ...", "error: ..."), device; sdpa's rows add backend (the one SDPA picked).
    """
    dev = torch.device(device)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
    rows = []
    for B, S, H, D, dtype in _configs(quick, dev.type):
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=dtype) for _ in range(3))
        key_mask = _key_mask(B, S, dev)
        shape = f"B{B}-S{S}-H{H}-D{D}"
        for mask in MASKS:
            flops_fwd = 4.0 * H * D * _visible_pairs(B, S, mask)
            for provider in PROVIDERS:
                for mode in MODES:
                    if provider == "ours_atomic_dq" and mode == "fwd":
                        continue  # the same forward as ours
                    if provider in PINNED and mask != "none":
                        continue  # the goal compares the unmasked case only
                    row = dict(
                        name=f"attention-{mask}-{mode}", provider=provider, shape=shape,
                        dtype=str(dtype).replace("torch.", ""), mask=mask, mode=mode, ms=None,
                        ms_p20=None, ms_p80=None, tflops=None, peak_mem_mb=None, status="ok",
                        device=dev_name,
                    )  # fmt: skip
                    if provider == "sdpa":  # the choice can depend on whether grads are needed
                        g = mode != "fwd"
                        qkv = (t.detach().requires_grad_(g) for t in (q, k, v))
                        row["backend"] = sdpa_backend(*qkv, mask, key_mask)
                    try:
                        check_time()  # before the set-up: a provider's first call compiles
                        fn = _timed_fn(_MAKERS[provider], q, k, v, mask, key_mask, mode)
                        fn()  # compile / autotune outside the memory figure
                        if dev.type == "cuda":
                            torch.cuda.synchronize()
                            base = torch.cuda.memory_allocated()
                            torch.cuda.reset_peak_memory_stats()
                        fn()
                        if dev.type == "cuda":
                            torch.cuda.synchronize()
                            peak = torch.cuda.max_memory_allocated() - base
                            row["peak_mem_mb"] = round(peak / 2**20, 1)
                        row.update(time_fn(fn, dev.type, quick=quick))
                        row["tflops"] = flops_fwd * FLOP_FACTOR[mode] / (row["ms"] * 1e-3) / 1e12
                    except ImportError:
                        row["status"] = "missing"
                    except NotImplementedError as e:
                        row["status"] = f"unsupported: {e}"
                    except Exception as e:  # a provider failing must not hide the others
                        row["status"] = f"error: {type(e).__name__}: {str(e)[:200]}"
                    rows.append(row)
                    if row["status"] != "ok" and mode == "fwd":
                        # The same failure repeats for bwd and fwd+bwd: record it, skip timing.
                        for m in MODES[1:]:
                            rows.append({**row, "name": f"attention-{mask}-{m}", "mode": m})
                        break
        del q, k, v
    return rows


def _print(rows: list[dict]) -> None:
    ours = {
        (r["shape"], r["mask"], r["mode"]): r["ms"]
        for r in rows
        if r["provider"] == "ours" and r["ms"]
    }
    print(f"{'shape':<22}{'mask':<11}{'mode':<9}{'provider':<16}{'ms':>9}{'TFLOP/s':>9}"
          f"{'t/ours':>8}  status")  # fmt: skip
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] else "-"
        tf = f"{r['tflops']:.1f}" if r["tflops"] else "-"
        base = ours.get((r["shape"], r["mask"], r["mode"]))
        speed = f"{r['ms'] / base:.2f}" if base and r["ms"] else "-"
        backend = f"  ({r['backend']})" if r.get("backend") else ""
        print(f"{r['shape']:<22}{r['mask']:<11}{r['mode']:<9}{r['provider']:<16}{ms:>9}{tf:>9}"
              f"{speed:>8}  {r['status']}{backend}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the goal shape only")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = ap.parse_args()
    rows = run(args.quick, args.device)
    _print(rows)
    meta = {**machine(), "quick": args.quick}
    tag = "gpu" if args.device == "cuda" else "cpu"
    out = Path(args.out or Path(__file__).parent / "results" / f"attention_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
