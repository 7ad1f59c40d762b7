"""Seeds every test and runs the Triton kernels in the interpreter when there is no GPU."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere: it selects the CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed(request):
    # A fresh seed per test (derived from its id) so that no test depends on another's RNG use.
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    yield
