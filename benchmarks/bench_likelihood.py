"""Likelihood evaluation: dlm.likelihood.conditional_nll (LLaDA's Monte-Carlo estimate of
-log p(answer | prompt), what lm-eval multiple-choice tasks run) on DiffusionLM, against the same
estimate computed the way LLaDA's get_log_likelihood does: the model's full logits over every
position of every draw, then the cross-entropy at the masked positions.

    python -m benchmarks.bench_likelihood [--device cpu|cuda] [--quick]

Ours scores the masked answer positions from the hidden states with the fused linear
cross-entropy (no (draws, S, V) logits) and runs the last layer only over the answers' span.
Both providers give the same estimate (float32 cross-entropy either way); the rows say how far
apart they are. CPU: the 4-layer tiny body with a 32768-token vocabulary. GPU: the "1b" preset
(d_model 2048, 16 layers, vocabulary 126464) in bfloat16. Peak memory above the inputs: the
CUDA allocator's on GPU; on CPU the peak resident set of one call in a fresh child process
(glibc returns freed blocks of 64 KiB and more to the system there, so earlier calls' freed
memory cannot hide a peak).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from benchmarks.common import (
    OutOfTime,
    check_time,
    past_deadline,
    peak_memory_mb,
    row,
    save_rows,
    standalone_args,
    status_kb,
    time_fns,
    vs_baseline,
)
from dlm.config import ModelConfig, get_preset
from dlm.likelihood import conditional_nll
from dlm.model import DiffusionLM


class LogitsOnly(torch.nn.Module):
    """The model behind a forward with neither return_hidden nor output_range: the estimate then
    takes the plain path (full logits, as LLaDA's evaluation code)."""

    def __init__(self, model: DiffusionLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.model(input_ids, attention_mask, position_ids)


def _setup(device: str, quick: bool):
    """(name, model, mask_id, dtype, (rows, prompt, answer, mc_num, batch_size))."""
    torch.manual_seed(0)
    if device.startswith("cuda"):
        cfg = get_preset("1b").model
        with torch.device(device):
            model = DiffusionLM(cfg).to(dtype=torch.bfloat16).eval()
        case = (2, 64, 16, 4, 4) if quick else (8, 448, 64, 16, 16)
        return "1b", model, cfg.mask_token_id, torch.bfloat16, case
    V = 32768
    cfg = ModelConfig(vocab_size=V, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2,
                      max_seq_len=256, mask_token_id=V - 1, init_std=0.3)  # fmt: skip
    case = (2, 24, 8, 2, 2) if quick else (4, 96, 32, 8, 8)
    return f"tiny-V{V}", DiffusionLM(cfg).eval(), V - 1, torch.float32, case


def _providers(device: str, quick: bool):
    """(name, shape, dtype, [(provider, fn)], the model) of the case."""
    name, model, mask_id, dtype, (B, P, A, mc, bs) = _setup(device, quick)
    shape = f"{name}-B{B}-P{P}-A{A}-mc{mc}-bs{bs}"
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, mask_id - 1, (B, P), generator=g).to(device)
    answer = torch.randint(0, mask_id - 1, (B, A), generator=g).to(device)
    kw = dict(mask_id=mask_id, mc_num=mc, batch_size=bs, seed=0)
    plain = LogitsOnly(model)
    providers = [
        ("torch", lambda: conditional_nll(plain, prompt, answer, **kw)),
        ("dlm", lambda: conditional_nll(model, prompt, answer, **kw)),
    ]
    return shape, dtype, providers, model, (B, P, A, mc, bs)


def _child_peak(provider: str, quick: bool) -> None:
    """Runs in the child: prints {"peak_mem_mb": ...} for one call of ``provider``."""
    fn = dict(_providers("cpu", quick)[2])[provider]
    fn()  # warm-up: lazy initialisation, thread pools
    base = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    fn()
    print(json.dumps({"peak_mem_mb": (status_kb("VmHWM") - base) / 1024}))


def _cpu_peak_mb(provider: str, quick: bool) -> float | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "benchmarks.bench_likelihood", "--_peak-child", provider]
    cmd += ["--quick"] if quick else []
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=300)
        return json.loads(res.stdout.strip().splitlines()[-1])["peak_mem_mb"]
    except Exception:
        return None


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    check_time()
    op = "conditional_nll"
    shape, dtype, providers, model, (B, P, A, mc, bs) = _providers(device, quick)
    try:
        ref = providers[0][1]()
        out = providers[1][1]()
        times = time_fns([fn for _, fn in providers], device, quick=quick)
    except OutOfTime:
        return [row(op, p, shape, dtype, None, status="skipped: time budget") for p, _ in providers]
    rel = float(((out - ref).abs() / ref.abs()).max())
    logits_mb = bs * (P + A) * model.cfg.vocab_size * torch.finfo(dtype).bits / 8 / 2**20
    rows = []
    for (provider, fn), t in zip(providers, times):
        extra = {"tokens_scored_per_s": B * mc * A / (t["ms"] / 1e3),
                 "one_chunk_of_logits_mb": logits_mb}  # fmt: skip
        if device.startswith("cuda"):
            extra["peak_mem_mb"] = peak_memory_mb(fn, device)
        elif os.path.exists("/proc/self/clear_refs") and not past_deadline():
            extra["peak_mem_mb"] = _cpu_peak_mb(provider, quick)  # a child costs seconds
        if provider == "dlm":
            extra["max_rel_diff_vs_baseline"] = rel
        rows.append(row(op, provider, shape, dtype, t, **extra))
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_peak-child"]:
        _child_peak(argv[1], "--quick" in argv)
        return 0
    a = standalone_args(__doc__, argv)
    rows = run(a.quick, a.device)
    for r, sp in vs_baseline(rows):
        ok = r["status"] == "ok"
        ms = f"{r['ms']:9.1f} ms" if ok else ""
        mem = f"{r['peak_mem_mb']:8.0f} MB" if r.get("peak_mem_mb") is not None else ""
        diff = (
            f"rel diff {r['max_rel_diff_vs_baseline']:.1e}"
            if "max_rel_diff_vs_baseline" in r
            else ""
        )
        print(f"{r['shape']:40s} {r['provider']:6s} {ms:>12s} {mem:>11s}  {sp}  {diff}")
    save_rows(a.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
