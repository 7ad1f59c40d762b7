"""The benchmark code runs at toy sizes so that it cannot rot (no timing is asserted)."""

import json

import pytest

from benchmarks import run as bench_run


@pytest.mark.parametrize("name", bench_run.BENCHES)
def test_benchmark_runs_at_toy_size(name, tmp_path):
    rc = bench_run.main(["--quick", "--device", "cpu", "--only", name, "--out", str(tmp_path),
                         "--no-ceilings"])  # fmt: skip
    files = list(tmp_path.glob("cpu-*-quick.json"))
    assert len(files) == 1
    rows = json.loads(files[0].read_text())["rows"]
    assert rc == 0, [r["status"] for r in rows if r["status"].startswith("error")]
    assert rows, "a benchmark must produce rows"
    for r in rows:
        assert {"name", "provider", "shape", "dtype", "status"} <= set(r)
        # A peer may be missing or not support a case; only an error of our own code fails.
        assert not r["status"].startswith("error"), r
        # The benchmarks' own correctness checks: a ratio is worth nothing if the outputs differ.
        if r.get("dtype") == "float32":
            assert r.get("token_agreement_vs_reference", 1.0) == 1.0, r
        for k in ("loss_rel_diff_vs_eager", "loss_rel_diff_vs_gather_eager"):
            assert r.get(k, 0.0) < 1e-5, r
        if r["status"] == "ok":
            assert r["ms"] > 0


def test_sigterm_keeps_what_was_measured(tmp_path, monkeypatch):
    # gpu_check.sh's backstop `timeout` sends SIGTERM: the case in flight stops, the module
    # returns its rows, the rest are "skipped", the JSON is written, main returns, and the
    # previous SIGTERM handler is back. Two stand-in modules, no real benchmark.
    import os
    import signal
    import sys
    import types

    from benchmarks import common

    def fake(quick, device):
        rows = []
        for i in range(5):
            r = dict(name="fake", provider="p", shape=str(i), dtype="-", status="ok", ms=1.0)
            try:
                common.check_time()
                if i == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
                    for _ in range(100):  # the handler runs at the next bytecode
                        pass
            except common.OutOfTime as e:
                r = {**r, "status": f"error: OutOfTime: {e}", "ms": None}
            rows.append(r)
        return rows

    def after(quick, device):
        common.check_time()
        return [dict(name="after", provider="p", shape="-", dtype="-", status="ok", ms=1.0)]

    for name, fn in (("bench_fake_term", fake), ("bench_fake_after", after)):
        mod = types.ModuleType(f"benchmarks.{name}")
        mod.run = fn
        monkeypatch.setitem(sys.modules, f"benchmarks.{name}", mod)
    prev = signal.getsignal(signal.SIGTERM)
    rc = bench_run.main(["--quick", "--device", "cpu", "--only", "bench_fake_term",
                         "bench_fake_after", "--out", str(tmp_path), "--no-ceilings"])  # fmt: skip
    assert rc == 0 and signal.getsignal(signal.SIGTERM) is prev
    (path,) = tmp_path.glob("cpu-*-quick.json")
    got = [(r["name"], r["shape"], r["status"]) for r in json.loads(path.read_text())["rows"]]
    skipped = "skipped: time budget"
    assert got == [("fake", "0", "ok"), ("fake", "1", "ok"), ("fake", "2", skipped),
                   ("fake", "3", skipped), ("fake", "4", skipped),
                   ("bench_fake_after", "-", skipped)]  # fmt: skip
    common.check_time()  # the expiry does not outlive the run


