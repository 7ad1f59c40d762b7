"""The dlm tests use tiny models: one thread each.

With two threads, every small op waits at an OpenMP barrier for the other thread; on a machine
shared with other jobs that thread is often descheduled and a tiny training step took ~15x longer
(measured on the 2-core CI box under load). Restored after each test.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
