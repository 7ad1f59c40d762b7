"""masked_linear_cross_entropy vs the ways DLM trainers compute the LM head + masked loss.

Providers (half of the rows carry loss, as in the diffusion loss; mean over them):
  dlm_kernels          masked_linear_cross_entropy(hidden, W, target, mask) (on CUDA, eager:
                       cuBLAS over vocabulary slabs)
  dlm_kernels-fused    the same through the fused Triton kernels (DLM_KERNELS_LCE=fused: the
                       path CUDA graphs and torch.compile take; GPU only)
  eager                full (N, V) logits, then F.cross_entropy(logits[mask].float(),
                       target[mask]) (LLaDA / Dream training code; the float32 upcast as
                       transformers' loss does it)
  gather-eager         F.cross_entropy(F.linear(hidden[mask], W).float(), target[mask])
  eager-nocast, gather-eager-nocast   the same two in the logits' dtype, as LLaDA's guideline
                       writes the loss (bf16 on a GPU; on float32 the rows above)
  torch.compile        torch.compile of the full-logits composition with ignore_index at rows
                       without loss (static shapes)
  torch-lce            F.linear_cross_entropy(hidden[mask], W, target[mask]) (options=None:
                       torch's reference path)
  torch-lce-chunked    the same with options=LinearCrossEntropyOptions() (torch's chunking)
  torch-lce-chunked-all  chunked, all N rows, ignore_index at rows without loss (no gather)
  liger                LigerFusedLinearCrossEntropyLoss on the gathered rows (GPU, if installed)
  cce                  cut_cross_entropy.linear_cross_entropy on the gathered rows (GPU, if
                       installed)

Modes: "fwd" (forward with grad-requiring inputs), "bwd" (backward alone, after an untimed
forward; CUDA events on the GPU) and "fwd+bwd". Providers that compute the gradients during the
forward (ours on the CPU, Liger) show a cheap "bwd" and a costly "fwd": compare "fwd+bwd".

Peak memory, "peak_mem_mb": the extra memory of one fwd+bwd above what the inputs hold, the
parameter gradients included. GPU: torch.cuda.max_memory_allocated above the baseline. CPU:
tracemalloc does not see torch's allocations and the profiler lost some frees, so each case runs
in a fresh child process with MALLOC_MMAP_THRESHOLD_=65536 (every large tensor is mmapped and
returned to the OS when freed, so the resident set follows the live tensors), and the figure is
VmHWM - VmRSS around the call, with VmHWM reset through /proc/self/clear_refs after a warm-up.

    python -m benchmarks.bench_linear_cross_entropy [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import dlm_kernels
from benchmarks.common import check_time, compiled, peak_memory_mb, row, status_kb, time_fn

# (tokens N, hidden H, vocabulary V). CPU goal: 2048 x 512 x 32000 float32 (issue 4); GPU goal:
# 16384 x 4096 x 151936 bf16.
CPU_SHAPES = [(2048, 512, 32000)]
GPU_SHAPES = [(16384, 4096, 151936), (8192, 4096, 32000)]
QUICK_CPU_SHAPES = [(64, 40, 1003)]  # toy: tests/test_benchmarks.py runs it in CI
QUICK_GPU_SHAPES = [(16384, 4096, 151936)]
P_MASK = 0.5


def _inputs(N, H, V, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    W = (torch.randn(V, H, generator=g) * H**-0.5).to(device=device, dtype=dtype)
    W.requires_grad_(True)
    target = torch.randint(0, V, (N,), generator=g).to(device)
    mask = (torch.rand(N, generator=g) < P_MASK).to(device)
    return hidden, W, target, mask


def _ours(hidden, W, target, mask):
    return dlm_kernels.masked_linear_cross_entropy(hidden, W, target, mask)


def _static_all_rows(hidden, W, target, mask):
    # Full logits and ignore_index at rows without loss: static shapes, one graph to compile.
    t = torch.where(mask, target, torch.full_like(target, -100))
    return F.cross_entropy(F.linear(hidden, W).float(), t, ignore_index=-100)


def _compiled(hidden, W, target, mask):
    """torch.compile of the full-logits composition (the peer a user gets for free)."""
    return compiled(_static_all_rows)(hidden, W, target, mask)


def _eager(hidden, W, target, mask):
    logits = F.linear(hidden, W)
    return F.cross_entropy(logits[mask].float(), target[mask])


def _gather_eager(hidden, W, target, mask):
    return F.cross_entropy(F.linear(hidden[mask], W).float(), target[mask])


# The same two in the logits' own dtype, as LLaDA's training guideline writes the loss (no
# float32 copy of the masked logits: on bf16 half the bytes of the upcasting rows above, which
# follow transformers' loss). On float32 inputs they are the rows above: CUDA only.
_SAME_ON_FP32 = "n/a: float32 inputs (the upcasting row is the same work)"


def _eager_nocast(hidden, W, target, mask):
    return F.cross_entropy(F.linear(hidden, W)[mask], target[mask])


def _gather_eager_nocast(hidden, W, target, mask):
    return F.cross_entropy(F.linear(hidden[mask], W), target[mask])


def _torch_lce(hidden, W, target, mask):
    return F.linear_cross_entropy(hidden[mask], W, target[mask])


def _torch_lce_chunked(hidden, W, target, mask):
    opts = torch.nn.LinearCrossEntropyOptions()
    return F.linear_cross_entropy(hidden[mask], W, target[mask], options=opts)


def _torch_lce_chunked_all(hidden, W, target, mask):
    opts = torch.nn.LinearCrossEntropyOptions()
    t = torch.where(mask, target, torch.full_like(target, -100))
    return F.linear_cross_entropy(hidden, W, t, ignore_index=-100, options=opts)


def _liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss()
    return lambda hidden, W, target, mask: loss_fn(W, hidden[mask], target[mask])


def _cce():
    from cut_cross_entropy import linear_cross_entropy

    return lambda hidden, W, target, mask: linear_cross_entropy(hidden[mask], W, target[mask])


def _providers(device):
    out = [
        ("dlm_kernels", _ours),
        # The same call with DLM_KERNELS_LCE=fused, which run() sets around this provider (the
        # ops choose their path when they run, forward and backward).
        ("dlm_kernels-fused", _ours if device.startswith("cuda") else "n/a: CUDA only"),
        ("eager", _eager),
        ("gather-eager", _gather_eager),
        ("eager-nocast", _eager_nocast if device.startswith("cuda") else _SAME_ON_FP32),
        ("gather-eager-nocast",
         _gather_eager_nocast if device.startswith("cuda") else _SAME_ON_FP32),
        ("torch-lce", _torch_lce if hasattr(F, "linear_cross_entropy") else None),
        ("torch-lce-chunked", _torch_lce_chunked if hasattr(F, "linear_cross_entropy") else None),
        ("torch-lce-chunked-all",
         _torch_lce_chunked_all if hasattr(F, "linear_cross_entropy") else None),
        ("torch.compile", _compiled),  # last of the CPU peers: its compile is the slowest
    ]  # fmt: skip
    peers = []
    for name, make in (("liger", _liger), ("cce", _cce)):
        if not device.startswith("cuda"):
            peers.append((name, "missing: Triton/CUDA-only library, no CPU path"))
            continue
        try:
            peers.append((name, make()))
        except Exception as e:  # not installed, or an import-time failure
            peers.append((name, f"missing: {type(e).__name__}: {e}"))
    if not device.startswith("cuda"):
        return out + peers
    # On a GPU the peers come right after the eager baselines, and the fused Triton path (about
    # 0.6 s per fwd+bwd at the V 151936 goal shape on an H100) after them: a time budget that
    # runs out then skips what matters least (session 9's gpu_check never reached the peers).
    first = [p for p in out if p[0] in ("dlm_kernels", "eager", "gather-eager",
                                        "gather-eager-nocast")]  # fmt: skip
    return first + peers + [p for p in out if p not in first]


def _fwd_bwd(fn, hidden, W, target, mask):
    def step():
        hidden.grad = None
        W.grad = None
        fn(hidden, W, target, mask).backward()

    return step


def _fwd(fn, hidden, W, target, mask):
    def step():
        return fn(hidden, W, target, mask)

    return step


def _time_bwd(fn, hidden, W, target, mask, device, quick) -> dict:
    """Median / p20 / p80 ms of loss.backward() alone, each after an untimed forward."""
    import statistics
    import time

    check_time()
    on_gpu = device.startswith("cuda")
    reps = (5 if quick else 10) if on_gpu else (2 if quick else 5)
    times = []
    for i in range(reps + 1):  # the first is a warm-up
        hidden.grad = W.grad = None
        loss = fn(hidden, W, target, mask)
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            loss.backward()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            loss.backward()
            ms = (time.perf_counter() - t0) * 1e3
        if i:
            times.append(ms)
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return {"ms": statistics.median(times), "ms_p20": q[0], "ms_p80": q[3]}


# ---------------------------------------------------------------------------------------------
# CPU peak memory: one case per child process (see the module docstring)
# ---------------------------------------------------------------------------------------------
def _child_peak(provider: str, N: int, H: int, V: int, dtype: str) -> None:
    """Runs in the child: prints {"peak_mem_mb": ...} for one fwd+bwd of ``provider``."""
    fn = dict(_providers("cpu"))[provider]
    hidden, W, target, mask = _inputs(N, H, V, getattr(torch, dtype), "cpu")
    step = _fwd_bwd(fn, hidden, W, target, mask)
    step()  # warm-up: lazy initialisation, thread pools
    hidden.grad = None
    W.grad = None
    base = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    fn(hidden, W, target, mask).backward()
    print(json.dumps({"peak_mem_mb": (status_kb("VmHWM") - base) / 1024}))


def _cpu_peak_mb(provider, N, H, V, dtype) -> float | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "benchmarks.bench_linear_cross_entropy", "--_peak-child",
           provider, str(N), str(H), str(V), str(dtype).replace("torch.", "")]  # fmt: skip
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=600)
        return json.loads(res.stdout.strip().splitlines()[-1])["peak_mem_mb"]
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
OP = "masked_linear_cross_entropy"


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    on_gpu = device.startswith("cuda")
    if on_gpu:
        shapes = QUICK_GPU_SHAPES if quick else GPU_SHAPES
    else:
        shapes = QUICK_CPU_SHAPES if quick else CPU_SHAPES
    dtype = torch.bfloat16 if on_gpu else torch.float32
    rows = []
    for N, H, V in shapes:
        shape = f"N{N}-H{H}-V{V}-p{P_MASK}"
        hidden, W, target, mask = _inputs(N, H, V, dtype, device)
        full_logits_mb = N * V * hidden.element_size() / 2**20
        with torch.no_grad():  # every provider's loss against this one (recorded per row)
            want = float(_gather_eager(hidden, W, target, mask))
        for provider, fn in _providers(device):
            if not callable(fn):
                reason = fn or "missing: torch has no F.linear_cross_entropy"
                for mode in ("fwd", "bwd", "fwd+bwd"):
                    rows.append(row(f"{OP} {mode}", provider, shape, dtype, None, status=reason))
                continue
            # Each figure on its own: a mode that fails (out of memory, out of time) is recorded
            # without losing the ones measured before it.
            timings, status = {}, {}
            prev_choice = os.environ.get("DLM_KERNELS_LCE")
            if provider == "dlm_kernels-fused":
                os.environ["DLM_KERNELS_LCE"] = "fused"
            steps = {
                "fwd+bwd": _fwd_bwd(fn, hidden, W, target, mask),
                "fwd": _fwd(fn, hidden, W, target, mask),
            }
            check = {}
            try:
                with torch.no_grad():
                    got = float(fn(hidden, W, target, mask))
                check["loss_rel_diff_vs_gather_eager"] = abs(got - want) / max(abs(want), 1e-30)
            except Exception:  # the timing below records the failure
                pass
            for mode in ("fwd+bwd", "fwd", "bwd"):
                try:
                    if mode == "bwd":
                        timings[mode] = _time_bwd(fn, hidden, W, target, mask, device, quick)
                    else:
                        timings[mode] = time_fn(steps[mode], device, quick=quick)
                except Exception as e:  # a peer failing at this shape (e.g. out of memory)
                    status[mode] = f"error: {type(e).__name__}: {e}"[:200]
                    if on_gpu:
                        torch.cuda.empty_cache()
            peak = None
            try:
                if on_gpu and "fwd+bwd" in timings:
                    peak = peak_memory_mb(_fwd_bwd(fn, hidden, W, target, mask), device,
                                          grads=(hidden, W))  # fmt: skip
                elif not on_gpu and not quick and "fwd+bwd" in timings:
                    check_time()  # a child process per case costs seconds
                    peak = _cpu_peak_mb(provider, N, H, V, dtype)
            except Exception:
                peak = None
            if prev_choice is None:
                os.environ.pop("DLM_KERNELS_LCE", None)
            else:
                os.environ["DLM_KERNELS_LCE"] = prev_choice
            extra = dict(peak_mem_mb=peak, full_logits_mb=full_logits_mb, device=device, **check)
            for mode in ("fwd", "bwd", "fwd+bwd"):
                if mode in timings:
                    rows.append(row(f"{OP} {mode}", provider, shape, dtype, timings[mode], **extra))
                else:
                    rows.append(row(f"{OP} {mode}", provider, shape, dtype, None,
                                    status=status[mode]))  # fmt: skip
        hidden.grad = W.grad = None
        if on_gpu:
            torch.cuda.empty_cache()
    return rows


def _table(rows):
    lines = [f"{'mode':8} {'provider':24} {'shape':28} {'ms':>10} {'p20':>10} {'p80':>10} "
             f"{'peak MB':>9}  status"]  # fmt: skip
    for r in rows:
        ms = [f"{r[k]:10.1f}" if r.get(k) is not None else f"{'-':>10}"
              for k in ("ms", "ms_p20", "ms_p80")]  # fmt: skip
        pk = r.get("peak_mem_mb")
        pk = f"{pk:9.1f}" if pk is not None else f"{'-':>9}"
        lines.append(f"{r['name']:8} {r['provider']:24} {r['shape']:28} {' '.join(ms)} {pk}  "
                     f"{r['status']}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_peak-child":
        _, _, provider, N, H, V, dtype = sys.argv
        _child_peak(provider, int(N), int(H), int(V), dtype)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    rows = run(args.quick, args.device)
    print(_table(rows))
    if args.json:
        from benchmarks.common import machine

        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
