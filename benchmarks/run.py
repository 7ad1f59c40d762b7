"""Run every benchmark and write the figures: JSON (all of them) and a markdown table.

    python -m benchmarks.run [--device cpu|cuda] [--quick] [--out DIR] [--only NAME ...]

Each ``benchmarks/bench_<op>.py`` exposes ``run(quick, device) -> list[dict]``. A benchmark
whose module fails to import or raises is recorded as a row with status "error", never dropped;
a peer library that is not installed is a row with status "missing", never a zero.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import signal
import sys
import time
import traceback

import torch

from benchmarks import common
from benchmarks.common import OutOfTime, machine, set_deadline

BENCHES = [
    "bench_cross_entropy",
    "bench_linear_cross_entropy",
    "bench_unmask_sample",
    "bench_likelihood",  # before sample: a few seconds, where sample's later cases take minutes
    "bench_sample",
    "bench_attention",  # last on the CPU: 3 s there
]
# On CUDA attention runs first: its goal shape autotunes 3 kernels x 3 masks (~57 s of compiles
# on the H200, gpu-h200-2026-11-28-s15-run2-autotune.txt) before anything is timed, and as the
# last module it was left 45 s and recorded nothing (gpu-h200-2026-11-28-s15-run1).
CUDA_FIRST = ("bench_attention",)
# Shares of --budget. GPU: attention has the most cases (sizes x masks x providers x modes) and
# autotunes its tiles at the first call of each shape class. CUDA, 2026-11-28 (H200, 225 s):
# CE 28 s, LCE 49 s, unmask 42 s, likelihood 12 s, sample 50 s, all at their goal shapes first.
# CPU: roughly each module's share of a full run (2-core EPYC, 2026-11-27: CE 173 s, LCE 328 s,
# unmask 47 s (98 s with the greedy-margin case), sample 497 s, attention 3 s), sample held
# back: its larger cases matter least, unmask's goal shapes (issue 3's CPU goal) most.
WEIGHTS = {
    "cuda": {"bench_attention": 4.0, "bench_linear_cross_entropy": 2.0, "bench_unmask_sample": 2.0,
             "bench_sample": 2.0, "bench_likelihood": 0.7},
    "cpu": {"bench_cross_entropy": 1.7, "bench_linear_cross_entropy": 3.3,
            "bench_unmask_sample": 1.0, "bench_sample": 2.0, "bench_likelihood": 0.5,
            "bench_attention": 0.1},
}  # fmt: skip


def order(names: list[str], device: str) -> list[str]:
    """The modules in the order they run: on CUDA those in CUDA_FIRST lead."""
    if not device.startswith("cuda"):
        return list(names)
    return [n for n in names if n in CUDA_FIRST] + [n for n in names if n not in CUDA_FIRST]


# The provider each speed-up is against ("matmul": the fused-head rows, the LM head alone).
BASELINES = ("eager", "reference", "sdpa", "torch", "matmul")


def ratios(rows: list[dict]) -> None:
    """Add ``speedup``: each row's time against the baseline row of the same case and mode."""
    base = {}
    for r in rows:
        if r.get("status") == "ok" and r["provider"] in BASELINES:
            base.setdefault((r["name"], r["shape"], r["dtype"]), r["ms"])
    for r in rows:
        b = base.get((r["name"], r["shape"], r["dtype"]))
        if b and r.get("status") == "ok":
            r["speedup_vs_baseline"] = b / r["ms"]


def fractions(rows: list[dict]) -> None:
    """Add each row's share of the card's ceilings (copy GB/s, matmul TFLOP/s) from this run."""
    ceil = {r["name"]: r for r in rows if r["name"].startswith("ceiling:") and r["status"] == "ok"}
    bw = ceil.get("ceiling: copy", {}).get("gbps")
    fl = ceil.get("ceiling: matmul", {}).get("tflops")
    for r in rows:
        if r["name"].startswith("ceiling:") or r.get("status") != "ok":
            continue
        if bw and r.get("gbps"):
            r["frac_of_copy_bw"] = r["gbps"] / bw
        if fl and r.get("tflops"):
            r["frac_of_matmul"] = r["tflops"] / fl


