"""Seeds every test and runs the Triton kernels in the interpreter when there is no GPU."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere: it selects the CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# On a GPU, attention autotunes its tiles at the first call of each shape class (one compile
# per candidate): tests run the default tiles, tests/ops/test_attention.py checks every
# candidate and the autotuner itself explicitly.
os.environ.setdefault("DLM_KERNELS_AUTOTUNE", "0")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed(request):
    # A fresh seed per test (derived from its id) so that no test depends on another's RNG use.
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    yield


_FAILLOG = os.environ.get("DLM_TEST_FAILLOG")


def pytest_runtest_logreport(report):
    # benchmarks/gpu_check.sh: each failure is written down when it happens. Its test run
    # stops at a time budget, and an interrupted pytest-xdist run prints no summary (session 9
    # lost the name of its one failure that way). The controller writes (workers forward it
    # their reports); a worker would write each failure twice.
    if _FAILLOG and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(_FAILLOG, "a") as f:
            f.write(f"FAILED {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n\n")