def test_ceilings_and_plots(tmp_path):
    rc = bench_run.main(["--quick", "--device", "cpu", "--only", "bench_cross_entropy",
                         "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    (path,) = tmp_path.glob("cpu-*-quick.json")
    rows = json.loads(path.read_text())["rows"]
    assert any(r["name"] == "ceiling: copy" and r["gbps"] > 0 for r in rows)
    assert any("frac_of_copy_bw" in r for r in rows)
    from benchmarks import plot

    pngs = plot.plot(str(path))
    assert pngs and all(p.endswith(".png") for p in pngs)


def test_rows_timed_before_the_deadline_are_kept(monkeypatch):
    # The budget runs out while a case is being timed: its timing loop stops with what it
    # measured, and the peak-memory step after it must give None, not raise OutOfTime and lose
    # the measured rows.
    from benchmarks import bench_likelihood, common

    real = bench_likelihood.time_fns

    def then_expire(*args, **kwargs):
        out = real(*args, **kwargs)
        common.expire()
        return out

    monkeypatch.setattr(bench_likelihood, "time_fns", then_expire)
    try:
        rows = bench_likelihood.run(quick=True, device="cpu")
        # The GPU modules' peak step, still past the deadline: None, not OutOfTime.
        assert common.peak_memory_mb(lambda: None, "cpu") is None
    finally:
        common.set_deadline(None)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(r["ms"] > 0 and r.get("peak_mem_mb") is None for r in rows)


def test_cpu_timing_repeats_cheap_calls(monkeypatch):
    # CPU timings take at least 7 samples (1 with --quick); a cheap call goes on to 50 so that
    # its median is not a handful of a shared machine's noisy samples; a slow one stops at 7.
    from benchmarks import common

    monkeypatch.setattr(common, "_MIN_SECONDS", 60.0)  # every call counts as cheap
    calls = []
    common.time_fn(lambda: calls.append(1), "cpu")
    assert len(calls) == 1 + common._MAX_REPS  # the warm-up, then every repetition
    calls.clear()
    common.time_fn(lambda: calls.append(1), "cpu", quick=True)
    assert len(calls) == 2
    monkeypatch.setattr(common, "_MIN_SECONDS", 0.0)  # every call counts as slow
    calls.clear()
    common.time_fn(lambda: calls.append(1), "cpu")
    assert len(calls) == 1 + common._MIN_REPS
    counts = [[], []]
    out = common.time_fns([lambda: counts[0].append(1), lambda: counts[1].append(1)], "cpu")
    assert [len(c) for c in counts] == [1 + common._MIN_REPS] * 2 and len(out) == 2
    monkeypatch.setattr(common, "_MIN_SECONDS", 60.0)
    counts = [[], []]
    common.time_fns([lambda: counts[0].append(1), lambda: counts[1].append(1)], "cpu")
    assert [len(c) for c in counts] == [1 + common._MAX_REPS] * 2


def test_cuda_runs_attention_first():
    # On CUDA attention's compiles need the start of the budget (a last module is left what the
    # others did not spend); the CPU order is the list's.
    names = list(bench_run.BENCHES)
    cuda = bench_run.order(names, "cuda:0")
    assert cuda[0] == "bench_attention" and sorted(cuda) == sorted(names)
    assert bench_run.order(names, "cpu") == names
    assert bench_run.order(["bench_sample"], "cuda") == ["bench_sample"]


def test_sample_gpu_order_reaches_every_case_core_rows_before_any_cache_row():
    """Session 15's GPU run spent the sampler's budget on batch 8's cache rows and skipped all
    of batch 1: the core rows (baseline, eager, graphed) of every case come first."""
    from benchmarks.bench_sample import gpu_order

    cases = [(["b8-torch", "b8-dlm", "b8-graph"], ["b8-dual", "b8-prefix"]),
             (["b1-torch", "b1-dlm", "b1-graph"], ["b1-dual", "b1-prefix"])]  # fmt: skip
    want = ["b8-torch", "b8-dlm", "b8-graph", "b1-torch", "b1-dlm", "b1-graph", "b8-dual",
            "b8-prefix", "b1-dual", "b1-prefix"]  # fmt: skip
    assert gpu_order(cases) == want


def test_attention_rows_name_sdpas_backend_and_pin_flash_for_the_goal():
    # Issue 5's goal is against SDPA's flash backend; SDPA as a user calls it may pick another
    # (cuDNN on Hopper). Its rows say which; the pinned rows time the named backends, unmasked.
    from benchmarks import bench_attention

    rows = bench_attention.run(quick=True, device="cpu")
    sdpa = [r for r in rows if r["provider"] == "sdpa"]
    assert sdpa and all(r["backend"] == "FLASH_ATTENTION" for r in sdpa)  # CPU: its flash kernel
    pinned = [r for r in rows if r["provider"] in bench_attention.PINNED]
    assert {r["mask"] for r in pinned} == {"none"}
    by = {(r["provider"], r["mode"]): r for r in pinned}
    assert all(by["sdpa_flash", m]["status"] == "ok" for m in bench_attention.MODES)
    # No cuDNN on a CPU: reported as unsupported (never as an error or a time).
    assert all(
        by["sdpa_cudnn", m]["status"].startswith("unsupported") for m in bench_attention.MODES
    )
    assert "backend" in bench_run.table(rows).splitlines()[0]


def test_pytest_benchmark_suite_runs_at_toy_size():
    # benchmarks/pytest_suite.py (make bench's pytest-benchmark part), once per case, toy shapes:
    # its own checks (our output against the baseline's) run; no timing.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DLM_BENCH_TOY": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(root / "benchmarks" / "pytest_suite.py"), "--benchmark-disable"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-500:]


def test_profile_tables_run_at_toy_size():
    # benchmarks/profile_gpu.py (gpu_check.sh's last step): every case and provider gives a
    # table, none an error.
    from benchmarks import profile_gpu

    text = profile_gpu.run("cpu", quick=True, budget_s=600)
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert len(sections) == 8 and all(s.endswith("(3 calls)") for s in sections), sections
