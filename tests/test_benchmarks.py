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
        if r["status"] == "ok":
            assert r["ms"] > 0


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
