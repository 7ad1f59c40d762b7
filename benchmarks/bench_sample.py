"""Generation throughput: dlm.sampler.generate against a plain PyTorch loop written the way
LLaDA's generate.py is (full float64 softmax and Gumbel noise over the whole (B, L, V) logits,
a Python top-k per row), on the same model, checked to give the same tokens (temperature 0,
low_confidence remasking).

    python -m benchmarks.bench_sample [--device cpu|cuda] [--quick]

CPU: a tiny character-level model (the demo's shape). GPU: a 1B-shaped random model (the "1b"
preset: d_model 2048, 16 layers, vocabulary 126464) in bfloat16, prompt 64, gen_length 256,
64 steps, block_length 32, batch 1 and 8, without and with Fast-dLLM's prefix / dual KV cache
(when the model supports kv_cache=; otherwise those rows say "missing"), and on a GPU with the
forward replayed from CUDA graphs (generate's cuda_graph=True).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import (
    OutOfTime,
    check_time,
    row,
    save_rows,
    standalone_args,
    time_fn,
    time_fns,
    vs_baseline,
)
from dlm.config import ModelConfig, get_preset
from dlm.cuda_graph import graphed_forward
from dlm.model import DiffusionLM
from dlm.sampler import _accepts, generate


@torch.no_grad()
def llada_style_loop(model, prompt, steps, gen_length, block_length, mask_id):
    """The baseline: LLaDA's generate.py loop at temperature 0 with low_confidence remasking."""
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    n_blocks = gen_length // block_length
    spb = steps // n_blocks
    for blk in range(n_blocks):
        lo, hi = P + blk * block_length, P + (blk + 1) * block_length
        n = (x[:, lo:hi] == mask_id).sum(1, keepdim=True)
        plan = (n // spb).repeat(1, spb)
        for b in range(B):
            plan[b, : int(n[b] % spb)] += 1
        for i in range(spb):
            masked = x == mask_id
            logits = model(x)
            # A trained model never predicts the mask; a random one may: forbid it, as our
            # sampler does, so that both give the same tokens.
            logits[..., mask_id] = float("-inf")
            logits64 = logits.to(torch.float64)
            noise = torch.rand_like(logits64)  # LLaDA draws it even at temperature 0
            x0 = torch.argmax(logits64.exp() / (-torch.log(noise)) ** 0.0, dim=-1)
            p = F.softmax(logits64, dim=-1)
            conf = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            conf[:, hi:] = float("-inf")
            x0 = torch.where(masked, x0, x)
            conf = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
            take = torch.zeros_like(x0, dtype=torch.bool)
            for b in range(B):
                take[b, torch.topk(conf[b], int(plan[b, i])).indices] = True
            x[take] = x0[take]
    return x


def _models(device: str, quick: bool):
    """(name, model, mask_id, dtype, cases) with cases (B, P, G, steps, block_length)."""
    torch.manual_seed(0)
    if device.startswith("cuda"):
        cfg = get_preset("1b").model
        with torch.device(device):  # initialise on the GPU: seconds, not a CPU minute
            m = DiffusionLM(cfg).to(dtype=torch.bfloat16).eval()
        yield (
            "1b",
            m,
            cfg.mask_token_id,
            torch.bfloat16,
            # Batch 8 first: the goal shape, measured before the budget can run out.
            [(8, 64, 256, 64, 32), (1, 64, 256, 64, 32)],
        )
        return
    # The demo's character model, then the same body with a BPE-sized vocabulary (32k), where
    # the loop's float64 passes over (B, L, V) start to cost as much as the model.
    for vocab in (67, 32768):
        cfg = ModelConfig(vocab_size=vocab, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2,
                          max_seq_len=256, mask_token_id=vocab - 1, init_std=0.3)  # fmt: skip
        cases = [(1, 16, 64, 32, 32), (4, 16, 64, 32, 32), (8, 16, 64, 32, 32)]
        if quick:
            # CI's toy run only keeps the code from rotting: one batched case, 8 steps (the
            # LLaDA-style baseline's float64 passes over (B, L, V) took 54 of its 66 s).
            cases = [(4, 16, 64, 8, 32)]
        yield f"tiny-V{vocab}", DiffusionLM(cfg).eval(), vocab - 1, torch.float32, cases


def _providers(name, model, mask_id, device, B, P, G, steps, bl):
    """(shape, tokens/s from a timing, eager providers, graphed providers, kv caches) of one
    case; a provider is (name, call, extra figures after timing). The baseline and our eager
    output are computed here, once."""
    shape = f"{name}-B{B}-P{P}-G{G}-S{steps}-BL{bl}"
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, mask_id - 1, (B, P), generator=g).to(device)
    ref = llada_style_loop(model, prompt, steps, G, bl, mask_id)

    def ours(kv=None, graph=False):
        return generate(model, prompt, gen_length=G, steps=steps, block_length=bl,
                        mask_id=mask_id, kv_cache=kv, cuda_graph=graph)  # fmt: skip

    def tps(t):
        return B * G / (t["ms"] / 1e3)

    out = ours()
    kvs = ["prefix", "dual"] if _accepts(model, "kv_cache") else []

    def agree(a, b) -> float:
        return float((a == b).float().mean())

    # Eager rows, then, on a GPU, the forward replayed from CUDA graphs (dlm.cuda_graph: one
    # graph per block window and cached step, captured in the warm-up call, replayed in the
    # timed calls).
    eager = [
        ("torch", lambda: llada_style_loop(model, prompt, steps, G, bl, mask_id), dict),
        ("dlm", ours, lambda: dict(same_tokens_as_baseline=bool((out == ref).all()))),
    ]
    eager += [(f"dlm+{kv}-cache", lambda kv=kv: ours(kv),
               lambda kv=kv: dict(token_agreement_vs_no_cache=agree(ours(kv), out)))
              for kv in kvs]  # fmt: skip
    graphed = [("dlm+cuda-graph" + (f"+{kv}-cache" if kv else ""),
                lambda kv=kv: ours(kv, graph=True),
                lambda kv=kv: dict(token_agreement_vs_eager=agree(ours(kv, graph=True),
                                                                  ours(kv)),
                                   graphs_captured=graphed_forward(model).captures))
               for kv in [None, *kvs]]  # fmt: skip
    return shape, tps, eager, graphed, kvs


