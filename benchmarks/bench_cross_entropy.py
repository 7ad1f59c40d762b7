"""masked_cross_entropy vs the eager pattern of DLM trainers, forward + backward.

Baseline (eager): ``F.cross_entropy(logits[mask].float(), target[mask], reduction="none") *
weight``, then ``.sum() / n``, backward into the full logits (the float32 upcast as transformers'
loss does it); on bf16 also "eager-nocast", the same in the logits' dtype as LLaDA's guideline
writes it. Peer: ``torch.compile`` of the same loss written with static shapes (ignore_index at
rows without loss: it reads every row, twice the masked rows the others read in the forward,
which flatters our ratio against it). Ours: ``masked_cross_entropy``
through the dispatch (C++ on CPU, Triton on CUDA). Half the rows are masked, as in the
diffusion loss.

    python -m benchmarks.bench_cross_entropy [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import dlm_kernels
from benchmarks.common import OutOfTime, compiled, peak_memory_mb, row, time_fn

CPU_SHAPES = [(4096, 32000), (4096, 151936)]
GPU_SHAPES = [(8192, 32000), (8192, 151936)]
QUICK_SHAPES = [(64, 1003)]


def _eager(logits, target, mask, weight):
    loss = F.cross_entropy(logits[mask].float(), target[mask], reduction="none") * weight[mask]
    return loss.sum() / mask.sum().clamp_min(1)


def _eager_nocast(logits, target, mask, weight):
    # LLaDA's guideline: the loss in the logits' own dtype, no float32 copy of the masked rows
    # (bf16 on a GPU; on float32 inputs it is _eager, so it runs on CUDA only).
    loss = F.cross_entropy(logits[mask], target[mask], reduction="none") * weight[mask]
    return loss.sum() / mask.sum().clamp_min(1)


def _masked_rows_static(logits, target, mask, weight):
    # The same loss with static shapes (every row, ignore_index where no loss is carried), so
    # that torch.compile can fuse it whole; logits[mask] would break the graph.
    t = torch.where(mask, target, torch.full_like(target, -100))
    loss = F.cross_entropy(logits.float(), t, reduction="none") * weight
    return loss.sum() / mask.sum().clamp_min(1)


def _compiled(logits, target, mask, weight):
    """torch.compile of the eager composition (the peer a user gets for free)."""
    return compiled(_masked_rows_static)(logits, target, mask, weight)


def _ours(logits, target, mask, weight):
    return dlm_kernels.masked_cross_entropy(logits, target, mask, weight)


def _ours_grad_in_fwd(logits, target, mask, weight):
    # grad_in_forward overwrites its input, so it needs logits made by an op, not the leaf: the
    # clone stands in for the LM head that makes them, and its time (one more copy pass over
    # the logits) is counted against this provider.
    x = logits.clone()
    return dlm_kernels.masked_cross_entropy(x, target, mask, weight, grad_in_forward=True)


def _closures(fn, args):
    """(forward, forward+backward) callables of one provider on fixed inputs."""
    logits = args[0]

    def fwd():
        with torch.no_grad():
            return fn(*args)

    def fwd_bwd():
        logits.grad = None
        fn(*args).backward()

    return fwd, fwd_bwd


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    shapes = QUICK_SHAPES if quick else (GPU_SHAPES if device.startswith("cuda") else CPU_SHAPES)
    dtypes = [torch.bfloat16] if device.startswith("cuda") else [torch.float32]
    rows = []
    for N, V in shapes:
        for dtype in dtypes:
            g = torch.Generator(device="cpu").manual_seed(0)
            logits = torch.randn(N, V, generator=g).to(device=device, dtype=dtype)
            logits.requires_grad_(True)
            target = torch.randint(0, V, (N,), generator=g).to(device)
            mask = (torch.rand(N, generator=g) < 0.5).to(device)
            weight = (torch.rand(N, generator=g) + 0.5).to(device)
            n_valid = int(mask.sum())
            size = logits.element_size()
            # fwd reads the masked rows; bwd reads them again and writes every row's gradient.
            bytes_fwd = n_valid * V * size
            bytes_fb = 2 * n_valid * V * size + N * V * size
            providers = (
                ("eager", _eager),
                *((("eager-nocast", _eager_nocast),) if dtype != torch.float32 else ()),
                ("dlm_kernels", _ours),
                ("dlm_kernels grad_in_forward", _ours_grad_in_fwd),
                ("torch.compile", _compiled),
            )
            args = (logits, target, mask, weight)
            with torch.no_grad():  # every provider's loss against eager's (recorded per row)
                want = float(_eager(*args))
            for provider, fn in providers:
                fwd, fwd_bwd = _closures(fn, args)
                with torch.no_grad():
                    got = float(fn(logits.detach().clone(), target, mask, weight))
                check = {"loss_rel_diff_vs_eager": abs(got - want) / max(abs(want), 1e-30)}
                shape = f"N{N}-V{V}-masked{n_valid}"
                modes = [("fwd", fwd, bytes_fwd), ("fwd+bwd", fwd_bwd, bytes_fb)]
                if provider.endswith("grad_in_forward"):
                    modes = modes[1:]  # its forward alone is the plain forward
                for mode, f, nbytes in modes:
                    try:
                        t = time_fn(f, device, quick=quick)
                        peak = peak_memory_mb(f, device, grads=(logits,))
                    except OutOfTime:  # keep what was measured; the rest is marked skipped
                        rows.append(row(f"masked_cross_entropy {mode}", provider, shape, dtype,
                                        None, status="skipped: time budget"))  # fmt: skip
                        continue
                    rows.append(row(
                        f"masked_cross_entropy {mode}", provider, shape, dtype, t,
                        gbps=nbytes / (t["ms"] * 1e-3) / 1e9, peak_mem_mb=peak, **check,
                    ))  # fmt: skip
            logits.grad = None
    return rows


def main() -> None:
    from benchmarks.run import print_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    print_table(run(a.quick, a.device))


if __name__ == "__main__":
    main()
