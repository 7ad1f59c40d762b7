"""Timing and memory helpers shared by every benchmark.

GPU: triton.testing.do_bench (median and quantiles over many launches, L2 flushed between).
CPU: wall-clock over repeated calls with time.perf_counter (median, p20, p80).
Peak memory: torch.cuda.max_memory_allocated on GPU; on CPU the growth of the process's peak
resident set (ru_maxrss), measured in a fresh child process per case when ``isolate`` is used.
Every figure is reported next to a baseline measured in the same process and run.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class OutOfTime(RuntimeError):
    """A benchmark module ran past the time budget that benchmarks.run gave it."""


_DEADLINE = float("inf")
_EXPIRED = False  # set by expire(): no later deadline revives the run


def set_deadline(seconds_from_now: float | None) -> None:
    """Give the cases that follow a budget; ``time_fn`` raises OutOfTime once it is spent.
    None: no budget, and an expire() is forgotten (a later in-process run starts afresh)."""
    global _DEADLINE, _EXPIRED
    _DEADLINE = float("inf") if seconds_from_now is None else time.monotonic() + seconds_from_now
    if seconds_from_now is None:
        _EXPIRED = False


def expire() -> None:
    """Spend every budget now and for good (benchmarks.run's SIGTERM handler): each later
    check_time raises, so the modules record their remaining cases as skipped and return."""
    global _EXPIRED
    _EXPIRED = True


def past_deadline() -> bool:
    """The budget ran out during a case: its timing loop keeps the rounds measured so far
    (at least one) instead of running all its repetitions past the module's share."""
    return _EXPIRED or time.monotonic() > _DEADLINE


def check_time() -> None:
    """Raise OutOfTime when the budget is spent (call before any costly set-up of a case)."""
    if _EXPIRED or time.monotonic() > _DEADLINE:
        raise OutOfTime("time budget spent: case not run")


# CPU repetitions: at least _MIN_REPS (1 with --quick); calls of a few ms go on until each
# callable has run for _MIN_SECONDS or _MAX_REPS times, so that the median of a cheap op is not
# 7 samples of a shared 2-core machine's noise (session 12 saw 2x between runs of one op).
_MIN_REPS, _MAX_REPS, _MIN_SECONDS = 7, 50, 0.3
# A slow call (a baseline chain of seconds) stops at 3 repetitions once it has run this long,
# so that one slow baseline does not take the time of the cases after it.
_SLOW_SECONDS = 10.0


def _more_reps(quick: bool, done: int, seconds: float) -> bool:
    """Whether a CPU timing loop runs another repetition, ``done`` of them so far having taken
    ``seconds`` (per callable)."""
    if quick:
        return done < 1
    return done < _MIN_REPS or (done < _MAX_REPS and seconds < _MIN_SECONDS)


def time_fn(fn: Callable[[], object], device: str, *, quick: bool = False) -> dict:
    """Median / p20 / p80 milliseconds of ``fn()``."""
    check_time()
    if device.startswith("cuda"):
        import triton.testing

        # A call of a second or more (a whole generate loop) would cost do_bench 7 calls (5 to
        # estimate, 1 warm-up, 1 timed): one warm-up call, then 3 timed ones. Decided from the
        # second call: the first may compile or autotune for seconds.
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        first_ms = (time.perf_counter() - t0) * 1e3
        if first_ms > 250:
            times = [first_ms]
            for _ in range(0 if quick else 2):
                if past_deadline():
                    break
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
            times.sort()
            return {"ms": statistics.median(times), "ms_p20": times[0], "ms_p80": times[-1]}
        ms = triton.testing.do_bench(
            fn, warmup=5 if quick else 25, rep=20 if quick else 100, quantiles=[0.5, 0.2, 0.8]
        )
        return {"ms": ms[0], "ms_p20": ms[1], "ms_p80": ms[2]}
    fn()  # warm-up (allocator, first-call dispatch)
    times = []
    start = time.perf_counter()
    budget = start + (0.5 if quick else _SLOW_SECONDS)
    while _more_reps(quick, len(times), time.perf_counter() - start):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if (time.perf_counter() > budget and len(times) >= 3) or past_deadline():
            break
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return {"ms": statistics.median(times), "ms_p20": q[0], "ms_p80": q[3]}


def time_fns(fns: list[Callable[[], object]], device: str, *, quick: bool = False) -> list[dict]:
    """``time_fn`` of several callables, interleaved on the CPU (one call of each per round), so
    that a load change on a shared machine hits every provider alike; on CUDA, one by one.
    Interleaving also means each call finds the caches as the others left them: where a
    baseline sweeps hundreds of MB, an op over inputs that real use has just written (a
    sampler's logits) is timed one by one (time_fn) instead."""
    if device.startswith("cuda") or len(fns) < 2:
        return [time_fn(fn, device, quick=quick) for fn in fns]
    check_time()
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    budget = start + (0.5 if quick else _SLOW_SECONDS) * len(fns)
    while _more_reps(quick, len(times[0]), (time.perf_counter() - start) / len(fns)):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append((time.perf_counter() - t0) * 1e3)
        if (time.perf_counter() > budget and len(times[0]) >= 3) or past_deadline():
            break
    out = []
    for ts in times:
        ts.sort()
        q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else [ts[0]] * 4
        out.append({"ms": statistics.median(ts), "ms_p20": q[0], "ms_p80": q[3]})
    return out


def peak_memory_mb(fn: Callable[[], object], device: str, grads=()) -> float | None:
    """Peak extra memory of one call of ``fn`` in MB (GPU: allocator peak above the baseline).
    None once the budget is spent: the timing just measured (its loop stopped at the deadline)
    is kept without this figure rather than lost to OutOfTime.

    grads: leaf tensors whose ``.grad`` is dropped before the baseline is read, so that the
    gradients the call writes count in its peak (a gradient left by the timing loop would
    otherwise sit in the baseline, and the call's own would replace it unseen); the CPU child
    processes do the same."""
    if past_deadline():
        return None
    for t in grads:
        t.grad = None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return None  # CPU peaks need a fresh process: see rss_peak_mb


def status_kb(key: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM): CPU peak memory in a child process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


def standalone_args(doc: str, argv=None):
    """The --device / --quick / --json arguments of a benchmark module run on its own."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None, help="write the rows here")
    return p.parse_args(argv)


def vs_baseline(rows: list[dict], baseline: str = "torch"):
    """(row, "1.23x" against the baseline's time for its shape, or the row's status), for a
    module run on its own to print."""
    base = {r["shape"]: r["ms"] for r in rows if r["provider"] == baseline and r["status"] == "ok"}
    for r in rows:
        ok = r["status"] == "ok" and r["shape"] in base
        yield r, (f"{base[r['shape']] / r['ms']:.2f}x" if ok else r["status"])


def save_rows(path: str | None, rows: list[dict]) -> None:
    """A module run on its own with --json: its rows and the machine, as benchmarks.run writes."""
    if path:
        import json

        with open(path, "w") as f:
            json.dump({"machine": machine(), "rows": rows}, f, indent=1)


def rss_peak_mb() -> float:
    """This process's peak resident set size in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    """Device name and versions, for every results file."""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = info["cpu"]
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)), check=False,
        ).stdout.strip() or None  # fmt: skip
    except OSError:
        info["commit"] = None
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


_COMPILED: dict = {}


def compiled(fn: Callable):
    """torch.compile(fn, dynamic=False), built once per function: the compile peer of a bench."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def row(name: str, provider: str, shape: str, dtype, timing: dict | None, **extra) -> dict:
    """One result row; a provider that could not run has timing None and a status saying why."""
    out = {
        "name": name,
        "provider": provider,
        "shape": shape,
        "dtype": str(dtype).replace("torch.", ""),
        "status": "ok" if timing else extra.pop("status", "missing"),
    }
    if timing:
        out.update(timing)
    out.update(extra)
    return out