def _missing_cache_rows(shape, dtype) -> list[dict]:
    return [row("sample", f"dlm+{kv}-cache", shape, dtype, None,
                status="missing: DiffusionLM.forward takes no kv_cache")
            for kv in ("prefix", "dual")]  # fmt: skip


def _cpu_case(name, model, mask_id, dtype, device, quick, B, P, G, steps, bl) -> list[dict]:
    shape, tps, eager, graphed, kvs = _providers(name, model, mask_id, device, B, P, G, steps, bl)
    rows = []
    # Every provider timed in one interleaved loop: the ratios are between calls made side by
    # side, not between blocks of calls minutes apart on a shared machine.
    times = time_fns([fn for _, fn, _ in eager], device, quick=quick)
    for (prov, _, extra), t in zip(eager, times):
        rows.append(row("sample", prov, shape, dtype, t, tokens_per_s=tps(t), **extra()))
    for prov, _, _ in graphed:
        rows.append(row("sample", prov, shape, dtype, None,
                        status="missing: CUDA graphs need a GPU"))  # fmt: skip
    return rows + ([] if kvs else _missing_cache_rows(shape, dtype))


def gpu_order(cases: list[tuple[list, list]]) -> list:
    """The GPU's timing order over cases given as (core jobs, cache jobs): the core jobs of
    every case (the baseline, our eager run, our graphed run: the issue's goal rows, batch 8
    first), then the cache jobs of every case, so the budget reaches batch 1's core rows
    before batch 8's cache rows (session 15's run skipped all of batch 1)."""
    return [j for core, _ in cases for j in core] + [j for _, cache in cases for j in cache]


def _gpu_jobs(name, model, mask_id, device, B, P, G, steps, bl) -> tuple[list, list]:
    """(core jobs, cache jobs) of one GPU case; a job is (shape, provider, call, extra, tps).
    Graphs right after the eager rows they compare with, dual before prefix."""
    shape, tps, eager, graphed, kvs = _providers(name, model, mask_id, device, B, P, G, steps, bl)
    core = eager[:2] + [graphed[0]]
    cache = [
        p for kv in ("dual", "prefix") for p in graphed + eager if p[0].endswith(f"+{kv}-cache")
    ]
    return ([(shape, *p, tps) for p in core], [(shape, *p, tps) for p in cache])


def run(quick: bool, device: str) -> list[dict]:
    rows = []
    check_time()
    cuda = device.startswith("cuda")
    for name, model, mask_id, dtype, cases in _models(device, quick):
        plans = []
        for B, P, G, steps, bl in cases:
            try:
                if cuda:
                    plans.append(_gpu_jobs(name, model, mask_id, device, B, P, G, steps, bl))
                    if not plans[-1][1]:  # no kv_cache= on this model
                        rows += _missing_cache_rows(plans[-1][0][0][0], dtype)
                else:
                    rows += _cpu_case(
                        name, model, mask_id, dtype, device, quick, B, P, G, steps, bl
                    )
            except OutOfTime:  # keep the cases measured so far; record the rest as skipped
                shape = f"{name}-B{B}-P{P}-G{G}-S{steps}-BL{bl}"
                rows.append(row("sample", "-", shape, dtype, None, status="skipped: time budget"))
        # GPU: one by one; a job the budget does not reach is recorded as skipped, the ones
        # measured are kept.
        for shape, prov, fn, extra, tps in gpu_order(plans):
            try:
                t = time_fn(fn, device, quick=quick)
            except OutOfTime:
                rows.append(row("sample", prov, shape, dtype, None, status="skipped: time budget"))
                continue
            rows.append(row("sample", prov, shape, dtype, t, tokens_per_s=tps(t), **extra()))
    return rows


def main(argv=None) -> int:
    a = standalone_args(__doc__, argv)
    rows = run(a.quick, a.device)
    for r, sp in vs_baseline(rows):
        tok = f"{r.get('tokens_per_s', 0):10.1f} tok/s" if r["status"] == "ok" else ""
        print(f"{r['shape']:36s} {r['provider']:18s} {tok:>18s}  {sp}")
    save_rows(a.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
