"""Where the time goes: a torch.profiler table per op at the goal shapes, ours beside a baseline.

The benchmarks give one time per provider; where ours misses a goal (the masked cross-entropy
against torch.compile, the attention backward against SDPA, the fused head against the bare
matmul, the greedy step against the copy ceiling) the next step needs each kernel's share, and
GPU time is too rare to spend it finding out by hand. gpu_check.sh runs this last, with what is
left of its time: one table per case of the kernels' CUDA time over a few calls, after warm-up
calls outside the profile (Triton compiles, default tiles: DLM_KERNELS_AUTOTUNE=0).

    python -m benchmarks.profile_gpu [--out FILE] [--quick]   # CPU: toy shapes, CPU time

A case that fails is reported in the output and the others still run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dlm_kernels  # noqa: E402


def _cases(dev: torch.device, quick: bool):
    """(name, {provider: zero-argument callable}) at the goal shapes (toy ones off a GPU)."""
    cuda = dev.type == "cuda" and not quick
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False):
        t = torch.randn(*shape, generator=g).to(device=dev, dtype=dt)
        return t.requires_grad_(grad)

    # masked cross-entropy fwd+bwd (issue 2's GPU shape: 8192 rows, V 32000, half masked)
    N, V = (8192, 32000) if cuda else (64, 1003)
    logits = rand(N, V, grad=True)
    target = torch.randint(0, V, (N,), generator=g).to(dev)
    mask = (torch.rand(N, generator=g) < 0.5).to(dev)

    def ce_ours():
        logits.grad = None
        dlm_kernels.masked_cross_entropy(logits, target, mask).backward()

    def ce_eager():
        logits.grad = None
        F.cross_entropy(logits[mask].float(), target[mask]).backward()

    yield "masked_cross_entropy fwd+bwd", {"ours": ce_ours, "eager": ce_eager}

    # attention fwd+bwd (issue 5's goal shape, no mask)
    B, S, H, D = (4, 4096, 16, 128) if cuda else (1, 64, 2, 32)
    q, k, v = (rand(B, S, H, D, grad=True) for _ in range(3))

    def att_ours():
        dlm_kernels.bidirectional_attention(q, k, v).sum().backward()

    def att_sdpa():
        o = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        o.sum().backward()

    yield "bidirectional_attention fwd+bwd", {"ours": att_ours, "sdpa": att_sdpa}

    # greedy unmask step (issue 3's GPU shape: 8 x 512 masked rows, V 151936)
    Bs, L, Vs = (8, 512, 151936) if cuda else (2, 8, 1003)
    lg = rand(Bs * L, Vs)
    x = torch.full((Bs, L), Vs - 1, dtype=torch.int64, device=dev)

    def greedy_ours():
        dlm_kernels.unmask_step(x, lg, mask_id=Vs - 1, num_transfer=8)

    def greedy_amax():
        lg.amax(-1)

    yield "unmask_step greedy", {"ours": greedy_ours, "read floor (amax)": greedy_amax}

    # fused head greedy step against the bare matmul for its rows (H 3584: Dream 7B's width)
    Hd = 3584 if cuda else 40
    hidden = rand(Bs, L, Hd)
    W = rand(Vs, Hd) * Hd**-0.5
    xm = x.clone()
    xm[:, ::2] = 0  # half the positions masked

    def head_ours():
        dlm_kernels.fused_head_unmask_step(xm, hidden, W, mask_id=Vs - 1, num_transfer=8)

    rows = hidden[xm == Vs - 1]

    def head_matmul():
        rows @ W.t()

    yield "fused_head_unmask_step greedy", {"ours": head_ours, "bare matmul": head_matmul}


def run(device: str = "cuda", quick: bool = False, budget_s: float = 60.0) -> str:
    """The profile tables as text (stops starting new cases after ``budget_s`` seconds)."""
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sort = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    out = [f"# profile_gpu on {name}, torch {torch.__version__}"]
    t0 = time.monotonic()
    try:
        for case, providers in _cases(dev, quick):
            for provider, fn in providers.items():
                if time.monotonic() - t0 > budget_s:
                    out.append(f"\n## {case} / {provider}: skipped (time budget)")
                    continue
                try:
                    for _ in range(2):  # compiles and caches outside the profile
                        fn()
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    with profile(activities=acts) as prof:
                        for _ in range(3):
                            fn()
                        if dev.type == "cuda":
                            torch.cuda.synchronize()
                    table = prof.key_averages().table(
                        sort_by=sort, row_limit=12, max_name_column_width=60
                    )
                    out.append(f"\n## {case} / {provider} (3 calls)\n{table}")
                except Exception as e:  # one failing case must not hide the others
                    out.append(f"\n## {case} / {provider}: error {type(e).__name__}: {e}")
    except Exception:
        out.append("\n## set-up error\n" + traceback.format_exc(limit=3))
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="toy shapes")
    p.add_argument("--budget", type=float, default=60.0, help="seconds before no new case starts")
    p.add_argument("--out", default=None, help="write the tables here too")
    a = p.parse_args(argv)
    os.environ.setdefault("DLM_KERNELS_AUTOTUNE", "0")  # default tiles: no autotune compiles
    text = run(a.device, a.quick, a.budget)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