def table(rows: list[dict]) -> str:
    cols = [
        "name",
        "provider",
        "shape",
        "dtype",
        "status",
        "ms",
        "speedup_vs_baseline",
        "gbps",
        "frac_of_copy_bw",
        "tflops",
        "frac_of_matmul",
        "peak_mem_mb",
    ]
    if any(r.get("backend") for r in rows):  # SDPA's pick (bench_attention)
        cols.append("backend")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if isinstance(v, float):
                v = f"{v:.3g}" if c != "ms" else f"{v:.3f}"
            cells.append("" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(rows: list[dict]) -> None:
    ratios(rows)
    fractions(rows)
    print(table(rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="toy sizes, one iteration")
    p.add_argument("--out", default=None, help="folder for results (default benchmarks/results)")
    p.add_argument("--only", nargs="*", default=None, help="benchmark module names to run")
    p.add_argument("--no-ceilings", action="store_true", help="skip the copy/matmul ceilings")
    p.add_argument(
        "--budget", type=float, default=None,
        help="seconds for all benchmarks, shared by weight; cases past a module's share are "
        "recorded as 'skipped: time budget' (the goal shapes run first)",
    )  # fmt: skip
    a = p.parse_args(argv)
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out, exist_ok=True)
    rows: list[dict] = []
    failed = False
    info = machine()
    if not a.no_ceilings:
        try:
            from benchmarks import ceilings

            rows.extend(ceilings.measure(a.device, a.quick))
        except Exception as e:  # the kernels' own figures still count without the ceilings
            failed = True
            traceback.print_exc()
            rows.append(
                {
                    "name": "ceilings",
                    "provider": "-",
                    "shape": "-",
                    "dtype": "-",
                    "status": f"error: {type(e).__name__}: {e}"[:300],
                }
            )
    names = order(a.only or BENCHES, a.device)
    t_start = time.monotonic()

    writing = [False]

    def on_term(signum, frame):
        # `timeout` (gpu_check.sh's backstop) sends SIGTERM: spend the budget for good and stop
        # the case in flight, so that the module returns the rows it has, they are written and
        # the table printed before the KILL that follows (a write in progress finishes).
        common.expire()
        if not writing[0]:
            raise OutOfTime("SIGTERM: the run's time is up")

    prev_term = signal.signal(signal.SIGTERM, on_term)
    for i, name in enumerate(names):
        if a.budget is not None:
            # This module's share of what is left, so time one module leaves unused goes on.
            left = a.budget - (time.monotonic() - t_start)
            wts = WEIGHTS["cuda" if a.device.startswith("cuda") else "cpu"]
            share = wts.get(name, 1.0) / sum(wts.get(n, 1.0) for n in names[i:])
            set_deadline(max(left * share, 0.0))
        t_mod = time.monotonic()
        try:
            mod = importlib.import_module(f"benchmarks.{name}")
            got = mod.run(quick=a.quick, device=a.device)
            for r in got:
                if "OutOfTime" in str(r.get("status", ""))[:40]:
                    r["status"] = "skipped: time budget"
            rows.extend(got)
            print(f"{name}: {len(got)} rows in {time.monotonic() - t_mod:.0f} s", file=sys.stderr,
                  flush=True)  # fmt: skip
        except OutOfTime:  # a module without per-case handling: its finished rows are lost
            rows.append(dict(name=name, provider="-", shape="-", dtype="-",
                             status="skipped: time budget"))  # fmt: skip
        except Exception as e:  # record, keep going: one broken benchmark must not hide others
            failed = True
            traceback.print_exc()
            rows.append(
                {
                    "name": name,
                    "provider": "-",
                    "shape": "-",
                    "dtype": "-",
                    "status": f"error: {type(e).__name__}: {e}"[:300],
                }
            )
        # Written after every module, so a run cut short still leaves what it measured.
        writing[0] = True
        base, md = write(rows, out, a.device, a.quick, info)
        writing[0] = False
    set_deadline(None)  # a later in-process caller starts without a budget
    signal.signal(signal.SIGTERM, prev_term)
    print(md)
    print(f"wrote {base}.json and {base}.md", file=sys.stderr)
    return 1 if failed else 0


def write(rows: list[dict], out: str, device: str, quick: bool, info: dict) -> tuple[str, str]:
    ratios(rows)
    fractions(rows)
    kind = "gpu" if device.startswith("cuda") else "cpu"
    stamp = datetime.date.today().isoformat()
    base = os.path.join(out, f"{kind}-{stamp}{'-quick' if quick else ''}")
    with open(base + ".json", "w") as f:
        json.dump({"machine": info, "quick": quick, "rows": rows}, f, indent=1)
    md = f"Machine: {info['device']}, torch {info['torch']}, commit {info['commit']}\n\n"
    md += table(rows) + "\n"
    with open(base + ".md", "w") as f:
        f.write(md)
    return base, md


if __name__ == "__main__":
    sys.exit(main())
